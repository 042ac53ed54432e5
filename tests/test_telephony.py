"""Phone calls end to end: real SIP peers (baresip, SIPp) call real media workers in a private netns.

The worker is its own process (started by the real `SipSupervisor`), runs the real pipeline (Silero VAD,
Whisper tiny.en, espeak-ng) and the probe agent from tests/fixtures_sip.py. What the caller hears is
recorded by baresip and transcribed; what the agent got is in the probe log; the rest is in SQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import wave
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import pytest

from speechpipe.pipe_config import PipeConfig
from speechpipe.pipeline import events as ev
from speechpipe.settings import Settings
from speechpipe.telephony import media, sipmsg
from speechpipe.telephony.config import SipConfig
from speechpipe.telephony.sip_checks import RtpStream, registrar_scenario, scenario
from speechpipe.telephony.worker import refer_uri
from tests.fixtures_sip import (
    ANSWER,
    GOODBYE,
    LONG,
    PYTHON,
    PhoneLab,
    baresip_call,
    make_lab,
    sipp,
    wait_for,
)
from tests.speech import normalise_text, read_wav, resample, silence, synth, wer, write_wav

QUESTION = "What time does the library open tomorrow?"
TRANSFER_ASK = "Please put me through to sales."
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def assets(phone_lab: PhoneLab) -> dict[str, Path]:
    d = phone_lab.dir / "assets"
    d.mkdir(exist_ok=True)
    out: dict[str, Path] = {}
    for rate in (8000, 16000):
        pcm = np.concatenate([silence(400, rate), synth(QUESTION, rate=rate), silence(8000, rate)])
        write_wav(d / f"question{rate}.wav", pcm, rate)
        out[f"question{rate}"] = d / f"question{rate}.wav"
    q8 = synth(QUESTION, rate=8000)
    out["question_dtmf"] = RtpStream().silence(300).speech(q8).silence(1200).dtmf("1").dtmf("2").dtmf("#") \
        .silence(300).write_pcap(d / "question_dtmf.pcap")
    out["transfer_ask"] = RtpStream().silence(300).speech(synth(TRANSFER_ASK, rate=8000)).silence(8000) \
        .write_pcap(d / "transfer_ask.pcap")
    out["question_long"] = RtpStream().silence(300).speech(q8).silence(12000) \
        .write_pcap(d / "question_long.pcap")
    out["garbage"] = RtpStream().silence(200).garbage(300).silence(300).speech(q8).silence(1500) \
        .write_pcap(d / "garbage.pcap")
    return out


def _scn(lab: PhoneLab, name: str, kind: str, **kw: Any) -> Path:
    d = lab.dir / "sipp"
    d.mkdir(exist_ok=True)
    return scenario(d / f"{name}.xml", kind, **kw)


def _hf_ratio(pcm: np.ndarray, rate: int) -> float:
    """Share of spectral magnitude above 4 kHz: ~0 for a narrowband (8 kHz) path, clearly more for G.722."""
    spec = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    freqs = np.fft.rfftfreq(len(pcm), 1 / rate)
    return float(spec[freqs > 4100].sum() / max(spec.sum(), 1e-9))


# ---------------------------------------------------------------------------------------- pure parts


def test_sip_message_parsing_is_bounded_and_never_raises() -> None:
    invite = ("INVITE sip:2000@10.0.0.5:5080;transport=udp SIP/2.0\r\nVia: x\r\n"
              'P-Asserted-Identity: "Front Desk" <sip:+4930123@pbx>\r\n\r\n')
    assert sipmsg.dialled_user(invite) == "2000"
    assert sipmsg.caller_identity(invite, '"Alice" <sip:1001@pbx>;tag=1') == ("+4930123", "Front Desk")
    assert sipmsg.caller_identity("INVITE sip:1@h SIP/2.0\r\n\r\n", '"Al\\"ice" <sip:1001@pbx>') == \
        ("1001", 'Al"ice')
    assert sipmsg.name_addr("<tel:+15551234>") == (None, "+15551234")
    assert sipmsg.dialled_user("INVITE sip:pbx.example.com SIP/2.0\r\n\r\n", "<sip:2001@pbx>") == "2001"
    hostile = ["", "\x00\x01", "INVITE", "INVITE sip:@ SIP/2.0", '"' * 5000, "<sip:" + "a" * 10000 + "@h>"]
    for text in hostile:
        for value in (sipmsg.dialled_user(text, text), *sipmsg.caller_identity(text, text)):
            assert value is None or (len(value) <= sipmsg.MAX_FIELD and "\x00" not in value)


def test_refer_targets_must_be_listed_by_the_pipe() -> None:
    allowed = ["1002", "sip:sales@pbx.example.com"]
    assert refer_uri("1002", allowed, "10.0.0.2:5060") == "sip:1002@10.0.0.2:5060"
    assert refer_uri("sip:sales@pbx.example.com", allowed, "10.0.0.2:5060") == "sip:sales@pbx.example.com"
    for bad in ("1003", "", "sip:1002@evil.example.com", "1002>;x", "1002\r\nX: y", " 9999"):
        assert refer_uri(bad, allowed, "10.0.0.2:5060") is None


def test_worker_ports_and_rtp_ranges_follow_settings() -> None:
    env = {"SPEECHPIPE_SIP_RTP_PORT_BASE": "30000", "SPEECHPIPE_SIP_RTP_PORTS": "100",
           "SPEECHPIPE_SIP_MAX_CALLS": "8"}
    cfgs = [SipConfig.from_env(i, 5080, env) for i in range(3)]
    assert [c.port for c in cfgs] == [5080, 5081, 5082]
    assert [c.rtp_port for c in cfgs] == [30000, 30100, 30200]
    assert all(c.max_calls == 8 for c in cfgs)


def test_hangup_unhooks_the_port_before_pjsua_destroys_the_stream() -> None:
    """The PJ_EINVAL on hang-up: pjsua destroys a call's stream (and queues the removal of its bridge slot)
    before it reports DISCONNECTED, so disconnecting our port from that slot in the callback raced the
    removal. Now our own hang-up disconnects first, and the DISCONNECTED callback disconnects nothing."""
    import pjsua2 as pj

    from speechpipe.telephony import endpoint as ep_mod

    order: list[str] = []

    class Media:
        def __init__(self, name: str) -> None:
            self.name = name

        def stopTransmit(self, sink: Any) -> None:
            order.append(f"disconnect {self.name}->{sink.name}")

    class Pool:
        def release(self, port: Any) -> None:
            order.append(f"release {port.name}")

    class Info:
        state = pj.PJSIP_INV_STATE_DISCONNECTED
        lastStatusCode = 200
        lastReason = "Normal call clearing"

    class FakeCall:
        def __init__(self, owner: Any, key: int) -> None:
            self.owner, self.key, self.gone = owner, key, False
            self.port, self.audio, self.conf_slot = Media("port"), Media("stream"), 3

        def hangup(self, prm: Any) -> None:  # pjsua: destroy the stream, then report DISCONNECTED
            order.append("pjsua hangup")
            ep_mod._Call.onCallState(self, None)  # type: ignore[arg-type]

        def getInfo(self) -> Info:
            return Info()

    emitted: list[tuple[Any, ...]] = []
    ep = ep_mod.SipEndpoint.__new__(ep_mod.SipEndpoint)
    ep.ports, ep._dead = Pool(), []  # type: ignore[assignment]
    ep._emit = lambda *a: emitted.append(a)  # type: ignore[method-assign]
    # our BYE: unhook first, then pjsua; the callback it fires finds nothing to disconnect
    ep._calls = {1: FakeCall(ep, 1)}  # type: ignore[dict-item]
    assert ep.hangup(1)
    assert order == ["disconnect stream->port", "disconnect port->stream", "release port", "pjsua hangup"]
    assert emitted == [("disconnected", 1, 200, "Normal call clearing")] and ep._dead == [1]
    # the caller's BYE: pjsua already removed the stream's slot; we only take the port back
    order.clear()
    call = FakeCall(ep, 2)
    ep_mod._Call.onCallState(call, None)  # type: ignore[arg-type]
    assert order == ["release port"] and call.port is None and call.gone


def test_frames_cross_the_bridge_with_one_copy_and_no_swig_call() -> None:
    """The direct MediaFrame path is active here and moves exact bytes both ways, ~50x cheaper than SWIG."""
    import pjsua2 as pj

    assert media.DIRECT, "the MediaFrame layout probe failed: the slow SWIG path is in use"
    pcm = np.random.default_rng(1).integers(-32768, 32767, 160, dtype=np.int16).tobytes()
    rx = pj.MediaFrame()
    rx.type, rx.size = pj.PJMEDIA_FRAME_TYPE_AUDIO, len(pcm)
    rx.buf.resize(len(pcm))
    media._memcpy(media.vector_data(rx.buf), pcm, len(pcm))
    assert media.read_frame(rx) == pcm
    tx = pj.MediaFrame()
    tx.size = len(pcm)
    media.write_frame(tx, pcm)
    assert bytes(tx.buf) == pcm and tx.size == len(pcm) and tx.type == pj.PJMEDIA_FRAME_TYPE_AUDIO

    def cost(fn: Any, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n

    direct = cost(lambda: media.read_frame(rx), 2000)
    swig = cost(lambda: bytes(rx.buf), 50)
    assert direct * 10 < swig, (direct, swig)


# ---------------------------------------------------------------------------------------- real calls


CALLERS = {"PCMU/8000/1": ("1001", "Alice"), "PCMA/8000/1": ("1002", "Bob"),
           "G722/16000/1": ("1003", "Carol")}


@pytest.mark.slow
async def test_baresip_calls_in_every_codec_reach_the_agent_and_hear_the_answer(
        phone_lab: PhoneLab, assets: dict[str, Path], whisper_engine: Any) -> None:
    """PCMU, PCMA and G.722 at once (three baresip callers): the question reaches the agent as user.text
    with direction inbound_phone and the caller's number; the recorded answer transcribes back to the
    agent's reply; sessions, turns and recordings rows are right; G.722 runs wideband end to end."""
    lab = phone_lab
    await lab.idle()
    assert lab.ns.interfaces() == ["lo"]  # nothing here can reach another machine
    calls = {}
    for i, (codec, (number, name)) in enumerate(CALLERS.items()):
        rate = 16000 if codec.startswith("G722") else 8000
        calls[codec] = baresip_call(lab.ns, lab.dir / f"baresip-{number}", f"sip:2000@127.0.0.1:{lab.port}",
                                    assets[f"question{rate}"], codecs=codec, seconds=10,
                                    local_port=5070 + 2 * i, user=number, display=name)
    await wait_for(lambda: all(c.proc.poll() is not None for c in calls.values()), 40, "baresip to finish")

    live: dict[str, str] = {}
    on_record: dict[str, str] = {}  # the question as decoded from each call's recording
    for codec, call in calls.items():
        number, name = CALLERS[codec]
        sid = await lab.session_of(number)
        started = lab.probe(sid, "call.started")[0]
        assert started["direction"] == "inbound_phone" and started["caller"] == number
        assert started["caller_name"] == name
        texts = [m["text"] for m in lab.probe(sid, "user.text")]
        assert texts and texts[0] == lab.store.list_turns(sid)[0].text, (codec, texts)
        live[codec] = texts[0]

        heard, rate = read_wav(call.heard())
        said, _ = whisper_engine.transcribe(resample(heard, rate, 16000))
        assert wer(ANSWER, said) <= 0.2, (codec, said, call.log_tail())
        wideband = codec.startswith("G722")
        assert (rate == 16000) == wideband
        if wideband:
            assert _hf_ratio(heard, rate) > 0.02  # speech above 4 kHz made it through

        rec = await lab.ended(sid)
        assert (rec.direction, rec.caller, rec.caller_name, rec.end_reason) == \
            ("inbound_phone", number, name, "caller_hangup")
        sip = rec.metadata["sip"]
        assert sip["codec"] == codec.split("/")[0] and sip["rate"] == (16000 if wideband else 8000)
        assert sip["dialled"] == "2000" and rec.pipe_id == lab.pipes["2000"].id
        turns = lab.store.list_turns(sid)
        assert [t.role for t in turns][:2] == ["user", "agent"], turns
        assert turns[1].text == ANSWER and not turns[1].interrupted
        recording = lab.store.get_recording(sid)
        # What the pipeline heard is the question: the recording's caller channel, decoded whole, judged over
        # the three calls below. Three calls at once on two cores do not give the same audio every run, and
        # on some runs tiny.en misreads this narrowband sentence ("Well, I'm not the library open tomorrow",
        # 3 words of 7, seen once in a full suite run).
        caller, rec_rate = read_wav(recording.path)
        on_record[codec] = whisper_engine.transcribe(caller[: rec_rate * 4])[0]
        with wave.open(recording.path) as w:
            assert (w.getnchannels(), w.getframerate()) == (2, 16000)
            assert w.getnframes() / 16000 == pytest.approx(recording.duration_s, abs=0.05)
        assert 6 < recording.duration_s < 12
        assert rec.metrics["media"]["frames_in"] > 300  # the per-call media figures are stored too
    # The live texts carry the question, judged over the three calls (one misread word in one call, e.g.
    # "Was I in the library…", must not fail a routing test); real-speech accuracy on a PCMU call is
    # tests/test_phone_speech.py's. The recordings are judged the same way, after.
    refs = [normalise_text(QUESTION)] * len(live)
    # Measured 0.0 in 2 runs; one misread word in one call scores 0.06.
    assert jiwer.wer(refs, [normalise_text(t) for t in live.values()]) <= 0.35, live
    # Mostly 0.0; the misreading above in one call scores 0.14. A caller channel without the question
    # (silence, the agent's voice, garbled media) scores near 1.
    assert jiwer.wer(refs, [normalise_text(t) for t in on_record.values()]) <= 0.2, on_record


