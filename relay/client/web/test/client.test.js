// RelayClient's connection logic against a scripted WebSocket: close codes, edge rotation,
// last_id on reconnect, capped backoff, token refresh, the bounded SDK call queue. (The real
// socket paths are covered by the browser tests in tests/browser/.)
import assert from "node:assert/strict";
import { test } from "node:test";

import { encode } from "@msgpack/msgpack";

import { closeAction, compareIds, RelayClient } from "../relay-client.js";

class FakeSocket {
  static made = [];

  constructor(url) {
    this.url = new URL(url);
    this.readyState = 0;
    this.sent = [];
    this.closedByClient = null;
    FakeSocket.made.push(this);
  }

  send(data) { this.sent.push(data); }

  close(code = 1005, reason = "") {
    if (this.readyState >= 2) return;
    this.closedByClient = code;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code: 1006, reason }));
  }

  // Test side: what the edge does.
  deliver(body) { this.readyState = 1; this.onmessage({ data: encode({ v: 1, ...body }).slice().buffer }); }
  welcome(extra = {}) { this.deliver({ kind: "welcome", conversation: "c", edge: "e", start: "live", recovered: null, position: null, ...extra }); }
  drop(code) { this.readyState = 3; this.onclose({ code, reason: "" }); }
}

const tick = (ms = 0) => new Promise((resolve) => setTimeout(resolve, ms));

async function nextSocket(count) {
  for (let i = 0; i < 200 && FakeSocket.made.length < count; i++) await tick(1);
  assert.equal(FakeSocket.made.length, count, "no new connection attempt");
  return FakeSocket.made[count - 1];
}

function recorder() {
  const calls = [];
  return {
    calls,
    controller: {
      yieldAudioData: (data, end) => { calls.push(["audio", data.length, end]); return "cid-1"; },
      yieldFramesData: (frames, cid) => { calls.push(["frames", frames.length, cid]); },
      interrupt: () => { calls.push(["interrupt"]); },
    },
  };
}

function client(extra = {}) {
  FakeSocket.made = [];
  return new RelayClient({
    edges: ["ws://edge-a:1", "http://edge-b:2/"], conversationId: "conv/1", token: "t0",
    WebSocket: FakeSocket, backoff: { initialMs: 1, maxMs: 4, jitter: 0 }, pingIntervalMs: 0, ...extra,
  });
}

const audio = (id, seq) => ({ kind: "audio", id, turn: "t", seq, data: new Uint8Array(4), end: false });

test("ids compare as integer pairs and every close code maps to the documented action", () => {
  assert.equal(compareIds("5-10", "5-9"), 1);
  assert.equal(compareIds("10-0", "9-99"), 1);
  assert.equal(compareIds("7-3", "7-3"), 0);
  const actions = Object.fromEntries([1000, 1001, 1002, 1006, 1009, 1011, 1012, 4400, 4401, 4402, 4403, 4429, 4430, 4503, 4999]
    .map((code) => [code, closeAction(code)]));
  assert.deepEqual(actions, {
    1000: "stop", 1001: "reconnect", 1002: "fail", 1006: "reconnect", 1009: "fail", 1011: "reconnect",
    1012: "reconnect", 4400: "fail", 4401: "refresh_token", 4402: "refresh_token", 4403: "fail",
    4429: "reconnect", 4430: "back_off", 4503: "reconnect", 4999: "reconnect",
  });
});

