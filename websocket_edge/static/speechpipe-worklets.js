// Speech Pipe AudioWorklet processors: microphone capture and agent playback, each with its resampler.
//
// "speechpipe-capture": microphone at the AudioContext's rate → windowed-sinc resampler → PCM16 frames of
// 20 ms at the session's input rate, posted to the main thread (with their RMS level).
// "speechpipe-playback": PCM16 from the server at the session's output rate → resampler → a jitter buffer
// that starts after a short prebuffer, drops everything on `clear`, and reports what it actually played:
// {type: "started"}, {type: "ended", seconds} (played to the end), {type: "stopped", seconds} (cleared).
// A span ends when the buffer runs dry after an `end` message (the reply is complete), or after a long
// dry spell without one: the server pauses agent audio while it decides whether the user is barging in,
// and that pause must not count as the end.

// Streaming band-limited resampler: windowed sinc (Hann), cutoff below the lower Nyquist frequency.
class StreamResampler {
  constructor(inRate, outRate, halfTaps = 16) {
    this.identity = inRate === outRate;
    this.step = inRate / outRate; // input samples per output sample
    // Cutoff as a fraction of the input rate's Nyquist: under both rates' Nyquist, with a transition band.
    this.cutoff = Math.min(1, outRate / inRate) * 0.9;
    this.half = Math.ceil(halfTaps / this.cutoff); // kernel half-width in input samples
    this.buf = new Float32Array(4096);
    this.len = this.half; // leading zeros: the first output is centred on the first input sample
    this.t = this.half; // position of the next output sample, in input samples from buf[0]
  }

  process(input) {
    if (this.identity) return Float32Array.from(input);
    if (this.len + input.length > this.buf.length) {
      const bigger = new Float32Array(Math.max(this.buf.length * 2, this.len + input.length));
      bigger.set(this.buf.subarray(0, this.len));
      this.buf = bigger;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
    const out = [];
    const { half, cutoff, buf } = this;
    while (this.t + half < this.len) {
      const centre = Math.floor(this.t);
      let acc = 0;
      for (let k = centre - half + 1; k <= centre + half; k++) {
        const x = this.t - k;
        const u = x / half;
        const w = 0.5 + 0.5 * Math.cos(Math.PI * u);
        const arg = Math.PI * cutoff * x;
        const s = arg === 0 ? 1 : Math.sin(arg) / arg;
        acc += buf[k] * cutoff * s * w;
      }
      out.push(acc);
      this.t += this.step;
    }
    const drop = Math.floor(this.t) - half;
    if (drop > 0) {
      buf.copyWithin(0, drop, this.len);
      this.len -= drop;
      this.t -= drop;
    }
    return Float32Array.from(out);
  }
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.targetRate = opts.targetRate || 16000;
    this.frame = Math.round(this.targetRate / 50);
    this.resampler = new StreamResampler(sampleRate, this.targetRate);
    this.pcm = new Int16Array(this.frame);
    this.fill = 0;
    this.sumsq = 0;
    this.muted = false;
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "mute") this.muted = !!e.data.muted;
    };
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    const y = this.resampler.process(channel);
    for (let i = 0; i < y.length; i++) {
      const v = this.muted ? 0 : Math.max(-1, Math.min(1, y[i]));
      this.sumsq += v * v;
      this.pcm[this.fill++] = v < 0 ? Math.round(v * 32768) : Math.round(v * 32767);
      if (this.fill === this.frame) {
        const level = Math.sqrt(this.sumsq / this.frame);
        this.port.postMessage({ type: "frame", pcm: this.pcm.buffer, level }, [this.pcm.buffer]);
        this.pcm = new Int16Array(this.frame);
        this.fill = 0;
        this.sumsq = 0;
      }
    }
    return true;
  }
}

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.inRate = opts.inputRate || 24000;
    this.prebuffer = Math.round(sampleRate * (opts.prebufferMs ?? 40) / 1000);
    this.hangover = Math.round(sampleRate * (opts.hangoverMs ?? 1500) / 1000);
    this.ending = false; // the server said the reply is complete: end as soon as the buffer is dry
    this.resampler = new StreamResampler(this.inRate, sampleRate);
    this.chunks = []; // Float32Arrays at the context rate
    this.offset = 0; // read position in chunks[0]
    this.buffered = 0;
    this.playing = false;
    this.played = 0; // samples played since "started"
    this.dry = 0; // samples of underrun since the buffer last had audio
    this.waited = 0; // samples spent waiting for the prebuffer to fill
    this.sumsq = 0;
    this.levelCount = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    if (msg.type === "pcm") {
      const int16 = new Int16Array(msg.pcm);
      const f = new Float32Array(int16.length);
      for (let i = 0; i < int16.length; i++) f[i] = int16[i] / 32768;
      const y = this.resampler.process(f);
      if (y.length) {
        this.chunks.push(y);
        this.buffered += y.length;
      }
    } else if (msg.type === "end") {
      this.ending = this.playing || this.buffered > 0;
    } else if (msg.type === "clear") {
      this.chunks = [];
      this.offset = 0;
      this.buffered = 0;
      if (this.playing) this.finish("stopped");
    }
  }

  finish(kind) {
    this.port.postMessage({ type: kind, seconds: this.played / sampleRate });
    this.playing = false;
    this.played = 0;
    this.dry = 0;
    this.ending = false;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    const n = out.length;
    if (!this.playing && this.buffered > 0) {
      this.waited += n;
      // Start once the prebuffer is there, or when no more is coming soon (a very short reply).
      if (this.buffered >= this.prebuffer || this.waited >= this.prebuffer * 2) {
        this.playing = true;
        this.waited = 0;
        this.port.postMessage({ type: "started" });
      }
    }
    let written = 0;
    if (this.playing) {
      while (written < n && this.chunks.length) {
        const chunk = this.chunks[0];
        const take = Math.min(n - written, chunk.length - this.offset);
        out.set(chunk.subarray(this.offset, this.offset + take), written);
        written += take;
        this.offset += take;
        if (this.offset >= chunk.length) {
          this.chunks.shift();
          this.offset = 0;
        }
      }
      this.buffered -= written;
      this.played += written;
      this.dry = written < n ? this.dry + (n - written) : 0;
      if (this.buffered === 0 && (this.ending || this.dry >= this.hangover)) this.finish("ended");
    }
    for (let i = written; i < n; i++) out[i] = 0;
    for (let i = 0; i < written; i++) this.sumsq += out[i] * out[i];
    this.levelCount += n;
    if (this.levelCount >= sampleRate / 20) {
      this.port.postMessage({ type: "level", level: Math.sqrt(this.sumsq / this.levelCount) });
      this.sumsq = 0;
      this.levelCount = 0;
    }
    return true;
  }
}

registerProcessor("speechpipe-capture", CaptureProcessor);
registerProcessor("speechpipe-playback", PlaybackProcessor);