@pytest.mark.slow
async def test_dtmf_digits_reach_the_agent(phone_lab: PhoneLab, assets: dict[str, Path]) -> None:
    lab = phone_lab
    await lab.idle()
    scn = _scn(lab, "dtmf", "call", pcap=assets["question_dtmf"], hold_ms=6500, caller="5550101",
               formats="0 101")
    run = await sipp(lab.ns, scn, f"127.0.0.1:{lab.port}", service="2000")
    assert run.returncode == 0, run.explain()
    sid = await lab.session_of("5550101")
    await lab.ended(sid)
    assert [m["digit"] for m in lab.probe(sid, "dtmf")] == ["1", "2", "#"]
    assert "c=IN IP4 127.0.0.1" in run.messages()  # the worker's media address is loopback too


@pytest.mark.slow
async def test_transfer_sends_a_refer_the_peer_accepts(phone_lab: PhoneLab, assets: dict[str, Path]) -> None:
    lab = phone_lab
    await lab.idle()
    scn = _scn(lab, "refer", "refer", pcap=assets["transfer_ask"], caller="5550102")
    run = await sipp(lab.ns, scn, f"127.0.0.1:{lab.port}", service="2002")
    assert run.returncode == 0, run.explain()  # REFER → 202, NOTIFY 200, then the worker's BYE
    msgs = run.messages()
    assert "Refer-To: <sip:1002@127.0.0.1:5090>" in msgs or "Refer-To: sip:1002@127.0.0.1:5090" in msgs, msgs
    sid = await lab.session_of("5550102")
    rec = await lab.ended(sid)
    assert rec.end_reason == "transferred"
    assert not lab.probe(sid, "error")


