// avatar-relay web client: one ES module, no build step (docs/protocol.md is the contract).
//
// RelayClient keeps one WebSocket to one of a list of edges, resumes with last_id on any edge
// after a drop, drops what the protocol says to drop, and acts on every close code. Messages go
// to an AvatarKitAdapter, which makes the AvatarKit SDK calls of the protocol's state machine one
// after another. See README.md beside this file for the wiring with @spatius/avatarkit.

import { decode, encode } from "@msgpack/msgpack";

export const PROTOCOL_VERSION = 1;

const STREAM_KINDS = new Set(["turn_start", "audio", "frames", "audio_only", "interrupt", "turn_end"]);
const EDGE_KINDS = new Set(["welcome", "error", "pong"]);

/** What a client does after a close code (docs/protocol.md, "Close codes"). */
export const CloseAction = Object.freeze({
  STOP: "stop", // 1000: the edge or the app ended the conversation normally
  FAIL: "fail", // 1002, 1009, 4400, 4403: a client bug or the wrong token; retrying cannot help
  REFRESH_TOKEN: "refresh_token", // 4401, 4402: get a new token, reconnect at once with last_id
  BACK_OFF: "back_off", // 4430: too many connections; wait seconds, then another edge
  RECONNECT: "reconnect", // everything else: reconnect with last_id, to the next edge
});

const FAIL_CODES = new Set([1002, 1009, 4400, 4403]);
const TOKEN_CODES = new Set([4401, 4402]);
const CROWDED = 4430;
// "Back off a few seconds, growing" (4430): the edge is refusing connections, not failing.
const CROWDED_FIRST_MS = 2000;
const CROWDED_MAX_MS = 30000;

/** The action for a WebSocket close code. Unknown codes and 1006 (no close frame) reconnect. */
export function closeAction(code) {
  if (code === 1000) return CloseAction.STOP;
  if (FAIL_CODES.has(code)) return CloseAction.FAIL;
  if (TOKEN_CODES.has(code)) return CloseAction.REFRESH_TOKEN;
  if (code === CROWDED) return CloseAction.BACK_OFF;
  return CloseAction.RECONNECT;
}

function parseId(id) {
  const dash = id.indexOf("-");
  if (dash <= 0 || dash !== id.lastIndexOf("-")) throw new RelayError(`bad stream id ${id}`);
  // Both halves stay below 2^53 for real stream ids (milliseconds since 1970, per-ms sequence).
  return [Number(id.slice(0, dash)), Number(id.slice(dash + 1))];
}

/** The greatest id below `id`: resuming after it delivers `id` itself again. */
export function idBefore(id) {
  const [ms, seq] = parseId(id);
  return seq > 0 ? `${ms}-${seq - 1}` : `${ms - 1}-${Number.MAX_SAFE_INTEGER}`;
}

/** Compare stream ids as (milliseconds, sequence) integers: -1, 0 or 1. Never compare as text. */
export function compareIds(a, b) {
  const [am, as] = parseId(a);
  const [bm, bs] = parseId(b);
  if (am !== bm) return am < bm ? -1 : 1;
  if (as !== bs) return as < bs ? -1 : 1;
  return 0;
}

export class RelayError extends Error {
  constructor(message, details = {}) {
    super(message);
    this.name = "RelayError";
    Object.assign(this, details);
  }
}

/** Decode one binary server frame into a plain object; binary fields are Uint8Array. */
export function decodeMessage(bytes) {
  let body;
  try {
    body = decode(bytes instanceof ArrayBuffer ? new Uint8Array(bytes) : bytes);
  } catch (err) {
    throw new RelayError("message is not valid msgpack", { cause: err });
  }
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    throw new RelayError("message is not a msgpack map");
  }
  if (body.v !== PROTOCOL_VERSION) throw new RelayError(`unsupported protocol version ${body.v}`);
  if (!STREAM_KINDS.has(body.kind) && !EDGE_KINDS.has(body.kind)) {
    throw new RelayError(`unknown message kind ${body.kind}`);
  }
  if (STREAM_KINDS.has(body.kind) && typeof body.id !== "string") {
    throw new RelayError(`${body.kind} message without an id`);
  }
  return body;
}

/** The last stream id processed; refuses messages at or below it (reconnect races). */
export class StreamPosition {
  constructor(lastId = null) {
    this.lastId = lastId ?? null;
  }

  /** True if the message is to be processed; stream messages advance the position. */
  accept(message) {
    if (typeof message.id !== "string") return true;
    if (this.lastId !== null && compareIds(message.id, this.lastId) <= 0) return false;
    this.lastId = message.id;
    return true;
  }
}

