// Type declarations for relay-client.js (avatar-relay web client, protocol version 1).

export declare const PROTOCOL_VERSION: 1;

/** What a client does after a WebSocket close code (docs/protocol.md, "Close codes"). */
export declare const CloseAction: {
  readonly STOP: "stop";
  readonly FAIL: "fail";
  readonly REFRESH_TOKEN: "refresh_token";
  readonly BACK_OFF: "back_off";
  readonly RECONNECT: "reconnect";
};
export type CloseActionName = (typeof CloseAction)[keyof typeof CloseAction];

/** 1000 stop; 1002, 1009, 4400, 4403 fail; 4401, 4402 refresh the token; 4430 back off; else reconnect. */
export declare function closeAction(code: number): CloseActionName;

/** Compare stream ids as (milliseconds, sequence) integers: -1, 0 or 1. */
export declare function compareIds(a: string, b: string): -1 | 0 | 1;

/** The greatest stream id below `id`. */
export declare function idBefore(id: string): string;

export declare class RelayError extends Error {
  /** Close code, for errors that ended the client. */
  closeCode?: number;
  /** Edge error code ("bad_last_id", ...) or "queue_full". */
  code?: string | number;
  reason?: string;
}

interface StreamFields {
  v: 1;
  /** Stream position "<ms>-<seq>"; send it back as last_id. */
  id: string;
  turn: string;
  [unknown: string]: unknown;
}
export interface TurnStartMessage extends StreamFields {
  kind: "turn_start";
  sample_rate: number;
  format: "pcm_s16le";
  channels: 1;
}
export interface AudioMessage extends StreamFields {
  kind: "audio";
  seq: number;
  /** PCM16 little-endian mono; may be empty when `end` is true. */
  data: Uint8Array;
  end: boolean;
}
export interface FramesMessage extends StreamFields {
  kind: "frames";
  seq: number;
  /** One serialized Motion Server message, byte for byte. */
  data: Uint8Array;
  last: boolean;
}
export interface AudioOnlyMessage extends StreamFields {
  kind: "audio_only";
  reason: string;
}
export interface InterruptMessage extends StreamFields {
  kind: "interrupt";
  reason: string;
}
export interface TurnEndMessage extends StreamFields {
  kind: "turn_end";
  status: "complete" | "audio_only";
}
export type StreamMessage =
  | TurnStartMessage | AudioMessage | FramesMessage | AudioOnlyMessage | InterruptMessage | TurnEndMessage;

export interface WelcomeMessage {
  v: 1;
  kind: "welcome";
  conversation: string;
  edge: string;
  start: "resume" | "turn" | "live";
  /** null without last_id; false when last_id could not be honoured (reset the player). */
  recovered: boolean | null;
  position: string | null;
  [unknown: string]: unknown;
}
export interface ErrorMessage {
  v: 1;
  kind: "error";
  code: string;
  message: string;
}
export interface PongMessage {
  v: 1;
  kind: "pong";
  nonce: unknown;
}
export type ServerMessage = StreamMessage | WelcomeMessage | ErrorMessage | PongMessage;

/** Decode one binary frame; throws RelayError for anything the protocol does not allow. */
export declare function decodeMessage(bytes: ArrayBuffer | Uint8Array): ServerMessage;

/** The last stream id processed; refuses messages at or below it. */
export declare class StreamPosition {
  constructor(lastId?: string | null);
  lastId: string | null;
  accept(message: ServerMessage): boolean;
}

/**
 * The three AvatarKit controller methods Backend Mode needs: the real `AvatarController` of
 * `@spatius/avatarkit` (`avatarView.controller`) has them. Each may return a promise.
 */
export interface AvatarControllerLike {
  yieldAudioData(audio: Uint8Array, end: boolean): string | null | undefined | Promise<string | null | undefined>;
  yieldFramesData(frames: Uint8Array[], conversationId: string): unknown;
  interrupt(): unknown;
}

export interface AvatarKitAdapterOptions {
  /** Messages waiting for their SDK calls, at most (default 4096); see README "Limits". */
  maxPending?: number;
  /** A controller call threw; the adapter goes on with the next message. */
  onError?: ((error: unknown, message: ServerMessage) => void) | null;
}