@pytest.mark.slow
async def test_refused_transfer_sends_no_refer_and_tells_the_agent(phone_lab: PhoneLab,
                                                                   assets: dict[str, Path]) -> None:
    lab = phone_lab
    await lab.idle()
    # wait_bye fails on any unexpected request: a REFER would fail the scenario.
    scn = _scn(lab, "refuse", "wait_bye", pcap=assets["transfer_ask"], caller="5550103")
    run = await sipp(lab.ns, scn, f"127.0.0.1:{lab.port}", service="2003")
    assert run.returncode == 0, run.explain()
    assert "REFER sip:" not in run.messages()
    sid = await lab.session_of("5550103")
    errors = lab.probe(sid, "error")
    assert [e["code"] for e in errors] == ["transfer_target_not_allowed"]
    rec = await lab.ended(sid)
    assert rec.end_reason == "transfer_refused"


@pytest.mark.slow
async def test_agent_end_hangs_up_with_bye(phone_lab: PhoneLab, assets: dict[str, Path]) -> None:
    lab = phone_lab
    await lab.idle()
    scn = _scn(lab, "end", "wait_bye", pcap=assets["question_long"], caller="5550104")
    run = await sipp(lab.ns, scn, f"127.0.0.1:{lab.port}", service="2001")
    assert run.returncode == 0, run.explain()  # the worker sent BYE (SIPp was waiting for exactly that)
    sid = await lab.session_of("5550104")
    rec = await lab.ended(sid)
    assert rec.end_reason == "agent_goodbye"
    agent = [t for t in lab.store.list_turns(sid) if t.role == "agent"]
    assert [t.text for t in agent] == [GOODBYE] and not agent[0].interrupted  # said in full before BYE


