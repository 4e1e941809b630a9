import { FerryError, type FerryErrorOptions } from '../errors.js';

/** A peer sent something that breaks the protocol; the connection is closed and not trusted further. */
export class WireProtocolError extends FerryError {
  readonly code = 'WIRE_PROTOCOL';
}

/** The peer went away (closed, or stopped answering heartbeats) before answering. */
export class PeerGoneError extends FerryError {
  readonly code = 'PEER_GONE';
  override readonly retryable = true;
  constructor(
    readonly peer: string,
    readonly reason: string,
    options: FerryErrorOptions = {},
  ) {
    super(`${peer}: ${reason}`, options);
  }
}

/** The peer answered a request with a failure; its code, message and hint are kept. */
export class RemoteError extends FerryError {
  readonly code: string;
  constructor(
    readonly peer: string,
    code: string,
    message: string,
    hint: string | undefined,
    /** The peer says the failed request changed nothing. */
    readonly unchanged: boolean,
  ) {
    super(`${peer}: ${message}`, { hint });
    this.code = code;
  }
}