/** The protocol's state machine: SDK calls one after another, in message order. */
export declare class AvatarKitAdapter {
  constructor(controller: AvatarControllerLike, options?: AvatarKitAdapterOptions);
  readonly controller: AvatarControllerLike;
  /** The latest non-null id returned by yieldAudioData in this turn, or null. */
  readonly conversationId: string | null;
  readonly pending: number;
  maxPending: number;
  /** Id of the last stream message whose calls finished. */
  readonly appliedId: string | null;
  push(message: ServerMessage): boolean;
  dropPending(): StreamMessage[];
  whenIdle(): Promise<void>;
}

export interface TokenRefreshInfo {
  /** 4401 (token refused) or 4402 (expired, at connect or mid-connection). */
  code: number;
  reason: string;
  conversationId: string;
}

export interface CloseInfo {
  code: number;
  reason: string;
  action: CloseActionName;
  edge: string | null;
  /** Whether the connection had been welcomed before it closed. */
  welcomed: boolean;
  /** The edge's `error` message sent just before this close, if any. */
  edgeError: { code: string; message: string } | null;
}

export type ClientState = "idle" | "connecting" | "open" | "refreshing" | "waiting" | "stopped" | "failed";

export interface RelayClientOptions {
  /** Edge base URLs (ws://, wss://, http:// or https://); the client moves to the next on a drop. */
  edges: string | string[];
  conversationId: string;
  /** The token, or a function returning it (called for the first connection). */
  token: string | (() => string | Promise<string>);
  /** Called on 4401/4402 for a new token (default: `token` if it is a function). */
  refreshToken?: (info: TokenRefreshInfo) => string | Promise<string>;
  /** The AvatarKit controller; wrapped in an AvatarKitAdapter. */
  controller?: AvatarControllerLike;
  /** Or an adapter of your own configuration. */
  adapter?: AvatarKitAdapter;
  /** A stored position (onPosition) to resume from, e.g. after a page reload. */
  lastId?: string | null;
  /** Reconnect delays: initialMs doubling (factor) up to maxMs, +-jitter. Default 50, 2000, 2, 0.2. */
  backoff?: { initialMs?: number; maxMs?: number; factor?: number; jitter?: number };
  /** Give up after this many failed attempts in a row (0 = never, the default). */
  maxAttempts?: number;
  /** An attempt without a welcome by then is abandoned (default 10000). */
  connectTimeoutMs?: number;
  /** Protocol ping period; two silent periods count as a dropped connection (default 15000, 0 = off). */
  pingIntervalMs?: number;
  /** WebSocket constructor (default globalThis.WebSocket). */
  WebSocket?: new (url: string) => WebSocket;
  /** Every accepted message, before its SDK calls. */
  onMessage?: (message: ServerMessage) => void;
  onWelcome?: (welcome: WelcomeMessage) => void;
  /** Position of the last message whose SDK calls finished: store it to resume after a reload. */
  onPosition?: (lastId: string) => void;
  onStateChange?: (state: ClientState) => void;
  onClose?: (info: CloseInfo) => void;
  onError?: (error: unknown, message?: ServerMessage) => void;
}

export interface ClosedResult {
  state: "stopped" | "failed";
  code: number;
  reason: string;
  error?: RelayError;
}

export declare class RelayClient {
  constructor(options: RelayClientOptions);
  readonly edges: string[];
  readonly conversationId: string;
  readonly adapter: AvatarKitAdapter | null;
  readonly state: ClientState;
  /** The edge of the current or last connection. */
  readonly edge: string | null;
  /** Tokens fetched through refreshToken so far. */
  readonly tokenRefreshes: number;
  /** Welcomed connections so far. */
  readonly connections: number;
  /** Id of the last accepted stream message (sent as last_id on reconnect). */
  readonly lastId: string | null;
  /** Resolves when the client stops for good: stop(), close code 1000, or a failure. */
  readonly closed: Promise<ClosedResult>;
  start(): this;
  stop(): void;
  /** Drop the current connection and resume at once on the next edge. */
  reconnect(): void;
  ping(nonce?: unknown): void;
}
