/**
 * Every request of Ferry's protocol, declared once: the body it carries
 * (a member of ferry.proto's Envelope oneof), the body that answers it,
 * and whether another agent may send it. Callers (WireConnection.call)
 * and handlers (RequestHandlers) are typed by this table; the agent
 * authorizes and dispatches by it; a unit test checks it against the
 * Envelope oneof read from ferry.proto.
 */
import type { Body, BodyName, BodyOf } from './messages.js';

interface RequestSpec {
  reply: BodyName;
  /**
   * Another agent (an agent certificate) may send it too. Only the image
   * stream of a migration and the outcome a destination asks its source:
   * one node's stolen agent key must not freeze or kill processes on the
   * others. Everything else needs a controller's certificate.
   */
  fromAgents?: true;
}

export const REQUESTS = {
  factsQuery: { reply: 'facts' },
  cpuCheck: { reply: 'ack' },
  prepareDestination: { reply: 'ack' },
  pageServerStart: { reply: 'pageServerStarted' },
  preDumpRound: { reply: 'roundDone' },
  carryAhead: { reply: 'carriedAhead' },
  finalDump: { reply: 'dumpHeld' },
  imageChunk: { reply: 'ack', fromAgents: true },
  imagesDone: { reply: 'ack', fromAgents: true },
  restore: { reply: 'restored' },
  commit: { reply: 'committed' },
  resume: { reply: 'resumed' },
  abort: { reply: 'ack' },
  runWorkload: { reply: 'workload' },
  listWorkloads: { reply: 'workloadList' },
  outcomeQuery: { reply: 'outcome', fromAgents: true },
  recover: { reply: 'migrationList' },
  statusQuery: { reply: 'migrationList' },
  nodeQuery: { reply: 'nodeFacts' },
  setDraining: { reply: 'nodeFacts' },
} as const satisfies Partial<Record<BodyName, RequestSpec>>;

/** Bodies the connection itself sends and answers: the handshake, failures and progress events. */
export const CONTROL_BODIES = ['hello', 'welcome', 'failure', 'progress'] as const satisfies readonly BodyName[];

export type RequestName = keyof typeof REQUESTS;
export type ReplyName<K extends RequestName> = (typeof REQUESTS)[K]['reply'];
export type ReplyOf<K extends RequestName> = BodyOf<ReplyName<K>>;

/** One handler per request, typed by the table; what a handler returns is wrapped in its reply body. */
export type RequestHandlers<Context> = {
  [K in RequestName]: (params: BodyOf<K>, context: Context) => ReplyOf<K> | Promise<ReplyOf<K>>;
};

export function isRequestName(name: BodyName | undefined): name is RequestName {
  return name !== undefined && Object.hasOwn(REQUESTS, name);
}

/** Whether a peer holding an agent certificate may send this request. */
export function agentsMaySend(name: RequestName): boolean {
  return (REQUESTS[name] as RequestSpec).fromAgents === true;
}

/** The request's envelope body: { [name]: params }. */
export function requestBody<K extends RequestName>(name: K, params: BodyOf<K>): Body {
  return { [name]: params };
}

/** The reply's envelope body: { [reply]: value }. */
export function replyBody<K extends RequestName>(name: K, value: ReplyOf<K>): Body {
  return { [REQUESTS[name].reply]: value };
}
