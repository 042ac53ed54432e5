"""Tools that exercise a media worker from the outside: RTP pcaps and SIPp scenarios, hostile SIP input.

Used by the phone tests and `bench/phone_calls.py`, and handy against a deployment:
- `RtpStream` builds one RTP stream (G.711 speech, RFC 4733 DTMF events, garbage datagrams) and writes it
  as a pcap that SIPp's `play_pcap_audio` replays towards the negotiated media address;
- `scenario(...)` writes SIPp UAC scenarios (plain call, wait for BYE, accept a REFER, no common codec,
  busy-or-answered); `registrar_scenario(...)` a UAS registrar that checks digest credentials;
- `python -m speechpipe.telephony.sip_checks garbage HOST PORT` sends malformed SIP datagrams and prints
  what came back (JSON), for checking that a worker answers or drops them and stays up.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speechpipe.pipeline.audio import alaw_encode, ulaw_encode

PT_PCMU, PT_PCMA, PT_EVENT = 0, 8, 101
_DTMF_EVENTS = {**{str(d): d for d in range(10)}, "*": 10, "#": 11, "A": 12, "B": 13, "C": 14, "D": 15}


@dataclass
class _Packet:
    at_s: float
    payload: bytes  # the UDP payload: RTP header + body, or garbage


@dataclass
class RtpStream:
    """One RTP stream at 8 kHz (20 ms packets), built in time order, written as an Ethernet/IPv4 pcap."""

    law: str = "ulaw"
    ssrc: int = 0x5EEC4
    packets: list[_Packet] = field(default_factory=list)
    _t: float = 0.0
    _seq: int = 1000
    _ts: int = 16000
    _marker: bool = True

    @property
    def pt(self) -> int:
        return PT_PCMU if self.law == "ulaw" else PT_PCMA

    @property
    def duration_s(self) -> float:
        return self._t

    def _rtp(self, pt: int, ts: int, body: bytes, marker: bool = False) -> bytes:
        self._seq = (self._seq + 1) & 0xFFFF
        return struct.pack(">BBHII", 0x80, (0x80 if marker else 0) | pt, self._seq, ts & 0xFFFFFFFF,
                           self.ssrc) + body

    def speech(self, pcm16_8k: np.ndarray) -> RtpStream:
        """Append 8 kHz PCM16 audio as G.711 packets (the last one padded with silence)."""
        pcm = np.asarray(pcm16_8k, dtype=np.int16)
        pad = (-len(pcm)) % 160
        if pad:
            pcm = np.concatenate([pcm, np.zeros(pad, np.int16)])
        codes = (ulaw_encode(pcm) if self.law == "ulaw" else alaw_encode(pcm)).tobytes()
        for i in range(0, len(codes), 160):
            rtp = self._rtp(self.pt, self._ts, codes[i:i + 160], self._marker)
            self.packets.append(_Packet(self._t, rtp))
            self._marker = False
            self._t += 0.02
            self._ts += 160
        return self

    def silence(self, ms: float) -> RtpStream:
        return self.speech(np.zeros(int(8 * ms), np.int16))

    def dtmf(self, digit: str, ms: int = 120) -> RtpStream:
        """An RFC 4733 telephone-event: marker on the first packet, three end packets, then 60 ms of gap."""
        event = _DTMF_EVENTS[digit.upper()]
        start = self._ts
        steps = max(ms // 20, 2)
        for i in range(1, steps + 1):
            duration = i * 160
            end = i == steps
            body = struct.pack(">BBH", event, (0x80 if end else 0) | 10, duration)
            for _ in range(3 if end else 1):
                self.packets.append(_Packet(self._t, self._rtp(PT_EVENT, start, body, marker=i == 1)))
            self._t += 0.02
        self._ts += steps * 160
        return self.silence(60)

    def garbage(self, count: int, seed: int = 7) -> RtpStream:
        """Datagrams a media port must shrug off: random bytes, truncated headers, wrong versions, unknown
        payload types, huge packets, RTCP-looking junk."""
        rng = random.Random(seed)
        makers = [
            lambda: rng.randbytes(rng.randint(0, 11)),  # shorter than an RTP header
            lambda: rng.randbytes(rng.randint(12, 400)),
            lambda: bytes([0x40 | rng.randint(0, 63)]) + rng.randbytes(171),  # RTP version 1
            lambda: struct.pack(">BBHII", 0x80, rng.choice([13, 34, 96, 127]), rng.randint(0, 65535),
                                rng.randint(0, 2**32 - 1), rng.randint(0, 2**32 - 1)) + rng.randbytes(160),
            lambda: struct.pack(">BBHII", 0x8F, 0, 1, 0, self.ssrc) + rng.randbytes(8),  # 15 CSRCs, no room
            lambda: struct.pack(">BBHII", 0xA0, self.pt, 1, 0, self.ssrc) + b"\x00" * 10 + b"\xff",  # padding
            lambda: rng.randbytes(1400),
            lambda: struct.pack(">BBHI", 0x81, 200, 0xFFFF, self.ssrc),  # RTCP SR with a lying length
        ]
        for _ in range(count):
            self.packets.append(_Packet(self._t, rng.choice(makers)()))
            self._t += 0.005
        return self

    def write_pcap(self, path: Path | str) -> Path:
        path = Path(path)
        out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]  # Ethernet link type
        base = 1_700_000_000
        for ident, p in enumerate(self.packets):
            udp = struct.pack(">HHHH", 6000, 6002, 8 + len(p.payload), 0) + p.payload
            ip = _ipv4(udp, ident & 0xFFFF)
            frame = b"\x00" * 12 + b"\x08\x00" + ip
            sec = base + int(p.at_s)
            usec = round((p.at_s - int(p.at_s)) * 1e6)
            out.append(struct.pack("<IIII", sec, usec, len(frame), len(frame)) + frame)
        path.write_bytes(b"".join(out))
        return path


def _ipv4(payload: bytes, ident: int) -> bytes:
    head = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, 17, 0,
                       socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1"))
    total = sum(struct.unpack(">10H", head))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return head[:10] + struct.pack(">H", ~total & 0xFFFF) + head[12:] + payload


# ---------------------------------------------------------------------------------------- SIPp scenarios

_HEAD = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="{name}">
"""

