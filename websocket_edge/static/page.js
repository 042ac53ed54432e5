// The test page: pick a pipe, get a token (typed in, or from the demo endpoint in demo mode), talk.
// Everything the session reports is also kept in `window.speechpipePage.log` for automated tests.
import { SpeechPipeSession } from "/sdk/speechpipe.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const page = { session: null, log: [], turns: [] };
window.speechpipePage = page;

const remembered = JSON.parse(localStorage.getItem("speechpipe.pipes") || "[]");
for (const id of remembered) $("pipes").append(new Option(id, id));
$("pipe").value = params.get("pipe") || remembered[0] || "";
$("token").value = params.get("token") || "";

function setStatus(state) {
  $("status").textContent = state.replace("_", " ");
  $("status").dataset.state = state;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setRunning(running) {
  $("start").disabled = running;
  $("stop").disabled = !running;
  $("mute").disabled = !running;
  $("text").disabled = !running;
  document.querySelector("#say button").disabled = !running;
  for (const key of document.querySelectorAll("#keypad button")) key.disabled = !running;
  $("pipe").disabled = running;
  $("token").disabled = running;
}

async function getToken(pipeId) {
  const typed = $("token").value.trim();
  if (typed) return { token: typed, pipe_id: pipeId };
  const resp = await fetch("/v1/demo/token", { method: "POST" });
  if (resp.status === 404) throw new Error("This server is not in demo mode: paste a session token minted with your API key.");
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error?.message || `demo token: HTTP ${resp.status}`);
  if (pipeId && pipeId !== body.pipe_id) throw new Error(`The demo endpoint only serves the demo pipe ${body.pipe_id}.`);
  return body;
}

