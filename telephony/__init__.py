"""Phone calls: pjsua2 SIP user agents in media-worker processes, bridged to the pipeline.

- `supervisor`: what `speechpipe serve` runs: N worker processes on ports base..base+N-1, restarts, health.
- `worker`: one worker process: calls ↔ `PipelineSession`s, pipe lookup, transfer/end, crash recovery.
- `endpoint`: pjsua2 on its own thread (Endpoint, Account, Call), talking to the worker in plain values.
- `media`: the 20 ms PCM bridge between pjsua2's conference bridge and a session (`AudioMediaPort`).
- `sipmsg`: bounded parsers for the dialled number and the caller's identity. `config`: `SipConfig`.
- `sip_checks`: RTP pcaps, SIPp scenarios and malformed-SIP probes for tests, benchmarks and deployments.
"""

from speechpipe.extras import require_server

require_server(__name__, ("numpy",))
