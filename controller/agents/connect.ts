import pRetry, { AbortError as RetryAbort } from 'p-retry';
import { FerryError, InvalidInputError } from '../../src/errors.js';
import {
  PeerGoneError,
  RemoteError,
  WireConnection,
  type BodyOf,
  type ProgressMessage,
  type ReplyOf,
  type RequestName,
  type RequestOptions,
} from '../../src/wire/index.js';
import type { AgentEndpoint } from './endpoint.js';

/** An agent that cannot be reached: nothing was touched, and reaching it again may work. */
export class AgentUnreachableError extends InvalidInputError {
  override readonly code = 'AGENT_UNREACHABLE';
  override readonly retryable = true;
}

/** Whether repeating the operation that failed may succeed, as the error itself says (FerryError.retryable). */
export function isRetryable(error: unknown): boolean {
  return error instanceof FerryError && error.retryable;
}

/**
 * What the controller needs of a connection to an agent: typed calls (the
 * request table's), whether it is closed, and closing it. A WireConnection
 * is one; the migration's protocol tests give fakes with scripted answers.
 */
export interface AgentLink {
  /** The name the agent gave in the handshake ('' when it gave none). */
  readonly peerName: string;
  readonly closed: boolean;
  call<K extends RequestName>(name: K, params: BodyOf<K>, options?: RequestOptions): Promise<ReplyOf<K>>;
  close(reason?: string): void;
}

/** How a part of the controller opens an AgentLink: connectAgent, or a fake. */
export type ConnectLink = (
  endpoint: AgentEndpoint,
  options: { onProgress?: (p: ProgressMessage) => void; signal?: AbortSignal | undefined },
) => Promise<AgentLink>;

/** Connects to an agent as the controller. Connecting changes nothing anywhere, so it is retried. */
export async function connectAgent(
  endpoint: AgentEndpoint,
  softwareVersion: string,
  options: { onProgress?: (p: ProgressMessage) => void; signal?: AbortSignal | undefined } = {},
): Promise<WireConnection> {
  const { url } = endpoint;
  const name = endpoint.tls?.name ?? 'controller';
  try {
    return await pRetry(
      () =>
        WireConnection.connect(
          url,
          { role: 'controller', name, softwareVersion },
          { peer: url, onProgress: options.onProgress, signal: options.signal, tls: endpoint.tls },
        ).catch((error: unknown) => {
          if (!isRetryable(error)) throw new RetryAbort(error as Error);
          throw error;
        }),
      // About 3 s in all (0.2 + 0.4 + 0.8 + 1.6): an agent that was just (re)started takes a second
      // or more on a busy machine before it listens (its CRIU service starts first).
      { retries: 4, minTimeout: 200, signal: options.signal },
    );
  } catch (error) {
    if (error instanceof RemoteError) throw error;
    const why = error instanceof PeerGoneError ? error.reason : (error as Error).message;
    throw new AgentUnreachableError(`cannot reach the agent at ${url}: ${why}`, {
      hint: /certificate|SSL|TLS|alert/i.test(why)
        ? 'the agent and this controller must hold certificates of the same cluster CA (`ferry init`, `ferry install`); the agent logs the refusal'
        : 'check the URL and that `ferry agent` runs there (`ferry lab up` starts two local ones)',
      cause: error,
    });
  }
}

/** A remote "bad input" is bad input here too: exit 2, nothing changed. */
export function localized(error: unknown): unknown {
  if (error instanceof RemoteError && error.code === 'INVALID_INPUT') {
    return new InvalidInputError(error.message, { hint: error.hint, cause: error });
  }
  return error;
}
