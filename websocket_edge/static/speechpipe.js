// Speech Pipe browser SDK: talk to a pipe in full duplex from a web page. An ES module, no build step.
//
//   import { SpeechPipeSession } from "https://your-server/sdk/speechpipe.js";
//   const s = new SpeechPipeSession({ url: "wss://your-server/v1/pipes/pipe_.../connect", token });
//   s.on("user_turn", (e) => console.log("you:", e.text));
//   s.on("agent_reply", (e) => console.log("agent:", e.text));
//   await s.connect();            // asks for the microphone, opens the socket, resolves on session.started
//   s.sendText("hello");  s.sendDtmf("12#");  s.mute(true);  await s.disconnect();
//
// Events: every server event by its type ("user_partial", "user_turn", "agent_reply", "barge_in", "metric",
// "session.started", "agent.speech_started", ...), plus "state" ({state}), "error" ({code, message}),
// "level" ({input} or {output}, RMS 0..1), "playback" ({state, seconds, seq}), "close" ({code, reason}),
// and "event" (every server event). The protocol is in docs/client-protocol.md.

export const SUPPORTED_RATES = [8000, 16000, 24000, 44100, 48000];
export const MAX_DTMF_DIGITS = 32;
const DTMF_RE = /^[0-9*#A-D]+$/;

export class SpeechPipeError extends Error {
  constructor(code, message, closeCode = null) {
    super(message);
    this.code = code;
    this.closeCode = closeCode;
  }
}

export class SpeechPipeSession {
  constructor({
    url, token, sampleRate = 16000, outputSampleRate = 24000, echoCancellation = true,
    noiseSuppression = true, autoGainControl = true, workletUrl = null, prebufferMs = 40,
    mediaStream = null,
  } = {}) {
    if (!url) throw new TypeError("SpeechPipeSession needs a `url` (…/v1/pipes/{pipe_id}/connect)");
    if (!SUPPORTED_RATES.includes(sampleRate) || !SUPPORTED_RATES.includes(outputSampleRate)) {
      throw new RangeError(`sample rates must be one of ${SUPPORTED_RATES.join(", ")}`);
    }
    this.url = url;
    this.token = token;
    this.sampleRate = sampleRate;
    this.outputSampleRate = outputSampleRate;
    this.constraints = { echoCancellation, noiseSuppression, autoGainControl, channelCount: 1 };
    this.workletUrl = workletUrl || new URL("./speechpipe-worklets.js", import.meta.url).href;
    this.prebufferMs = prebufferMs;
    this.mediaStream = mediaStream;
    this.state = "idle";
    this.sessionId = null;
    this.muted = false;
    this._handlers = new Map();
    this._agentSeq = null;
    this._ws = null;
    this._ctx = null;
  }

  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this._handlers.get(event)?.delete(fn);
  }

  _emit(event, data) {
    for (const fn of this._handlers.get(event) || []) {
      try {
        fn(data);
      } catch (err) {
        console.error(`speechpipe: "${event}" handler failed`, err);
      }
    }
  }

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    this._emit("state", { state });
  }

  _connectUrl() {
    const u = new URL(this.url, globalThis.location?.href);
    if (u.protocol === "http:") u.protocol = "ws:";
    if (u.protocol === "https:") u.protocol = "wss:";
    if (this.token) u.searchParams.set("token", this.token);
    return u.href;
  }

  async connect() {
    if (this.state !== "idle" && this.state !== "closed") throw new Error(`cannot connect while ${this.state}`);
    this._setState("connecting");
    try {
      await this._openAudio();
    } catch (err) {
      const error = new SpeechPipeError("microphone", `audio setup failed: ${err.message || err}`);
      this._emit("error", { code: error.code, message: error.message });
      await this._teardownAudio();
      this._setState("closed");
      throw error;
    }
    return new Promise((resolve, reject) => {
      let started = false;
      const ws = new WebSocket(this._connectUrl());
      ws.binaryType = "arraybuffer";
      this._ws = ws;
      ws.onopen = () => {
        ws.send(JSON.stringify({
          type: "start", sample_rate: this.sampleRate, output_sample_rate: this.outputSampleRate, codec: "pcm16",
        }));
      };
      ws.onmessage = (e) => {
        if (typeof e.data !== "string") {
          this._playback?.port.postMessage({ type: "pcm", pcm: e.data }, [e.data]);
          return;
        }
        let msg;
        try {
          msg = JSON.parse(e.data);
        } catch {
          return;
        }
        this._onServerEvent(msg);
        if (msg.type === "session.started" && !started) {
          started = true;
          resolve(msg);
        }
      };
      ws.onclose = (e) => {
        this._emit("close", { code: e.code, reason: e.reason });
        if (e.code !== 1000 && e.code !== 1005) {
          const code = (e.reason || "").split(":")[0] || `close_${e.code}`;
          this._emit("error", { code, message: e.reason || `connection closed (${e.code})`, closeCode: e.code });
        }
        this._teardownAudio();
        this._setState("closed");
        if (!started) reject(new SpeechPipeError((e.reason || "").split(":")[0] || "closed", e.reason, e.code));
      };
    });
  }

  async _openAudio() {
    this._ctx = new AudioContext({ latencyHint: "interactive" });
    await this._ctx.audioWorklet.addModule(this.workletUrl);
    if (this._ctx.state === "suspended") await this._ctx.resume();
    this._stream = this.mediaStream || await navigator.mediaDevices.getUserMedia({ audio: this.constraints });
    this._source = this._ctx.createMediaStreamSource(this._stream);
    this._capture = new AudioWorkletNode(this._ctx, "speechpipe-capture", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { targetRate: this.sampleRate },
    });
    this._capture.port.onmessage = (e) => {
      const m = e.data;
      if (m.type !== "frame") return;
      this._emit("level", { input: m.level });
      if (this._ws && this._ws.readyState === WebSocket.OPEN && this.sessionId) this._ws.send(m.pcm);
    };
    // A silent sink keeps the capture node pulled by the audio graph without playing the microphone.
    this._sink = this._ctx.createGain();
    this._sink.gain.value = 0;
    this._source.connect(this._capture).connect(this._sink).connect(this._ctx.destination);
    this._playback = new AudioWorkletNode(this._ctx, "speechpipe-playback", {
      numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { inputRate: this.outputSampleRate, prebufferMs: this.prebufferMs },
    });
    this._playback.port.onmessage = (e) => this._onPlayback(e.data);
    this._playback.connect(this._ctx.destination);
  }

  async _teardownAudio() {
    if (this._stream && !this.mediaStream) this._stream.getTracks().forEach((t) => t.stop());
    this._stream = null;
    for (const node of [this._source, this._capture, this._sink, this._playback]) {
      try {
        node?.disconnect();
      } catch {
        /* already disconnected */
      }
    }
    this._source = this._capture = this._sink = this._playback = null;
    const ctx = this._ctx;
    this._ctx = null;
    if (ctx && ctx.state !== "closed") await ctx.close().catch(() => {});
  }

  _onServerEvent(msg) {
    switch (msg.type) {
      case "session.started":
        this.sessionId = msg.session_id;
        this._setState("listening");
        break;
      case "user.speech_started":
        if (this.state !== "agent_speaking") this._setState("user_speaking");
        break;
      case "user_turn":
        if (this.state === "user_speaking") this._setState("listening");
        break;
      case "agent.speech_started":
        this._agentSeq = msg.seq;
        break;
      case "agent.speech_done":
        if (!msg.interrupted) this._playback?.port.postMessage({ type: "end" });
        break;
      case "clear":
        this._playback?.port.postMessage({ type: "clear" });
        break;
      case "error":
        this._emit("error", { code: msg.code, message: msg.message });
        break;
      default:
        break;
    }
    if (msg.type !== "error") this._emit(msg.type, msg);
    this._emit("event", msg);
  }

  _onPlayback(m) {
    if (m.type === "level") {
      this._emit("level", { output: m.level });
      return;
    }
    const report = { type: "playback", state: m.type, seconds: m.seconds ?? 0, seq: this._agentSeq };
    if (m.type === "started") this._setState("agent_speaking");
    else if (this.state === "agent_speaking") this._setState("listening");
    if (this._ws && this._ws.readyState === WebSocket.OPEN) this._ws.send(JSON.stringify(report));
    this._emit("playback", report);
  }

  sendText(text) {
    if (!this._ws || this._ws.readyState !== WebSocket.OPEN) throw new Error("not connected");
    this._ws.send(JSON.stringify({ type: "text", text }));
  }

  // Keypad digits (0-9 * # A-D, lowercase a-d too), 1-32 at a time: each reaches the agent's `dtmf` hook,
  // in order, as a phone's keypad does. Throws (sending nothing) on anything else or when not connected.
  sendDtmf(digits) {
    if (typeof digits !== "string") throw new TypeError("sendDtmf needs a string of digits, e.g. \"12#\"");
    const normalised = digits.toUpperCase();
    if (normalised.length < 1 || normalised.length > MAX_DTMF_DIGITS || !DTMF_RE.test(normalised)) {
      throw new RangeError(`sendDtmf: ${JSON.stringify(digits)} is not 1-${MAX_DTMF_DIGITS} of 0-9 * # A-D`);
    }
    if (!this._ws || this._ws.readyState !== WebSocket.OPEN || !this.sessionId) throw new Error("not connected");
    this._ws.send(JSON.stringify({ type: "dtmf", digits: normalised }));
  }

  mute(muted = true) {
    this.muted = !!muted;
    this._capture?.port.postMessage({ type: "mute", muted: this.muted });
    this._emit("mute", { muted: this.muted });
  }

  async disconnect() {
    const ws = this._ws;
    if (!ws || ws.readyState >= WebSocket.CLOSING) {
      await this._teardownAudio();
      this._setState("closed");
      return;
    }
    const closed = new Promise((resolve) => ws.addEventListener("close", resolve, { once: true }));
    ws.send(JSON.stringify({ type: "stop" }));
    const timer = new Promise((resolve) => setTimeout(resolve, 3000));
    await Promise.race([closed, timer]);
    if (ws.readyState !== WebSocket.CLOSED) ws.close(1000, "client_stop");
    await this._teardownAudio();
    this._setState("closed");
  }
}