_INVITE = """  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "{display}" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:{caller}@[local_ip]:[local_port]>
      Max-Forwards: 70
{headers}      Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, REFER, NOTIFY
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=sipp 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP {formats}
{rtpmaps}      a=ptime:20
      a=sendrecv
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
"""

_ACK_2XX = """  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "{display}" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: <sip:{caller}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
"""

_ACK_ERR = """  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
"""

_BYE = """  <send retrans="500">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "{display}" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 3 BYE
      Contact: <sip:{caller}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200" crlf="true"/>
"""

_RECV_BYE = """  <recv request="BYE" timeout="{timeout}"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:{caller}@[local_ip]:[local_port]>
      Content-Length: 0
    ]]>
  </send>
"""

_ACCEPT_REFER = """  <recv request="REFER" timeout="{timeout}"/>
  <send>
    <![CDATA[
      SIP/2.0 202 Accepted
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:{caller}@[local_ip]:[local_port]>
      Content-Length: 0
    ]]>
  </send>
  <send retrans="500">
    <![CDATA[
      NOTIFY [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "{display}" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 NOTIFY
      Contact: <sip:{caller}@[local_ip]:[local_port]>
      Event: refer
      Subscription-State: terminated;reason=noresource
      Max-Forwards: 70
      Content-Type: message/sipfrag;version=2.0
      Content-Length: [len]

      SIP/2.0 200 OK
    ]]>
  </send>
  <recv response="200"/>
"""

_PLAY = """  <nop>
    <action>
      <exec play_pcap_audio="{pcap}"/>
    </action>
  </nop>
"""


