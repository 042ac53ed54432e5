"""Several `serve` nodes as one deployment over Redis: who has runners for what; job offers between nodes.

Every node advertises under `speechpipe:<cluster>:node:<node_id>` (a key that expires unless refreshed)
its public URL and, per workspace and agent_id (`workspaces: {ws_id: {agent_id: room}}`), the capacity and
load of the runners connected to it: runners serve their API key's workspace only, so a session is offered
only to nodes with runners of its own workspace, and the offer names the workspace again for the other
node to pick among its runners. A node holding a
session that wants a runner of another node publishes an `offer` on that node's channel; the other node
hands the job to one of its runners (the same `job.assign`, carrying the session node's bridge URL and call
token) and publishes the runner's answer back. The runner then dials the session's node directly, so
neither the call's audio nor its text ever passes through the runners' node: a node that dies loses only
the sessions it held. A node whose advert lapses drops out; runner slots held for its jobs are released.

Messages on `speechpipe:<cluster>:node:<node_id>:jobs`, JSON with `op`:
  offer      {from, job_id, workspace_id, agent_id, assign, ack_ms}   session node → runners' node
  answer     {job_id, accepted, reason}                   runners' node → session node
  release    {job_id, cancel}                             session node → runners' node (job over)
  runner_lost {job_id, reason}                            runners' node → session node
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from speechpipe.errors import ConfigError


class Hub(Protocol):
    """What the cluster needs of this node's hub (`dispatch.AgentHub`, which holds the cluster in turn)."""

    cluster: Cluster | None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...

    def local_capacity(self) -> dict[str, dict[str, dict[str, int]]]: ...

    def forget_origins_except(self, live: set[str]) -> None: ...

    async def serve_offer(self, origin: str, agent_id: str, assign: dict[str, Any],
                          ack_s: float, workspace_id: str | None = None) -> tuple[bool, str | None]: ...

    def remote_answer(self, job_id: str, accepted: bool, reason: str | None) -> None: ...

    def release_served(self, job_id: str, *, cancel: bool) -> None: ...

    def remote_runner_lost(self, job_id: str, reason: str) -> None: ...

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class NodeOffer:
    """Room another node advertises for one agent_id of one workspace."""

    node_id: str
    url: str
    capacity: int
    load: int

    @property
    def free(self) -> int:
        return self.capacity - self.load


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def ws_url(base: str) -> str:
    """`http(s)://host` → `ws(s)://host` (runners dial bridges as WebSockets)."""
    base = base.rstrip("/")
    if base.startswith("http"):
        return "ws" + base[4:]
    return base