@pytest.mark.slow
async def test_caller_hanging_up_mid_reply_ends_the_session_cleanly(phone_lab: PhoneLab,
                                                                    assets: dict[str, Path]) -> None:
    lab = phone_lab
    await lab.idle()
    # The question ends ~3 s in; the long reply starts ~1 s later and runs >10 s: hang up at 6 s.
    scn = _scn(lab, "hangup", "call", pcap=assets["question_long"], hold_ms=6000, caller="5550105")
    run = await sipp(lab.ns, scn, f"127.0.0.1:{lab.port}", service="2004")
    assert run.returncode == 0, run.explain()
    sid = await lab.session_of("5550105")
    rec = await lab.ended(sid)
    assert rec.end_reason == "caller_hangup"
    turns = lab.store.list_turns(sid)
    agent = [t for t in turns if t.role == "agent"]
    assert agent and agent[0].interrupted and agent[0].text == LONG
    assert agent[0].heard_text is not None and len(agent[0].heard_text) < len(LONG) / 2
    assert lab.store.get_recording(sid).duration_s > 4
    assert lab.probe(sid, "call.ended")[0]["reason"] == "caller_hangup"
    await lab.idle()  # and the worker is free again


@pytest.mark.slow
async def test_caller_hanging_up_during_dispatch_closes_the_agent_that_arrives(
        phone_lab: PhoneLab, assets: dict[str, Path]) -> None:
    """The agent comes 4 s after the session starts; the caller has hung up at 1.5 s. The session ends as
    the caller's hang-up and the late agent is closed, not left holding a runner's call slot."""
    lab = phone_lab
    await lab.idle()
    scn = _scn(lab, "hangup_dispatch", "call", pcap=assets["question_long"], hold_ms=1500, caller="5550107")
    run = await sipp(lab.ns, scn, f"127.0.0.1:{lab.port}", service="2005")
    assert run.returncode == 0, run.explain()
    sid = await lab.session_of("5550107", kind="factory")
    rec = await lab.ended(sid)
    assert rec.end_reason == "caller_hangup"
    closed = await wait_for(lambda: lab.probe(sid, "closed"), 10, "the late agent to close", lab.worker_log)
    assert [m["reason"] for m in closed] == ["session_ended"]
    assert not lab.probe(sid, "call.started")  # it never got the call
    await lab.idle()


