"""`AgentHub`: the registry of connected runners and the dispatch of sessions to them.

Runners register per `agent_id` with a capacity over the control socket. `dispatch()` offers a session to
the least-loaded runner of its agent_id (`job.assign`), waits for `job.ack` up to the ack deadline, and on a
rejection or a late/missing ack offers it to the next runner; once a runner accepts and its bridge socket
says `hello`, the session gets a `BridgeLink`. Load counts a job from the moment it is offered, so
concurrent dispatches never over-fill a runner. Dead runners are found two ways: their control socket
closes, or their heartbeats stop (then their calls fail at once: a frozen process cannot redial; only a call
whose bridge still carried a runner frame within `bridge_idle_s` is kept, as after a plain disconnect).

Idle timers count real frames only. A registered control socket with no frame from the runner (its
`heartbeat`s, acks, ...) for `heartbeat_timeout_s` is closed with 4408 (CLOSE_HEARTBEAT) and the runner
leaves the rotation; a bridge with no runner frame for `bridge_idle_s` is closed with 4408 too, and may be
redialled with its call token within the grace (the SDK does, and sends a keepalive `ack` every heartbeat
interval on a quiet bridge). WebSocket pings and pongs reset neither: aiohttp answers them itself, so a
peer whose process only pings is as dead to the hub as a silent one.

The ack deadline is a reason to fail over, never a verdict by itself: it starts once the offer is written,
frames that already reached this process are read before it counts as missed (a busy event loop is not a
silent runner), and when no other runner could take the session the offer stays open (a runner that is
merely slow, e.g. under a burst of calls, is still the best there is) until the runner answers, is lost,
the session ends, or the dispatch deadline passes. Consecutive missed acks take a runner out of rotation
until it proves alive (an ack, even a late one, or a heartbeat), so one that never acks does not keep
getting offers ahead of healthy ones.

Pools are per workspace: a runner registers with an API key and serves only sessions of pipes in that
key's workspace (`RunnerConn.workspace_id`); a session's workspace is its pipe's (`workspace_of`, looked
up once per pipe). The same agent_id in two workspaces is two pools that never see each other's calls,
here and across nodes (adverts and offers between nodes carry the workspace).

With a `cluster.Cluster` attached (several nodes over Redis), runners of other nodes are candidates too:
each stands in here as a `RunnerConn` whose `node` is set, and the offer travels over Redis; jobs this node
serves for another node's sessions carry their `origin`.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from speechpipe import protocol as p
from speechpipe.errors import AuthenticationError, Code, NotFoundError

from .agent_bridge import Bridge, BridgeLink, NoAgentAvailable, close_socket, send_frame

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RunnerConn:
    runner_id: str
    key_id: str
    worker_id: str
    agent_id: str
    capacity: int
    bridge_base: str
    order: int
    ws: web.WebSocketResponse | None = None
    pid: int | None = None
    sdk: str | None = None
    jobs: dict[str, Job] = field(default_factory=dict)
    reported_active: int = 0
    draining: bool = False
    alive: bool = True
    last_seen: float = field(default_factory=time.monotonic)
    missed_acks: int = 0  # offers in a row it did not ack in time; an ack or a heartbeat resets it
    out_of_rotation: bool = False  # too many missed acks: no offers until it proves alive
    assigned_total: int = 0
    acks_total: int = 0  # offers it answered in time (accepted or not)
    ack_timeouts_total: int = 0
    acks_late_total: int = 0
    node: str | None = None  # set on a stand-in for the runners of another node
    workspace_id: str | None = None  # its API key's: it serves sessions of this workspace's pipes only

    @property
    def load(self) -> int:
        # The runner's own count covers calls we cannot see (e.g. taken from another serve node).
        return max(len(self.jobs), self.reported_active)

    def snapshot(self) -> dict[str, Any]:
        return {"runner_id": self.runner_id, "worker_id": self.worker_id, "agent_id": self.agent_id,
                "workspace_id": self.workspace_id, "capacity": self.capacity, "load": self.load,
                "draining": self.draining, "alive": self.alive,
                "pid": self.pid, "sdk": self.sdk, "assigned_total": self.assigned_total,
                "missed_acks": self.missed_acks, "in_rotation": not self.out_of_rotation,
                "acks_total": self.acks_total, "ack_timeouts_total": self.ack_timeouts_total,
                "acks_late_total": self.acks_late_total}


@dataclass(eq=False)
class Job:
    job_id: str
    session_id: str
    agent_id: str
    runner: RunnerConn
    token: str
    ack: asyncio.Future[tuple[bool, str | None]]
    bridge: Bridge | None = None
    released: bool = False
    origin: str | None = None  # the node holding the session, when this node serves another's job
    workspace_id: str | None = None  # the session's (its pipe's): only runners of it may take the job


# secret -> the API key (a records.ApiKey: its id and workspace_id), or just its id (then no workspace);
# raises AuthenticationError
Authenticate = Callable[[str], Awaitable[Any] | Any]
Answer = tuple[bool, str | None]  # a runner's job.ack: (accepted, reason)


class AgentHub:
    def __init__(self, store: Any = None, *, authenticate: Authenticate | None = None,
                 heartbeat_interval_s: float = 5.0, heartbeat_timeout_s: float | None = None,
                 ack_timeout_s: float = 2.0, hello_timeout_s: float = 5.0, dispatch_timeout_s: float = 10.0,
                 bridge_grace_s: float = 10.0, orphan_grace_s: float = 0.5, bridge_ping_s: float = 10.0,
                 bridge_idle_s: float | None = None, public_url: str | None = None,
                 out_of_rotation_after: int = 2, max_errors: int = 100,
                 verbs: tuple[str, ...] | None = None) -> None:
        """`store` (Store or AsyncStore) checks runners' API keys, unless `authenticate` is given.

        bridge_grace_s: how long a dropped bridge may take to redial while its runner is connected;
        orphan_grace_s: the same once the runner's control socket is gone too (a crash, most likely).
        heartbeat_timeout_s: a registered control socket with no frame from its runner for this long (default
        3 heartbeat intervals; WebSocket pings do not count) is closed with 4408 and the runner is lost.
        bridge_ping_s: WebSocket ping interval on bridges (a pong must come within half of it).
        bridge_idle_s: a bridge with no frame from its runner for this long (default heartbeat_timeout_s;
        pings do not count, the SDK's keepalive acks do) is closed with 4408; the runner may redial it.
        public_url: base URL runners reach this node at (default: the host they dialled the control on).
        ack_timeout_s: how long an offer waits for its ack before it fails over to another runner (with no
        other runner to try, it waits on, up to dispatch_timeout_s); out_of_rotation_after: missed acks in a
        row that stop offers to a runner until it acks or heartbeats.
        """
        if store is None and authenticate is None:
            raise ValueError("AgentHub needs a store or an authenticate callable to check runners' keys")
        self.store = store
        self._authenticate = authenticate
        self.cluster: Cluster | None = None
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s or 3 * heartbeat_interval_s
        self.ack_timeout_s = ack_timeout_s
        self.out_of_rotation_after = max(1, out_of_rotation_after)
        self.hello_timeout_s = hello_timeout_s
        self.dispatch_timeout_s = dispatch_timeout_s
        self.bridge_grace_s = bridge_grace_s
        self.orphan_grace_s = orphan_grace_s
        self.bridge_ping_s = bridge_ping_s
        self.bridge_idle_s = bridge_idle_s or self.heartbeat_timeout_s
        self.public_url = public_url.rstrip("/") if public_url else None
        self.max_errors = max_errors
        self.verbs = verbs if verbs is not None else session_verbs()
        self.counters: collections.Counter[str] = collections.Counter()
        self._runners: dict[str, RunnerConn] = {}
        self._by_worker: dict[tuple[str, str], RunnerConn] = {}
        self._jobs: dict[str, Job] = {}
        self._tokens: dict[str, Bridge] = {}
        self._expired: collections.OrderedDict[str, RunnerConn] = collections.OrderedDict()
        self._order = 0
        self._pipe_workspaces: dict[str, str | None] = {}  # a pipe never changes workspace: cached for good
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self.closed = False

    # ---- runners ------------------------------------------------------------------------------------
    async def authenticate(self, secret: str | None) -> tuple[str, str | None]:
        """(API key id, its workspace id) for a runner's secret; raises AuthenticationError."""
        if not secret:
            raise AuthenticationError("an API key is required (Authorization: Bearer <key>)",
                                      code=Code.UNAUTHORIZED)
        if self._authenticate is not None:
            result = self._authenticate(secret)
            key = await result if inspect.isawaitable(result) else result
        else:
            key = await self._store_call("verify_api_key", secret)
        if isinstance(key, str):
            return key, None
        return key.id, getattr(key, "workspace_id", None)

    async def _store_call(self, name: str, *args: Any) -> Any:
        """A method of the store, awaited (AsyncStore) or run off the loop (Store)."""
        fn = getattr(self.store, name)
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def workspace_of(self, session: Any) -> str | None:
        """The workspace a session belongs to: its pipe's. Without a store (an `authenticate` callable only),
        None, as every runner's then. A pipe id the store does not know (sessions benchmarks make by hand;
        the product only makes sessions of real pipes) is taken for the default workspace."""
        if self.store is None:
            return None
        pipe_id = str(session.info.pipe_id)
        if pipe_id in self._pipe_workspaces:
            return self._pipe_workspaces[pipe_id]
        try:
            ws: str | None = await self._store_call("pipe_workspace", pipe_id)
        except NotFoundError:
            log.warning("session %s: pipe %r is unknown; dispatching in the default workspace",
                        session.session_id, pipe_id)
            return await self._store_call("default_workspace_id")  # type: ignore[no-any-return]
        if len(self._pipe_workspaces) >= 100_000:
            self._pipe_workspaces.clear()
        self._pipe_workspaces[pipe_id] = ws
        return ws

    def register(self, ws: web.WebSocketResponse, frame: dict[str, Any], key_id: str,
                 bridge_base: str, workspace_id: str | None = None) -> RunnerConn:
        self._ensure_heartbeat()
        worker_id = frame.get("worker_id") or f"w_{secrets.token_hex(6)}"
        runner = self._by_worker.get((key_id, worker_id))
        if runner is not None:
            old = runner.ws
            if old is not None and old is not ws and not old.closed:
                self.spawn(close_socket(old, p.CLOSE_REPLACED, "this worker registered again"))
            self.counters["runner_reconnects"] += 1
        else:
            self._order += 1
            runner = RunnerConn(runner_id=f"run_{secrets.token_hex(8)}", key_id=key_id, worker_id=worker_id,
                                agent_id=frame["agent_id"], capacity=frame["capacity"],
                                bridge_base=bridge_base, order=self._order, workspace_id=workspace_id)
            self._by_worker[(key_id, worker_id)] = runner
            self._runners[runner.runner_id] = runner
        runner.ws = ws
        runner.agent_id = frame["agent_id"]
        runner.capacity = frame["capacity"]
        runner.bridge_base = bridge_base
        runner.pid = frame.get("pid")
        runner.sdk = frame.get("sdk")
        runner.reported_active = frame.get("active") or 0
        runner.draining = False
        runner.alive = True
        runner.last_seen = time.monotonic()
        for job in runner.jobs.values():  # calls waiting for a redial get the long grace again
            if job.bridge is not None:
                job.bridge.arm_grace()
        self.counters["runners_registered"] += 1
        self._changed()
        log.info("runner %s registered: agent=%s workspace=%s capacity=%d worker=%s pid=%s", runner.runner_id,
                 runner.agent_id, runner.workspace_id, runner.capacity, worker_id, runner.pid)
        return runner

    def registered_frame(self, runner: RunnerConn) -> dict[str, Any]:
        return {"type": p.REGISTERED, "runner_id": runner.runner_id, "protocol": p.PROTOCOL_VERSION,
                "heartbeat_interval_ms": int(self.heartbeat_interval_s * 1000),
                "heartbeat_timeout_ms": int(self.heartbeat_timeout_s * 1000)}

    async def on_control_frame(self, runner: RunnerConn, frame: dict[str, Any]) -> dict[str, Any] | None:
        """One validated frame from a registered runner; returns an error frame to answer with, if any."""
        runner.last_seen = time.monotonic()
        kind = frame["type"]
        if kind == p.HEARTBEAT:
            if "active" in frame:
                runner.reported_active = frame["active"]
            self._proved_alive(runner)
        elif kind == p.JOB_ACK:
            self._proved_alive(runner)
            return self._on_ack(runner, frame)
        elif kind == p.DRAIN:
            if not runner.draining:
                runner.draining = True
                self.counters["runners_drained"] += 1
                self._changed()
                log.info("runner %s drains: no new jobs (%d live)", runner.runner_id, runner.load)
        elif kind == p.REGISTER:
            return p.error_frame(p.Codes.OUT_OF_ORDER, "already registered on this socket")
        return None

    def _on_ack(self, runner: RunnerConn, frame: dict[str, Any]) -> dict[str, Any] | None:
        job_id = frame["job_id"]
        job = self._jobs.get(job_id)
        if job is None or job.runner is not runner:
            if self._expired.get(job_id) is runner:
                self.counters["acks_late"] += 1
                runner.acks_late_total += 1
                if frame["accepted"]:  # too late: tell the runner to drop it (the token is dead already)
                    return {"type": p.JOB_CANCEL, "job_id": job_id, "reason": "ack_late"}
                return None
            return p.error_frame(p.Codes.UNKNOWN_JOB, f"no job {job_id[:64]!r} is waiting for your ack")
        if job.ack.done():
            return p.error_frame(p.Codes.OUT_OF_ORDER, f"job {job_id} was already acknowledged")
        job.ack.set_result((frame["accepted"], frame.get("reason")))
        runner.acks_total += 1
        return None

    def _proved_alive(self, runner: RunnerConn) -> None:
        runner.missed_acks = 0
        if runner.out_of_rotation:
            runner.out_of_rotation = False
            self.counters["runners_back_in_rotation"] += 1
            log.info("runner %s answers again: back in rotation", runner.runner_id)
            self._changed()

    def _missed_ack(self, runner: RunnerConn) -> None:
        runner.missed_acks += 1
        runner.ack_timeouts_total += 1
        self.counters["acks_timed_out"] += 1
        if runner.missed_acks >= self.out_of_rotation_after and not runner.out_of_rotation:
            runner.out_of_rotation = True
            self.counters["runners_out_of_rotation"] += 1
            log.warning("runner %s missed %d acks in a row: out of rotation until it acks or heartbeats",
                        runner.runner_id, runner.missed_acks)
            self._changed()

    def runner_lost(self, runner: RunnerConn, reason: str) -> None:
        """The runner's control socket is gone (closed, or silent past the heartbeat timeout)."""
        if not runner.alive:
            return
        runner.alive = False
        runner.ws = None
        self.counters[f"runners_lost_{reason}"] += 1
        log.warning("runner %s (%s, worker %s) lost: %s; %d calls", runner.runner_id, runner.agent_id,
                    runner.worker_id, reason, len(runner.jobs))
        for job in list(runner.jobs.values()):
            if not job.ack.done():
                job.ack.set_result((False, "runner_lost"))
            elif job.origin is not None:  # the session's node holds the bridge: it decides
                if self.cluster is not None:
                    self.cluster.send(job.origin, {"op": "runner_lost", "job_id": job.job_id,
                                                   "reason": reason})
                self.release(job, "runner_lost")
            elif job.bridge is not None:
                self._bridge_of_lost_runner(job.bridge, reason)
        self._forget_if_idle(runner)
        self._changed()

    def _bridge_of_lost_runner(self, bridge: Bridge, reason: str) -> None:
        """A call whose runner's control socket is gone. After a heartbeat timeout the process is taken for
        frozen (it will not redial) unless the bridge itself still carried a frame lately: then, as after a
        plain disconnect, the call goes on (a frozen one is caught by the bridge's own idle timer)."""
        if not bridge.ready.is_set() or (reason == "heartbeat_timeout"
                                         and not bridge.heard_within(self.bridge_idle_s)):
            bridge.fail("runner_lost")  # a silent process will not redial
        elif not bridge.attached:
            bridge.arm_grace()  # now the short, orphan grace

    def _forget_if_idle(self, runner: RunnerConn) -> None:
        if not runner.alive and not runner.jobs:
            self._runners.pop(runner.runner_id, None)
            if self._by_worker.get((runner.key_id, runner.worker_id)) is runner:
                del self._by_worker[(runner.key_id, runner.worker_id)]

    # ---- heartbeats -----------------------------------------------------------------------------------
    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeats(),
                                                                     name="agent-heartbeats")

    async def _heartbeats(self) -> None:
        beat = {"type": p.HEARTBEAT}
        while not self.closed:
            await asyncio.sleep(self.heartbeat_interval_s)
            now = time.monotonic()
            sends = []
            for runner in list(self._runners.values()):
                ws = runner.ws
                if not runner.alive or ws is None:
                    continue
                if now - runner.last_seen > self.heartbeat_timeout_s:
                    # Only frames move last_seen: a socket that just answers (or sends) pings ends here.
                    log.warning("runner %s: no frame on its control socket for %.1f s (timeout %g s); "
                                "closing with %d", runner.runner_id, now - runner.last_seen,
                                self.heartbeat_timeout_s, p.CLOSE_HEARTBEAT)
                    self.runner_lost(runner, "heartbeat_timeout")
                    self.spawn(close_socket(ws, p.CLOSE_HEARTBEAT, "no heartbeat"))
                    continue
                sends.append(send_frame(ws, beat))
            if sends:  # all at once: one runner with a full socket buffer does not delay the others
                await asyncio.gather(*sends)

    # ---- dispatch ---------------------------------------------------------------------------------------
    async def dispatch(self, session: Any, agent_id: str | None = None,
                       within_s: float | None = None) -> BridgeLink:
        """An `AgentLink` to a runner of `agent_id` (default: the session's) that accepted the session and
        whose bridge said hello. Raises NoAgentAvailable (reason: no_runner, at_capacity, ack_timeout,
        rejected reasons, bridge_timeout, runner_lost, session_ended)."""
        bridge = await self.offer(session, agent_id or session.info.agent_id, within_s)
        link = BridgeLink(self, session, bridge)
        for message in bridge.take_early():
            link.deliver(message)
        self.counters["dispatched"] += 1
        return link

    async def offer(self, session: Any, agent_id: str, within_s: float | None = None) -> Bridge:
        """Offer the session to runners of `agent_id`, least loaded first, until one accepts and dials."""
        session_id = str(session.session_id)
        deadline = time.monotonic() + (within_s if within_s is not None else self.dispatch_timeout_s)
        workspace_id = await self.workspace_of(session)
        tried: set[str] = set()
        reason: str | None = None
        while True:
            if _session_over(session):
                raise NoAgentAvailable("session_ended")
            untried = [r for r in self._local_pool(agent_id, workspace_id) if r.runner_id not in tried]
            if self.cluster is not None:
                untried += [r for r in await self._remote_pool(agent_id, workspace_id)
                            if r.runner_id not in tried]
            free = [r for r in untried if r.load < r.capacity]
            remaining = deadline - time.monotonic()
            if not free or remaining <= 0:
                if untried and remaining > 0:
                    reason = "at_capacity"
                raise NoAgentAvailable(reason or ("no_runner" if remaining > 0 else "dispatch_timeout"))
            # Least loaded first; on a tie, a runner of this node (no Redis round trip).
            runner = min(free, key=lambda r: (r.load / r.capacity, r.node is not None, r.load, r.missed_acks,
                                              r.assigned_total, r.order))
            tried.add(runner.runner_id)
            job = self._new_job(session_id, agent_id, runner, workspace_id)
            outcome = await self._try(job, session, min(self.ack_timeout_s, remaining), deadline, tried,
                                      sole=len(free) == 1)
            if outcome is None:
                assert job.bridge is not None
                return job.bridge
            reason = outcome

    def _local_pool(self, agent_id: str, workspace_id: str | None) -> list[RunnerConn]:
        """The runners of this node that take offers for `agent_id` of `workspace_id` now."""
        return [r for r in self._runners.values()
                if r.agent_id == agent_id and r.workspace_id == workspace_id and r.alive and not r.draining
                and not r.out_of_rotation]

    async def _other_free(self, agent_id: str, workspace_id: str | None, tried: set[str], *,
                          remote: bool = True) -> bool:
        """Whether a runner not tried yet (here, or with `remote` on another node) has a free slot."""
        if any(r.load < r.capacity for r in self._local_pool(agent_id, workspace_id)
               if r.runner_id not in tried):
            return True
        if remote and self.cluster is not None:
            return any(r.load < r.capacity for r in await self._remote_pool(agent_id, workspace_id)
                       if r.runner_id not in tried)
        return False

    async def _remote_pool(self, agent_id: str, workspace_id: str | None) -> list[RunnerConn]:
        """One stand-in per other node with runners of `agent_id` in `workspace_id`: its runners' summed
        capacity and load."""
        assert self.cluster is not None
        return [RunnerConn(runner_id=f"node:{o.node_id}", key_id="", worker_id="", agent_id=agent_id,
                           capacity=o.capacity, bridge_base=o.url, order=0, reported_active=o.load,
                           node=o.node_id, workspace_id=workspace_id)
                for o in await self.cluster.offers(agent_id, workspace_id) if o.capacity > 0]

    def _new_job(self, session_id: str, agent_id: str, runner: RunnerConn, workspace_id: str | None) -> Job:
        job = Job(job_id=f"job_{secrets.token_hex(8)}", session_id=session_id, agent_id=agent_id,
                  runner=runner, token="spc_" + secrets.token_urlsafe(32),
                  ack=asyncio.get_running_loop().create_future(), workspace_id=workspace_id)
        job.bridge = Bridge(self, job)
        runner.jobs[job.job_id] = job
        runner.assigned_total += 1
        self._jobs[job.job_id] = job
        self._tokens[job.token] = job.bridge
        return job

    async def _try(self, job: Job, session: Any, ack_s: float, deadline: float, tried: set[str], *,
                   sole: bool) -> str | None:
        """One offer: None when the runner accepted and dialled in; else why not. `ack_s` is the ack deadline,
        `deadline` the whole dispatch's; `sole`: no other runner had a free slot when this one was picked."""
        runner = job.runner
        info = session.info
        cluster = self.cluster if runner.node is not None else None
        base = cluster.bridge_base if cluster is not None else self.public_url or runner.bridge_base
        assign = {"type": p.JOB_ASSIGN, "job_id": job.job_id, "session_id": job.session_id,
                  "agent_id": job.agent_id, "bridge_url": f"{base}/v1/agents/bridge/{job.session_id}",
                  "call_token": job.token, "deadline_ms": int(ack_s * 1000),
                  "metadata": {"direction": info.direction, "pipe_id": info.pipe_id, "caller": info.caller,
                               **(info.metadata or {})}}
        self.counters["jobs_offered"] += 1
        if runner.node is not None:
            self.counters["jobs_offered_to_peers"] += 1
            # The other node applies the ack deadline to each of its runners; with nobody else to try, it
            # may wait on its last one up to our dispatch deadline, as we would on a runner of ours.
            offer_s = max(ack_s, deadline - time.monotonic()) if sole else ack_s
            sent = cluster is not None and await cluster.offer(runner.node, job.job_id, job.agent_id,
                                                                 assign, offer_s, job.workspace_id)
            if cluster is None or not sent:
                self.release(job, "node_unreachable")
                return "node_unreachable"
            try:
                answer = await self._await_ack(job, offer_s + cluster.answer_slack_s, deadline, session)
            finally:
                cluster.offer_done(runner.node)
        else:
            if runner.ws is None or not await send_frame(runner.ws, assign):
                self.release(job, "runner_lost")
                return "runner_lost"
            # The ack deadline starts now, with the offer written.
            answer = await self._await_ack(job, ack_s, deadline, session,
                                           lambda: self._other_free(job.agent_id, job.workspace_id, tried))
        if isinstance(answer, str):  # no answer
            if answer == "ack_timeout":
                log.warning("runner %s did not ack job %s (ack deadline %.0f ms); %s", runner.runner_id,
                            job.job_id, ack_s * 1000, "failing over" if time.monotonic() < deadline
                            else "dispatch deadline passed")
                self._missed_ack(runner)
            self._expire(job, answer)
            return answer
        accepted, why = answer
        if not accepted:
            why = why or p.REJECT_REFUSED
            self.counters[f"jobs_rejected_{why}"] += 1
            log.info("runner %s rejected job %s: %s", runner.runner_id, job.job_id, why)
            self.release(job, f"rejected:{why}")
            return why
        self.counters["jobs_accepted"] += 1
        if runner.node is not None:
            self.counters["jobs_accepted_by_peers"] += 1
        assert job.bridge is not None
        # A runner that accepted gets the whole hello window, even past the dispatch deadline: it took the
        # call, and its bridge is one dial away.
        if not await job.bridge.wait_ready(self.hello_timeout_s):
            if job.bridge.over:  # failed while we waited (the runner died)
                return job.bridge.end_reason or "runner_lost"
            self.counters["bridge_timeouts"] += 1
            if runner.ws is not None:
                await send_frame(runner.ws, {"type": p.JOB_CANCEL, "job_id": job.job_id,
                                             "reason": "no_hello"})
            job.bridge.end("bridge_timeout", p.CLOSE_CALL_OVER)
            return "bridge_timeout"
        return None

    async def _await_ack(self, job: Job, ack_s: float, deadline: float, session: Any = None,
                         other_free: Callable[[], Awaitable[bool]] | None = None) -> Answer | str:
        """The runner's answer (accepted, reason), or why there is none: ack_timeout, session_ended, or the
        reason the job ended meanwhile.

        Nothing counts as missed before the frames that already reached this process are read: on a busy
        event loop the deadline's timer can fire before the socket holding the ack is. Then, with
        `other_free` given, the offer fails over only if it finds another runner to try; else the runner
        (it may be slow, not dead: a burst, a loaded machine) is waited for up to `deadline`, while the
        session lasts. A runner found dead meanwhile answers (False, runner_lost) through `runner_lost`."""
        ack = job.ack
        limit = ack_s
        ended: asyncio.Future[Any] | None = None
        try:
            while True:
                waits: set[asyncio.Future[Any]] = {ack} if ended is None else {ack, ended}
                await asyncio.wait(waits, timeout=max(0.0, limit), return_when=asyncio.FIRST_COMPLETED)
                await _settle(ack)
                if ack.done():
                    if ack.cancelled():  # released meanwhile (the bridge ended: server shutdown, ...)
                        return (job.bridge.end_reason if job.bridge is not None else None) or "runner_lost"
                    return ack.result()
                if _session_over(session):
                    return "session_ended"
                left = deadline - time.monotonic()
                if other_free is None or left <= 0 or await other_free():
                    return "ack_timeout"
                if ended is None:
                    self.counters["acks_slow"] += 1
                    log.info("runner %s has not acked job %s within %.0f ms; no other runner to try: the "
                             "offer stays open", job.runner.runner_id, job.job_id, ack_s * 1000)
                    event = getattr(session, "ended", None)
                    if isinstance(event, asyncio.Event):
                        ended = asyncio.ensure_future(event.wait())
                limit = min(ack_s, left)
        finally:
            if ended is not None:
                ended.cancel()

    def _expire(self, job: Job, reason: str = "ack_timeout") -> None:
        """Give up on an offer that was not answered: a late accept gets a job.cancel."""
        self._remember_expired(job.job_id, job.runner)
        assert job.bridge is not None
        job.bridge.end(reason, p.CLOSE_CALL_OVER)

    def _remember_expired(self, job_id: str, runner: RunnerConn) -> None:
        self._expired[job_id] = runner
        while len(self._expired) > 1024:
            self._expired.popitem(last=False)

    def release(self, job: Job, reason: str) -> None:
        """The job no longer holds a slot on its runner, and its call token is dead."""
        if job.released:
            return
        job.released = True
        refused = job.ack.done() and not job.ack.cancelled() and not job.ack.result()[0]
        if not job.ack.done():
            job.ack.cancel()
        job.runner.jobs.pop(job.job_id, None)
        self._jobs.pop(job.job_id, None)
        self._tokens.pop(job.token, None)
        self._forget_if_idle(job.runner)
        node = job.runner.node
        if node is not None and self.cluster is not None and not refused:
            # The other node holds a runner slot for this job until told; a runner that never dialled
            # in is told to drop the job.
            ready = job.bridge is not None and job.bridge.ready.is_set()
            self.cluster.send(node, {"op": "release", "job_id": job.job_id, "cancel": not ready,
                                     "reason": reason})
        self._changed()

    # ---- jobs between nodes (see cluster.py) -------------------------------------------------------------
    def _changed(self) -> None:
        if self.cluster is not None:
            self.cluster.changed()

    def local_capacity(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per workspace id ("" for none), per agent_id, the runners connected here that take jobs: what this
        node advertises."""
        pools: dict[str, dict[str, dict[str, int]]] = {}
        for r in self._runners.values():
            if r.alive and not r.draining and not r.out_of_rotation and r.node is None:
                agents = pools.setdefault(r.workspace_id or "", {})
                a = agents.setdefault(r.agent_id, {"runners": 0, "capacity": 0, "load": 0})
                a["runners"] += 1
                a["capacity"] += r.capacity
                a["load"] += r.load
        return pools

    async def serve_offer(self, origin: str, agent_id: str, assign: dict[str, Any],
                          ack_s: float, workspace_id: str | None = None) -> tuple[bool, str | None]:
        """A session of `workspace_id` on node `origin` wants a runner of `agent_id`: offer its `job.assign`
        (bridge URL and call token are the origin's) to ours of that workspace, least loaded first, within
        `ack_s`: each runner gets our ack deadline before the next is tried, the last one the rest of
        `ack_s`. (accepted, why not)."""
        job_id = str(assign["job_id"])
        if job_id in self._jobs:
            return False, "duplicate_job"
        self.counters["jobs_offered_by_peers"] += 1
        deadline = time.monotonic() + ack_s
        tried: set[str] = set()
        reason: str | None = None
        while True:
            untried = [r for r in self._local_pool(agent_id, workspace_id) if r.runner_id not in tried]
            free = [r for r in untried if r.load < r.capacity]
            remaining = deadline - time.monotonic()
            if not free or remaining <= 0:
                if untried and remaining > 0:
                    reason = "at_capacity"
                return False, reason or ("no_runner" if remaining > 0 else "ack_timeout")
            runner = min(free, key=lambda r: (r.load / r.capacity, r.load, r.missed_acks, r.assigned_total,
                                              r.order))
            tried.add(runner.runner_id)
            job = Job(job_id=job_id, session_id=str(assign["session_id"]), agent_id=agent_id, runner=runner,
                      token=str(assign["call_token"]), ack=asyncio.get_running_loop().create_future(),
                      origin=origin, workspace_id=workspace_id)
            runner.jobs[job_id] = job
            runner.assigned_total += 1
            self._jobs[job_id] = job
            self._changed()
            ack_i = min(self.ack_timeout_s, remaining)
            frame = {**assign, "deadline_ms": int(ack_i * 1000)}
            if runner.ws is None or not await send_frame(runner.ws, frame):
                self.release(job, "runner_lost")
                reason = "runner_lost"
                continue
            answer = await self._await_ack(job, ack_i, deadline, None,
                                           lambda: self._other_free(agent_id, workspace_id, tried,
                                                                    remote=False))
            if isinstance(answer, str):
                if answer == "ack_timeout":
                    self._missed_ack(runner)
                self._remember_expired(job_id, runner)
                self.release(job, answer)
                reason = answer
                continue
            accepted, why = answer
            if accepted and not job.released:
                self.counters["jobs_accepted_for_peers"] += 1
                log.info("runner %s took job %s for session %s on node %s", runner.runner_id, job_id,
                         job.session_id, origin)
                return True, None
            self.release(job, f"rejected:{why}")
            reason = why or p.REJECT_REFUSED
            if why == "cancelled_by_origin":
                return False, why

    def remote_answer(self, job_id: str, accepted: bool, reason: str | None) -> None:
        """The answer to an offer this node sent to another node."""
        job = self._jobs.get(job_id)
        if job is not None and job.runner.node is not None:
            if not job.ack.done():
                job.ack.set_result((accepted, reason))
            return
        runner = self._expired.get(job_id)
        if accepted and runner is not None and runner.node is not None and self.cluster is not None:
            self.counters["acks_late"] += 1  # we gave up already: free the slot it holds over there
            self.cluster.send(runner.node, {"op": "release", "job_id": job_id, "cancel": True,
                                            "reason": "ack_late"})

    def release_served(self, job_id: str, *, cancel: bool) -> None:
        """The origin node is done with a job we served (call over, or it gave up waiting)."""
        job = self._jobs.get(job_id)
        if job is None or job.origin is None:
            return
        if not job.ack.done():  # still waiting for our runner: a late accept gets a job.cancel
            self._remember_expired(job_id, job.runner)
            job.ack.set_result((False, "cancelled_by_origin"))
            return
        ws = job.runner.ws
        if cancel and ws is not None:
            self.spawn(send_frame(ws, {"type": p.JOB_CANCEL, "job_id": job_id, "reason": "cancelled"}))
        self.release(job, "released_by_origin")

    def remote_runner_lost(self, job_id: str, reason: str) -> None:
        """The runner another node gave one of our sessions to lost its control socket there."""
        job = self._jobs.get(job_id)
        if job is None or job.runner.node is None or job.bridge is None:
            return
        job.runner.alive = False  # this job's stand-in only: its bridge now gets the short grace
        if not job.ack.done():
            job.ack.set_result((False, "runner_lost"))
        else:
            self._bridge_of_lost_runner(job.bridge, reason)

    def forget_origins_except(self, live: set[str]) -> None:
        """Nodes whose advert lapsed are gone: runner slots held for their sessions are free again."""
        for job in list(self._jobs.values()):
            if job.origin is not None and job.origin not in live and job.ack.done():
                log.warning("node %s is gone: job %s (session %s) no longer holds runner %s", job.origin,
                            job.job_id, job.session_id, job.runner.runner_id)
                self.release(job, "origin_gone")

    def bridge_for(self, token: str, session_id: str) -> Bridge | None:
        bridge = self._tokens.get(token)
        if bridge is None or not secrets.compare_digest(bridge.session_id, session_id):
            return None
        return bridge

    # ---- introspection, lifecycle ---------------------------------------------------------------------
    def runners(self, agent_id: str | None = None) -> list[dict[str, Any]]:
        return [r.snapshot() for r in self._runners.values()
                if r.alive and (agent_id is None or r.agent_id == agent_id)]

    def stats(self) -> dict[str, Any]:
        alive = [r for r in self._runners.values() if r.alive]
        agents: dict[str, dict[str, int]] = {}
        for r in alive:
            a = agents.setdefault(r.agent_id, {"runners": 0, "capacity": 0, "load": 0})
            a["runners"] += 1
            a["capacity"] += 0 if r.draining or r.out_of_rotation else r.capacity
            a["load"] += r.load
        return {"runners": len(alive), "agents": agents, "live_calls": sum(
            1 for j in self._jobs.values() if j.bridge is not None and j.bridge.ready.is_set()),
            "pending_offers": sum(1 for j in self._jobs.values() if not j.ack.done()),
            "counters": dict(self.counters), "pid": os.getpid(),
            "node_id": self.cluster.node_id if self.cluster is not None else None}

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Server shutdown: runners are told to go away (they reconnect to whichever node comes back)."""
        self.closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for job in list(self._jobs.values()):
            if job.bridge is not None:
                job.bridge.fail("server_shutdown")
        for runner in list(self._runners.values()):
            if runner.ws is not None:
                await close_socket(runner.ws, p.CLOSE_GOING_AWAY, "server shutting down")
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def session_verbs() -> tuple[str, ...]:
    """The verbs hello.ack advertises: all of them, but `agent.interrupt` only once the pipeline knows it."""
    from speechpipe.pipeline import agent as pipeline_agent

    known = hasattr(pipeline_agent, "INTERRUPT")
    return tuple(v for v in p.AGENT_VERBS if v != p.INTERRUPT or known)


def _session_over(session: Any) -> bool:
    ended = getattr(session, "ended", None)
    return bool(ended is not None and ended.is_set())


async def _settle(fut: asyncio.Future[Any], passes: int = 5) -> None:
    """A few passes of the event loop, no wall-clock time: what already reached this process (an ack in a
    socket buffer that a busy loop has not read yet) is read before a deadline counts as missed."""
    for _ in range(passes):
        if fut.done():
            return
        await asyncio.sleep(0)