class Cluster:
    def __init__(self, hub: Hub, redis_url: str, *, public_url: str, node_id: str | None = None,
                 name: str = "default", advert_interval_s: float = 1.0, answer_slack_s: float = 1.0) -> None:
        """public_url: the base URL runners connected to other nodes reach this node at.
        name: the cluster's name; deployments sharing one Redis keep apart by it.
        answer_slack_s: how much longer than the ack deadline a remote answer may take (Redis round trips)."""
        self.hub = hub
        self.redis_url = redis_url
        self.node_id = node_id or default_node_id()
        self.prefix = f"speechpipe:{name}"
        self.nodes_set = f"{self.prefix}:nodes"
        self.public_url = public_url.rstrip("/")
        self.bridge_base = ws_url(self.public_url)
        self.advert_interval_s = advert_interval_s
        self.advert_ttl_ms = int(advert_interval_s * 3000)
        self.answer_slack_s = answer_slack_s
        self.redis = aioredis.from_url(redis_url, decode_responses=True, health_check_interval=10)
        self._pubsub: Any = None
        self._changed = asyncio.Event()
        self._inflight: dict[str, int] = {}  # offers to a node still waiting for its answer
        self._tasks: list[asyncio.Task[None]] = []
        self._live_nodes: set[str] = set()
        self.closed = False

    def channel(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}:jobs"

    def _advert_key(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"

    # ---- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.redis.ping()
            self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe(self.channel(self.node_id))
            await self._advertise()
        except (RedisError, OSError) as exc:
            await self.redis.aclose()
            raise ConfigError(f"SPEECHPIPE_REDIS_URL is set but Redis at {_display(self.redis_url)} "
                              f"cannot be used: {exc}") from exc
        self.hub.cluster = self
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen(), name="cluster-listen"),
                       loop.create_task(self._advertise_loop(), name="cluster-advertise")]
        log.info("cluster node %s up: public URL %s, Redis %s", self.node_id, self.public_url,
                 _display(self.redis_url))

    async def close(self) -> None:
        """Withdraw this node: no new offers come here; other nodes release what we held at once."""
        self.closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(self._advert_key(self.node_id))
            await self.redis.srem(self.nodes_set, self.node_id)
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()
        if self.hub.cluster is self:
            self.hub.cluster = None

    def changed(self) -> None:
        """Runner capacity or load changed: advertise soon, so other nodes do not offer into a full node."""
        self._changed.set()

    # ---- adverts ------------------------------------------------------------------------------------------
    async def _advertise(self) -> None:
        advert = {"node_id": self.node_id, "url": self.public_url, "ts": time.time(),
                  "workspaces": self.hub.local_capacity()}
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self._advert_key(self.node_id), json.dumps(advert), px=self.advert_ttl_ms)
            pipe.sadd(self.nodes_set, self.node_id)
            await pipe.execute()

    async def _advertise_loop(self) -> None:
        failing = False
        while not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.advert_interval_s)
            self._changed.clear()
            try:
                await self._advertise()
                adverts = await self._adverts()
                self._live_nodes = set(adverts)
                self.hub.forget_origins_except(self._live_nodes | {self.node_id})
                if failing:
                    log.info("cluster node %s: Redis is back", self.node_id)
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.error("cluster node %s: cannot reach Redis (%s); only local runners serve new "
                              "sessions until it is back", self.node_id, exc)
                failing = True
                await asyncio.sleep(self.advert_interval_s)

    async def _adverts(self) -> dict[str, dict[str, Any]]:
        nodes = sorted(await self.redis.smembers(self.nodes_set))
        if not nodes:
            return {}
        values = await self.redis.mget([self._advert_key(n) for n in nodes])
        adverts = {}
        stale = []
        for node_id, raw in zip(nodes, values, strict=True):
            if raw is None:
                stale.append(node_id)
                continue
            with contextlib.suppress(ValueError, TypeError):
                adverts[node_id] = json.loads(raw)
        if stale:  # lapsed adverts: the node is gone (or partitioned); forget it
            await self.redis.srem(self.nodes_set, *stale)
        return adverts

    async def offers(self, agent_id: str, workspace_id: str | None) -> list[NodeOffer]:
        """Other nodes' runners of `agent_id` in `workspace_id`: their advertised load plus our offers to them
        in flight."""
        try:
            adverts = await self._adverts()
        except (RedisError, OSError) as exc:
            log.warning("cluster: cannot read node adverts (%s); trying local runners only", exc)
            return []
        found = []
        for node_id, advert in adverts.items():
            if node_id == self.node_id:
                continue
            room = ((advert.get("workspaces") or {}).get(workspace_id or "") or {}).get(agent_id)
            if not room:
                continue
            load = int(room.get("load", 0)) + self._inflight.get(node_id, 0)
            found.append(NodeOffer(node_id, str(advert.get("url", "")), int(room.get("capacity", 0)), load))
        return found

    # ---- messages ---------------------------------------------------------------------------------------
    def send(self, node_id: str, message: dict[str, Any]) -> None:
        self.hub.spawn(self._publish(node_id, message))

    async def _publish(self, node_id: str, message: dict[str, Any]) -> bool:
        try:
            receivers = await self.redis.publish(self.channel(node_id), json.dumps(message))
        except (RedisError, OSError) as exc:
            log.warning("cluster: %s to node %s not sent: %s", message.get("op"), node_id, exc)
            return False
        if not receivers:
            log.warning("cluster: node %s is not listening (%s for job %s dropped)", node_id,
                        message.get("op"), message.get("job_id"))
        return receivers > 0

    async def offer(self, node_id: str, job_id: str, agent_id: str, assign: dict[str, Any],
                    ack_s: float, workspace_id: str | None = None) -> bool:
        """Publish a job offer to `node_id`; its answer comes back through `AgentHub.remote_answer`.
        Unless it returns False (not sent), the caller must call `offer_done` once the answer is in."""
        self._inflight[node_id] = self._inflight.get(node_id, 0) + 1
        sent = await self._publish(node_id, {"op": "offer", "from": self.node_id, "job_id": job_id,
                                             "workspace_id": workspace_id or "", "agent_id": agent_id,
                                             "assign": assign,
                                             "ack_ms": int(ack_s * 1000)})
        if not sent:
            self.offer_done(node_id)
        return sent

    def offer_done(self, node_id: str) -> None:
        left = self._inflight.get(node_id, 0) - 1
        if left > 0:
            self._inflight[node_id] = left
        else:
            self._inflight.pop(node_id, None)

    async def _listen(self) -> None:
        backoff = 0.2
        while not self.closed:
            try:
                async for message in self._pubsub.listen():
                    backoff = 0.2
                    if message.get("type") == "message":
                        self._on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.error("cluster node %s: job channel lost (%s); resubscribing", self.node_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
            except Exception:  # a bug of ours must not stop this node hearing offers
                log.exception("cluster node %s: job channel listener failed; restarting it", self.node_id)
                await asyncio.sleep(backoff)

    def _on_message(self, raw: str) -> None:
        try:
            m = json.loads(raw)
            op = m["op"]
            job_id = str(m["job_id"])
        except (ValueError, KeyError, TypeError):
            log.warning("cluster: unreadable message on the job channel: %.200r", raw)
            return
        hub = self.hub
        if op == "offer":
            hub.spawn(self._serve_offer(m))
        elif op == "answer":
            hub.remote_answer(job_id, bool(m.get("accepted")), m.get("reason"))
        elif op == "release":
            hub.release_served(job_id, cancel=bool(m.get("cancel")))
        elif op == "runner_lost":
            hub.remote_runner_lost(job_id, str(m.get("reason") or "runner_lost"))
        else:
            log.warning("cluster: unknown op %r on the job channel", op)

    async def _serve_offer(self, m: dict[str, Any]) -> None:
        origin = str(m.get("from") or "")
        try:
            # No workspace in the offer (a node of an older version) matches no runner of ours with one.
            accepted, reason = await self.hub.serve_offer(origin, str(m["agent_id"]), dict(m["assign"]),
                                                          float(m.get("ack_ms", 2000)) / 1000,
                                                          str(m.get("workspace_id") or "") or None)
        except Exception:
            log.exception("cluster: serving offer %s from %s failed", m.get("job_id"), origin)
            accepted, reason = False, "node_error"
        await self._publish(origin, {"op": "answer", "job_id": m["job_id"], "accepted": accepted,
                                     "reason": reason})


def _display(url: str) -> str:
    """The Redis URL without its password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
