// The long-lived, reconnecting device client: finds a room (dispatcher or
// configured WebSocket addresses), authenticates, pings, delivers pushes to the
// app and acknowledges each one after the app's handler returned, drops
// duplicates by id, keeps each topic's position and resubscribes from it
// after every reconnect, obeys KICK (reconnect_after_ms, reconnect_to) and
// reconnects with jittered backoff. The same code runs in browsers and in
// Node (pass `WebSocket` from the `ws` package there).

import { create } from "@bufbuild/protobuf";
import {
  AckSchema,
  AuthOkSchema,
  AuthSchema,
  ErrorCode,
  ErrorSchema,
  KickCode,
  KickSchema,
  PushKind,
  PushSchema,
  SubOkSchema,
  SubSchema,
  UnsubSchema,
  UpstreamSchema,
  type AuthOk,
  type Push,
} from "./gen/client_pb.js";
import { Backoff } from "./backoff.js";
import { DedupFilter } from "./dedup.js";
import {
  AuthError,
  ClosedError,
  ConnectError,
  DisconnectedError,
  InvalidArgumentError,
  KickedError,
  ProtocolError,
  PushgridError,
  TimeoutError,
  TokenRefreshError,
  UpstreamError,
} from "./errors.js";
import { DEFAULT_MAX_BODY, FrameDecoder, Op, decodeBody, encodeEmpty, encodeFrame, type Frame } from "./frame.js";

/** The part of the WebSocket API the client uses (browsers' and `ws`'s). */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code?: number; reason?: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ClientOptions {
  /** The JWT sent in AUTH (HS256, signed by the app's backend). */
  token: string;
  /**
   * Called when the room refuses the token (expired, rotated secret): return
   * a fresh one and the client tries again with it at once. Without it, or
   * when the fresh token is refused too, the client stops with an AuthError.
   */
  refreshToken?: (refused: AuthError) => string | Promise<string>;
  /** Stable id of this device (one per browser profile, for example). */
  deviceId: string;
  /** Sent in AUTH; default "web". */
  platform?: string;
  /** Room addresses, tried in order: `ws://host:port/` or `wss://host/path`. */
  urls?: string[];
  /**
   * Dispatcher base URL (`http://127.0.0.1:8070`): rooms come from
   * `GET {dispatcher}/v1/dispatch?user=..`, before `urls`.
   */
  dispatcher?: string;
  /** User id for the dispatcher; default the token's `sub` claim. */
  user?: string;
  /** Prefer wss addresses from the dispatcher (default: when the page is https). */
  secure?: boolean;
  /** Acknowledge each unicast/multicast push after the handlers returned (default true). */
  autoAck?: boolean;
  /** Ping interval; default the `heartbeat_secs` of AUTH_OK. */
  heartbeatMs?: number;
  reconnectBackoffMinMs?: number;
  reconnectBackoffMaxMs?: number;
  connectTimeoutMs?: number;
  authTimeoutMs?: number;
  upstreamTimeoutMs?: number;
  /** How many recent message ids the duplicate filter remembers (default 10,000). */
  dedupCapacity?: number;
  maxBody?: number;
  /** Stop after a SINGLE_LOGIN kick (a newer login of this device took over). Default true. */
  stopOnSingleLogin?: boolean;
  /** The WebSocket class; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
}

export type MessageKind = "unicast" | "multicast" | "broadcast";

/** A push as the app sees it. */
export interface PushMessage {
  /** The message id (64 bits). */
  id: bigint;
  kind: MessageKind;
  /** Broadcasts only: the topic, its offset and epoch. */
  topic: string;
  offset: bigint;
  epoch: bigint;
  payload: Uint8Array;
  /** The payload as UTF-8 text. */
  text: string;
  createdMs: number;
}

export interface ConnectedEvent {
  connId: bigint;
  url: string;
  heartbeatMs: number;
  /** 1 for the first connection, then 2, 3... */
  connects: number;
}

export interface DisconnectedEvent {
  reason: string;
  /** False once the client stopped for good (closed, auth refused, single login). */
  willReconnect: boolean;
  /** Milliseconds until the next attempt, when it reconnects. */
  retryInMs: number;
}

export interface SubscribedEvent {
  topic: string;
  /** The messages since the last known offset were replayed (they came as `message` events first). */
  recovered: boolean;
  /** A resubscription whose gap the topic's history no longer covers: refetch state. */
  missed: boolean;
  offset: bigint;
  epoch: bigint;
}

export interface ClientEvents {
  message: (message: PushMessage) => void | Promise<void>;
  connected: (event: ConnectedEvent) => void;
  disconnected: (event: DisconnectedEvent) => void;
  error: (error: PushgridError) => void;
  subscribed: (event: SubscribedEvent) => void;
  kicked: (kick: KickedError) => void;
}

export interface ClientStats {
  pushesReceived: number;
  duplicatesDropped: number;
  acksSent: number;
  connects: number;
  reconnects: number;
}

interface TopicPosition {
  offset: bigint;
  epoch: bigint;
  /** A SUB_OK arrived: later SUBs resume from here. */
  subscribed: boolean;
}

interface PendingUpstream {
  clientMsgId: string;
  body: Uint8Array;
  resolve: () => void;
  reject: (error: PushgridError) => void;
  timer: ReturnType<typeof setTimeout>;
}

interface Session {
  ws: WebSocketLike;
  url: string;
  /** Resolves with why the session ended. */
  ended: Promise<SessionEnd>;
  end: (end: SessionEnd) => void;
  inFlight: Map<number, PendingUpstream>;
  lastHeard: number;
  timer?: ReturnType<typeof setInterval>;
}

type SessionEnd =
  | { kind: "lost"; reason: string }
  | { kind: "kicked"; kick: KickedError }
  | { kind: "closed" }
  | { kind: "reconnect" };

type Attempt =
  | { kind: "connected"; ws: WebSocketLike; url: string; decoder: FrameDecoder; authOk: AuthOk; rest: Frame[] }
  | { kind: "auth_failed"; error: AuthError | TokenRefreshError }
  | { kind: "failed"; reason: string };

const MAX_PENDING_ACKS = 10_000;
const MAX_QUEUED_UPSTREAMS = 256;
const ACK_CHUNK = 4096;
const STABLE_SESSION_MS = 10_000;
const textDecoder = new TextDecoder();

function kindOf(kind: PushKind): MessageKind {
  switch (kind) {
    case PushKind.MULTICAST:
      return "multicast";
    case PushKind.BROADCAST:
      return "broadcast";
    default:
      return "unicast";
  }
}

/** The server's topic rule, checked before sending (a refused SUB ends the connection). */
export function normalizeTopic(topic: string): string {
  if (topic === "") return "all";
  const bytes = new TextEncoder().encode(topic).length;
  if (bytes > 128) throw new InvalidArgumentError(`a topic must be 1 to 128 bytes, not ${bytes}`);
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/u.test(topic)) {
    throw new InvalidArgumentError("a topic must be printable text (no control characters)");
  }
  return topic;
}

