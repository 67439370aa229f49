// @pushgrid/web: the pushgrid device SDK for browsers and Node.
export {
  PushgridClient,
  normalizeTopic,
  redirectUrl,
  userFromToken,
  type ClientEvents,
  type ClientOptions,
  type ClientStats,
  type ConnectedEvent,
  type DisconnectedEvent,
  type MessageKind,
  type PushMessage,
  type SubscribedEvent,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./client.js";
export {
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
  type PushgridErrorCode,
} from "./errors.js";
export { Backoff } from "./backoff.js";
export { DedupFilter } from "./dedup.js";
export { DEFAULT_MAX_BODY, FrameDecoder, HEADER_LEN, Op, VERSION, decodeBody, encodeEmpty, encodeFrame, encodeRaw, parseHeader, type Frame } from "./frame.js";
export * as proto from "./gen/client_pb.js";
export { ErrorCode, KickCode, PushKind } from "./gen/client_pb.js";