def scenario(path: Path | str, kind: str, *, pcap: Path | str | None = None, hold_ms: int = 8000,
             timeout_ms: int = 30000, formats: str = "0 101", caller: str = "5551234",
             display: str = "SIPp Caller", reject_code: int = 488,
             headers: dict[str, str] | None = None) -> Path:
    """Write a SIPp UAC scenario.

    kinds: `call` (play `pcap`, hang up after `hold_ms`), `wait_bye` (play, then wait for the worker's BYE),
    `refer` (play, accept the worker's REFER with 202 + NOTIFY 200, then take its BYE), `reject`
    (expect `reject_code` for the INVITE, e.g. 488 for no common codec, and ACK it), `busy_or_call`
    (486 is fine, else hold the call `hold_ms` and hang up). `headers` are added to the INVITE.
    """
    rtpmaps = "".join(f"      a=rtpmap:{pt} {name}\n" for pt, name in _rtpmaps(formats))
    if "101" in formats.split():
        rtpmaps += "      a=fmtp:101 0-15\n"
    fill = {"caller": caller, "display": display, "timeout": timeout_ms}
    extra = "".join(f"      {name}: {value}\n" for name, value in (headers or {}).items())
    invite = _INVITE.format(formats=formats, rtpmaps=rtpmaps, headers=extra, **fill)
    parts = [_HEAD.format(name=kind), invite]
    play = _PLAY.format(pcap=pcap) if pcap else ""
    if kind == "reject":
        parts += [f'  <recv response="{reject_code}" timeout="10000"/>\n', _ACK_ERR.format(**fill)]
    elif kind == "busy_or_call":
        parts += ['  <recv response="486" optional="true" next="1"/>\n',
                  '  <recv response="200" rrs="true"/>\n', _ACK_2XX.format(**fill), play,
                  f'  <pause milliseconds="{hold_ms}"/>\n', _BYE.format(**fill),
                  '  <nop next="2"/>\n  <label id="1"/>\n', _ACK_ERR.format(**fill), '  <label id="2"/>\n']
    else:
        parts += ['  <recv response="200" rrs="true"/>\n', _ACK_2XX.format(**fill), play]
        if kind == "call":
            parts += [f'  <pause milliseconds="{hold_ms}"/>\n', _BYE.format(**fill)]
        elif kind == "wait_bye":
            parts += [_RECV_BYE.format(**fill)]
        elif kind == "refer":
            parts += [_ACCEPT_REFER.format(**fill), _RECV_BYE.format(**fill)]
        else:
            raise ValueError(f"unknown scenario kind {kind!r}")
    parts.append("</scenario>\n")
    path = Path(path)
    path.write_text("".join(parts))
    return path


_REGISTRAR = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="registrar">
  <recv request="REGISTER"/>
  <send>
    <![CDATA[
      SIP/2.0 401 Unauthorized
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      WWW-Authenticate: Digest realm="{realm}", nonce="n[pid]x[call_number]", algorithm=MD5, qop="auth"
      Content-Length: 0
    ]]>
  </send>
  <recv request="REGISTER">
    <action>
      <verifyauth assign_to="authvalid" username="{username}" password="{password}"/>
    </action>
  </recv>
  <nop test="authvalid" next="1"/>
{reply_403}  <recv request="REGISTER" timeout="300"/>
  <label id="1"/>
{reply_200}</scenario>
"""

_REPLY = """  <send>
    <![CDATA[
      SIP/2.0 {status}
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
{extra}      Content-Length: 0
    ]]>
  </send>