/** The `sub` claim of a JWT, read without verifying it (the room verifies). */
export function userFromToken(token: string): string | undefined {
  const payload = token.split(".")[1];
  if (!payload) return undefined;
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
    const json = textDecoder.decode(Uint8Array.from(atob(padded), (c) => c.charCodeAt(0)));
    const sub = (JSON.parse(json) as { sub?: unknown }).sub;
    return typeof sub === "string" || typeof sub === "number" ? String(sub) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Where a KICK's `reconnect_to` sends a browser: an address with a scheme is
 * used as it is (ws or wss only); a bare `host:port` names the target room's
 * listener for the device's own transport, so it takes the current scheme.
 */
export function redirectUrl(reconnectTo: string, currentUrl: string): string | undefined {
  const target = reconnectTo.trim();
  if (target === "") return undefined;
  if (target.includes("://")) {
    return /^wss?:\/\//i.test(target) ? target : undefined;
  }
  const scheme = currentUrl.toLowerCase().startsWith("wss:") ? "wss" : "ws";
  return `${scheme}://${target}/`;
}

/** A dispatcher address as a WebSocket URL (bare `host:port` gets `scheme`). */
function asUrl(address: string, scheme: "ws" | "wss"): string {
  return address.includes("://") ? address : `${scheme}://${address}/`;
}

export class PushgridClient {
  private readonly options: Required<
    Omit<ClientOptions, "refreshToken" | "urls" | "dispatcher" | "user" | "heartbeatMs" | "WebSocket" | "secure">
  > &
    ClientOptions;
  private readonly WS: WebSocketConstructor;
  private readonly listeners: { [K in keyof ClientEvents]: Set<ClientEvents[K]> } = {
    message: new Set(),
    connected: new Set(),
    disconnected: new Set(),
    error: new Set(),
    subscribed: new Set(),
    kicked: new Set(),
  };
  private readonly dedup: DedupFilter;
  private readonly backoff: Backoff;
  private readonly topics = new Map<string, TopicPosition>();
  private readonly subWaiters = new Map<string, Array<(event: SubscribedEvent) => void>>();
  private pendingAcks: bigint[] = [];
  private queuedUpstreams: PendingUpstream[] = [];
  private session: Session | undefined;
  private redirect: string[] = [];
  private dispatched: { urls: string[]; expires: number } | undefined;
  private seq = 0;
  private started = false;
  private stopped = false;
  private wake: (() => void) | undefined;
  private deliveries: Promise<void> = Promise.resolve();
  private connectedWaiters: Array<{ resolve: () => void; reject: (error: PushgridError) => void }> = [];
  private readonly counters: ClientStats = { pushesReceived: 0, duplicatesDropped: 0, acksSent: 0, connects: 0, reconnects: 0 };

  constructor(options: ClientOptions) {
    if (!options.token) throw new InvalidArgumentError("token is required");
    if (!options.deviceId) throw new InvalidArgumentError("deviceId is required");
    if (!options.dispatcher && !(options.urls && options.urls.length > 0)) {
      throw new InvalidArgumentError("give a dispatcher or at least one room url");
    }
    for (const url of options.urls ?? []) {
      if (!/^wss?:\/\//i.test(url)) throw new InvalidArgumentError(`not a ws:// or wss:// url: ${url}`);
    }
    this.options = {
      platform: "web",
      autoAck: true,
      reconnectBackoffMinMs: 500,
      reconnectBackoffMaxMs: 30_000,
      connectTimeoutMs: 5_000,
      authTimeoutMs: 10_000,
      upstreamTimeoutMs: 10_000,
      dedupCapacity: 10_000,
      maxBody: DEFAULT_MAX_BODY,
      stopOnSingleLogin: true,
      ...options,
    };
    const ws = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!ws) {
      throw new InvalidArgumentError("no WebSocket here: pass options.WebSocket (in Node: the `ws` package)");
    }
    this.WS = ws;
    this.dedup = new DedupFilter(this.options.dedupCapacity);
    this.backoff = new Backoff(this.options.reconnectBackoffMinMs, this.options.reconnectBackoffMaxMs);
  }

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof ClientEvents>(event: K, listener: ClientEvents[K]): () => void {
    this.listeners[event].add(listener);
    return () => this.off(event, listener);
  }

  off<K extends keyof ClientEvents>(event: K, listener: ClientEvents[K]): void {
    this.listeners[event].delete(listener);
  }

  /**
   * Starts the connection loop; resolves at the first AUTH_OK, rejects when
   * the client stops before one (auth refused, closed). Reconnects go on in
   * the background after that, reported as events.
   */
  connect(): Promise<void> {
    const first = new Promise<void>((resolve, reject) => {
      if (this.session) return resolve();
      if (this.stopped) return reject(new ClosedError());
      this.connectedWaiters.push({ resolve, reject });
    });
    if (!this.started) {
      this.started = true;
      void this.run();
    }
    return first;
  }

  get connected(): boolean {
    return this.session !== undefined;
  }

  get closed(): boolean {
    return this.stopped;
  }

  stats(): ClientStats {
    return { ...this.counters };
  }

  /** The position kept for a topic (what the next SUB resumes from). */
  topicPosition(topic: string): { offset: bigint; epoch: bigint } | undefined {
    const position = this.topics.get(normalizeTopic(topic));
    return position ? { offset: position.offset, epoch: position.epoch } : undefined;
  }

  /**
   * Subscribes to a topic (`"all"` or `""`: every device of the app gets it
   * without SUB). Resolves with the server's SUB_OK. After every reconnect the
   * client subscribes again from the last offset it received, so the room
   * replays what was missed (or says it cannot: `missed`).
   */
  subscribe(topic: string): Promise<SubscribedEvent> {
    const name = normalizeTopic(topic);
    if (this.stopped) return Promise.reject(new ClosedError());
    const answered = new Promise<SubscribedEvent>((resolve) => {
      const waiters = this.subWaiters.get(name) ?? [];
      waiters.push(resolve);
      this.subWaiters.set(name, waiters);
    });
    if (!this.topics.has(name)) {
      const position: TopicPosition = { offset: 0n, epoch: 0n, subscribed: false };
      this.topics.set(name, position);
      this.sendSub(name, position);
    }
    return answered;
  }

  unsubscribe(topic: string): void {
    const name = normalizeTopic(topic);
    if (this.topics.delete(name)) {
      this.send(encodeFrame(Op.Unsub, 0, UnsubSchema, create(UnsubSchema, { topic: name })));
    }
  }

  /**
   * Sends an UPSTREAM message (waiting for a connection if there is none) and
   * resolves at UPSTREAM_OK; rejects with UpstreamError (the server's ERROR),
   * TimeoutError or ClosedError.
   */
  upstream(product: string, type: string, payload: Uint8Array | string, clientMsgId?: string): Promise<void> {
    if (this.stopped) return Promise.reject(new ClosedError());
    const id = clientMsgId ?? `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
    const bytes = typeof payload === "string" ? new TextEncoder().encode(payload) : payload;
    const message = create(UpstreamSchema, { product, type, clientMsgId: id, payload: bytes });
    return new Promise<void>((resolve, reject) => {
      const pending: PendingUpstream = {
        clientMsgId: id,
        body: new Uint8Array(0),
        resolve,
        reject,
        timer: setTimeout(() => {
          this.dropUpstream(pending);
          reject(new TimeoutError(`no answer to upstream ${id} within ${this.options.upstreamTimeoutMs} ms`));
        }, this.options.upstreamTimeoutMs),
      };
      pending.body = encodeFrame(Op.Upstream, 0, UpstreamSchema, message).subarray(12);
      if (pending.body.length > this.options.maxBody) {
        clearTimeout(pending.timer);
        reject(new InvalidArgumentError(`upstream body of ${pending.body.length} bytes exceeds ${this.options.maxBody}`));
        return;
      }
      if (this.session) {
        this.sendUpstream(this.session, pending);
      } else if (this.queuedUpstreams.length >= MAX_QUEUED_UPSTREAMS) {
        clearTimeout(pending.timer);
        reject(new InvalidArgumentError(`${MAX_QUEUED_UPSTREAMS} upstream messages already wait for a connection`));
      } else {
        this.queuedUpstreams.push(pending);
      }
    });
  }

  /**
   * Acknowledges messages by hand (with `autoAck: false`): sent now, or after
   * the next AUTH_OK when disconnected.
   */
  ack(ids: bigint[]): void {
    for (const id of ids) this.dedup.markAcked(id);
    this.sendAcks(ids);
  }

  /** Drops the connection and reconnects at once, as after a network change. */
  reconnect(): void {
    this.session?.end({ kind: "reconnect" });
  }

  /** Stops for good: closes the connection, rejects what waits. Idempotent. */
  close(): void {
    if (this.stopped) return;
    this.stop(new ClosedError());
    this.session?.end({ kind: "closed" });
    this.wake?.();
  }

  // ---- the connection loop ----

  private async run(): Promise<void> {
    let waitMs = 0;
    while (!this.stopped) {
      if (waitMs > 0) await this.sleep(waitMs);
      if (this.stopped) break;
      const attempt = await this.connectAny();
      if (this.stopped) {
        if (attempt.kind === "connected") attempt.ws.close(1000, "closed");
        break;
      }
      if (attempt.kind === "auth_failed") {
        this.emit("error", attempt.error);
        this.stop(attempt.error);
        this.emit("disconnected", { reason: attempt.error.message, willReconnect: false, retryInMs: 0 });
        break;
      }
      if (attempt.kind === "failed") {
        this.dispatched = undefined;
        waitMs = this.backoff.nextDelayMs();
        this.emit("error", new ConnectError(attempt.reason, waitMs));
        continue;
      }
      const startedAt = Date.now();
      const end = await this.runSession(attempt);
      if (Date.now() - startedAt >= STABLE_SESSION_MS) this.backoff.reset();
      if (end.kind === "closed" || this.stopped) {
        this.emit("disconnected", { reason: "closed", willReconnect: false, retryInMs: 0 });
        break;
      }
      if (end.kind === "reconnect") {
        waitMs = 0;
        this.emit("disconnected", { reason: "reconnect requested", willReconnect: true, retryInMs: 0 });
        continue;
      }
      if (end.kind === "lost") {
        waitMs = this.backoff.nextDelayMs();
        this.emit("disconnected", { reason: end.reason, willReconnect: true, retryInMs: waitMs });
        continue;
      }
      const kick = end.kick;
      const target = redirectUrl(kick.reconnectTo, attempt.url);
      if (target) this.redirect = [target];
      waitMs = kick.reconnectAfterMs > 0 ? kick.reconnectAfterMs : this.backoff.nextDelayMs();
      this.emit("kicked", kick);
      const stop = kick.kickCode === KickCode.SINGLE_LOGIN && this.options.stopOnSingleLogin;
      if (stop) this.stop(kick);
      this.emit("disconnected", { reason: kick.message, willReconnect: !stop, retryInMs: stop ? 0 : waitMs });
    }
  }

  /** Ends the client: rejects everything that waits with `error`. */
  private stop(error: PushgridError): void {
    this.stopped = true;
    for (const waiter of this.connectedWaiters.splice(0)) waiter.reject(error);
    for (const pending of this.queuedUpstreams.splice(0)) {
      clearTimeout(pending.timer);
      pending.reject(error instanceof ClosedError ? error : new ClosedError(error.message));
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.wake = undefined;
        resolve();
      }, ms);
      this.wake = () => {
        clearTimeout(timer);
        this.wake = undefined;
        resolve();
      };
    });
  }

  /** Room URLs to try, in order: a KICK's redirect, the dispatcher's rooms, the configured urls. */
  private async targets(): Promise<{ urls: string[]; failure?: string }> {
    const urls = this.redirect.splice(0);
    let failure: string | undefined;
    if (this.options.dispatcher) {
      try {
        urls.push(...(await this.dispatch(this.options.dispatcher)));
      } catch (error) {
        failure = error instanceof Error ? error.message : String(error);
      }
    }
    urls.push(...(this.options.urls ?? []));
    return { urls: [...new Set(urls)], failure };
  }

  private async dispatch(base: string): Promise<string[]> {
    if (this.dispatched && Date.now() < this.dispatched.expires) return this.dispatched.urls;
    const user = this.options.user ?? userFromToken(this.options.token);
    if (!user) throw new InvalidArgumentError("cannot tell the user id for the dispatcher: set `user` or use a JWT with a sub claim");
    const url = `${base.replace(/\/+$/, "")}/v1/dispatch?user=${encodeURIComponent(user)}`;
    const response = await fetch(url);
    const body = (await response.json()) as {
      result?: { rooms?: Array<{ ws?: string; wss?: string }>; ttl_secs?: number };
      error?: { code?: string; message?: string };
    };
    if (body.error || !body.result) {
      throw new ConnectError(`dispatcher: HTTP ${response.status}, ${body.error?.code}: ${body.error?.message}`, 0);
    }
    const secure = this.options.secure ?? (globalThis as { location?: { protocol?: string } }).location?.protocol === "https:";
    const urls: string[] = [];
    for (const room of body.result.rooms ?? []) {
      const wss = room.wss?.trim();
      const ws = room.ws?.trim();
      if (wss) urls.push(asUrl(wss, "wss"));
      else if (ws && !secure) urls.push(asUrl(ws, "ws"));
    }
    if (urls.length === 0) throw new ConnectError("the dispatcher offered no room with a WebSocket listener", 0);
    const ttl = body.result.ttl_secs ?? 0;
    if (ttl > 0) this.dispatched = { urls, expires: Date.now() + ttl * 1000 };
    return urls;
  }

  private async connectAny(): Promise<Attempt> {
    const { urls, failure } = await this.targets();
    if (urls.length === 0) return { kind: "failed", reason: failure ?? "no room address" };
    const failures: string[] = failure ? [`dispatcher: ${failure}`] : [];
    for (const url of urls) {
      if (this.stopped) break;
      let attempt = await this.attempt(url, this.options.token);
      if (attempt.kind === "auth_failed" && attempt.error instanceof AuthError && !attempt.error.retryable && this.options.refreshToken) {
        let fresh: string;
        try {
          fresh = await this.options.refreshToken(attempt.error);
        } catch (cause) {
          const error = new TokenRefreshError(
            `the token was refused (${attempt.error.serverMessage}) and refreshing it failed: ${cause instanceof Error ? cause.message : String(cause)}`,
            cause,
          );
          return { kind: "auth_failed", error };
        }
        if (!fresh) return attempt;
        this.options.token = fresh;
        attempt = await this.attempt(url, fresh);
      }
      if (attempt.kind === "connected") return attempt;
      if (attempt.kind === "auth_failed") {
        if (!(attempt.error instanceof AuthError) || !attempt.error.retryable) return attempt;
        failures.push(`${url}: ${attempt.error.message}`);
        continue;
      }
      failures.push(`${url}: ${attempt.reason}`);
    }
    return { kind: "failed", reason: failures.join("; ") };
  }

  /** Opens one WebSocket, sends AUTH and waits for AUTH_OK or ERROR. */
  private attempt(url: string, token: string): Promise<Attempt> {
    return new Promise<Attempt>((resolve) => {
      let ws: WebSocketLike;
      try {
        ws = new this.WS(url);
      } catch (error) {
        resolve({ kind: "failed", reason: error instanceof Error ? error.message : String(error) });
        return;
      }
      ws.binaryType = "arraybuffer";
      const decoder = new FrameDecoder(this.options.maxBody);
      let settled = false;
      const finish = (attempt: Attempt) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        if (attempt.kind !== "connected") {
          try {
            ws.close();
          } catch {
            // already closed
          }
        }
        resolve(attempt);
      };
      let timer = setTimeout(
        () => finish({ kind: "failed", reason: `not open within ${this.options.connectTimeoutMs} ms` }),
        this.options.connectTimeoutMs,
      );
      ws.onopen = () => {
        clearTimeout(timer);
        timer = setTimeout(
          () => finish({ kind: "failed", reason: `no AUTH_OK within ${this.options.authTimeoutMs} ms` }),
          this.options.authTimeoutMs,
        );
        const auth = create(AuthSchema, { token, deviceId: this.options.deviceId, platform: this.options.platform });
        ws.send(encodeFrame(Op.Auth, this.nextSeq(), AuthSchema, auth));
      };
      ws.onmessage = (event) => {
        let frames: Frame[];
        try {
          frames = decoder.push(toBytes(event.data));
        } catch (error) {
          finish({ kind: "failed", reason: error instanceof Error ? error.message : String(error) });
          return;
        }
        const [first, ...rest] = frames;
        if (!first) return;
        try {
          if (first.op === Op.AuthOk) {
            finish({ kind: "connected", ws, url, decoder, authOk: decodeBody(AuthOkSchema, first), rest });
          } else if (first.op === Op.Error) {
            const refusal = decodeBody(ErrorSchema, first);
            finish({ kind: "auth_failed", error: new AuthError(refusal.code, refusal.message) });
          } else {
            finish({ kind: "failed", reason: `expected AUTH_OK, got ${Op[first.op]}` });
          }
        } catch (error) {
          finish({ kind: "failed", reason: error instanceof Error ? error.message : String(error) });
        }
      };
      ws.onerror = () => finish({ kind: "failed", reason: "WebSocket error (refused or unreachable)" });
      ws.onclose = (event) =>
        finish({ kind: "failed", reason: `closed before AUTH_OK (code ${event.code ?? "?"}${event.reason ? `: ${event.reason}` : ""})` });
    });
  }

  private nextSeq(): number {
    this.seq = (this.seq + 1) >>> 0;
    if (this.seq === 0) this.seq = 1;
    return this.seq;
  }

  private runSession(attempt: Extract<Attempt, { kind: "connected" }>): Promise<SessionEnd> {
    const { ws, decoder, authOk } = attempt;
    let end!: (end: SessionEnd) => void;
    const ended = new Promise<SessionEnd>((resolve) => (end = resolve));
    const session: Session = {
      ws,
      url: attempt.url,
      ended,
      end: () => undefined,
      inFlight: new Map(),
      lastHeard: Date.now(),
    };
    let finished = false;
    session.end = (why) => {
      if (finished) return;
      finished = true;
      if (session.timer) clearInterval(session.timer);
      ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(1000);
      } catch {
        // already closed
      }
      if (this.session === session) this.session = undefined;
      for (const [, pending] of session.inFlight) {
        clearTimeout(pending.timer);
        pending.reject(new DisconnectedError(`the connection ended before upstream ${pending.clientMsgId} was answered`));
      }
      session.inFlight.clear();
      end(why);
    };
    this.session = session;
    this.counters.connects += 1;
    if (this.counters.connects > 1) this.counters.reconnects += 1;

    const heartbeatMs = this.options.heartbeatMs ?? Math.max(1, authOk.heartbeatSecs) * 1000;
    const silenceLimit = heartbeatMs * 3;
    session.timer = setInterval(() => {
      if (Date.now() - session.lastHeard > silenceLimit) {
        session.end({ kind: "lost", reason: `no frame from the server for ${silenceLimit} ms` });
        return;
      }
      this.send(encodeEmpty(Op.Ping, 0));
    }, heartbeatMs);
    ws.onmessage = (event) => {
      session.lastHeard = Date.now();
      let frames: Frame[];
      try {
        frames = decoder.push(toBytes(event.data));
      } catch (error) {
        this.emit("error", error as PushgridError);
        session.end({ kind: "lost", reason: (error as Error).message });
        return;
      }
      for (const frame of frames) {
        if (finished) return;
        this.handleFrame(session, frame);
      }
    };
    ws.onclose = (event) =>
      session.end({ kind: "lost", reason: `connection closed (code ${event.code ?? "?"}${event.reason ? `: ${event.reason}` : ""})` });
    ws.onerror = () => session.end({ kind: "lost", reason: "WebSocket error" });

    // What waited for a connection goes first, then the subscriptions from their positions.
    const acks = this.pendingAcks.splice(0);
    this.sendAcks(acks);
    for (const pending of this.queuedUpstreams.splice(0)) this.sendUpstream(session, pending);
    for (const [topic, position] of this.topics) this.sendSub(topic, position);

    const connected: ConnectedEvent = {
      connId: authOk.connId,
      url: session.url,
      heartbeatMs,
      connects: this.counters.connects,
    };
    for (const waiter of this.connectedWaiters.splice(0)) waiter.resolve();
    this.emit("connected", connected);
    for (const frame of attempt.rest) this.handleFrame(session, frame);
    return ended;
  }

  private handleFrame(session: Session, frame: Frame): void {
    try {
      switch (frame.op) {
        case Op.Pong:
          return;
        case Op.Ping:
          this.send(encodeEmpty(Op.Pong, frame.seq));
          return;
        case Op.Push:
          this.handlePush(decodeBody(PushSchema, frame));
          return;
        case Op.SubOk:
          this.handleSubOk(decodeBody(SubOkSchema, frame));
          return;
        case Op.UpstreamOk: {
          const pending = session.inFlight.get(frame.seq);
          if (!pending) return;
          session.inFlight.delete(frame.seq);
          clearTimeout(pending.timer);
          pending.resolve();
          return;
        }
        case Op.Kick: {
          const kick = decodeBody(KickSchema, frame);
          session.end({
            kind: "kicked",
            kick: new KickedError(kick.code, kick.reason, kick.reconnectAfterMs, kick.reconnectTo),
          });
          return;
        }
        case Op.Error: {
          const error = decodeBody(ErrorSchema, frame);
          const pending = frame.seq !== 0 ? session.inFlight.get(frame.seq) : undefined;
          if (pending) {
            session.inFlight.delete(frame.seq);
            clearTimeout(pending.timer);
            pending.reject(new UpstreamError(error.code, error.message));
            return;
          }
          const protocol = new ProtocolError(error.code, error.message);
          this.emit("error", protocol);
          session.end({ kind: "lost", reason: protocol.message });
          return;
        }
        default:
          throw new ProtocolError(ErrorCode.UNKNOWN_OP, `unexpected ${Op[frame.op]} from the server`);
      }
    } catch (error) {
      const failure = error instanceof PushgridError ? error : new ProtocolError(ErrorCode.BAD_BODY, String(error));
      this.emit("error", failure);
      session.end({ kind: "lost", reason: failure.message });
    }
  }

  private handlePush(push: Push): void {
    const ackable = push.kind !== PushKind.BROADCAST;
    if (!ackable) {
      const position = this.topics.get(push.topic);
      if (position && (push.epoch !== position.epoch || push.offset > position.offset)) {
        position.offset = push.offset;
        position.epoch = push.epoch;
      }
    }
    const id = push.msgId;
    const seen = id === 0n ? "new" : this.dedup.check(id);
    if (seen !== "new") {
      this.counters.duplicatesDropped += 1;
      if (seen === "duplicate_acked" && ackable) this.sendAcks([id]);
      return;
    }
    if (id !== 0n) this.dedup.insert(id);
    const message: PushMessage = {
      id,
      kind: kindOf(push.kind),
      topic: push.topic,
      offset: push.offset,
      epoch: push.epoch,
      payload: push.payload,
      text: textDecoder.decode(push.payload),
      createdMs: Number(push.createdMs),
    };
    this.counters.pushesReceived += 1;
    // Handlers run one message at a time, in arrival order; the ACK goes
    // after every handler returned (or its promise resolved).
    this.deliveries = this.deliveries.then(async () => {
      try {
        await Promise.all([...this.listeners.message].map((listener) => listener(message)));
      } catch (cause) {
        // Not acked: the server delivers it again on the next connection.
        if (id !== 0n) this.dedup.forget(id);
        this.emit(
          "error",
          new PushgridError("protocol", `a message handler failed for ${id}; not acknowledged: ${cause instanceof Error ? cause.message : String(cause)}`),
        );
        return;
      }
      if (this.options.autoAck && ackable && id !== 0n) this.ack([id]);
    });
  }

  private handleSubOk(ok: { topic: string; recovered: boolean; offset: bigint; epoch: bigint }): void {
    let missed = false;
    const position = this.topics.get(ok.topic);
    if (position?.subscribed && position.epoch === 0n && position.offset === 0n && ok.epoch !== 0n) {
      // The device saw the stream empty (no epoch yet) and it has begun
      // since; a SUB from (0, 0) reads as a first one, so ask again from
      // the start of its epoch: everything in it is what the device missed.
      position.epoch = ok.epoch;
      if (ok.offset > 0n) {
        this.sendSub(ok.topic, position);
        return;
      }
    }
    if (position) {
      if (!ok.recovered || position.epoch !== ok.epoch) {
        missed = position.subscribed && (position.epoch !== ok.epoch || ok.offset > position.offset);
        position.offset = ok.offset;
        position.epoch = ok.epoch;
      }
      position.subscribed = true;
    }
    const event: SubscribedEvent = { topic: ok.topic, recovered: ok.recovered, missed, offset: ok.offset, epoch: ok.epoch };
    // After the replayed messages' handlers, so `subscribed` follows them.
    this.deliveries = this.deliveries.then(() => {
      for (const waiter of this.subWaiters.get(ok.topic)?.splice(0) ?? []) waiter(event);
      this.emit("subscribed", event);
    });
  }

  // ---- sending ----

  private send(frame: Uint8Array): boolean {
    const session = this.session;
    if (!session) return false;
    try {
      session.ws.send(frame);
      return true;
    } catch (error) {
      session.end({ kind: "lost", reason: `send failed: ${error instanceof Error ? error.message : String(error)}` });
      return false;
    }
  }

  private sendAcks(ids: bigint[]): void {
    for (let at = 0; at < ids.length; at += ACK_CHUNK) {
      const chunk = ids.slice(at, at + ACK_CHUNK);
      if (this.send(encodeFrame(Op.Ack, 0, AckSchema, create(AckSchema, { msgIds: chunk })))) {
        this.counters.acksSent += chunk.length;
      } else {
        this.pendingAcks.push(...chunk);
        if (this.pendingAcks.length > MAX_PENDING_ACKS) {
          // The oldest go: the server redelivers those and they are acked again.
          this.pendingAcks.splice(0, this.pendingAcks.length - MAX_PENDING_ACKS);
        }
      }
    }
  }

  private sendSub(topic: string, position: TopicPosition): void {
    const sub = create(SubSchema, {
      topic,
      sinceOffset: position.subscribed ? position.offset : 0n,
      epoch: position.subscribed ? position.epoch : 0n,
    });
    this.send(encodeFrame(Op.Sub, 0, SubSchema, sub));
  }

  private sendUpstream(session: Session, pending: PendingUpstream): void {
    const seq = this.nextSeq();
    session.inFlight.set(seq, pending);
    const frame = new Uint8Array(12 + pending.body.length);
    frame.set(encodeEmpty(Op.Upstream, seq), 0);
    new DataView(frame.buffer).setUint32(0, pending.body.length);
    frame.set(pending.body, 12);
    if (!this.send(frame)) {
      session.inFlight.delete(seq);
      this.queuedUpstreams.push(pending);
    }
  }

  private dropUpstream(pending: PendingUpstream): void {
    this.queuedUpstreams = this.queuedUpstreams.filter((queued) => queued !== pending);
    for (const [seq, inFlight] of this.session?.inFlight ?? []) {
      if (inFlight === pending) this.session?.inFlight.delete(seq);
    }
  }

  private emit<K extends keyof ClientEvents>(event: K, ...args: Parameters<ClientEvents[K]>): void {
    for (const listener of [...this.listeners[event]]) {
      try {
        (listener as (...a: Parameters<ClientEvents[K]>) => unknown)(...args);
      } catch (error) {
        // A throwing listener must not break the client.
        if (event !== "error") this.emit("error", new PushgridError("protocol", `a ${event} listener threw: ${String(error)}`));
      }
    }
  }
}

function toBytes(data: unknown): Uint8Array {
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (Array.isArray(data)) {
    // `ws` may hand fragments as an array of Buffers.
    const parts = data as Uint8Array[];
    const joined = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
    let at = 0;
    for (const part of parts) {
      joined.set(part, at);
      at += part.length;
    }
    return joined;
  }
  throw new ProtocolError(ErrorCode.BAD_BODY, "a text WebSocket message: the frame protocol is binary");
}
