// The demo page: one conversation from the local stack's edges, played by the stand-in player,
// with the turn drawn as it happens. Query parameters (relay run prints a ready URL):
//   control=<url>        the stack's demo control (tokens, "speak a turn"); or token=<token>
//   edges=<ws,ws,...>    edges to use, in order (default: the edge serving this page)
//   conversation=<id>    default "web-demo"
//   token_ttl=<seconds>  short-lived tokens from the control, to watch the refresh callback work

import { RelayClient } from "./lib/relay-client.js";
import { mouthOpening } from "./animation.js";
import { FPS, StandInAvatarController } from "./player.js";

const params = new URLSearchParams(location.search);
const conversationId = params.get("conversation") || "web-demo";
const control = params.get("control");
const ownEdge = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}`;
const edges = (params.get("edges") || ownEdge).split(",").filter(Boolean);
const SAMPLE_RATE = 16000; // AvatarKit's audio format is fixed per instance; the stack speaks 16 kHz
const TIMELINE_MAX = 400; // rows kept in the timeline (oldest dropped)
const RECORD_MAX = 20000; // messages kept in window.relayDemo.messages for tests (oldest dropped)

const $ = (id) => document.getElementById(id);
const demo = { messages: [], welcomes: [], closes: [], errors: [], tokens: 0, ready: false };
window.relayDemo = demo;

async function fetchToken() {
  demo.tokens += 1;
  if (!control) {
    const token = params.get("token");
    if (!token) throw new Error("no token: open the page with ?control=... or ?token=...");
    return token;
  }
  const ttl = params.get("token_ttl");
  const query = `conversation=${encodeURIComponent(conversationId)}${ttl ? `&ttl=${encodeURIComponent(ttl)}` : ""}`;
  const response = await fetch(`${control}/token?${query}`);
  if (!response.ok) throw new Error(`token endpoint answered ${response.status}`);
  return (await response.json()).token;
}

async function post(path) {
  if (!control) return;
  await player.initializeAudioContext(); // buttons are user gestures: audio may start now
  const response = await fetch(`${control}${path}${path.includes("?") ? "&" : "?"}conversation=${encodeURIComponent(conversationId)}`, { method: "POST" });
  if (!response.ok) addRow("connection", `control ${path} answered ${response.status}`);
}

// --- timeline ---------------------------------------------------------------------------------

let turnStartedAt = performance.now();

function addRow(kind, text) {
  const row = document.createElement("li");
  row.className = kind;
  const t = ((performance.now() - turnStartedAt) / 1000).toFixed(3).padStart(7);
  row.textContent = `${t} s  ${text}`;
  const list = $("timeline");
  list.appendChild(row);
  while (list.childElementCount > TIMELINE_MAX) list.firstElementChild.remove();
  list.scrollTop = list.scrollHeight;
}

function describe(m) {
  switch (m.kind) {
    case "turn_start": return `turn_start ${m.turn} (${m.sample_rate} Hz)`;
    case "audio": return `audio #${m.seq} ${m.data.byteLength} B${m.end ? " end" : ""}`;
    case "frames": return `frames #${m.seq} ${m.data.byteLength} B${m.last ? " last" : ""}`;
    case "audio_only": return `audio_only (${m.reason}): the rest of the turn plays without animation`;
    case "interrupt": return `interrupt (${m.reason}): player reset`;
    case "turn_end": return `turn_end ${m.status}`;
    default: return m.kind;
  }
}

function onMessage(m) {
  if (m.kind === "welcome") return;
  if (m.kind === "turn_start") {
    turnStartedAt = performance.now();
    $("timeline").replaceChildren();
  }
  demo.messages.push({ id: m.id, kind: m.kind, turn: m.turn, seq: m.seq ?? null });
  if (demo.messages.length > RECORD_MAX) demo.messages.shift();
  if (m.kind === "turn_start" && m.sample_rate !== SAMPLE_RATE) {
    addRow("interrupt", `turn at ${m.sample_rate} Hz; this player plays ${SAMPLE_RATE} Hz`);
  }
  addRow(m.kind, describe(m));
}

// --- the stand-in avatar and the chart --------------------------------------------------------

const player = new StandInAvatarController({ sampleRate: SAMPLE_RATE });
demo.player = player;

function drawFace(keyframe) {
  const canvas = $("avatar");
  const g = canvas.getContext("2d");
  const w = canvas.width;
  const h = canvas.height;
  g.clearRect(0, 0, w, h);
  const roll = keyframe ? 4 * (keyframe.rotation[2] ?? 0) : 0;
  const dx = keyframe ? 400 * (keyframe.translation[0] ?? 0) : 0;
  g.save();
  g.translate(w / 2 + dx, h / 2);
  g.rotate(roll);
  g.fillStyle = "#f3d2b3";
  g.strokeStyle = "#8a6a50";
  g.lineWidth = 3;
  g.beginPath();
  g.ellipse(0, 0, 110, 135, 0, 0, 2 * Math.PI);
  g.fill();
  g.stroke();
  const lid = keyframe ? Math.max(0, Math.min(1, keyframe.eye_lid[0] ?? 0)) : 0;
  const gaze = keyframe ? 60 * (keyframe.eye_pose[0] ?? 0) : 0;
  for (const side of [-1, 1]) {
    g.fillStyle = "#fff";
    g.beginPath();
    g.ellipse(side * 42, -35, 20, 14 * (1 - lid) + 1, 0, 0, 2 * Math.PI);
    g.fill();
    g.stroke();
    if (lid < 0.5) {
      g.fillStyle = "#2b4a6f";
      g.beginPath();
      g.arc(side * 42 + gaze, -35, 7, 0, 2 * Math.PI);
      g.fill();
    }
  }
  const opening = keyframe ? mouthOpening(keyframe) : 0;
  g.fillStyle = "#7a2630";
  g.beginPath();
  g.ellipse(0, 60, 38, 3 + 34 * opening, 0, 0, 2 * Math.PI);
  g.fill();
  g.stroke();
  g.restore();
  g.fillStyle = "#555";
  g.font = "12px system-ui";
  const reply = player.history[player.history.length - 1];
  const label = !reply ? "waiting for a turn" : reply.interrupted ? "interrupted"
    : reply.audioOnly ? "audio only (no animation)" : keyframe ? `mouth ${(100 * opening).toFixed(0)} %` : "idle";
  g.fillText(label, 8, h - 10);
}