/**
 * The protocol's client state machine on an AvatarKit controller (the real AvatarController of
 * @spatius/avatarkit, or any object with the same three methods). Calls run strictly one after
 * another in message order; a call returning a promise is awaited before the next one starts.
 *
 * The queue of messages waiting for their calls is bounded by maxPending. When it is full, push()
 * refuses the message; the RelayClient then drops the connection, throws the waiting messages
 * away and resumes just before the first of them, so they arrive again, once each.
 */
export class AvatarKitAdapter {
  constructor(controller, { maxPending = 4096, onError = null } = {}) {
    for (const name of ["yieldAudioData", "yieldFramesData", "interrupt"]) {
      if (typeof controller?.[name] !== "function") {
        throw new TypeError(`controller has no ${name}() method`);
      }
    }
    this.controller = controller;
    this.conversationId = null;
    this.maxPending = maxPending;
    this.onError = onError;
    this.startedId = null; // id of the last stream message whose calls started
    this.appliedId = null; // id of the last stream message whose calls finished
    this.onApplied = null; // (id) => void, set by RelayClient to publish positions
    this._queue = [];
    this._running = false;
    this._idle = [];
  }

  get pending() {
    return this._queue.length;
  }

  /** Queue a message for its SDK calls; false (and nothing queued) when the queue is full. */
  push(message) {
    // A welcome is always taken (one per connection): its recovered=false must not be lost.
    if (this._queue.length >= this.maxPending && typeof message.id === "string") return false;
    this._queue.push(message);
    if (!this._running) this._drain();
    return true;
  }

  /** Forget the stream messages whose calls have not started; returns them, oldest first. */
  dropPending() {
    const dropped = this._queue.filter((m) => typeof m.id === "string");
    this._queue = this._queue.filter((m) => typeof m.id !== "string");
    return dropped;
  }

  /** Resolves once every queued message has had its calls made. */
  whenIdle() {
    if (!this._running && this._queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this._idle.push(resolve));
  }

  async _drain() {
    this._running = true;
    try {
      while (this._queue.length > 0) {
        const message = this._queue.shift();
        if (typeof message.id === "string") this.startedId = message.id;
        try {
          await this._apply(message);
        } catch (err) {
          // A failing SDK call must not stall the turns behind it; the app hears about it.
          if (this.onError) this.onError(err, message);
        }
        if (typeof message.id === "string") {
          this.appliedId = message.id;
          if (this.onApplied) this.onApplied(message.id);
        }
      }
    } finally {
      this._running = false;
      for (const resolve of this._idle.splice(0)) resolve();
    }
  }

  async _apply(message) {
    const controller = this.controller;
    switch (message.kind) {
      case "welcome":
        if (message.recovered === false) await this._interrupt();
        break;
      case "turn_start":
        this.conversationId = null;
        break;
      case "audio": {
        const returned = await controller.yieldAudioData(message.data ?? new Uint8Array(0), message.end === true);
        // The SDK may mint a fresh id as a reply goes on; frames go to the latest non-null one.
        if (returned !== null && returned !== undefined) this.conversationId = returned;
        break;
      }
      case "frames":
        if (this.conversationId !== null) await controller.yieldFramesData([message.data], this.conversationId);
        break;
      case "audio_only":
        if (this.conversationId !== null) await controller.yieldFramesData([], this.conversationId);
        break;
      case "interrupt":
        await this._interrupt();
        break;
      default: // turn_end: nothing; the id stays until the next turn_start
    }
  }

  async _interrupt() {
    this.conversationId = null;
    await this.controller.interrupt();
  }
}

function toWsBase(edge) {
  const base = String(edge).replace(/\/+$/, "");
  if (base.startsWith("https://")) return "wss://" + base.slice(8);
  if (base.startsWith("http://")) return "ws://" + base.slice(7);
  return base;
}

/**
 * One conversation's connection: connect to one of `edges`, resume on any edge after a drop.
 * Options are documented in relay-client.d.ts and README.md.
 */