test("a drop resumes on the next edge with last_id; duplicates of the race are dropped", async () => {
  const { calls, controller } = recorder();
  const positions = [];
  const c = client({ controller, onPosition: (id) => positions.push(id) }).start();
  const a = await nextSocket(1);
  assert.equal(a.url.host, "edge-a:1");
  assert.equal(a.url.pathname, "/v1/conversations/conv%2F1/ws");
  assert.equal(a.url.searchParams.get("token"), "t0");
  assert.equal(a.url.searchParams.get("last_id"), null);
  a.welcome();
  a.deliver({ kind: "turn_start", id: "5-8", turn: "t", sample_rate: 16000, format: "pcm_s16le", channels: 1 });
  a.deliver(audio("5-9", 0));
  a.drop(1012);
  const b = await nextSocket(2);
  assert.equal(b.url.host, "edge-b:2");
  assert.equal(b.url.protocol, "ws:");
  assert.equal(b.url.searchParams.get("last_id"), "5-9");
  b.welcome({ start: "resume", recovered: true });
  b.deliver(audio("5-9", 0)); // the race: already processed
  b.deliver({ kind: "frames", id: "5-10", turn: "t", seq: 0, data: new Uint8Array(3), last: true });
  await c.adapter.whenIdle();
  assert.deepEqual(calls, [["audio", 4, false], ["frames", 1, "cid-1"]]);
  assert.deepEqual(positions, ["5-8", "5-9", "5-10"]);
  assert.equal(c.lastId, "5-10");
  assert.equal(c.connections, 2);
  c.stop();
  assert.equal((await c.closed).state, "stopped");
  assert.equal(b.closedByClient, 1000);
});

test("1000 stops, 4400 and 1009 fail, none reconnects", async () => {
  for (const [code, state] of [[1000, "stopped"], [4400, "failed"], [1009, "failed"]]) {
    const c = client({ controller: recorder().controller }).start();
    const s = await nextSocket(1);
    s.welcome();
    s.drop(code);
    assert.equal((await c.closed).state, state);
    await tick(10);
    assert.equal(FakeSocket.made.length, 1, `${code} reconnected`);
  }
});

test("backoff doubles up to the cap while edges keep failing, and resets after a welcome", async () => {
  const waits = [];
  const c = client({ controller: recorder().controller, backoff: { initialMs: 2, maxMs: 16, jitter: 0 } });
  const realTimeout = globalThis.setTimeout;
  globalThis.setTimeout = (fn, ms) => { if (ms >= 2 && ms < 1000) waits.push(ms); return realTimeout(fn, 0); };
  try {
    c.start();
    for (let n = 1; n <= 6; n++) (await nextSocket(n)).drop(1006);
    (await nextSocket(7)).welcome();
    FakeSocket.made[6].drop(1011);
    await nextSocket(8);
  } finally {
    globalThis.setTimeout = realTimeout;
  }
  c.stop();
  // Connect deadlines are 10 s (filtered out); reconnect waits: 2, 4, 8, 16, 16, 16, then 2 again.
  assert.deepEqual(waits, [2, 4, 8, 16, 16, 16, 2]);
  assert.deepEqual(FakeSocket.made.map((s) => s.url.host).slice(0, 3), ["edge-a:1", "edge-b:2", "edge-a:1"]);
});

test("4402 mid-connection asks the refresh callback, then resumes at once on the same edge with last_id", async () => {
  const asked = [];
  const c = client({
    controller: recorder().controller,
    refreshToken: async (info) => { asked.push(info.code); return `t${asked.length}`; },
  }).start();
  const a = await nextSocket(1);
  a.welcome();
  a.deliver(audio("9-0", 0));
  a.drop(4402);
  const b = await nextSocket(2);
  assert.deepEqual(asked, [4402]);
  assert.equal(b.url.host, "edge-a:1");
  assert.equal(b.url.searchParams.get("token"), "t1");
  assert.equal(b.url.searchParams.get("last_id"), "9-0");
  b.welcome({ start: "resume", recovered: true });
  assert.equal(c.state, "open");
  c.stop();
});

test("a refreshed token that is refused again before any welcome stops the client", async () => {
  let asked = 0;
  const c = client({ controller: recorder().controller, refreshToken: () => `bad${++asked}` }).start();
  (await nextSocket(1)).drop(4401);
  const second = await nextSocket(2);
  assert.equal(second.url.searchParams.get("token"), "bad1");
  second.drop(4402);
  const result = await c.closed;
  assert.equal(result.state, "failed");
  assert.equal(result.code, 4402);
  assert.equal(asked, 1);
  assert.equal(FakeSocket.made.length, 2);
});