function drawChart() {
  const canvas = $("chart");
  const g = canvas.getContext("2d");
  const w = canvas.width;
  const h = canvas.height;
  g.clearRect(0, 0, w, h);
  const reply = player.history[player.history.length - 1];
  const seconds = reply ? reply.bytes / 2 / SAMPLE_RATE : 0;
  const span = Math.max(3, Math.ceil(seconds));
  const x = (t) => 30 + (t / span) * (w - 40);
  const y = (v) => h - 24 - v * (h - 48);
  g.strokeStyle = "#ddd";
  g.fillStyle = "#777";
  g.font = "11px system-ui";
  for (let t = 0; t <= span; t++) {
    g.beginPath(); g.moveTo(x(t), 8); g.lineTo(x(t), h - 24); g.stroke();
    g.fillText(`${t}s`, x(t) - 6, h - 8);
  }
  if (!reply) return;
  // Audio level per 1/25 s window of what was scheduled.
  g.fillStyle = "rgba(31, 95, 191, 0.35)";
  const window = SAMPLE_RATE / FPS;
  let index = 0;
  for (const chunk of reply.audio) {
    const view = new DataView(chunk.buffer, chunk.byteOffset, chunk.byteLength - (chunk.byteLength % 2));
    for (let i = 0; i < view.byteLength; i += 2, index++) {
      if (index % window !== 0) continue;
      let sum = 0;
      let n = 0;
      for (let j = i; j < Math.min(view.byteLength, i + 2 * window); j += 2, n++) sum += (view.getInt16(j, true) / 32768) ** 2;
      const level = Math.min(1, 4 * Math.sqrt(sum / Math.max(1, n)));
      g.fillRect(x(index / SAMPLE_RATE), y(level), Math.max(1, x(1 / FPS) - x(0) - 1), y(0) - y(level));
    }
  }
  // Mouth opening of each keyframe at its place on the audio clock.
  if (reply.keyframes.length && !reply.audioOnly) {
    g.strokeStyle = "#1d8a3a";
    g.lineWidth = 2;
    g.beginPath();
    reply.keyframes.forEach((k, i) => (i ? g.lineTo : g.moveTo).call(g, x(i / FPS), y(mouthOpening(k))));
    g.stroke();
    g.lineWidth = 1;
  }
  g.strokeStyle = "#c0262d";
  const now = player.heardSeconds(reply);
  g.beginPath(); g.moveTo(x(now), 8); g.lineTo(x(now), h - 24); g.stroke();
  g.fillStyle = "#333";
  g.fillText(`${reply.keyframes.length} keyframes, ${seconds.toFixed(2)} s of audio${reply.audioOnly ? ", audio only" : ""}`, 40, 20);
}

function frame() {
  drawFace(player.currentKeyframe());
  drawChart();
  showStatus();
  requestAnimationFrame(frame);
}

// --- the client -------------------------------------------------------------------------------

function showStatus() {
  if (!client) return;
  $("status").textContent = `${client.state} · ${client.edge ?? "-"} · conversation ${conversationId} · last_id ${client.lastId ?? "-"}`;
}

const client = new RelayClient({
  edges,
  conversationId,
  token: fetchToken,
  refreshToken: fetchToken,
  controller: player,
  onMessage,
  onWelcome: (w) => {
    demo.welcomes.push({ edge: w.edge, start: w.start, recovered: w.recovered, position: w.position });
    addRow("connection", `welcome from ${w.edge}: start=${w.start} recovered=${w.recovered}`);
    demo.ready = true;
    showStatus();
  },
  onClose: (c) => {
    demo.closes.push({ code: c.code, reason: c.reason, action: c.action });
    addRow("connection", `closed ${c.code} ${c.reason} -> ${c.action}`);
    showStatus();
  },
  onStateChange: showStatus,
  onError: (err) => { demo.errors.push(String(err?.message ?? err)); },
});
demo.client = client;

$("speak").onclick = () => post("/turn");
$("speak-fault").onclick = () => post("/turn?fault=motion");
$("interrupt").onclick = () => post("/interrupt");
$("drop").onclick = () => client.reconnect();
for (const id of ["speak", "speak-fault", "interrupt"]) $(id).disabled = !control;

client.start();
requestAnimationFrame(frame);