function addLine(role, seq, text) {
  const li = document.createElement("li");
  li.dataset.role = role;
  li.dataset.seq = String(seq);
  li.innerHTML = `<span class="who"></span><span class="text"></span>`;
  li.querySelector(".who").textContent = role === "user" ? "You" : "Agent";
  li.querySelector(".text").textContent = text;
  $("transcript").append(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

function latencyRow(turn) {
  let row = document.querySelector(`#latency tr[data-turn="${turn}"]`);
  if (!row) {
    row = document.createElement("tr");
    row.dataset.turn = String(turn);
    row.innerHTML = "<td></td><td class='response'>–</td><td class='barge'>–</td><td class='silence'>–</td>";
    row.cells[0].textContent = String(turn);
    document.querySelector("#latency tbody").append(row);
  }
  return row;
}

let lastUserSeq = 0;

// The session view: live figures from the events while the session runs; once it ends, the end reason and
// the summary the server stored in `sessions.metrics` (sent with `session.ended`).
const view = { turns: 0, latencies: [], interruptions: 0, ended: false };
page.view = view;

function setViewState(state, label) {
  $("session-view").dataset.state = state;
  $("sv-state").textContent = label;
}

function resetSessionView() {
  Object.assign(view, { turns: 0, latencies: [], interruptions: 0, ended: false });
  for (const id of ["sv-last", "sv-avg", "sv-end-reason", "sv-p50", "sv-p95", "sv-latencies"]) $(id).textContent = "–";
  showLive();
  setViewState("connecting", "connecting");
}

function showLive() {
  $("sv-turns").textContent = String(view.turns);
  $("sv-interruptions").textContent = String(view.interruptions);
  const n = view.latencies.length;
  if (!n) return;
  $("sv-last").textContent = String(Math.round(view.latencies[n - 1]));
  $("sv-avg").textContent = String(Math.round(view.latencies.reduce((a, b) => a + b, 0) / n));
}

function showStored(reason, metrics) {
  view.ended = true;
  setViewState("ended", "ended");
  $("sv-end-reason").textContent = reason;
  if (metrics.user_turns !== undefined) $("sv-turns").textContent = String(metrics.user_turns);
  if (metrics.interruptions !== undefined) $("sv-interruptions").textContent = String(metrics.interruptions);
  const response = metrics.response_ms || {};
  if (response.p50 !== undefined) {
    $("sv-p50").textContent = String(Math.round(response.p50));
    $("sv-p95").textContent = String(Math.round(response.p95));
  }
  const stored = metrics.turn_latencies_ms || [];
  if (stored.length) $("sv-latencies").textContent = stored.join(", ");
}

function watchSession(session) {
  session.on("session.started", () => setViewState("live", "live"));
  session.on("user_turn", () => { view.turns += 1; showLive(); });
  session.on("metric", (e) => {
    if (e.name !== "turn") return;
    view.latencies.push(e.values.response_latency_ms);
    showLive();
  });
  session.on("barge_in", () => { view.interruptions += 1; showLive(); });
  session.on("session.ended", (e) => showStored(e.reason, e.metrics || {}));
  session.on("close", (e) => {
    if (view.ended) return;
    setViewState("closed", "closed");  // no `session.ended`: refused, or the connection dropped
    $("sv-end-reason").textContent = e.reason || `closed (${e.code})`;
  });
}

async function start() {
  showError("");
  setRunning(true);
  resetSessionView();
  try {
    const pipeInput = $("pipe").value.trim();
    const { token, pipe_id: pipeId } = await getToken(pipeInput);
    $("pipe").value = pipeId;
    if (!remembered.includes(pipeId)) localStorage.setItem("speechpipe.pipes", JSON.stringify([pipeId, ...remembered].slice(0, 10)));
    const wsUrl = new URL(`/v1/pipes/${encodeURIComponent(pipeId)}/connect`, location.href);
    const session = new SpeechPipeSession({ url: wsUrl.href, token });
    page.session = session;
    const record = (e) => {
      page.log.push({ t: performance.now(), ...e });
      if (page.log.length > 20000) page.log.splice(0, 5000);
    };
    session.on("event", record);
    watchSession(session);
    session.on("playback", (e) => record({ ...e, type: "playback" }));
    session.on("close", (e) => record({ type: "close", ...e }));
    session.on("state", ({ state }) => setStatus(state));
    session.on("level", (e) => {
      if (e.input !== undefined) $("in-level").value = Math.min(1, e.input * 4);
      if (e.output !== undefined) $("out-level").value = Math.min(1, e.output * 4);
      if (e.output > 0.005) record({ type: "level", output: e.output }); // when the agent was audible
    });
    session.on("user_partial", (e) => { $("partial").textContent = e.text; });
    session.on("user_turn", (e) => {
      $("partial").textContent = "";
      lastUserSeq = e.seq;
      addLine("user", e.seq, e.text);
    });
    session.on("agent_reply", (e) => addLine("agent", e.seq, e.text));
    session.on("agent.speech_done", (e) => {
      const li = [...document.querySelectorAll(`#transcript li[data-role="agent"][data-seq="${e.seq}"]`)].pop();
      if (!li) return;
      li.dataset.interrupted = String(e.interrupted);
      if (e.interrupted) {
        const heard = document.createElement("span");
        heard.className = "heard";
        heard.textContent = `heard: “${e.heard_text}”`;
        li.append(heard);
      }
    });
    session.on("metric", (e) => {
      if (e.name !== "turn" && e.name !== "barge_in") return;  // the table shows per-turn figures only
      const row = latencyRow(lastUserSeq);
      if (e.name === "turn") {
        row.querySelector(".response").textContent = Math.round(e.values.response_latency_ms);
        row.querySelector(".silence").textContent = Math.round(e.values.endpoint_silence_ms ?? 0);
      } else if (e.name === "barge_in") {
        row.querySelector(".barge").textContent = Math.round(e.values.reaction_ms);
      }
    });
    session.on("error", (e) => showError(`${e.code}: ${e.message}`));
    session.on("close", () => setRunning(false));
    const started = await session.connect();
    $("session-id").textContent = started.session_id;
  } catch (err) {
    showError(err.message || String(err));
    setRunning(false);
    setStatus("closed");
  }
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", () => page.session?.disconnect());
$("mute").addEventListener("click", () => {
  const s = page.session;
  if (!s) return;
  s.mute(!s.muted);
  $("mute").setAttribute("aria-pressed", String(s.muted));
  $("mute").textContent = s.muted ? "Unmute" : "Mute";
});
$("say").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (text && page.session) page.session.sendText(text);
  $("text").value = "";
});

// The keypad: each key press is one DTMF digit to the agent (its `dtmf` hook), as on a phone.
$("keypad").addEventListener("click", (e) => {
  const key = e.target.closest("button[data-digit]");
  const session = page.session;
  if (!key || !session || session.state === "closed" || !session.sessionId) return;
  try {
    session.sendDtmf(key.dataset.digit);
    page.log.push({ t: performance.now(), type: "dtmf_sent", digits: key.dataset.digit });
  } catch (err) {
    showError(err.message || String(err));
  }
});
