"""compose.yaml, the Asterisk configuration and the product's settings must agree.

Nothing here starts a container: the files are parsed (compose variables interpolated the way Compose
does, Asterisk sections with their templates resolved), pjsip.conf is rendered by the real
asterisk/entrypoint.sh, and the values are checked against what `Settings` / `SipConfig` derive from the
same environment: worker ports, worker addresses, RTP ranges, codecs, extensions, credentials by env var.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from speechpipe.pipeline.config import PipeConfig
from speechpipe.settings import Settings
from speechpipe.storage.demo import DEMO_AGENT_ID
from speechpipe.telephony.config import SipConfig
from speechpipe.telephony.endpoint import CODECS

ROOT = Path(__file__).resolve().parent.parent
AST = ROOT / "asterisk"
SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "SOFTPHONE_1001_PASSWORD": "s1001-secret",
           "SOFTPHONE_1002_PASSWORD": "s1002-secret", "ASTERISK_EXTERNAL_ADDR": "192.0.2.7"}
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose-style `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$` in every string of `value`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        val = env.get(name)
        if op in (":-", "-"):
            return val if val else (arg or "")
        if op in (":?", "?") and not val:
            raise KeyError(f"{name}: {arg}")
        return val or ""

    return _VAR.sub(one, value)


def load_compose(env: dict[str, str]) -> dict[str, Any]:
    return interpolate(yaml.safe_load((ROOT / "compose.yaml").read_text()), env)


def sections(text: str) -> list[tuple[str, list[str], dict[str, list[str]]]]:
    """Asterisk config → [(name, templates, {key: [values]})]; `;` starts a comment, `=>` is `=`."""
    out: list[tuple[str, list[str], dict[str, list[str]]]] = []
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"\[([^\]]+)\](?:\(([^)]*)\))?", line)
        if m:
            out.append((m.group(1), [t.strip() for t in (m.group(2) or "").split(",") if t.strip()], {}))
            continue
        key, sep, value = line.partition("=")
        assert sep and out, f"not a key=value line inside a section: {raw!r}"
        out[-1][2].setdefault(key.strip(), []).append(value.lstrip(">").strip())
    return out


def resolved(text: str) -> list[tuple[str, dict[str, str]]]:
    """Non-template sections with their templates' values merged in (last value of each key)."""
    secs = sections(text)
    templates = {name: keys for name, tpls, keys in secs if "!" in tpls}
    out = []
    for name, tpls, keys in secs:
        if "!" in tpls:
            continue
        merged: dict[str, str] = {}
        for t in tpls:
            merged.update({k: v[-1] for k, v in templates[t].items()})
        merged.update({k: v[-1] for k, v in keys.items()})
        out.append((name, merged))
    return out


def dialplan(text: str) -> dict[str, dict[str, list[str]]]:
    """extensions.conf → {context: {pattern: [priority steps, in order]}} (`exten =>` and `same =>`)."""
    plan: dict[str, dict[str, list[str]]] = {}
    context, pattern = "", ""
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].strip()
        if m := re.fullmatch(r"\[([^\]]+)\]", line):
            context = m.group(1)
            plan[context] = {}
        elif m := re.fullmatch(r"exten\s*=>\s*([^,]+),([^,]+),(.*)", line):
            pattern = m.group(1).strip()
            plan[context].setdefault(pattern, []).append(m.group(3).strip())
        elif m := re.fullmatch(r"same\s*=>\s*([^,]+),(.*)", line):
            plan[context][pattern].append(m.group(2).strip())
    return plan


def pattern_matches(pattern: str, number: str) -> bool:
    """Asterisk extension pattern matching (`_` patterns with X, Z, N, [..], `.` and `!`)."""
    if not pattern.startswith("_"):
        return pattern == number
    rx = ""
    for token in re.findall(r"\[[^\]]*\]|.", pattern[1:]):
        rx += {"X": "[0-9]", "Z": "[1-9]", "N": "[2-9]", ".": ".+", "!": ".*"}.get(
            token.upper(), token if token.startswith("[") else re.escape(token))
    return re.fullmatch(rx, number) is not None


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(SECRETS)


