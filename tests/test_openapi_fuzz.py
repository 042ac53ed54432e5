"""Schemathesis walks the served /v1/openapi.json against the live server, on both databases.

It runs the `schemathesis run` CLI (examples, coverage, fuzzing and stateful phases; positive and negative
data, NUL bytes included) with every check except `positive_data_acceptance`, whose premise — every
schema-valid input is accepted — the API deliberately breaks in two documented ways: cursors are opaque
tokens (a made-up one is a 422), and strings holding NUL are refused (PostgreSQL cannot store them; the
schema cannot say so for free-form metadata). The checks that do run include `not_a_server_error`,
`response_schema_conformance`, `status_code_conformance`, `negative_data_rejection`, `ignored_auth`,
`use_after_free` and `unsupported_method`.

The pytest plugin's lazy loader (`schemathesis.pytest.from_fixture`) does not work with pytest 9 (it reads
`request.node._nodeid`), hence the CLI. The seed is random per run and printed; pin it with
SPEECHPIPE_FUZZ_SEED to replay a failure.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_db import LiveServer

EXAMPLES_PER_OPERATION = 40
SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


def _seed_sessions(server: LiveServer, wav: Path) -> None:
    """Sessions with turns and a recording, so the stateful phase's links reach real data."""
    store = server.store
    data = wav.read_bytes()
    pipe = store.create_pipe({"agent_id": "fuzz-bot"}, name="fuzz")
    for n in range(3):
        sid = store.create_session(pipe.id, "fuzz-bot", ("web", "inbound_phone")[n % 2], metadata={"n": n})
        store.add_turn(sid, 0, "user", "hello", 0, 700)
        store.add_turn(sid, 1, "agent", "hi, how can I help?", 900, 2100, interrupted=True, heard_text="hi,")
        store.add_recording(sid, str(wav), "wav", 22050, 1, 2.0, len(data), hashlib.sha256(data).hexdigest())
        if n:
            store.end_session(sid, "client_closed", metrics={"turns": 2})


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(live_server: LiveServer, speech_wav: Path,
                                                                    tmp_path: Path) -> None:
    _seed_sessions(live_server, speech_wav)
    seed = int(os.environ.get("SPEECHPIPE_FUZZ_SEED") or random.randrange(1, 2**31))
    cmd = [
        SCHEMATHESIS, "run", f"{live_server.url}/v1/openapi.json",
        "--header", f"Authorization: Bearer {live_server.api_key}",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", str(seed), "--workers", "1",
        "--request-timeout", "30", "--suppress-health-check", "too_slow",
    ]
    env = {**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    replay = f"seed {seed}; replay with SPEECHPIPE_FUZZ_SEED={seed}"
    assert proc.returncode == 0, f"schemathesis failed ({replay}):\n" + output[-20000:]
    # The run really exercised the API: every operation was tested and none was left unreachable.
    assert "Selected: 11/11" in output or "Selected: 12/12" in output, output[-3000:]
    assert "Tested: 11" in output or "Tested: 12" in output, output[-3000:]
