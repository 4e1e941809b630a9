/**
 * The one error base of the project. Every failure a user can meet is a
 * FerryError subclass: `code` is stable and machine-readable (the CLI's
 * --json prints it), `hint` says what the user can do about it, and
 * `retryable` says whether repeating the same operation may succeed, so
 * that callers never have to guess from a message.
 */
export interface FerryErrorOptions {
  hint?: string | undefined;
  cause?: unknown;
}

export abstract class FerryError extends Error {
  abstract readonly code: string;
  readonly hint: string | undefined;
  /** True when the same operation may succeed if simply tried again. */
  readonly retryable: boolean = false;

  constructor(message: string, options: FerryErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.hint = options.hint;
  }
}

/** Input that can never work as given: the CLI exits 2 and changes nothing. */
export class InvalidInputError extends FerryError {
  readonly code: string = 'INVALID_INPUT';
}

/** An operation gave up waiting; `waitingFor` says on what. */
export class TimeoutError extends FerryError {
  readonly code = 'TIMEOUT';
  constructor(
    readonly waitingFor: string,
    readonly timeoutMs: number,
    options: FerryErrorOptions = {},
  ) {
    super(`timed out after ${timeoutMs} ms waiting for ${waitingFor}`, options);
  }
}

/** The caller cancelled the operation through its AbortSignal. */
export class AbortedError extends FerryError {
  readonly code = 'ABORTED';
  constructor(
    readonly operation: string,
    options: FerryErrorOptions = {},
  ) {
    super(`${operation} was cancelled`, options);
  }
}

/** The AbortSignal's reason as a FerryError, whatever the aborter passed. */
export function abortReason(signal: AbortSignal, operation: string): FerryError {
  const reason: unknown = signal.reason;
  if (reason instanceof FerryError) return reason;
  return new AbortedError(operation, { cause: reason });
}
