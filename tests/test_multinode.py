"""Two real `serve` nodes on loopback, one PostgreSQL, one Redis: runners on either node answer sessions held
by the other; a node that dies takes only its own sessions with it.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from .nodes import BIN, Cluster, Talker, clean_env, hub_events
from .speech import normalise_text

pytestmark = pytest.mark.postgres

SENTENCES = ["What time does the shop open tomorrow?", "Please send me the invoice by email.",
             "I would like to book a table for two."]


def echoed(heard: str, answer: str) -> bool:
    return answer == f"You said: {heard}" and bool(normalise_text(heard))


async def test_runner_on_one_node_answers_sessions_on_the_other(cluster: Cluster) -> None:
    node_a, node_b = await cluster.start_nodes("A", "B")
    await cluster.start_runner("r1", "A")
    assert cluster.advertised_runners("B") == 0
    async with aiohttp.ClientSession() as http:
        # Sessions held by node B, answered by the runner connected to node A only.
        talkers = [Talker(http, node_b, cluster.api_key, cluster.pipe_id) for _ in range(2)]
        greetings = await asyncio.gather(*(t.open() for t in talkers))
        assert all(g["text"] == "Hello! This is the echo agent on the web." for g in greetings)
        load = cluster.room("A")["load"]
        assert load == 2, cluster.advert("A")  # node A holds runner slots for B's two sessions
        answers = await asyncio.gather(*(t.say(s) for t, s in zip(talkers, SENTENCES, strict=False)))
        for heard, answer in answers:
            assert echoed(heard, answer), (heard, answer)
        assert [await t.close() for t in talkers] == [(1000, "normal: client_stop")] * 2
        # Both nodes count it: B gave two jobs to a peer's runner, A's runner took two for a peer.
        assert (await hub_events(http, node_b.base)).get("jobs_accepted_by_peers") == 2
        assert (await hub_events(http, node_a.base)).get("jobs_accepted_for_peers") == 2
        b_ids = [t.session_id for t in talkers]

        # The runner moves: stop it on A, start one on B. New sessions on either node go to it.
        await cluster.stop_runner("r1", "A")
        await cluster.start_runner("r2", "B", fallback=("A",))
        on_b, on_a = Talker(http, node_b, cluster.api_key, cluster.pipe_id), \
            Talker(http, node_a, cluster.api_key, cluster.pipe_id)
        await asyncio.gather(on_b.open(), on_a.open())
        for talker, sentence in ((on_b, SENTENCES[0]), (on_a, SENTENCES[1])):
            assert echoed(*await talker.say(sentence))

        # Node B dies (SIGKILL: no goodbye). Its own session is lost; A's session, whose runner dialled
        # A's bridge directly, goes on talking through the runner whose control socket was on B.
        cluster.nodes["B"].stop(signal.SIGKILL)
        assert echoed(*await on_a.say(SENTENCES[2]))
        assert await on_a.close() == (1000, "normal: client_stop")
        lost = await on_b.client.closed(timeout_s=5)
        assert lost[0] != 1000, lost
        # The runner redials the next node it knows, so A's new sessions still find it.
        await cluster.wait_advertised("A", 1)
        after = Talker(http, node_a, cluster.api_key, cluster.pipe_id)
        await after.open()
        assert echoed(*await after.say(SENTENCES[0]))
        assert await after.close() == (1000, "normal: client_stop")

    # Everything A and B wrote is in the one PostgreSQL database.
    store = cluster.store
    for sid in b_ids:
        rec = store.get_session(sid)
        assert (rec.direction, rec.end_reason) == ("web", "client_stop")
        roles = [t.role for t in store.list_turns(sid)]
        assert roles == ["agent", "user", "agent"], roles
    rec = store.get_session(on_a.session_id)
    assert rec.end_reason == "client_stop"
    assert [t.role for t in store.list_turns(on_a.session_id)] == ["agent", "user", "agent", "user", "agent"]
    assert store.get_session(on_b.session_id).end_reason is None  # lost with its node, never ended


def test_redis_without_a_shared_database_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run([str(BIN / "speechpipe"), "serve", "--port", "0"], capture_output=True, text=True,
                          timeout=60, env=clean_env(SPEECHPIPE_DATA_DIR=str(tmp_path),
                                                    SPEECHPIPE_REDIS_URL="redis://127.0.0.1:6379/0"))
    assert proc.returncode == 2, proc.stderr
    assert "set SPEECHPIPE_DATABASE_URL to PostgreSQL" in proc.stderr


def test_unreachable_redis_is_a_clear_startup_error(cluster: Cluster, tmp_path: Path) -> None:
    proc = subprocess.run([str(BIN / "speechpipe"), "serve", "--port", "0"], capture_output=True, text=True,
                          timeout=60, env=clean_env(SPEECHPIPE_DATA_DIR=str(tmp_path),
                                                    SPEECHPIPE_DATABASE_URL=cluster.db_url,
                                                    SPEECHPIPE_REDIS_URL="redis://:hunter2@127.0.0.1:1/0"))
    assert proc.returncode == 2, proc.stderr
    assert "Redis at redis://***@127.0.0.1:1/0 cannot be used" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout
