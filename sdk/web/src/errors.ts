// Every error the SDK raises or reports is a PushgridError with a `code`.

import { ErrorCode, KickCode } from "./gen/client_pb.js";

/** What went wrong, as a stable string (switch on it, never on messages). */
export type PushgridErrorCode =
  | "protocol"
  | "auth_failed"
  | "connect_failed"
  | "disconnected"
  | "kicked"
  | "upstream_refused"
  | "timeout"
  | "closed"
  | "invalid_argument"
  | "token_refresh_failed";

export class PushgridError extends Error {
  constructor(
    readonly code: PushgridErrorCode,
    message: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

/** Bytes from the server that are not a valid frame, or an ERROR frame. */
export class ProtocolError extends PushgridError {
  constructor(
    readonly serverCode: ErrorCode,
    message: string,
  ) {
    super("protocol", `${ErrorCode[serverCode] ?? serverCode}: ${message}`);
  }
}

/** The room refused AUTH (bad or expired token, forbidden address...). */
export class AuthError extends PushgridError {
  constructor(
    readonly serverCode: ErrorCode,
    readonly serverMessage: string,
  ) {
    super("auth_failed", `authentication refused (${ErrorCode[serverCode] ?? serverCode}): ${serverMessage}`);
  }

  /** True when trying again later (not with a new token) may work. */
  get retryable(): boolean {
    return [ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL, ErrorCode.AUTH_TIMEOUT, ErrorCode.RATE_LIMITED, ErrorCode.TOO_MANY_CONNECTIONS].includes(
      this.serverCode,
    );
  }
}

/** No room could be reached this round; the client retries after `retryInMs`. */
export class ConnectError extends PushgridError {
  constructor(
    message: string,
    readonly retryInMs: number,
  ) {
    super("connect_failed", message);
  }
}

/** The server sent KICK; the client reconnects unless told to stop. */
export class KickedError extends PushgridError {
  constructor(
    readonly kickCode: KickCode,
    readonly reason: string,
    readonly reconnectAfterMs: number,
    readonly reconnectTo: string,
  ) {
    super("kicked", `kicked (${KickCode[kickCode] ?? kickCode}): ${reason}`);
  }
}

/** The server answered an UPSTREAM with ERROR. */
export class UpstreamError extends PushgridError {
  constructor(
    readonly serverCode: ErrorCode,
    message: string,
  ) {
    super("upstream_refused", `upstream refused (${ErrorCode[serverCode] ?? serverCode}): ${message}`);
  }
}

export class TimeoutError extends PushgridError {
  constructor(message: string) {
    super("timeout", message);
  }
}

/** The connection dropped before an answer came. */
export class DisconnectedError extends PushgridError {
  constructor(message: string) {
    super("disconnected", message);
  }
}

/** The client was closed (or stopped for good). */
export class ClosedError extends PushgridError {
  constructor(message = "the client is closed") {
    super("closed", message);
  }
}

export class InvalidArgumentError extends PushgridError {
  constructor(message: string) {
    super("invalid_argument", message);
  }
}

/** The token refresh callback threw or returned no token. */
export class TokenRefreshError extends PushgridError {
  constructor(
    message: string,
    readonly cause?: unknown,
  ) {
    super("token_refresh_failed", message);
  }
}
