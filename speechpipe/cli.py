"""The `speechpipe` command: serve, db upgrade, workspaces create|list, keys create|list|revoke,
pipes create|list, demo.

Global options override the `SPEECHPIPE_*` environment (see `speechpipe.settings`). Commands that open
the database migrate it first, so every command works on a fresh data directory. `serve` imports no
speech engine: models load when a session needs them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from speechpipe.errors import ConfigError, SpeechPipeError
from speechpipe.logs import AccessLogger, announce, configure_logging
from speechpipe.settings import Settings

try:
    from speechpipe.storage import Store
    from speechpipe.storage.demo import DemoInfo, ensure_demo
    from speechpipe.storage.engine import display_url
except ImportError as exc:  # the light install (runner SDK and client): no server commands
    raise SystemExit(f"error: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speechpipe",
                                description="Speech Pipe: give any text-only agent a voice.")
    p.add_argument("--data-dir", type=Path, help="data directory (env SPEECHPIPE_DATA_DIR)")
    p.add_argument("--database-url",
                   help="SQLAlchemy URL, e.g. postgresql://... (env SPEECHPIPE_DATABASE_URL)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the server (REST API, WebSockets, agent channel, test page)")
    s.add_argument("--host", help="listen address (env SPEECHPIPE_HOST, default 127.0.0.1)")
    s.add_argument("--port", type=int,
                   help="listen port, 0 = any free port (env SPEECHPIPE_PORT, default 8780)")
    s.add_argument("--demo", action="store_true", default=None,
                   help="demo mode: ensure the demo key and pipe, enable POST /v1/demo/token "
                        "(env SPEECHPIPE_DEMO)")

    db = sub.add_parser("db", help="database maintenance").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply pending schema migrations")

    ws = sub.add_parser("workspaces", help="workspaces: each key sees only its own workspace's pipes and "
                        "sessions").add_subparsers(dest="workspaces_command", required=True)
    wc = ws.add_parser("create", help="create a workspace")
    wc.add_argument("name")
    wc.add_argument("--json", action="store_true", help="print JSON")
    wl = ws.add_parser("list", help="list workspaces")
    wl.add_argument("--json", action="store_true", help="print JSON")

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="create an API key (its secret is shown only once)")
    kc.add_argument("--name", help="a label for the key")
    kc.add_argument("--workspace", default="default", help="the workspace the key acts in (default: default)")
    kc.add_argument("--json", action="store_true", help="print JSON")
    kl = keys.add_parser("list", help="list API keys")
    kl.add_argument("--workspace", help="only the keys of this workspace")
    kl.add_argument("--json", action="store_true", help="print JSON")
    kr = keys.add_parser("revoke", help="revoke an API key (its unused session tokens stop working too)")
    kr.add_argument("key_id")

    pipes = sub.add_parser("pipes", help="pipes").add_subparsers(dest="pipes_command", required=True)
    pc = pipes.add_parser("create", help="create a pipe")
    pc.add_argument("--agent-id", help="the agent that answers this pipe's sessions")
    pc.add_argument("--name", help="a label for the pipe")
    pc.add_argument("--config", help="pipe config as JSON, or @file.json")
    pc.add_argument("--workspace", default="default", help="the pipe's workspace (default: default)")
    pc.add_argument("--json", action="store_true", help="print JSON")
    pl = pipes.add_parser("list", help="list pipes")
    pl.add_argument("--workspace", help="only the pipes of this workspace")
    pl.add_argument("--json", action="store_true", help="print JSON")

    d = sub.add_parser("demo", help="create (first run) or show the demo API key and pipe")
    d.add_argument("--json", action="store_true", help="print JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env(data_dir=args.data_dir.expanduser() if args.data_dir else None,
                                     database_url=args.database_url,
                                     host=getattr(args, "host", None), port=getattr(args, "port", None),
                                     demo=getattr(args, "demo", None))
        return _COMMANDS[args.command](args, settings)
    except SpeechPipeError as exc:
        print(f"error: {exc.message} [{exc.code}]", file=sys.stderr)
        if exc.details:
            for item in exc.details if isinstance(exc.details, list) else [exc.details]:
                print(f"  {item}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _open_store(settings: Settings, *, quiet: bool = False) -> Store:
    if not quiet:
        print(f"data dir: {settings.data_dir}\ndatabase: {display_url(settings.db_url)}", file=sys.stderr)
    return Store.from_settings(settings, upgrade=True)


# --------------------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.log_format)
    from speechpipe.websocket_edge.app import create_app  # aiohttp app; no speech engine loads here

    if settings.redis_url and not settings.database_url:
        raise ConfigError("SPEECHPIPE_REDIS_URL joins this node to others, which needs a database they "
                          "share: set SPEECHPIPE_DATABASE_URL to PostgreSQL (postgresql+psycopg://...)")
    store = Store.from_settings(settings, upgrade=True)
    try:
        demo = ensure_demo(store, settings.data_dir) if settings.demo else None
        app = create_app(settings, store, demo=demo)
        asyncio.run(_serve(app, settings, store, demo))
    finally:
        store.close()
    return 0


async def _serve(app: Any, settings: Settings, store: Store, demo: DemoInfo | None) -> None:
    import secrets

    from aiohttp import web

    from speechpipe.pipeline.session import Engines
    from speechpipe.websocket_edge.agent_relay import setup_agent_relay
    from speechpipe.websocket_edge.app import SIP_HEALTH_KEY
    from speechpipe.websocket_edge.client_ws import ENGINES_KEY

    engines = Engines()
    app[ENGINES_KEY] = engines
    internal_secret = secrets.token_urlsafe(32)  # lets this server's own SIP workers use the agent relay
    setup_agent_relay(app, internal_secret)
    runner = web.AppRunner(app, handle_signals=False, access_log_class=AccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    base = _base_urls(runner.addresses)[0]
    loop = asyncio.get_running_loop()
    # Load the default STT model now, off the loop, so the first caller does not wait for it.
    warmup = loop.run_in_executor(engines.executor, engines.warm_up, _default_pipe_config())
    sip = demo_agent = cluster = None
    try:
        if settings.redis_url:
            from speechpipe.websocket_edge.agent_channel import HUB_KEY
            from speechpipe.websocket_edge.cluster import Cluster

            cluster = Cluster(app[HUB_KEY], settings.redis_url, public_url=settings.public_url or base,
                              node_id=settings.node_id, name=settings.cluster_name)
            await cluster.start()
        if settings.sip_workers > 0:
            from speechpipe.telephony.supervisor import SipSupervisor

            sip = SipSupervisor.from_settings(
                settings, agent_factory="speechpipe.telephony.relay_client:relay_agent",
                env={"SPEECHPIPE_INTERNAL_URL": base, "SPEECHPIPE_INTERNAL_SECRET": internal_secret})
            app[SIP_HEALTH_KEY] = sip.health
            await sip.start(wait_ready_s=None)  # workers load their models in the background
        if demo is not None:
            from speechpipe.demo_agent import demo_runner

            demo_agent = demo_runner(base, demo.api_key, demo.agent_id)
            await demo_agent.start(timeout_s=10)
        _print_banner(settings, store, runner.addresses, demo)
        if sip is not None:
            ports = ", ".join(str(settings.sip_port_base + i) for i in range(settings.sip_workers))
            announce(f"  SIP media workers: {settings.sip_workers} on UDP ports {ports}")
        if cluster is not None:
            announce(f"  cluster node: {cluster.node_id} (Redis); other nodes' runners dial "
                     f"{cluster.public_url}")
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        announce("shutting down")
    finally:
        if demo_agent is not None:
            await demo_agent.shutdown(timeout_s=5)
        if sip is not None:
            await sip.stop()
        if cluster is not None:
            await cluster.close()
        await runner.cleanup()
        warmup.cancel()


def _default_pipe_config() -> Any:
    from speechpipe.pipe_config import PipeConfig

    return PipeConfig(agent_id="warmup")


def _base_urls(addresses: list[Any]) -> list[str]:
    urls = []
    for addr in addresses:
        host, port = addr[0], addr[1]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        urls.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
    return list(dict.fromkeys(urls))


def _print_banner(settings: Settings, store: Store, addresses: list[Any], demo: DemoInfo | None) -> None:
    from speechpipe.storage.migrate import current_revision

    lines = [
        "Speech Pipe is running",
        f"  data dir:   {settings.data_dir}",
        f"  database:   {store.display_url} (schema {current_revision(store.engine)})",
        f"  recordings: {settings.recordings_dir}",
    ]
    for base in _base_urls(addresses):
        ws = "ws" + base[4:]
        lines += [
            f"  listening on {base}",
            f"    REST API:          {base}/v1",
            f"    OpenAPI:           {base}/v1/openapi.json",
            f"    client WebSocket:  {ws}/v1/pipes/{{pipe_id}}/connect?token={{session_token}}",
            f"    agent channel:     {ws}/v1/agents/connect",
            f"    test page:         {base}/",
            f"    health:            {base}/healthz",
            f"    metrics:           {base}/metrics",
        ]
    if demo is not None:
        lines += [
            "  demo mode:",
            f"    API key:   {demo.api_key}",
            f"    pipe:      {demo.pipe_id} (agent_id {demo.agent_id})",
            "    tokens:    POST /v1/demo/token (no API key; demo mode only)",
        ]
    announce("\n".join(lines))


# --------------------------------------------------------------------------------------- db, keys, pipes


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    print(f"data dir: {settings.data_dir}\ndatabase: {display_url(settings.db_url)}")
    store = Store.from_settings(settings)
    try:
        revision = store.upgrade()
    finally:
        store.close()
    print(f"database is at schema revision {revision}")
    return 0


def cmd_workspaces(args: argparse.Namespace, settings: Settings) -> int:
    store = _open_store(settings)
    try:
        if args.workspaces_command == "create":
            ws = store.create_workspace(args.name)
            if args.json:
                _print_json(_workspace_dict(ws))
            else:
                print(f"created workspace {ws.name} ({ws.id})")
                print(f"next: speechpipe keys create --workspace {ws.name}")
        else:
            spaces = store.list_workspaces()
            if args.json:
                _print_json([_workspace_dict(w) for w in spaces])
            else:
                _print_table(["ID", "NAME", "CREATED"], [[w.id, w.name, _ts(w.created_at)] for w in spaces])
    finally:
        store.close()
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    store = _open_store(settings)
    try:
        names = {w.id: w.name for w in store.list_workspaces()}
        if args.keys_command == "create":
            new = store.create_api_key(args.name, workspace=args.workspace)
            if args.json:
                _print_json({**_key_dict(new.key, names), "secret": new.secret})
            else:
                print(f"created API key {new.key.id}" + (f" ({new.key.name})" if new.key.name else "")
                      + f" in workspace {names.get(new.key.workspace_id, new.key.workspace_id)}")
                print(f"secret (shown only once, store it now): {new.secret}")
        elif args.keys_command == "list":
            ws_id = store.get_workspace(args.workspace).id if args.workspace else None
            keys = store.list_api_keys(workspace_id=ws_id)
            if args.json:
                _print_json([_key_dict(k, names) for k in keys])
            else:
                _print_table(["ID", "NAME", "WORKSPACE", "PREFIX", "CREATED", "REVOKED"], [
                    [k.id, k.name or "", names.get(k.workspace_id, k.workspace_id), k.prefix + "…",
                     _ts(k.created_at), _ts(k.revoked_at)] for k in keys])
        else:
            key = store.revoke_api_key(args.key_id)
            print(f"revoked API key {key.id} ({key.prefix}…) at {_ts(key.revoked_at)}")
    finally:
        store.close()
    return 0


def cmd_pipes(args: argparse.Namespace, settings: Settings) -> int:
    store = _open_store(settings)
    try:
        if args.pipes_command == "create":
            config = _load_config(args.config)
            if args.agent_id:
                config["agent_id"] = args.agent_id
            if "agent_id" not in config:
                print("error: give --agent-id (or agent_id in --config)", file=sys.stderr)
                return 2
            pipe = store.create_pipe(config, name=args.name,
                                     workspace_id=store.get_workspace(args.workspace).id)
            if args.json:
                _print_json(_pipe_dict(pipe))
            else:
                print(f"created pipe {pipe.id} (agent_id {pipe.agent_id})")
        else:
            pipes, cursor = [], None
            ws_id = store.get_workspace(args.workspace).id if args.workspace else None
            while True:
                page = store.list_pipes(limit=200, cursor=cursor, workspace_id=ws_id)
                pipes += page.items
                if not (cursor := page.next_cursor):
                    break
            if args.json:
                _print_json([_pipe_dict(p) for p in pipes])
            else:
                _print_table(["ID", "NAME", "AGENT_ID", "CREATED"],
                             [[p.id, p.name or "", p.agent_id, _ts(p.created_at)] for p in pipes])
    finally:
        store.close()
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    store = _open_store(settings, quiet=True)
    try:
        info = ensure_demo(store, settings.data_dir)
    finally:
        store.close()
    out = {"data_dir": str(settings.data_dir), "database": display_url(settings.db_url),
           "db_path": str(settings.db_path) if settings.database_url is None else None,
           "api_key_id": info.api_key_id, "api_key": info.api_key, "pipe_id": info.pipe_id,
           "agent_id": info.agent_id, "created": info.created_key or info.created_pipe}
    if args.json:
        _print_json(out)
        return 0
    print("created the demo API key and pipe" if out["created"]
          else "the demo API key and pipe (already set up)")
    print(f"  data dir:  {out['data_dir']}")
    print(f"  database:  {out['database']}")
    if out["db_path"]:
        print(f"  db path:   {out['db_path']}")
    print(f"  API key:   {info.api_key}   (id {info.api_key_id})")
    print(f"  pipe:      {info.pipe_id}   (agent_id {info.agent_id})")
    print("next: `speechpipe serve --demo`, then open the test page it prints")
    return 0


def _load_config(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    from speechpipe.errors import ValidationError

    text = raw
    if raw.startswith("@"):
        try:
            text = Path(raw[1:]).expanduser().read_text()
        except OSError as exc:
            raise ValidationError(f"cannot read config file {raw[1:]!r}: {exc.strerror}") from None
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ValidationError(f"--config is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValidationError("--config must be a JSON object")
    return config


def _ts(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


def _workspace_dict(w: Any) -> dict[str, Any]:
    return {"id": w.id, "name": w.name, "created_at": w.created_at.isoformat()}


def _key_dict(k: Any, workspaces: dict[str, str]) -> dict[str, Any]:
    return {"id": k.id, "name": k.name, "prefix": k.prefix, "workspace_id": k.workspace_id,
            "workspace": workspaces.get(k.workspace_id), "created_at": k.created_at.isoformat(),
            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None}


def _pipe_dict(p: Any) -> dict[str, Any]:
    return {"id": p.id, "name": p.name, "agent_id": p.agent_id, "workspace_id": p.workspace_id,
            "config": p.config,
            "created_at": p.created_at.isoformat(), "updated_at": p.updated_at.isoformat()}


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


_COMMANDS = {"serve": cmd_serve, "db": cmd_db, "workspaces": cmd_workspaces, "keys": cmd_keys,
             "pipes": cmd_pipes, "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())