export class RelayClient {
  constructor(options) {
    const edges = typeof options.edges === "string" ? [options.edges] : [...(options.edges ?? [])];
    if (edges.length === 0) throw new TypeError("at least one edge URL is required");
    if (!options.conversationId) throw new TypeError("conversationId is required");
    if (options.token === undefined) throw new TypeError("token is required (a string or a function)");
    this.edges = edges.map(toWsBase);
    this.conversationId = options.conversationId;
    this._tokenSource = options.token;
    this._token = typeof options.token === "string" ? options.token : null;
    this._refreshToken = options.refreshToken ?? null;
    this.adapter = options.adapter ?? (options.controller ? new AvatarKitAdapter(options.controller) : null);
    this._position = new StreamPosition(options.lastId ?? null);
    this._backoff = { initialMs: 50, maxMs: 2000, factor: 2, jitter: 0.2, ...(options.backoff ?? {}) };
    this._maxAttempts = options.maxAttempts ?? 0;
    this._connectTimeoutMs = options.connectTimeoutMs ?? 10000;
    this._pingIntervalMs = options.pingIntervalMs ?? 15000;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._on = {
      message: options.onMessage, welcome: options.onWelcome, position: options.onPosition,
      state: options.onStateChange, close: options.onClose, error: options.onError,
    };
    this.state = "idle";
    this.edge = null;
    this.connections = 0;
    this._edgeIndex = 0;
    this._failures = 0;
    this._refreshedSinceWelcome = false;
    this.tokenRefreshes = 0;
    this._ws = null;
    this._timers = new Set();
    this._lastHeard = 0;
    this._finished = null;
    this.closed = new Promise((resolve) => { this._finished = resolve; });
    if (this.adapter) {
      this.adapter.onError ??= (err, message) => this._emit("error", err, message);
      this.adapter.onApplied = (id) => this._emit("position", id);
    }
  }

  /** The id of the last stream message accepted: what a reconnect sends as last_id. */
  get lastId() {
    return this._position.lastId;
  }

  start() {
    if (this.state !== "idle") throw new RelayError(`start() in state ${this.state}`);
    this._connect();
    return this;
  }

  /** Close for good (code 1000); no reconnect. */
  stop() {
    this._finish("stopped", { code: 1000, reason: "client stop" });
  }

  /** Drop the current connection and resume at once on the next edge (a "retry now" button). */
  reconnect() {
    const ws = this._ws;
    if (!ws || this._isFinished()) return;
    this._ws = null;
    this._stopLiveness();
    ws.close(1000, "client reconnect");
    this._emit("close", { code: 1006, reason: "client reconnect", action: CloseAction.RECONNECT, edge: this.edge, welcomed: true });
    this._retry({ code: 1006, reason: "client reconnect", rotate: true, immediate: true });
  }

  /** Send a protocol ping; the edge answers with a pong (used for liveness). */
  ping(nonce = Date.now()) {
    if (this._ws && this._ws.readyState === 1) this._ws.send(encode({ v: PROTOCOL_VERSION, kind: "ping", nonce }));
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", state);
  }

  _emit(name, ...args) {
    const handler = this._on[name];
    if (!handler) return;
    try {
      handler(...args);
    } catch (err) {
      if (name !== "error" && this._on.error) this._on.error(err);
    }
  }

  _timer(fn, ms, repeat = false) {
    const id = repeat ? setInterval(fn, ms) : setTimeout(() => { this._timers.delete(id); fn(); }, ms);
    this._timers.add(id);
    return id;
  }

  _clearTimers() {
    for (const id of this._timers) { clearTimeout(id); clearInterval(id); }
    this._timers.clear();
  }

  async _currentToken() {
    if (this._token !== null) return this._token;
    this._token = await this._tokenSource();
    return this._token;
  }

  async _connect() {
    if (this._isFinished()) return;
    this._setState("connecting");
    let token;
    try {
      token = await this._currentToken();
    } catch (err) {
      return this._retry({ code: 0, reason: "token source failed", error: err, rotate: false });
    }
    if (this._isFinished()) return;
    const edge = this.edges[this._edgeIndex];
    let url = `${edge}/v1/conversations/${encodeURIComponent(this.conversationId)}/ws?token=${encodeURIComponent(token)}`;
    if (this.lastId !== null) url += `&last_id=${encodeURIComponent(this.lastId)}`;
    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (err) {
      return this._retry({ code: 0, reason: "bad edge URL", error: err, rotate: true });
    }
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    this.edge = edge;
    let welcomed = false;
    let edgeError = null;
    const deadline = this._timer(() => { if (!welcomed) ws.close(); }, this._connectTimeoutMs);
    ws.onmessage = (event) => {
      if (this._ws !== ws) return;
      this._lastHeard = Date.now();
      if (typeof event.data === "string") return; // the edge only sends binary frames
      let message;
      try {
        message = decodeMessage(event.data);
      } catch (err) {
        this._emit("error", err);
        return;
      }
      if (message.kind === "welcome") {
        welcomed = true;
        clearTimeout(deadline);
        this._timers.delete(deadline);
        this._failures = 0;
        this._refreshedSinceWelcome = false;
        this.connections += 1;
        this._setState("open");
        this._emit("welcome", message);
        this._startLiveness(ws);
      } else if (message.kind === "pong") {
        return;
      } else if (message.kind === "error") {
        // The edge explains the close that follows; the close code decides what happens.
        edgeError = { code: message.code, message: message.message };
        return;
      }
      this._deliver(ws, message);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._stopLiveness();
      clearTimeout(deadline);
      this._timers.delete(deadline);
      this._onClosed(event.code, event.reason ?? "", welcomed, edgeError);
    };
    ws.onerror = () => {}; // always followed by close, which decides what to do
  }