@pytest.mark.slow
async def test_a_call_no_agent_takes_ends_with_the_dispatch_reason(phone_lab: PhoneLab,
                                                                   assets: dict[str, Path]) -> None:
    """No agent: the caller hears the apology and the session ends with the reason dispatch gave
    (`at_capacity` here), as a web session does, not a generic `no_agent`."""
    lab = phone_lab
    await lab.idle()
    scn = _scn(lab, "busy", "wait_bye", pcap=assets["question_long"], caller="5550108")
    run = await sipp(lab.ns, scn, f"127.0.0.1:{lab.port}", service="2006")
    assert run.returncode == 0, run.explain()  # the worker hung up (BYE) after the apology
    sid = await lab.session_of("5550108", kind="factory")
    rec = await lab.ended(sid)
    assert rec.end_reason == "at_capacity"
    agent = [t for t in lab.store.list_turns(sid) if t.role == "agent"]
    assert [t.text for t in agent] == [PipeConfig(agent_id="x").no_agent_message]


async def test_a_pbx_hunting_over_other_workers_turns_health_to_error(phone_lab: PhoneLab,
                                                                     assets: dict[str, Path]) -> None:
    """Our dialplan names `<index>/<workers>` in X-SpeechPipe-Hunt; a worker that runs a different count
    still takes the call, but logs the mismatch and /healthz says error until the PBX agrees again."""
    lab = phone_lab
    await lab.idle()
    health = lab.supervisor.health

    async def call(hunt: str, caller: str) -> None:
        scn = _scn(lab, f"hunt-{caller}", "call", pcap=assets["question_long"], caller=caller, hold_ms=1500,
                   headers={"X-SpeechPipe-Hunt": hunt})
        run = await sipp(lab.ns, scn, f"127.0.0.1:{lab.port}", service="2000")
        assert run.returncode == 0, run.explain()

    await call("1/3", "5550120")  # the PBX was rendered for 3 workers; this lab runs 1
    await wait_for(lambda: health()["pbx_mismatch"], 10, "the mismatch in /healthz", lab.worker_log)
    assert "hunts over 3 worker(s) but Speech Pipe runs 1" in health()["pbx_mismatch"]
    assert not health()["ok"] and "PBX and Speech Pipe disagree" in lab.worker_log(200)
    await call("0/1", "5550121")  # re-rendered: the next call agrees, and the health recovers
    await wait_for(lambda: health()["pbx_mismatch"] is None and health()["ok"], 10, "health ok again",
                   lab.worker_log)


