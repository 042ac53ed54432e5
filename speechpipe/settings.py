"""Process settings: one frozen dataclass read from `SPEECHPIPE_*` environment variables.

Everything has an embedded default, so `speechpipe serve` runs with no configuration at all: SQLite in
`<data_dir>/speechpipe.db`, recordings in `<data_dir>/recordings`, the server on 127.0.0.1:8780.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from speechpipe.errors import ConfigError

DEFAULT_DATA_DIR = "~/.local/share/speechpipe"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=lambda: Path(DEFAULT_DATA_DIR).expanduser())
    # None means the embedded SQLite file; see `db_url`.
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8780
    token_ttl_s: float = 60.0
    demo: bool = False
    redis_url: str | None = None
    # Multi-node (with redis_url): the base URL other nodes' runners reach this node at (default: the
    # address it listens on), and this node's name in Redis (default: host-pid-random).
    public_url: str | None = None
    node_id: str | None = None
    cluster_name: str = "default"  # nodes sharing one Redis form one cluster per name
    # None means `<data_dir>/models`; see `models_path`.
    models_dir: Path | None = None
    sip_workers: int = 0
    sip_port_base: int = 5080
    # Browser origins allowed to open the client WebSocket; empty = same origin only.
    allowed_origins: tuple[str, ...] = ()
    log_format: Literal["text", "json"] = "text"
    # Largest request body the REST API reads (aiohttp client_max_size); bigger bodies get a JSON 413.
    max_body_bytes: int = 1024 * 1024

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Reads `SPEECHPIPE_*` variables from `env` (default os.environ); keyword overrides win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}

        def get(name: str) -> str | None:
            raw = env.get(f"SPEECHPIPE_{name}")
            return raw.strip() if raw is not None and raw.strip() != "" else None

        if (v := get("DATA_DIR")) is not None:
            values["data_dir"] = Path(v).expanduser()
        if (v := get("DATABASE_URL")) is not None:
            values["database_url"] = v
        if (v := get("HOST")) is not None:
            values["host"] = v
        if (v := get("PORT")) is not None:
            values["port"] = parse_int("SPEECHPIPE_PORT", v, 0, 65535)
        if (v := get("TOKEN_TTL_S")) is not None:
            values["token_ttl_s"] = _float("SPEECHPIPE_TOKEN_TTL_S", v, 1.0, 86400.0)
        if (v := env.get("SPEECHPIPE_DEMO")) is not None:
            values["demo"] = _bool("SPEECHPIPE_DEMO", v)
        if (v := get("REDIS_URL")) is not None:
            values["redis_url"] = v
        if (v := get("PUBLIC_URL")) is not None:
            if not v.startswith(("http://", "https://")):
                raise ConfigError(f"SPEECHPIPE_PUBLIC_URL must be an http(s):// URL, got {v!r}")
            values["public_url"] = v.rstrip("/")
        if (v := get("NODE_ID")) is not None:
            values["node_id"] = v
        if (v := get("CLUSTER")) is not None:
            values["cluster_name"] = v
        if (v := get("MODELS_DIR")) is not None:
            values["models_dir"] = Path(v).expanduser()
        if (v := get("SIP_WORKERS")) is not None:
            values["sip_workers"] = parse_int("SPEECHPIPE_SIP_WORKERS", v, 0, 64)
        if (v := get("SIP_PORT_BASE")) is not None:
            values["sip_port_base"] = parse_int("SPEECHPIPE_SIP_PORT_BASE", v, 1, 65000)
        if (v := get("ALLOWED_ORIGINS")) is not None:
            values["allowed_origins"] = tuple(o.strip().rstrip("/") for o in v.split(",") if o.strip())
        if (v := get("LOG_FORMAT")) is not None:
            if v not in ("text", "json"):
                raise ConfigError(f"SPEECHPIPE_LOG_FORMAT must be 'text' or 'json', got {v!r}")
            values["log_format"] = v
        if (v := get("MAX_BODY_BYTES")) is not None:
            values["max_body_bytes"] = parse_int("SPEECHPIPE_MAX_BODY_BYTES", v, 1024, 1 << 30)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def db_path(self) -> Path:
        """The embedded SQLite file (used when `database_url` is unset)."""
        return self.data_dir / "speechpipe.db"

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL in effect: `database_url`, or the embedded SQLite file."""
        return self.database_url or f"sqlite:///{self.db_path}"

    @property
    def recordings_dir(self) -> Path:
        return self.data_dir / "recordings"

    @property
    def models_path(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    def ensure_dirs(self) -> None:
        """Creates the data and recordings directories (private to the user: they hold secrets/audio)."""
        for d in (self.data_dir, self.recordings_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)


def parse_int(name: str, raw: str, lo: int, hi: int) -> int:
    """`raw` as an int within [lo, hi], or a ConfigError naming the variable."""
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _float(name: str, raw: str, lo: float, hi: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not lo <= value <= hi:  # also refuses nan
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {raw}")
    return value


def _bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{name} must be a boolean (1/0, true/false), got {raw!r}")