@pytest.fixture(scope="module")
def rendered(compose: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """asterisk/*.conf rendered by the real entrypoint with the asterisk service's environment."""
    out = tmp_path_factory.mktemp("asterisk-etc")
    env = {k: str(v) for k, v in compose["services"]["asterisk"]["environment"].items()}
    done = subprocess.run(["sh", str(AST / "entrypoint.sh"), "--render", str(AST), str(out)],
                          env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def _udp_ports(service: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(p.removesuffix("/udp").split(":")) for p in service.get("ports", []) if p.endswith("/udp")]


def test_worker_ports_addresses_and_counts_agree(compose: dict[str, Any], rendered: Path) -> None:
    sp, ast = compose["services"]["speechpipe"], compose["services"]["asterisk"]
    sp_env = {k: str(v) for k, v in sp["environment"].items()}
    settings = Settings.from_env(sp_env)
    workers = [SipConfig.from_env(i, settings.sip_port_base, sp_env) for i in range(settings.sip_workers)]
    assert settings.sip_workers >= 1
    sp_ip = sp["networks"]["speechpipe"]["ipv4_address"]
    assert all(w.public_addr == sp_ip for w in workers)  # what the workers write into Contact and SDP
    assert str(ast["environment"]["SPEECHPIPE_SIP_HOST"]) == sp_ip
    assert str(ast["environment"]["SPEECHPIPE_SIP_WORKERS"]) == str(settings.sip_workers)  # the hunt's N

    secs = resolved((rendered / "pjsip.conf").read_text())
    aors = {n: s for n, s in secs if s.get("type") == "aor" and n.startswith("speechpipe-w")}
    endpoints = {n: s for n, s in secs if s.get("type") == "endpoint" and n.startswith("speechpipe-w")}
    assert sorted(aors) == sorted(endpoints) == [f"speechpipe-w{i}" for i in range(settings.sip_workers)]
    for w, i in zip(workers, range(settings.sip_workers), strict=True):
        assert aors[f"speechpipe-w{i}"]["contact"] == f"sip:speechpipe@{sp_ip}:{w.port}"
        assert endpoints[f"speechpipe-w{i}"]["aors"] == f"speechpipe-w{i}"
    # RTP: each worker's range is its own, and inside the port space
    ranges = [(w.rtp_port, w.rtp_port + w.rtp_ports) for w in workers]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges)) and ranges[-1][1] <= 65536


def test_published_ports_match_asterisk_and_the_server(compose: dict[str, Any], rendered: Path) -> None:
    ast = compose["services"]["asterisk"]
    transport = dict(resolved((rendered / "pjsip.conf").read_text()))["transport-udp"]
    assert transport["protocol"] == "udp"
    sip_port = transport["bind"].rsplit(":", 1)[1]
    assert (sip_port, sip_port) in _udp_ports(ast)
    rtp = dict(resolved((rendered / "rtp.conf").read_text()))["general"]
    assert (f"{rtp['rtpstart']}-{rtp['rtpend']}",) * 2 in _udp_ports(ast)
    sp = compose["services"]["speechpipe"]
    command = sp["command"]
    port = command[command.index("--port") + 1]
    assert f"{port}:{port}" in sp["ports"] and "--demo" in command
    assert Settings.from_env({}).port == int(port)
    # the worker ports stay on the compose network: only Asterisk faces softphones
    assert not _udp_ports(sp)


def test_network_addresses_are_in_the_subnet(compose: dict[str, Any], rendered: Path) -> None:
    subnet = ipaddress.ip_network(compose["networks"]["speechpipe"]["ipam"]["config"][0]["subnet"])
    ips = [s["networks"]["speechpipe"]["ipv4_address"] for s in compose["services"].values()]
    assert len(set(ips)) == len(ips) and all(ipaddress.ip_address(ip) in subnet for ip in ips)
    transport = dict(resolved((rendered / "pjsip.conf").read_text()))["transport-udp"]
    assert ipaddress.ip_network(transport["local_net"]) == subnet
    assert transport["external_media_address"] == SECRETS["ASTERISK_EXTERNAL_ADDR"]


def test_credentials_come_from_the_environment_only(compose: dict[str, Any], rendered: Path) -> None:
    raw = yaml.safe_load((ROOT / "compose.yaml").read_text())
    template = sections((AST / "pjsip.conf").read_text())
    secrets_used = set()
    for _name, _tpls, keys in template:
        for value in keys.get("password", []):
            m = re.fullmatch(r"\$\{([A-Z0-9_]+)\}", value)
            assert m, f"pjsip.conf has a literal password: {value!r}"
            secrets_used.add(m.group(1))
    assert secrets_used == {"SOFTPHONE_1001_PASSWORD", "SOFTPHONE_1002_PASSWORD"}
    ast_env = raw["services"]["asterisk"]["environment"]
    for name in secrets_used:  # required from the user's environment: no default, no literal
        assert re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", ast_env[name]), ast_env[name]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]+\}", raw["services"]["postgres"]["environment"]
                        ["POSTGRES_PASSWORD"])
    assert "${POSTGRES_PASSWORD:?" in raw["services"]["speechpipe"]["environment"]["SPEECHPIPE_DATABASE_URL"]
    # and the rendered files carry exactly the values given
    auths = {n: s for n, s in resolved((rendered / "pjsip.conf").read_text()) if s.get("type") == "auth"}
    assert {n: s["password"] for n, s in auths.items()} == {
        "1001": SECRETS["SOFTPHONE_1001_PASSWORD"], "1002": SECRETS["SOFTPHONE_1002_PASSWORD"]}
    # the database URL the server gets matches the postgres service
    url = compose["services"]["speechpipe"]["environment"]["SPEECHPIPE_DATABASE_URL"]
    pg = compose["services"]["postgres"]["environment"]
    assert url == f"postgresql://{pg['POSTGRES_USER']}:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    with pytest.raises(KeyError, match="SOFTPHONE_1001_PASSWORD"):
        load_compose({k: v for k, v in SECRETS.items() if k != "SOFTPHONE_1001_PASSWORD"})


