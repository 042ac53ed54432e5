"""The native Asterisk path: `asterisk/entrypoint.sh --render` output agrees with the product's settings for
any worker count and port base, and every way the two sides can disagree fails loudly.

No Asterisk runs here (CI has none): the real renderer writes the files, the tests parse them the way
tests/test_compose_config.py does and compare them with what `Settings` / `SipConfig` derive from the same
environment file a user writes (docs/telephony.md, "Native Asterisk").
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest

from speechpipe.errors import ConfigError
from speechpipe.settings import Settings
from speechpipe.telephony import pbx_check
from speechpipe.telephony.config import SipConfig
from speechpipe.telephony.endpoint import CODECS
from speechpipe.telephony.supervisor import SipSupervisor
from tests.test_compose_config import AST, ROOT, dialplan, resolved

# What docs/telephony.md tells a native user to put in speechpipe-sip.env (one file both sides read).
NATIVE_ENV = {
    "SPEECHPIPE_SIP_WORKERS": "3",
    "SPEECHPIPE_SIP_PORT_BASE": "6000",
    "SPEECHPIPE_SIP_HOST": "127.0.0.1",
    "SOFTPHONE_1001_PASSWORD": "native-1001-secret",
    "SOFTPHONE_1002_PASSWORD": "native-1002-secret",
    "ASTERISK_EXTERNAL_ADDR": "192.0.2.10",
    "ASTERISK_LOCAL_NET": "192.0.2.0/24",
}


def render(dst: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(AST / "entrypoint.sh"), "--render", str(AST), str(dst)],
                          env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True)


@pytest.fixture
def native(tmp_path: Path) -> Path:
    out = tmp_path / "etc-asterisk"
    done = render(out, NATIVE_ENV)
    assert done.returncode == 0, done.stderr
    return out


def test_native_render_matches_the_settings_from_the_same_env_file(native: Path) -> None:
    settings = Settings.from_env(NATIVE_ENV)
    workers = [SipConfig.from_env(i, settings.sip_port_base, NATIVE_ENV) for i in range(settings.sip_workers)]
    assert settings.sip_workers == 3 and settings.sip_port_base == 6000
    secs = resolved((native / "pjsip.conf").read_text())
    aors = {n: s for n, s in secs if s.get("type") == "aor" and n.startswith("speechpipe-w")}
    endpoints = {n: s for n, s in secs if s.get("type") == "endpoint" and n.startswith("speechpipe-w")}
    assert sorted(aors) == sorted(endpoints) == [f"speechpipe-w{i}" for i in range(3)]
    for i, w in enumerate(workers):
        # the worker binds SPEECHPIPE_SIP_HOST:port; Asterisk calls exactly that
        assert aors[f"speechpipe-w{i}"]["contact"] == f"sip:speechpipe@{w.host}:{w.port}"
        assert w.port == 6000 + i
    plan = dialplan((native / "extensions.conf").read_text())
    glob = dict(resolved((native / "extensions.conf").read_text()))["globals"]
    assert glob["SPEECHPIPE_SIP_WORKERS"] == "3"
    assert "Dial(PJSIP/${ARG1}@speechpipe-w${W}" in " ".join(plan["speechpipe-hunt"]["s"])
    # codecs: what Asterisk may offer a worker is what the worker speaks, wideband first
    names = {"g722": "G722", "ulaw": "PCMU", "alaw": "PCMA"}
    ours = [c.split("/")[0] for c in CODECS]
    for name, sec in endpoints.items():
        allowed = [a.strip() for a in sec["allow"].split(",")]
        assert [names[a] for a in allowed] == ours, name
    # the transport and the secrets came through
    transport = dict(secs)["transport-udp"]
    assert transport["local_net"] == NATIVE_ENV["ASTERISK_LOCAL_NET"]
    assert transport["external_media_address"] == NATIVE_ENV["ASTERISK_EXTERNAL_ADDR"]
    assert not list(native.glob(".speechpipe-render*"))  # no scratch folder left behind
    # and the start-up check agrees
    assert pbx_check.problems(native, settings.sip_workers, settings.sip_port_base) == []
    pbx_check.check_at_start(settings, 3, 6000, {"SPEECHPIPE_SIP_PBX_CONF": str(native)})


def test_port_base_defaults_to_the_products_default(tmp_path: Path) -> None:
    env = {k: v for k, v in NATIVE_ENV.items() if k != "SPEECHPIPE_SIP_PORT_BASE"}
    assert render(tmp_path, env).returncode == 0
    assert pbx_check.pbx_workers(tmp_path)[0] == {i: ("127.0.0.1", Settings().sip_port_base + i)
                                                  for i in range(3)}


@pytest.mark.parametrize("workers, message", [
    (None, "SPEECHPIPE_SIP_WORKERS is not set"),
    ("", "SPEECHPIPE_SIP_WORKERS is not set"),
    ("two", "must be a whole number"),
    ("0", "between 1 and 64"),
])
def test_the_renderer_refuses_a_missing_or_bad_worker_count(tmp_path: Path, workers: str | None,
                                                            message: str) -> None:
    env = {k: v for k, v in NATIVE_ENV.items() if k != "SPEECHPIPE_SIP_WORKERS"}
    if workers is not None:
        env["SPEECHPIPE_SIP_WORKERS"] = workers
    dst = tmp_path / "out"
    done = render(dst, env)
    assert done.returncode != 0 and message in done.stderr
    assert not dst.exists() or not list(dst.iterdir())


def test_a_failed_render_leaves_the_old_configuration_alone(native: Path) -> None:
    before = {p.name: p.read_text() for p in native.iterdir()}
    env = {**NATIVE_ENV, "SPEECHPIPE_SIP_WORKERS": "5"}
    del env["SOFTPHONE_1002_PASSWORD"]
    done = render(native, env)
    assert done.returncode != 0 and "SOFTPHONE_1002_PASSWORD" in done.stderr
    assert {p.name: p.read_text() for p in native.iterdir()} == before  # not half-updated


def test_a_worker_count_mismatch_is_an_error_at_start(native: Path) -> None:
    found = pbx_check.problems(native, 2, 6000)
    assert any("Asterisk has 3 speechpipe-wN endpoint(s), Speech Pipe runs 2" in p for p in found)
    assert any("hunts over SPEECHPIPE_SIP_WORKERS=3" in p for p in found)
    ports = pbx_check.problems(native, 3, 5080)
    assert any("speechpipe-w0 calls port 6000" in p and "5080" in p for p in ports)
    with pytest.raises(ConfigError, match="does not match this server's SIP workers"):
        pbx_check.check_at_start(Settings(), 2, 6000, {"SPEECHPIPE_SIP_PBX_CONF": str(native)})
    # an unrendered extensions.conf (placeholder still there) is a mismatch too
    ext = native / "extensions.conf"
    ext.write_text(ext.read_text().replace("SPEECHPIPE_SIP_WORKERS=3", "SPEECHPIPE_SIP_WORKERS=@X@"))
    assert any("hunts over SPEECHPIPE_SIP_WORKERS=-1" in p for p in pbx_check.problems(native, 3, 6000))


def test_serve_refuses_to_start_workers_against_a_mismatched_pbx(native: Path, tmp_path: Path) -> None:
    settings = Settings.from_env({**NATIVE_ENV, "SPEECHPIPE_SIP_WORKERS": "2",
                                  "SPEECHPIPE_DATA_DIR": str(tmp_path)})
    sup = SipSupervisor(settings, env={"SPEECHPIPE_SIP_PBX_CONF": str(native)})

    async def start() -> None:
        await sup.start(wait_ready_s=None)

    with pytest.raises(ConfigError, match="Asterisk has 3 speechpipe-wN endpoint"):
        asyncio.run(start())
    assert all(s.proc is None and s.task is None for s in sup.slots)  # no worker was started


def test_pbx_check_cli_exits_nonzero_on_a_mismatch(native: Path, tmp_path: Path) -> None:
    import os
    import sys

    base = {"PATH": os.environ["PATH"], "SPEECHPIPE_DATA_DIR": str(tmp_path)}
    ok = subprocess.run([sys.executable, "-m", "speechpipe.telephony.pbx_check", str(native)],
                        env={**base, **NATIVE_ENV}, capture_output=True, text=True)
    assert ok.returncode == 0 and "ok: 3 worker(s) from port 6000" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "speechpipe.telephony.pbx_check", str(native)],
                         env={**base, **NATIVE_ENV, "SPEECHPIPE_SIP_WORKERS": "4"}, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "mismatch:" in bad.stderr and "Speech Pipe runs 4" in bad.stderr


def test_the_hunt_header_names_a_mismatch() -> None:
    assert pbx_check.hunt_mismatch(None, 0, 2) is None  # another PBX need not send it
    assert pbx_check.hunt_mismatch("1/2", 1, 2) is None
    assert "hunts over 3 worker(s) but Speech Pipe runs 2" in (pbx_check.hunt_mismatch("1/3", 1, 2) or "")
    assert "sent worker 0's call to worker 1" in (pbx_check.hunt_mismatch("0/2", 1, 2) or "")
    assert "malformed" in (pbx_check.hunt_mismatch("x" * 500, 0, 2) or "")


def test_the_native_docs_name_every_variable_the_renderer_needs() -> None:
    docs = (ROOT / "docs" / "telephony.md").read_text()
    native = docs[docs.index("## Native Asterisk"):]
    needed = set(re.findall(r"\$\{([A-Z0-9_]+)\}", (AST / "pjsip.conf").read_text()))
    needed |= set(re.findall(r"@([A-Z0-9_]+)@", (AST / "extensions.conf").read_text()))
    needed |= {"SPEECHPIPE_SIP_WORKERS", "SPEECHPIPE_SIP_PORT_BASE", "SPEECHPIPE_SIP_HOST",
               pbx_check.ENV_VAR}
    assert needed <= set(re.findall(r"\b[A-Z][A-Z0-9_]{3,}\b", native)), needed - set(
        re.findall(r"\b[A-Z][A-Z0-9_]{3,}\b", native))
    assert "entrypoint.sh --render" in native
