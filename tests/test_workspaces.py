"""Workspaces: a key sees and acts on its own workspace only, in the store, over REST, in the CLI, and in the
agent channel (a runner gets sessions of its key's workspace only), on one node and across two.

Real databases (SQLite and PostgreSQL), a real server over HTTP, real runner processes, real `serve` nodes.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from speechpipe.errors import Code, ConflictError, NotFoundError
from speechpipe.pipeline.config import PipeConfig
from speechpipe.storage import Store
from tests.fixtures_db import LiveServer
from tests.nodes import Cluster, Talker, hub_events
from tests.test_cli import run


def _name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _session_with_everything(store: Store, pipe_id: str, recordings: Path) -> str:
    """A session on `pipe_id` with a turn, an event and a recording file, as the pipeline leaves one."""
    sid = store.create_session(pipe_id, "support", "web")
    store.add_turn(sid, 0, "user", "my account number is 1234", 0, 900)
    store.add_session_event(sid, "recording_paused", 100)
    path = recordings / f"{sid}.wav"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF" + b"\0" * 40)
    store.add_recording(sid, str(path), "wav", 16000, 1, 0.1, 44, "0" * 64)
    store.end_session(sid, "caller_hung_up")
    return sid


# ------------------------------------------------------------------------------------------- store


def test_store_scopes_every_read_and_write_by_workspace(store: Store, tmp_path: Path) -> None:
    a, b = store.create_workspace(_name("a")), store.create_workspace(_name("b"))
    assert a.id.startswith("ws_") and a.id != b.id
    with pytest.raises(ConflictError):
        store.create_workspace(a.name)
    assert store.get_workspace(a.name) == a == store.get_workspace(a.id)
    with pytest.raises(NotFoundError) as missing:
        store.get_workspace(_name("nope"))
    assert missing.value.code == "workspace_not_found"
    assert {a.id, b.id} <= {w.id for w in store.list_workspaces()}

    key_a = store.create_api_key("a", workspace=a.name)
    key_b = store.create_api_key("b", workspace=b.id)
    assert store.verify_api_key(key_a.secret).workspace_id == a.id
    assert [k.id for k in store.list_api_keys(workspace_id=b.id)] == [key_b.key.id]
    assert store.create_api_key("d").key.workspace_id == store.default_workspace_id()

    pipe = store.create_pipe({"agent_id": "support"}, name="a's", workspace_id=a.id)
    assert pipe.workspace_id == a.id and store.pipe_workspace(pipe.id) == a.id
    sid = _session_with_everything(store, pipe.id, tmp_path)

    def not_found(code: str, fn: Any, *args: Any, **kw: Any) -> None:
        with pytest.raises(NotFoundError) as exc:
            fn(*args, **kw)
        assert exc.value.code == code

    for fn, args, kw in ((store.get_pipe, (pipe.id,), {}), (store.delete_pipe, (pipe.id,), {}),
                         (store.update_pipe, (pipe.id,), {"name": "stolen"}),
                         (store.mint_token, (pipe.id,), {})):
        not_found(Code.PIPE_NOT_FOUND, fn, *args, **kw, workspace_id=b.id)
    for fn in (store.get_session, store.list_turns, store.list_session_events, store.get_recording):
        not_found(Code.SESSION_NOT_FOUND, fn, sid, workspace_id=b.id)
    assert store.list_pipes(workspace_id=b.id, limit=200).items == []
    assert store.list_sessions(workspace_id=b.id, limit=200).items == []
    assert store.list_sessions(workspace_id=b.id, pipe_id=pipe.id).items == []

    # Its own workspace sees it all, unchanged by the refused attempts; so does the system (no scope).
    assert store.get_pipe(pipe.id, workspace_id=a.id).name == "a's"
    assert [p.id for p in store.list_pipes(workspace_id=a.id).items] == [pipe.id]
    assert [s.id for s in store.list_sessions(workspace_id=a.id).items] == [sid]
    assert store.get_session(sid, workspace_id=a.id).recording is not None
    assert len(store.list_turns(sid, workspace_id=a.id)) == 1
    assert store.mint_token(pipe.id, workspace_id=a.id).pipe_id == pipe.id
    assert store.get_session(sid).id == sid
    store.delete_pipe(pipe.id, workspace_id=a.id)
    not_found(Code.PIPE_NOT_FOUND, store.get_pipe, pipe.id, workspace_id=a.id)
    assert store.pipe_workspace(pipe.id) == a.id  # a deleted pipe's sessions still belong somewhere


# ------------------------------------------------------------------------------------------- REST


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def _call(http: aiohttp.ClientSession, server: LiveServer, secret: str, method: str, path: str,
                **kw: Any) -> tuple[int, Any]:
    async with http.request(method, server.url + path, headers={"Authorization": f"Bearer {secret}"},
                            **kw) as resp:
        raw = await resp.read()
        return resp.status, (json.loads(raw) if resp.content_type == "application/json" else raw)


@pytest.mark.asyncio(loop_scope="session")
async def test_rest_answers_another_workspaces_objects_like_missing_ones(
        http: aiohttp.ClientSession, live_server: LiveServer) -> None:
    store = live_server.store
    a, b = store.create_workspace(_name("rest-a")), store.create_workspace(_name("rest-b"))
    key_a = store.create_api_key("a", workspace=a.name).secret
    key_b = store.create_api_key("b", workspace=b.name).secret

    status, pipe = await _call(http, live_server, key_a, "POST", "/v1/pipes",
                               json={"name": "a's support", "config": {"agent_id": "support"}})
    assert status == 201
    pid = pipe["id"]
    assert store.get_pipe(pid).workspace_id == a.id  # the creating key's workspace
    sid = _session_with_everything(store, pid, live_server.settings.recordings_dir)
    missing_pipe, missing_sess = "pipe_" + "0" * 24, "sess_" + "0" * 24

    async def same_as_missing(method: str, path: str, missing_path: str, code: str, **kw: Any) -> None:
        theirs = await _call(http, live_server, key_b, method, path, **kw)
        nothing = await _call(http, live_server, key_b, method, missing_path, **kw)
        assert theirs[0] == nothing[0] == 404
        assert theirs[1]["error"]["code"] == nothing[1]["error"]["code"] == code

    for method, kw in (("GET", {}), ("PATCH", {"json": {"name": "stolen"}}), ("DELETE", {})):
        await same_as_missing(method, f"/v1/pipes/{pid}", f"/v1/pipes/{missing_pipe}", "pipe_not_found", **kw)
    for sub in ("", "/transcript", "/recording"):
        await same_as_missing("GET", f"/v1/sessions/{sid}{sub}", f"/v1/sessions/{missing_sess}{sub}",
                              "session_not_found")
    theirs = await _call(http, live_server, key_b, "POST", "/v1/sessions/tokens", json={"pipe_id": pid})
    nothing = await _call(http, live_server, key_b, "POST", "/v1/sessions/tokens",
                          json={"pipe_id": missing_pipe})
    assert theirs[0] == nothing[0] == 404 and theirs[1]["error"]["code"] == nothing[1]["error"]["code"]

    # Lists show only the caller's own objects: B sees nothing of A's, A sees its own; nothing was changed.
    status, b_pipes = await _call(http, live_server, key_b, "GET", "/v1/pipes", params={"limit": "200"})
    assert status == 200 and b_pipes["data"] == []
    status, b_sessions = await _call(http, live_server, key_b, "GET", "/v1/sessions", params={"pipe_id": pid})
    assert status == 200 and b_sessions["data"] == []
    status, b_all = await _call(http, live_server, key_b, "GET", "/v1/sessions", params={"limit": "200"})
    assert status == 200 and b_all["data"] == []
    status, a_pipes = await _call(http, live_server, key_a, "GET", "/v1/pipes", params={"limit": "200"})
    assert status == 200 and [p["id"] for p in a_pipes["data"]] == [pid]
    assert a_pipes["data"][0]["name"] == "a's support"
    status, a_sessions = await _call(http, live_server, key_a, "GET", "/v1/sessions")
    assert status == 200 and [s["id"] for s in a_sessions["data"]] == [sid]
    status, transcript = await _call(http, live_server, key_a, "GET", f"/v1/sessions/{sid}/transcript")
    assert status == 200 and len(transcript["turns"]) == 1
    status, audio = await _call(http, live_server, key_a, "GET", f"/v1/sessions/{sid}/recording")
    assert status == 200 and audio.startswith(b"RIFF")
    status, _ = await _call(http, live_server, key_a, "POST", "/v1/sessions/tokens", json={"pipe_id": pid})
    assert status == 201
    # The default workspace's key (the live server's) does not see A's pipe either.
    status, _ = await _call(http, live_server, live_server.api_key, "GET", f"/v1/pipes/{pid}")
    assert status == 404
    status, _ = await _call(http, live_server, key_a, "DELETE", f"/v1/pipes/{pid}")
    assert status == 204


# ------------------------------------------------------------------------------------------- CLI


def test_cli_workspaces_and_keys_per_workspace(tmp_path: Path) -> None:
    listed = json.loads(run(tmp_path, "workspaces", "list", "--json").stdout)
    assert [w["name"] for w in listed] == ["default"]
    made = json.loads(run(tmp_path, "workspaces", "create", "acme", "--json").stdout)
    assert made["name"] == "acme" and made["id"].startswith("ws_")
    assert "acme" in run(tmp_path, "workspaces", "list").stdout
    dup = run(tmp_path, "workspaces", "create", "acme", ok=False)
    assert dup.returncode == 2 and "conflict" in dup.stderr

    key = json.loads(run(tmp_path, "keys", "create", "--name", "acme-backend", "--workspace", "acme",
                         "--json").stdout)
    assert key["workspace"] == "acme" and key["workspace_id"] == made["id"]
    assert key["secret"].startswith("spk_")
    plain = json.loads(run(tmp_path, "keys", "create", "--name", "other", "--json").stdout)
    assert plain["workspace"] == "default"
    in_acme = json.loads(run(tmp_path, "keys", "list", "--workspace", "acme", "--json").stdout)
    assert [k["id"] for k in in_acme] == [key["id"]] and all("secret" not in k for k in in_acme)
    everyone = json.loads(run(tmp_path, "keys", "list", "--json").stdout)
    assert {k["id"] for k in everyone} == {key["id"], plain["id"]}
    table = run(tmp_path, "keys", "list").stdout
    assert "WORKSPACE" in table and "acme" in table
    unknown = run(tmp_path, "keys", "create", "--workspace", "nope", ok=False)
    assert unknown.returncode == 2 and "workspace_not_found" in unknown.stderr
    run(tmp_path, "keys", "revoke", key["id"])

    pipe = json.loads(run(tmp_path, "pipes", "create", "--agent-id", "support", "--workspace", "acme",
                          "--json").stdout)
    assert pipe["workspace_id"] == made["id"]
    assert [p["id"] for p in json.loads(run(tmp_path, "pipes", "list", "--workspace", "acme",
                                            "--json").stdout)] == [pipe["id"]]
    assert json.loads(run(tmp_path, "pipes", "list", "--workspace", "default", "--json").stdout) == []


# ------------------------------------------------------------------------------------------- agents


async def test_a_runner_only_gets_sessions_of_its_keys_workspace(agent_channel) -> None:
    """Runner B (key of workspace B) and runner A both serve agent_id "support": A's sessions go to A's
    runner, or end no_runner while A has none; runner B is never even offered one."""
    ch = await agent_channel()
    store = ch.store
    a, b = store.create_workspace(_name("agents-a")), store.create_workspace(_name("agents-b"))
    key_a = store.create_api_key("a", workspace=a.name).secret
    key_b = store.create_api_key("b", workspace=b.name).secret
    pipe_a = store.create_pipe(PipeConfig(agent_id="support"), workspace_id=a.id).id
    pipe_b = store.create_pipe(PipeConfig(agent_id="support"), workspace_id=b.id).id

    runner_b = await ch.runner("support", env={"SPEECHPIPE_API_KEY": key_b})
    assert ch.runner_info(runner_b.worker_id)["workspace_id"] == b.id

    lonely = await ch.call("support", pipe_id=pipe_a)
    assert lonely.attached is False
    assert await lonely.ended(within_s=20) == "no_runner"
    assert (await ch.astore.get_session(lonely.session_id)).end_reason == "no_runner"
    assert ch.runner_info(runner_b.worker_id)["assigned_total"] == 0

    runner_a = await ch.runner("support", env={"SPEECHPIPE_API_KEY": key_a})
    calls = [await ch.call("support", pipe_id=pipe_a) for _ in range(3)]
    for call in calls:
        assert call.attached is True
        await runner_a.wait_event("entry", lambda e, c=call: e["session_id"] == c.session_id)
    theirs = await ch.call("support", pipe_id=pipe_b)  # B's own session does reach B's runner
    assert theirs.attached is True
    await runner_b.wait_event("entry", lambda e: e["session_id"] == theirs.session_id)

    assert ch.runner_info(runner_a.worker_id)["assigned_total"] == 3
    assert ch.runner_info(runner_b.worker_id)["assigned_total"] == 1
    got_b = {e["session_id"] for e in runner_b.events("entry")}
    assert got_b == {theirs.session_id}
    assert not {c.session_id for c in calls} & got_b
    for call in [*calls, theirs]:
        await call.hang_up()


# ------------------------------------------------------------------------------------------- two nodes


@pytest.mark.postgres
async def test_across_nodes_a_runner_of_another_workspace_is_never_offered_the_session(
        cluster: Cluster) -> None:
    """Node A has only a runner of workspace "other" for the cluster's agent_id; a session of the default
    workspace on node B is not offered to it (no_runner). Once a runner of the default workspace joins node
    A, node B's session reaches it over Redis, and the other workspace's runner still got nothing."""
    node_a, node_b = await cluster.start_nodes("A", "B")
    other = cluster.store.create_workspace(_name("other"))
    other_key = cluster.store.create_api_key("other", workspace=other.name).secret
    await cluster.start_runner("theirs", "A", api_key=other_key, workspace_id=other.id)
    assert cluster.advertised_runners("A") == 0 and cluster.advertised_runners("A", other.id) == 1

    async with aiohttp.ClientSession() as http:
        lonely = Talker(http, node_b, cluster.api_key, cluster.pipe_id)
        await lonely.open()  # the apology: nobody of this workspace is there to answer
        assert (await lonely.client.closed())[1].endswith("no_runner")
        assert cluster.store.get_session(lonely.session_id).end_reason == "no_runner"
        assert (await hub_events(http, node_a.base)).get("jobs_offered_by_peers", 0) == 0

        await cluster.start_runner("ours", "A")
        talker = Talker(http, node_b, cluster.api_key, cluster.pipe_id)
        await talker.open()
        heard, answer = await talker.say("What time does the shop open tomorrow?")
        assert answer == f"You said: {heard}"
        await talker.close()
        assert (await hub_events(http, node_a.base)).get("jobs_offered_by_peers", 0) == 1

    # The runner log says "call <session id> ... started" for each call it takes.
    assert talker.session_id in cluster.runners["ours"].output()
    theirs = cluster.runners["theirs"].output()
    assert lonely.session_id not in theirs and talker.session_id not in theirs
    assert cluster.room("A", other.id)["runners"] == 1


async def test_phone_calls_through_the_relay_are_scoped_by_their_pipe(agent_channel, tmp_path: Path) -> None:
    """A SIP worker's session reaches the hub through the agent relay naming only its pipe: it is offered to
    runners of that pipe's workspace only."""
    from aiohttp import web

    from speechpipe.protocol import RELAY_PATH
    from speechpipe.websocket_edge.agent_channel import setup_agent_channel
    from speechpipe.websocket_edge.agent_relay import setup_agent_relay
    from speechpipe.websocket_edge.metrics import setup_metrics
    from tests.fixtures_agents import Channel

    base = await agent_channel()  # for its store, engines and cleanup of runner processes
    hub = type(base.hub)(base.astore, heartbeat_interval_s=0.5, ack_timeout_s=1.0)
    app = web.Application()
    setup_agent_channel(app, hub)
    setup_metrics(app)
    setup_agent_relay(app, "relay-secret")
    site_runner = web.AppRunner(app, handle_signals=False)
    await site_runner.setup()
    await web.TCPSite(site_runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{site_runner.addresses[0][1]}"
    ch = Channel(hub, url, base.store, base.astore, base.api_key, tmp_path / "relay", base.engines)
    ch.tmp.mkdir()
    store = ch.store
    try:
        a, b = store.create_workspace(_name("relay-a")), store.create_workspace(_name("relay-b"))
        key_a = store.create_api_key("a", workspace=a.name).secret
        key_b = store.create_api_key("b", workspace=b.name).secret
        pipe_a = store.create_pipe(PipeConfig(agent_id="support"), workspace_id=a.id).id
        runner_b = await ch.runner("support", env={"SPEECHPIPE_API_KEY": key_b})

        async def relay(session_id: str) -> dict[str, Any]:
            async with aiohttp.ClientSession() as http, http.ws_connect(
                    url + RELAY_PATH, headers={"Authorization": "Bearer relay-secret"}) as ws:
                await ws.send_json({"pipe_id": pipe_a, "agent_id": "support", "direction": "inbound_phone",
                                    "caller": "+15550100", "session_id": session_id})
                return await ws.receive_json(timeout=20)

        first = store.create_session(pipe_a, "support", "inbound_phone", caller="+15550100")
        assert await relay(first) == {"type": "no_agent", "reason": "no_runner"}
        assert ch.runner_info(runner_b.worker_id)["assigned_total"] == 0

        runner_a = await ch.runner("support", env={"SPEECHPIPE_API_KEY": key_a})
        second = store.create_session(pipe_a, "support", "inbound_phone", caller="+15550100")
        assert await relay(second) == {"type": "dispatched"}  # runner A accepted it and dialled its bridge
        assert ch.runner_info(runner_a.worker_id)["assigned_total"] == 1
        assert ch.runner_info(runner_b.worker_id)["assigned_total"] == 0
    finally:
        await ch.close()
        await site_runner.cleanup()