test("4430 backs off for seconds, growing, and moves to another edge", async () => {
  const waits = [];
  const c = client({ controller: recorder().controller });
  const realTimeout = globalThis.setTimeout;
  globalThis.setTimeout = (fn, ms) => { if (ms >= 2 && ms !== 10000) waits.push(ms); return realTimeout(fn, 0); };
  try {
    c.start();
    (await nextSocket(1)).drop(4430);
    (await nextSocket(2)).drop(4430);
    await nextSocket(3);
  } finally {
    globalThis.setTimeout = realTimeout;
  }
  c.stop();
  assert.deepEqual(waits, [2000, 4000]);
  assert.deepEqual(FakeSocket.made.map((s) => s.url.host), ["edge-a:1", "edge-b:2", "edge-a:1"]);
});

test("without a refresh callback a string token cannot be renewed: 4402 fails", async () => {
  const c = client({ controller: recorder().controller }).start();
  (await nextSocket(1)).drop(4402);
  assert.equal((await c.closed).state, "failed");
});

test("a full SDK call queue drops the connection and resumes before the first message dropped", async () => {
  let release;
  const gate = new Promise((resolve) => { release = resolve; });
  const seen = [];
  const controller = {
    yieldAudioData: async (data) => { seen.push(data[0]); await gate; return "cid"; },
    yieldFramesData: () => {},
    interrupt: () => {},
  };
  const c = client({ controller });
  c.adapter.maxPending = 2;
  c.start();
  const a = await nextSocket(1);
  a.welcome();
  await c.adapter.whenIdle();
  for (let i = 1; i <= 5; i++) a.deliver({ ...audio(`1-${i}`, i), data: new Uint8Array([i]) });
  const b = await nextSocket(2);
  // 1-1 started (blocked in the SDK), 1-2 and 1-3 queued, 1-4 refused: resume after 1-1.
  assert.equal(b.url.searchParams.get("last_id"), "1-1");
  assert.equal(a.closedByClient, 1000);
  release();
  await c.adapter.whenIdle();
  b.welcome({ start: "resume", recovered: true });
  for (let i = 2; i <= 3; i++) b.deliver({ ...audio(`1-${i}`, i), data: new Uint8Array([i]) });
  await c.adapter.whenIdle();
  for (let i = 4; i <= 5; i++) b.deliver({ ...audio(`1-${i}`, i), data: new Uint8Array([i]) });
  await c.adapter.whenIdle();
  assert.equal(FakeSocket.made.length, 2);
  assert.deepEqual(seen, [1, 2, 3, 4, 5]);
  c.stop();
});

test("the id before another is the greatest smaller one", async () => {
  const { idBefore } = await import("../relay-client.js");
  assert.equal(idBefore("5-3"), "5-2");
  assert.equal(idBefore("5-0"), `4-${Number.MAX_SAFE_INTEGER}`);
  assert.equal(compareIds(idBefore("5-0"), "5-0"), -1);
});

test("an edge error message comes with its close, not as onError", async () => {
  const errors = [];
  const closes = [];
  const c = client({
    controller: recorder().controller, onError: (e) => errors.push(e.message), onClose: (i) => closes.push(i),
    refreshToken: () => "t1",
  }).start();
  const a = await nextSocket(1);
  a.welcome();
  a.deliver({ kind: "error", code: "token_expired", message: "the token expired" });
  a.drop(4402);
  const b = await nextSocket(2);
  assert.deepEqual(errors, []);
  assert.deepEqual(closes[0].edgeError, { code: "token_expired", message: "the token expired" });
  b.welcome();
  b.deliver({ kind: "error", code: "bad_message", message: "unknown kind" });
  b.drop(4400);
  const result = await c.closed;
  assert.equal(result.state, "failed");
  assert.match(result.reason, /unknown kind/);
  assert.equal(errors.length, 1);
});
