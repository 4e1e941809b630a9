import { FerryError, type FerryErrorOptions } from '../errors.js';
import { readLogExcerpt } from './log.js';

/** No usable CRIU binary (missing, not executable, or not answering --version). */
export class CriuNotFoundError extends FerryError {
  readonly code = 'CRIU_NOT_FOUND';
}

/**
 * The `criu service` could not be reached: not started, died, or its socket
 * is gone. Retryable: the supervisor restarts the service.
 */
export class CriuServiceUnavailableError extends FerryError {
  readonly code = 'CRIU_SERVICE_UNAVAILABLE';
  override readonly retryable = true;
}

export interface CriuFailureDetails {
  /** The request that failed, e.g. "DUMP". */
  readonly request: string;
  readonly crErrno?: number | undefined;
  readonly crErrmsg?: string | undefined;
  /** The log file CRIU wrote for this request, when it wrote one. */
  readonly logFile?: string | undefined;
  /** The last lines of that log. */
  readonly logTail?: readonly string[] | undefined;
  /** The error lines of the log that matter (known-harmless ones left out). */
  readonly logErrors?: readonly string[] | undefined;
}

/** CRIU answered the request with success=false. */
export class CriuOperationError extends FerryError implements CriuFailureDetails {
  readonly code = 'CRIU_FAILED';
  readonly request: string;
  readonly crErrno: number | undefined;
  readonly crErrmsg: string | undefined;
  readonly logFile: string | undefined;
  readonly logTail: readonly string[];
  readonly logErrors: readonly string[];

  constructor(details: CriuFailureDetails, options: FerryErrorOptions = {}) {
    super(describeFailure(details), { hint: options.hint ?? hintFor(details), cause: options.cause });
    this.request = details.request;
    this.crErrno = details.crErrno;
    this.crErrmsg = details.crErrmsg;
    this.logFile = details.logFile;
    this.logTail = details.logTail ?? [];
    this.logErrors = details.logErrors ?? [];
  }
}

/**
 * The CRIU worker broke the protocol: a response that does not decode, a
 * response of the wrong type, or a close in the middle of a call.
 */
export class CriuProtocolError extends FerryError {
  readonly code = 'CRIU_PROTOCOL';
  constructor(
    message: string,
    readonly request: string,
    options: FerryErrorOptions = {},
  ) {
    super(message, options);
  }
}

/** The CRIU worker went away before answering (crashed, killed, or closed the connection). */
export class CriuDisconnectedError extends FerryError {
  readonly code = 'CRIU_DISCONNECTED';
  constructor(
    readonly request: string,
    options: FerryErrorOptions & { logFile?: string | undefined; logTail?: readonly string[] } = {},
  ) {
    super(
      `the CRIU worker closed the connection before answering ${request}` +
        (options.logTail !== undefined && options.logTail.length > 0
          ? `; its log ends: ${options.logTail.at(-1)}`
          : ''),
      {
        hint: options.hint ?? 'CRIU may have crashed; its log in the images directory says more',
        cause: options.cause,
      },
    );
    this.logFile = options.logFile;
    this.logTail = options.logTail ?? [];
  }
  readonly logFile: string | undefined;
  readonly logTail: readonly string[];
}

/** This kernel (or this CRIU) lacks what the request needs. */
export class CriuUnsupportedError extends FerryError {
  readonly code = 'CRIU_UNSUPPORTED';
  constructor(
    readonly feature: string,
    message: string,
    options: FerryErrorOptions = {},
  ) {
    super(message, options);
  }
}

/** A process named by PID does not exist. */
export class ProcessNotFoundError extends FerryError {
  readonly code = 'PROCESS_NOT_FOUND';
  constructor(readonly pid: number) {
    super(`no process with PID ${pid}`, { hint: 'check the PID with `ps`; it may have exited' });
  }
}

/** An images directory that does not exist or cannot be opened. */
export class ImagesDirError extends FerryError {
  readonly code = 'IMAGES_DIR';
  constructor(
    readonly dir: string,
    options: FerryErrorOptions = {},
  ) {
    super(`cannot open the images directory ${dir}`, {
      hint: options.hint ?? 'create the directory first (it must be a directory the agent can write)',
      cause: options.cause,
    });
  }
}

/** Summary lines CRIU logs after the real error ("Dumping FAILED.", "... failed with -1"). */
const GENERIC = [/FAILED\.?\s*\(/, /failed with -1/, /Can't send response/, /One of more action scripts failed/];

/** The error line that says what went wrong: the first specific one, else the last. */
export function mainReason(errors: readonly string[] | undefined): string | undefined {
  if (errors === undefined || errors.length === 0) return undefined;
  return errors.find((e) => !GENERIC.some((re) => re.test(e))) ?? errors.at(-1);
}

/** The main reason a CRIU log gives for a failure (mainReason of its error lines); undefined when it has none. */
export async function logReason(file: string): Promise<string | undefined> {
  return mainReason((await readLogExcerpt(file))?.errors);
}

function describeFailure(d: CriuFailureDetails): string {
  const parts = [`CRIU ${d.request} failed`];
  const reason = mainReason(d.logErrors) ?? d.crErrmsg;
  if (reason !== undefined && reason !== '') parts.push(`: ${reason}`);
  if (d.crErrno !== undefined && d.crErrno !== 0) parts.push(` (errno ${d.crErrno})`);
  if (d.logFile !== undefined) parts.push(`; log: ${d.logFile}`);
  return parts.join('');
}

function hintFor(d: CriuFailureDetails): string | undefined {
  const text = [...(d.logErrors ?? []), d.crErrmsg ?? ''].join('\n');
  if (/Can't fork for \d+: File exists/.test(text)) {
    return 'a process with the same PID already runs here; restore where the PID is free, or run the workload in its own PID namespace';
  }
  if (/No such process|Can't find process|ESRCH/.test(text)) return 'the process may have exited';
  if (/Can't (connect|resolve)|Connection refused/.test(text))
    return 'the page server is not reachable at that address and port';
  if (/sockets: Can't get 1:(16|34) opt/.test(text)) {
    return 'CRIU 4.1 cannot dump TCP/UDP sockets on this kernel (it refuses SO_PASSCRED on inet sockets); see docs/criu.md';
  }
  return d.logFile === undefined ? undefined : `read ${d.logFile} for the whole story`;
}