  _deliver(ws, message) {
    if (!this._position.accept(message)) return;
    this._emit("message", message);
    if (!this.adapter || this.adapter.push(message)) {
      if (!this.adapter && typeof message.id === "string") this._emit("position", message.id);
      return;
    }
    // The SDK calls fell too far behind: drop the connection and what waits, and resume just
    // before the first message thrown away, so each arrives again exactly once.
    const first = [...this.adapter.dropPending(), message][0];
    this._position.lastId = idBefore(first.id);
    this._emit("error", new RelayError("SDK call queue full; resuming", { code: "queue_full" }));
    this._ws = null;
    this._stopLiveness();
    ws.close(1000, "client queue full");
    this._retry({ code: 4429, reason: "client queue full", rotate: false });
  }

  _startLiveness(ws) {
    if (!this._pingIntervalMs) return;
    this._lastHeard = Date.now();
    this._liveness = this._timer(() => {
      if (Date.now() - this._lastHeard > 2 * this._pingIntervalMs) {
        // Silent for two intervals: the network dropped without a close frame.
        this._ws = null;
        this._stopLiveness();
        ws.close();
        this._onClosed(1006, "no answer to ping", true);
        return;
      }
      this.ping();
    }, this._pingIntervalMs, true);
  }

  _stopLiveness() {
    if (this._liveness !== undefined) {
      clearInterval(this._liveness);
      this._timers.delete(this._liveness);
      this._liveness = undefined;
    }
  }

  _onClosed(code, reason, welcomed, edgeError = null) {
    const action = closeAction(code);
    this._emit("close", { code, reason, action, edge: this.edge, welcomed, edgeError });
    if (this._isFinished()) return;
    if (action === CloseAction.STOP) return this._finish("stopped", { code, reason });
    if (action === CloseAction.FAIL) return this._fail(code, edgeError ? `${reason}: ${edgeError.message}` : reason);
    if (action === CloseAction.REFRESH_TOKEN) return this._refresh(code, reason, welcomed);
    return this._retry({ code, reason, rotate: true, crowded: action === CloseAction.BACK_OFF });
  }

  async _refresh(code, reason, welcomed) {
    // One new token per welcomed connection: a fresh token refused again before any welcome
    // is a configuration problem a second one will not cure (docs/protocol.md, token refresh).
    if (welcomed) this._refreshedSinceWelcome = false;
    const source = this._refreshToken ?? (typeof this._tokenSource === "function" ? this._tokenSource : null);
    if (!source || this._refreshedSinceWelcome) return this._fail(code, reason);
    this._refreshedSinceWelcome = true;
    this.tokenRefreshes += 1;
    this._setState("refreshing");
    try {
      this._token = await source({ code, reason, conversationId: this.conversationId });
    } catch (err) {
      this._emit("error", new RelayError("token refresh failed", { code, cause: err }));
      return this._fail(code, reason);
    }
    if (typeof this._token !== "string" || !this._token) return this._fail(code, "refresh returned no token");
    return this._retry({ code, reason, rotate: false, immediate: true });
  }

  _retry({ code, reason, error, rotate, immediate = false, crowded = false }) {
    if (this._isFinished()) return;
    if (error) this._emit("error", error);
    this._failures += 1;
    if (this._maxAttempts && this._failures > this._maxAttempts) {
      return this._fail(code, `gave up after ${this._maxAttempts} attempts (${reason})`);
    }
    if (rotate) this._edgeIndex = (this._edgeIndex + 1) % this.edges.length;
    const { initialMs, maxMs, factor, jitter } = this._backoff;
    let base = Math.min(maxMs, initialMs * factor ** Math.min(this._failures - 1, 30));
    if (crowded) base = Math.min(CROWDED_MAX_MS, CROWDED_FIRST_MS * 2 ** Math.min(this._failures - 1, 8));
    const delay = immediate ? 0 : base * (1 - jitter + 2 * jitter * Math.random());
    this._setState("waiting");
    this._timer(() => this._connect(), delay);
  }

  _fail(code, reason) {
    const error = new RelayError(`edge closed the connection with ${code} (${reason})`, { closeCode: code, reason });
    this._emit("error", error);
    this._finish("failed", { code, reason, error });
  }

  _isFinished() {
    return this.state === "stopped" || this.state === "failed";
  }

  _finish(state, result) {
    if (this._isFinished()) return;
    this._clearTimers();
    this._stopLiveness();
    const ws = this._ws;
    this._ws = null;
    if (ws && ws.readyState <= 1) ws.close(1000, "client stop");
    this._setState(state);
    this._finished({ state, ...result });
  }
}
