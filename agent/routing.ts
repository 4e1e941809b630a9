import {
  agentsMaySend,
  bodyName,
  isRequestName,
  replyBody,
  type Body,
  type EnvelopeMessage,
  type RequestHandlers,
  type RequestName,
  type WireConnection,
} from '../src/wire/index.js';
import { MigrationStateError, NotAllowedError } from './errors.js';

/** Who asks: the peer's certificate, when the connection has one (none under --insecure). */
export type Caller = Pick<WireConnection, 'certificate'>;

/**
 * Checks that the caller may send this request: a controller's certificate
 * may send any; an agent's only what the request table allows another
 * agent (the image stream of a migration and the outcome question).
 */
export function authorize(name: RequestName | undefined, caller: Caller): void {
  const certificate = caller.certificate;
  if (certificate?.role !== 'agent') return;
  if (name === undefined || !agentsMaySend(name)) {
    throw new NotAllowedError(
      `${certificate.name} holds an agent certificate, which may not ask for ${name ?? 'that'}`,
    );
  }
}

/** Answers one request with its handler from the table, after authorize(). */
export async function route<C extends Caller>(
  handlers: RequestHandlers<C>,
  envelope: EnvelopeMessage,
  caller: C,
): Promise<Body> {
  const asked = bodyName(envelope);
  const name = isRequestName(asked) ? asked : undefined;
  authorize(name, caller);
  if (name === undefined) throw new MigrationStateError('this request is not answered by an agent');
  // The table types each handler by its own request; here they are called by name.
  const handler = handlers[name] as (params: unknown, caller: C) => unknown;
  const reply = await handler(envelope[name], caller);
  return replyBody(name, reply as never);
}
