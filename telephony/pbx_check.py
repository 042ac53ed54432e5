"""Do the PBX and Speech Pipe agree on the media workers? Checked at start and on every call.

Asterisk hunts over `speechpipe-w0 .. speechpipe-w(N-1)` (asterisk/pjsip.conf, rendered by
asterisk/entrypoint.sh from SPEECHPIPE_SIP_WORKERS / SPEECHPIPE_SIP_PORT_BASE / SPEECHPIPE_SIP_HOST) and
`speechpipe serve` starts its own SPEECHPIPE_SIP_WORKERS workers. If the two numbers differ, some workers
never get a call or some calls go to ports nobody listens on. Two checks make that loud:

- at start: with `SPEECHPIPE_SIP_PBX_CONF` set to the rendered Asterisk folder (or its pjsip.conf), `serve`
  compares that configuration with its own settings and refuses to start on a mismatch. Standalone:
  `python -m speechpipe.telephony.pbx_check /etc/asterisk` (exit 1 and one line per problem);
- on every call: the dialplan adds `X-SpeechPipe-Hunt: <index>/<workers>` to each INVITE it sends a
  worker; a worker whose own index or count differs logs an error and /healthz turns to `error`
  (`pbx_mismatch`), so a PBX on another machine cannot disagree unnoticed either.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from speechpipe.errors import ConfigError
from speechpipe.settings import Settings

ENV_VAR = "SPEECHPIPE_SIP_PBX_CONF"
HUNT_HEADER = "X-SpeechPipe-Hunt"
_WORKER = re.compile(r"speechpipe-w(\d+)")
_CONTACT = re.compile(r"sip:[^@]+@(\[[^\]]+\]|[^:;>]+):(\d+)")


def _sections(text: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """Asterisk config text → [(section, templates, {key: last value})]; `;` comments, `=>` as `=`."""
    out: list[tuple[str, list[str], dict[str, str]]] = []
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"\[([^\]]+)\](?:\(([^)]*)\))?", line)
        if m:
            out.append((m.group(1), [t.strip() for t in (m.group(2) or "").split(",") if t.strip()], {}))
        elif out and "=" in line:
            key, _, value = line.partition("=")
            out[-1][2][key.strip()] = value.lstrip(">").strip()
    return out


def pbx_workers(conf: Path) -> tuple[dict[int, tuple[str, int]], int | None]:
    """From a rendered Asterisk folder (or its pjsip.conf): {worker index: (host, port)} of the
    speechpipe-wN contacts, and extensions.conf's SPEECHPIPE_SIP_WORKERS global (None if absent)."""
    folder = conf if conf.is_dir() else conf.parent
    pjsip = conf / "pjsip.conf" if conf.is_dir() else conf
    if not pjsip.is_file():
        raise ConfigError(f"{ENV_VAR}: no pjsip.conf at {pjsip}")
    workers: dict[int, tuple[str, int]] = {}
    for name, _tpls, keys in _sections(pjsip.read_text(errors="replace")):
        m = _WORKER.fullmatch(name)
        if m and "contact" in keys and (c := _CONTACT.match(keys["contact"])):
            workers[int(m.group(1))] = (c.group(1), int(c.group(2)))
    hunt: int | None = None
    ext = folder / "extensions.conf"
    if ext.is_file():
        for name, _tpls, keys in _sections(ext.read_text(errors="replace")):
            if name == "globals" and "SPEECHPIPE_SIP_WORKERS" in keys:
                raw = keys["SPEECHPIPE_SIP_WORKERS"]
                hunt = int(raw) if raw.isdigit() else -1
    return workers, hunt


def problems(conf: Path, workers: int, port_base: int) -> list[str]:
    """What differs between the rendered Asterisk configuration at `conf` and `workers` / `port_base`."""
    found, hunt = pbx_workers(conf)
    out: list[str] = []
    if sorted(found) != list(range(len(found))):
        out.append(f"{conf}: speechpipe-wN endpoints are not numbered 0..N-1: {sorted(found)}")
    if workers == 0:
        out.append(f"{conf}: Asterisk has {len(found)} speechpipe-wN endpoint(s), but this environment runs "
                   "no SIP workers (SPEECHPIPE_SIP_WORKERS unset or 0): load the same settings as serve")
    elif len(found) != workers:
        out.append(f"{conf}: Asterisk has {len(found)} speechpipe-wN endpoint(s), Speech Pipe runs "
                   f"{workers} worker(s) (SPEECHPIPE_SIP_WORKERS): render it again with "
                   f"SPEECHPIPE_SIP_WORKERS={workers} asterisk/entrypoint.sh --render ...")
    if hunt is None:
        out.append(f"{conf}: extensions.conf has no [globals] SPEECHPIPE_SIP_WORKERS (not rendered by "
                   "asterisk/entrypoint.sh?)")
    elif hunt != workers:
        out.append(f"{conf}: extensions.conf hunts over SPEECHPIPE_SIP_WORKERS={hunt}, Speech Pipe runs "
                   f"{workers}")
    for i, (_host, port) in sorted(found.items()):
        if port != port_base + i:
            out.append(f"{conf}: speechpipe-w{i} calls port {port}, Speech Pipe's worker {i} listens on "
                       f"{port_base + i} (SPEECHPIPE_SIP_PORT_BASE={port_base})")
    return out


def check_at_start(settings: Settings, workers: int, port_base: int,
                   env: Mapping[str, str]) -> None:
    """Raise ConfigError naming every mismatch when `SPEECHPIPE_SIP_PBX_CONF` is set; else nothing."""
    raw = (env.get(ENV_VAR) or "").strip()
    if not raw:
        return
    found = problems(Path(raw).expanduser(), workers, port_base)
    if found:
        raise ConfigError("the PBX configuration does not match this server's SIP workers:\n  "
                          + "\n  ".join(found))


def hunt_mismatch(value: str | None, index: int, workers: int) -> str | None:
    """A problem description when an INVITE's `X-SpeechPipe-Hunt: i/n` disagrees with this worker, else
    None (also when the header is absent: a PBX other than ours need not send it)."""
    if not value:
        return None
    m = re.fullmatch(r"\s*(\d{1,4})\s*/\s*(\d{1,4})\s*", value)
    if m is None:
        return f"{HUNT_HEADER} is malformed: {value[:40]!r}"
    i, n = int(m.group(1)), int(m.group(2))
    if n != workers:
        return (f"the PBX hunts over {n} worker(s) but Speech Pipe runs {workers} (SPEECHPIPE_SIP_WORKERS): "
                "render the Asterisk configuration with the same number")
    if i != index:
        return (f"the PBX sent worker {i}'s call to worker {index}: its speechpipe-wN ports and "
                "SPEECHPIPE_SIP_PORT_BASE differ")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m speechpipe.telephony.pbx_check",
                                description="Compare a rendered Asterisk configuration with this "
                                            "server's SPEECHPIPE_SIP_WORKERS / SPEECHPIPE_SIP_PORT_BASE.")
    p.add_argument("conf", type=Path, help="the rendered Asterisk folder (e.g. /etc/asterisk) or pjsip.conf")
    args = p.parse_args(argv)
    try:
        settings = Settings.from_env()
        found = problems(args.conf, settings.sip_workers, settings.sip_port_base)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in found:
        print(f"mismatch: {line}", file=sys.stderr)
    if found:
        return 1
    print(f"ok: {settings.sip_workers} worker(s) from port {settings.sip_port_base} in {args.conf}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