"""


def registrar_scenario(path: Path | str, username: str, password: str,
                       realm: str = "speechpipe.test") -> Path:
    """A SIPp UAS registrar: challenges the REGISTER (digest, qop=auth), checks the credentials with
    `verifyauth`, answers 200 (the scenario passes) or 403 (it fails)."""
    path = Path(path)
    path.write_text(_REGISTRAR.format(
        realm=realm, username=username, password=password,
        reply_403=_REPLY.format(status="403 Forbidden", extra=""),
        reply_200=_REPLY.format(status="200 OK", extra="      [last_Contact:];expires=300\n")))
    return path


def _rtpmaps(formats: str) -> list[tuple[str, str]]:
    names = {"0": "PCMU/8000", "8": "PCMA/8000", "9": "G722/8000", "3": "GSM/8000", "18": "G729/8000",
             "101": "telephone-event/8000", "97": "opus/48000/2", "98": "iLBC/8000"}
    return [(pt, names[pt]) for pt in formats.split() if pt in names]


# ---------------------------------------------------------------------------------------- malformed SIP


def malformed_requests(port: int) -> list[tuple[str, bytes]]:
    """(label, datagram) pairs a SIP stack must answer with an error or drop, never crash on."""
    rng = random.Random(11)  # the garbage is the same every run; transaction ids never are
    ids = random.Random(time.time_ns())
    stamp = time.time_ns()

    def req(first: str, headers: list[str], body: bytes = b"") -> bytes:
        return (first + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode() + body

    def base_headers() -> list[str]:  # a fresh transaction and dialog for every request
        n = ids.getrandbits(40)
        return [f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK{n:x}",
                f"From: <sip:fuzz@127.0.0.1>;tag={n:x}",
                f"To: <sip:2000@127.0.0.1:{port}>", f"Call-ID: garbage-{stamp}-{n:x}", "CSeq: 1 INVITE",
                "Contact: <sip:fuzz@127.0.0.1:5999>", "Max-Forwards: 70"]

    bad_sdp = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 \r\nm=audio notaport RTP/AVP x\r\n"
    invite = f"INVITE sip:2000@127.0.0.1:{port} SIP/2.0"
    return [
        ("random bytes", rng.randbytes(600)),
        ("empty datagram", b"\r\n\r\n"),
        ("request line only", f"INVITE sip:2000@127.0.0.1:{port} SIP/2.0\r\n\r\n".encode()),
        ("bad version", req(f"INVITE sip:2000@127.0.0.1:{port} SIP/7.0", base_headers())),
        ("no Call-ID", req(invite, [h for h in base_headers() if not h.startswith("Call-ID")])),
        ("Content-Length lies", req(invite, [*base_headers(), "Content-Type: application/sdp",
                                             "Content-Length: 9999"], b"v=0\r\n")),
        ("garbage SDP", req(invite, [*base_headers(), "Content-Type: application/sdp",
                                     f"Content-Length: {len(bad_sdp)}"], bad_sdp)),
        ("header soup", req(f"OPTIONS sip:2000@127.0.0.1:{port} SIP/2.0",
                            [*base_headers()[:4], "CSeq: 99999999999999999999 OPTIONS",
                             "Via: " + ";" * 3000, "X-Bin: " + rng.randbytes(200).hex()])),
        ("NUL bytes", req(invite, base_headers()).replace(b"From", b"Fr\x00om")),
        ("huge", req(f"MESSAGE sip:2000@127.0.0.1:{port} SIP/2.0",
                     [*base_headers(), "X-Long: " + "a" * 60000])),
        ("OPTIONS (sanity: a well-formed request after all that)",
         req(f"OPTIONS sip:2000@127.0.0.1:{port} SIP/2.0",
             [*base_headers()[:4], "CSeq: 1 OPTIONS", "Max-Forwards: 70", "Content-Length: 0"])),
    ]


def send_garbage(host: str, port: int, settle_s: float = 1.5) -> list[dict[str, object]]:
    """Send every malformed request, then report per request the status lines that came back for it
    (matched by Call-ID; retransmissions of one response count once)."""
    sent = malformed_requests(port)
    replies: dict[str, list[str]] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 5999))
        sock.settimeout(0.1)
        for _label, data in sent:
            sock.sendto(data, (host, port))
            time.sleep(0.05)
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            try:
                reply, _ = sock.recvfrom(65535)
            except TimeoutError:
                continue
            head = reply.decode("latin-1").split("\r\n")
            call_id = next((h.split(":", 1)[1].strip() for h in head
                            if h.lower().startswith(("call-id:", "i:"))), "")
            lines = replies.setdefault(call_id, [])
            if head[0] not in lines:
                lines.append(head[0])
    out: list[dict[str, object]] = []
    for label, data in sent:
        text = data.decode("latin-1")
        call_id = next((ln.split(":", 1)[1].strip() for ln in text.split("\r\n")
                        if ln.startswith("Call-ID:")), None)
        out.append({"label": label, "replies": replies.get(call_id, []) if call_id else []})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m speechpipe.telephony.sip_checks")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("garbage", help="send malformed SIP to HOST:PORT, print what came back as JSON")
    g.add_argument("host")
    g.add_argument("port", type=int)
    args = p.parse_args(argv)
    if args.cmd == "garbage":
        print(json.dumps(send_garbage(args.host, args.port)))


if __name__ == "__main__":
    main()
