"""SIP media-worker settings: what one worker binds, how many calls it takes, where it registers.

`Settings` (speechpipe.settings) holds what the whole product shares (`sip_workers`, `sip_port_base`, data
dir, database). The knobs only the SIP side reads come from `SPEECHPIPE_SIP_*` variables here:

- `SPEECHPIPE_SIP_HOST`            address SIP and RTP bind to (default 0.0.0.0)
- `SPEECHPIPE_SIP_PUBLIC_ADDR`     address written into Contact/SDP when the bind address is not reachable
                                   as is (NAT, containers); default: pjsip picks the interface address
- `SPEECHPIPE_SIP_MAX_CALLS`       calls one worker answers before `486 Busy Here` (capped by the pjsua
                                   build's PJSUA_MAX_CALLS; default: that cap)
- `SPEECHPIPE_SIP_RTP_PORT_BASE`   first RTP port; worker i uses base + i*`SPEECHPIPE_SIP_RTP_PORTS`
- `SPEECHPIPE_SIP_RTP_PORTS`       RTP ports per worker (default 200: RTP+RTCP pairs for 100 calls)
- `SPEECHPIPE_SIP_REGISTRAR`       optional outbound registration, e.g. `sip:pbx.example.com`
- `SPEECHPIPE_SIP_USERNAME` / `SPEECHPIPE_SIP_PASSWORD` / `SPEECHPIPE_SIP_REALM` digest credentials
- `SPEECHPIPE_SIP_AGENT_FACTORY`   `module:attr` of `async (session) -> AgentLink | None` for the workers
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from speechpipe.errors import ConfigError
from speechpipe.settings import parse_int


@dataclass(frozen=True)
class SipConfig:
    port: int = 5080
    host: str = "0.0.0.0"
    public_addr: str | None = None
    max_calls: int | None = None  # None: the pjsua build's limit
    rtp_port: int = 20000
    rtp_ports: int = 200
    registrar: str | None = None
    username: str | None = None
    password: str | None = None
    realm: str = "*"
    agent_factory: str | None = None
    # SIP user part this worker calls itself (Contact, From of REFER); the dialled user part picks the pipe.
    user: str = "speechpipe"

    @classmethod
    def from_env(cls, index: int = 0, port_base: int = 5080, env: Mapping[str, str] | None = None,
                 **overrides: Any) -> SipConfig:
        """Config of worker number `index` (SIP port `port_base + index`)."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            raw = env.get(f"SPEECHPIPE_SIP_{name}")
            return raw.strip() if raw is not None and raw.strip() else None

        values: dict[str, Any] = {"port": port_base + index}
        if (v := get("HOST")) is not None:
            values["host"] = v
        if (v := get("PUBLIC_ADDR")) is not None:
            values["public_addr"] = v
        if (v := get("MAX_CALLS")) is not None:
            values["max_calls"] = parse_int("SPEECHPIPE_SIP_MAX_CALLS", v, 1, 10000)
        ports = parse_int("SPEECHPIPE_SIP_RTP_PORTS", get("RTP_PORTS") or "200", 4, 20000)
        base = parse_int("SPEECHPIPE_SIP_RTP_PORT_BASE", get("RTP_PORT_BASE") or "20000", 1024, 65000)
        values["rtp_ports"] = ports
        values["rtp_port"] = base + index * ports
        for key in ("REGISTRAR", "USERNAME", "PASSWORD", "AGENT_FACTORY"):
            if (v := get(key)) is not None:
                values[key.lower()] = v
        if (v := get("REALM")) is not None:
            values["realm"] = v
        values.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**values)
        if cfg.registrar and not (cfg.username and cfg.password):
            raise ConfigError("SPEECHPIPE_SIP_REGISTRAR needs SPEECHPIPE_SIP_USERNAME and "
                              "SPEECHPIPE_SIP_PASSWORD")
        if cfg.rtp_port + cfg.rtp_ports > 65536:
            raise ConfigError(f"RTP ports {cfg.rtp_port}+{cfg.rtp_ports} run past 65535")
        return cfg

    def replace(self, **changes: Any) -> SipConfig:
        return dataclasses.replace(self, **changes)