def test_the_renderer_refuses_a_missing_secret(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "SOFTPHONE_1001_PASSWORD": "x", "ASTERISK_EXTERNAL_ADDR": "1.2.3.4",
           "ASTERISK_LOCAL_NET": "172.28.0.0/24", "SPEECHPIPE_SIP_HOST": "172.28.0.20",
           "SPEECHPIPE_SIP_WORKERS": "2"}
    done = subprocess.run(["sh", str(AST / "entrypoint.sh"), "--render", str(AST), str(tmp_path)], env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "SOFTPHONE_1002_PASSWORD" in done.stderr
    assert not (tmp_path / "pjsip.conf").exists()


def test_codecs_and_dtmf_match_what_the_workers_speak(rendered: Path) -> None:
    names = {"g722": "G722", "ulaw": "PCMU", "alaw": "PCMA"}
    ours = [c.split("/")[0] for c in CODECS]
    for name, sec in resolved((rendered / "pjsip.conf").read_text()):
        if sec.get("type") != "endpoint":
            continue
        allowed = [a.strip() for a in sec["allow"].split(",")]
        assert sec["disallow"] == "all" and allowed[0] == "g722", name  # wideband first
        assert [names[a] for a in allowed] and all(names[a] in ours for a in allowed), name
        assert sec["dtmf_mode"] == "rfc4733" and sec["direct_media"] == "no", name
        if name.startswith("speechpipe-w"):
            # the worker's leg gets the caller's codecs in our order: G.722 whenever the caller has it,
            # PCMU without a pointless transcode when it does not (docs/telephony.md, "Codecs")
            assert sec["outgoing_call_offer_pref"] == "local", name


def test_dialplan_reaches_softphones_echo_and_every_pipe_extension(compose: dict[str, Any],
                                                                  rendered: Path) -> None:
    plan = dialplan((rendered / "extensions.conf").read_text())
    endpoints = {n: s for n, s in resolved((rendered / "pjsip.conf").read_text())
                 if s.get("type") == "endpoint"}
    phones = plan[endpoints["1001"]["context"]]
    assert endpoints["1001"]["context"] == endpoints["1002"]["context"] == "speechpipe-phones"
    for number in ("1001", "1002"):
        assert any(pattern_matches(p, number) and any("Dial(PJSIP/${EXTEN}" in s for s in steps)
                   for p, steps in phones.items())
    assert any("Echo()" in s for s in phones["600"])
    pipe_ext = PipeConfig(agent_id="echo", sip_extension="2000").sip_extension
    hunt = [p for p in phones if pattern_matches(p, pipe_ext)]
    assert hunt and any("speechpipe-hunt" in s for s in phones[hunt[0]])
    steps = " ".join(plan["speechpipe-hunt"]["s"])
    # the hunt reads the worker count rendered into [globals], never Asterisk's own environment
    assert "${GLOBAL(SPEECHPIPE_SIP_WORKERS)}" in steps and "ENV(" not in steps
    assert "Dial(PJSIP/${ARG1}@speechpipe-w${W}" in steps and "X-SpeechPipe-Hunt" in " ".join(
        plan["speechpipe-hunt-headers"]["s"])
    glob = dict(resolved((rendered / "extensions.conf").read_text()))["globals"]
    assert glob["SPEECHPIPE_SIP_WORKERS"] == str(compose["services"]["speechpipe"]["environment"]
                                                 ["SPEECHPIPE_SIP_WORKERS"])
    # a transfer from a worker lands in a context that only reaches the softphones
    transfers = plan[endpoints["speechpipe-w0"]["context"]]
    assert transfers and all(pattern_matches(p, "1002") and not pattern_matches(p, "2000") for p in transfers)


def test_example_runner_serves_the_demo_agent(compose: dict[str, Any]) -> None:
    runner = compose["services"]["runner"]
    script = " ".join(runner["command"])
    assert f"--agent-id {DEMO_AGENT_ID}" in script and "/data/demo.json" in script
    assert runner["environment"]["SPEECHPIPE_URL"] == "http://speechpipe:8780"
    assert runner["image"] == compose["services"]["speechpipe"]["image"]
