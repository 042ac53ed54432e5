"""Demo mode's fixtures: one API key and one pipe bound to agent `demo-echo`, remembered across runs.
Both live in the `default` workspace (a demo runner registers with the demo key, so it serves that pipe).

The demo key's secret is shown once like any key, so it is also kept in `<data_dir>/demo.json` (mode 0600)
for `speechpipe demo` / `serve --demo` to print again later. If the database no longer has the key or pipe
(deleted, revoked, another database URL), fresh ones are made and the file is rewritten.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from speechpipe.errors import SpeechPipeError
from speechpipe.storage.store import Store

DEMO_AGENT_ID = "demo-echo"
DEMO_FILE = "demo.json"


@dataclass(frozen=True)
class DemoInfo:
    api_key_id: str
    api_key: str
    pipe_id: str
    agent_id: str = DEMO_AGENT_ID
    created_key: bool = False
    created_pipe: bool = False


def ensure_demo(store: Store, data_dir: Path) -> DemoInfo:
    path = data_dir / DEMO_FILE
    saved: dict[str, str] = {}
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}

    workspace_id = store.default_workspace_id()
    key_id, secret, created_key = saved.get("api_key_id"), saved.get("api_key"), False
    try:
        if not (key_id and secret):
            raise LookupError
        key = store.verify_api_key(secret)
        if key.id != key_id or key.workspace_id != workspace_id:
            raise LookupError
    except (SpeechPipeError, LookupError):
        new = store.create_api_key("demo")
        key_id, secret, created_key = new.key.id, new.secret, True

    pipe_id, created_pipe = saved.get("pipe_id"), False
    try:
        if not pipe_id or store.get_pipe(pipe_id, workspace_id=workspace_id).agent_id != DEMO_AGENT_ID:
            raise LookupError
    except (SpeechPipeError, LookupError):
        pipe_id, created_pipe = store.create_pipe({"agent_id": DEMO_AGENT_ID}, name="demo",
                                                  workspace_id=workspace_id).id, True

    info = DemoInfo(api_key_id=key_id, api_key=secret, pipe_id=pipe_id, created_key=created_key,
                    created_pipe=created_pipe)
    if created_key or created_pipe:
        _write_private(path, {k: v for k, v in asdict(info).items() if not k.startswith("created")})
    return info


def _write_private(path: Path, data: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