@pytest.mark.slow
async def test_bad_input_gets_the_right_answer_and_the_worker_stays_up(phone_lab: PhoneLab,
                                                                       assets: dict[str, Path]) -> None:
    lab = phone_lab
    await lab.idle()
    pid = lab.supervisor.health()["workers"][0]["pid"]

    # Malformed SIP: answered with an error or dropped, and a sane request still works afterwards.
    out = await asyncio.to_thread(lab.ns.run, [PYTHON, "-m", "speechpipe.telephony.sip_checks", "garbage",
                                               "127.0.0.1", str(lab.port)],
                                  capture_output=True, text=True, cwd=str(Path(__file__).parent.parent),
                                  env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    import json

    results = {r["label"]: r["replies"] for r in json.loads(out.stdout)}
    assert results["garbage SDP"] and all(r.startswith("SIP/2.0 4") for r in results["garbage SDP"])
    assert all(r.startswith("SIP/2.0 4") for replies in results.values() for r in replies
               if replies is not results["OPTIONS (sanity: a well-formed request after all that)"])
    assert results["OPTIONS (sanity: a well-formed request after all that)"] == ["SIP/2.0 200 OK"]

    # No common codec (GSM and G.729 only): 488.
    run = await sipp(lab.ns, _scn(lab, "nocodec", "reject", formats="3 18", caller="5550106"),
                     f"127.0.0.1:{lab.port}", service="2000")
    assert run.returncode == 0, run.explain()

    # RTP garbage before the speech: the call carries on and the question still arrives.
    run = await sipp(lab.ns, _scn(lab, "garbage", "call", pcap=assets["garbage"], hold_ms=7000,
                                  caller="5550107"), f"127.0.0.1:{lab.port}", service="2000")
    assert run.returncode == 0, run.explain()
    sid = await lab.session_of("5550107")
    assert any(wer(QUESTION, m["text"]) <= 0.2 for m in lab.probe(sid, "user.text"))
    await lab.ended(sid)
    await lab.idle()

    # An INVITE flood past the limit (3 here): exactly 3 answered, the rest 486 Busy Here.
    run = await sipp(lab.ns, _scn(lab, "flood", "busy_or_call", hold_ms=4000, caller="5550108"),
                     f"127.0.0.1:{lab.port}", service="2000", calls=10, rate=200)
    assert run.returncode == 0, run.explain()
    msgs = run.messages()
    finals = [block for block in msgs.split("\n\n") if "CSeq: 1 INVITE" in block]
    busy = sum(1 for b in finals if "SIP/2.0 486" in b)
    answered = sum(1 for b in finals if "SIP/2.0 200 OK" in b)
    assert (answered, busy) == (3, 7), msgs[-3000:]

    await lab.idle()
    health = lab.supervisor.health()["workers"][0]
    assert health["pid"] == pid and health["restarts"] == 0 and health["rejected_busy"] >= 7
    assert lab.ns.interfaces() == ["lo"]


@pytest.mark.slow
@pytest.mark.parametrize("password", ["s3cret", "wrong"])
async def test_outbound_registration_with_digest_auth(phone_lab: PhoneLab, password: str) -> None:
    """A worker configured with a registrar registers with digest auth; SIPp plays the registrar and
    checks the credentials (`verifyauth`), so a wrong password fails the scenario and the registration."""
    tmp = phone_lab.dir / f"register-{password}"
    tmp.mkdir()
    scn = registrar_scenario(tmp / "registrar.xml", "trunkuser", "s3cret")
    env = {"SPEECHPIPE_SIP_REGISTRAR": "sip:127.0.0.1:5300", "SPEECHPIPE_SIP_USERNAME": "trunkuser",
           "SPEECHPIPE_SIP_PASSWORD": password}
    store, sup, _ = make_lab(tmp, phone_lab.ns, 5280, extra_env=env)
    argv = [*phone_lab.ns.prefix(), "sipp", "-sf", str(scn), "-i", "127.0.0.1", "-p", "5300", "-m", "1",
            "-timeout", "60s", "-timeout_error", "-trace_err", "-nostdin"]
    registrar = asyncio.create_task(asyncio.to_thread(
        subprocess.run, argv, cwd=tmp, capture_output=True, text=True, timeout=90))
    try:
        await asyncio.sleep(0.5)  # the registrar listens before the worker starts
        await sup.start(wait_ready_s=120)
        done = await registrar
        reg = await wait_for(lambda: sup.health()["workers"][0]["registration"], 15, "a registration result")
        if password == "s3cret":
            assert done.returncode == 0, done.stdout[-2000:]
            assert reg == {"code": 200, "reason": "OK", "active": True}
        else:
            assert done.returncode != 0
            assert reg["code"] == 403 and not reg["active"]
    finally:
        await sup.stop()
        store.close()


# ---------------------------------------------------------------------------------------- crash


@pytest.mark.slow
async def test_sigkill_mid_call_restarts_the_worker_and_keeps_what_finished(
        phone_lab: PhoneLab, assets: dict[str, Path], talk: Any, whisper_engine: Any) -> None:
    """A worker SIGKILLed mid-call: a web session in the serving process carries on, the supervisor has a
    new worker up within seconds, the dead call's recording is repaired and playable, its finished turns
    are in SQL, and the new worker takes calls."""
    from speechpipe.pipeline.recorder import _HEADER_BYTES

    tmp = phone_lab.dir / "crash"
    tmp.mkdir()
    store, sup, pipes = make_lab(tmp, phone_lab.ns, 5180)
    lab = PhoneLab(phone_lab.ns, tmp, sup.settings, store, pipes, tmp / "probe.jsonl", sup, 5180)
    web = await talk()
    try:
        await sup.start(wait_ready_s=120)
        assert sup.health()["ok"], lab.worker_log()
        old_pid = sup.health()["workers"][0]["pid"]

        caller = baresip_call(lab.ns, tmp / "baresip", "sip:2000@127.0.0.1:5180", assets["question8000"],
                              codecs="PCMU/8000/1", seconds=30, user="1009", display="Crash Test")
        sid = await lab.session_of("1009")
        await wait_for(lambda: lab.probe(sid, "agent.speech_done"), 30, "the first answer to finish",
                       lab.worker_log)
        await asyncio.sleep(1.5)  # let the agent turn reach SQL and some more audio reach the file

        web.session.push_text("hello before the crash")
        assert await web.line.until(lambda: len(web.of(ev.AgentSpeechDone)) >= 1, 15)

        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        web.session.push_text("still there after the crash")  # the web side does not notice
        assert await web.line.until(lambda: len(web.of(ev.AgentSpeechDone)) >= 2, 15)
        assert not web.session.ended.is_set()

        def back_up() -> bool:
            w = sup.health()["workers"][0]
            return w["state"] == "up" and w["pid"] != old_pid
        await wait_for(back_up, 30, "the worker to come back", lab.worker_log)
        restart_s = time.monotonic() - killed_at
        print(f"worker back {restart_s:.1f} s after SIGKILL")
        assert restart_s < 10, restart_s
        assert sup.health()["workers"][0]["restarts"] == 1
        assert "SIGKILL" in (sup.health()["workers"][0]["last_exit"] or "")

        rec = await lab.ended(sid, within_s=30)  # the new worker ended the dead call's session
        assert rec.end_reason == "worker_crashed"
        turns = store.list_turns(sid)
        assert [t.role for t in turns] == ["user", "agent"], turns
        assert wer(QUESTION, turns[0].text) <= 0.2 and turns[1].text == ANSWER
        recording = store.get_recording(sid)
        path = Path(recording.path)
        with wave.open(str(path)) as w:  # a valid header whose sizes match the file
            frames = w.getnframes()
            stereo = np.frombuffer(w.readframes(frames), "<i2").reshape(-1, 2)
        size = await asyncio.to_thread(os.path.getsize, path)
        assert frames * 4 + _HEADER_BYTES == size
        assert frames / 16000 == pytest.approx(recording.duration_s, abs=0.05) and recording.duration_s > 3
        said, _ = whisper_engine.transcribe(stereo[:, 0].copy())  # the caller's side plays back
        assert wer(QUESTION, said) <= 0.25, said

        caller.proc.kill()
        caller.proc.wait(10)
        # The new worker takes calls.
        run = await sipp(lab.ns, _scn(lab, "after_crash", "call", pcap=assets["garbage"], hold_ms=6000,
                                      caller="5550109"), "127.0.0.1:5180", service="2000", local_port=5190)
        assert run.returncode == 0, run.explain()
        sid2 = await lab.session_of("5550109")
        assert any(wer(QUESTION, m["text"]) <= 0.2 for m in lab.probe(sid2, "user.text"))
    finally:
        await sup.stop()
        store.close()


def test_settings_defaults_run_no_worker_until_asked() -> None:
    # A fresh `serve` binds no SIP port; SPEECHPIPE_SIP_WORKERS=N starts N workers from the base port up.
    s = Settings.from_env({})
    assert (s.sip_workers, s.sip_port_base) == (0, 5080)
    assert Settings.from_env({"SPEECHPIPE_SIP_WORKERS": "2"}).sip_workers == 2
