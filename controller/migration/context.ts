import { randomBytes } from 'node:crypto';
import { NO_TEST_HOOKS, type TestHooks } from '../../src/hooks.js';
import { DEFAULT_HOLD_MS, type ProgressMessage } from '../../src/wire/index.js';
import { connectAgent, type AgentEndpoint, type AgentLink, type ConnectLink } from '../agents/index.js';
import type { PolicyLimits, SwitchoverCost } from './convergence.js';

export type Phase = 'preflight' | 'precopy' | 'switchover' | 'commit' | 'postcopy' | 'rollback' | 'done';
export type Strategy = 'precopy' | 'stop-and-copy' | 'postcopy';

export interface MigrationEvent {
  /** Milliseconds since the migration started. */
  atMs: number;
  phase: Phase;
  /** Who says it: "controller" or an agent's name. */
  from: string;
  message: string;
  round?: string | undefined;
  pages?: number | undefined;
  bytes?: number | undefined;
  /**
   * Pages on their way to the destination (told twice a second while a
   * round's page server runs): bytes so far, the rate, and how long is left
   * where the amount to send is known (the first copy of the memory).
   */
  transfer?: { bytes: number; bytesPerSecond: number; expectedBytes?: number; leftMs?: number } | undefined;
}

export interface MigrateOptions {
  /** The process: a PID on the source, or a workload name. */
  pid?: number | undefined;
  workload?: string | undefined;
  from: AgentEndpoint;
  to: AgentEndpoint;
  strategy?: 'auto' | Strategy | undefined;
  /** The convergence policy's limits; unset ones take DEFAULT_LIMITS (300 ms budget, 8 rounds...). */
  limits?: Partial<PolicyLimits> | undefined;
  /** Abort, leaving the source running, rather than go over the downtime budget. */
  strictDowntime?: boolean | undefined;
  /** Send pages unencrypted (the control connections stay mutual TLS). */
  plainPages?: boolean | undefined;
  /** Close the TCP connections that cannot move instead of refusing the migration: their peers see a reset. */
  tcpClose?: boolean | undefined;
  cost?: SwitchoverCost | undefined;
  /** How long either agent holds its side of the switchover waiting for the next step. */
  holdMs?: number | undefined;
  softwareVersion: string;
  onEvent?: ((event: MigrationEvent) => void) | undefined;
  signal?: AbortSignal | undefined;
  /** How the migration reaches the agents; default connectAgent (the protocol tests give fakes). */
  connect?: ConnectLink | undefined;
  /** Where a test may pause the controller (after preflight, held, restored, commit); default none. */
  hooks?: TestHooks | undefined;
}

/** One migration as it runs: its id, options, phase and clock, and how it tells what happens. */
export interface MigrationRun {
  readonly id: string;
  readonly options: MigrateOptions;
  /** How long each agent holds its side of the switchover waiting for the next step. */
  readonly holdMs: number;
  readonly plainPages: boolean;
  readonly hooks: TestHooks;
  /** The phase a failure is reported in; the steps move it on. */
  phase: Phase;
  /** The page bytes the round now running will send, where known (the whole memory the first time); else 0. */
  expectedPageBytes: number;
  /** The carried files' bytes the source sent ahead of the freeze. */
  carriedAheadBytes: number;
  /** Milliseconds since the migration started. */
  elapsed(): number;
  emit(phase: Phase, from: string, message: string, extra?: Partial<MigrationEvent>): void;
  /** A connection to an agent, its progress events told as this migration's (a resume may need a new one). */
  connect(endpoint: AgentEndpoint): Promise<AgentLink>;
}

/** The two agents of a migration, connected. */
export interface Parties {
  readonly source: AgentLink;
  readonly destination: AgentLink;
  readonly sourceName: string;
  readonly destinationName: string;
}

/** What every step of a migration works with. */
export type MigrationContext = MigrationRun & Parties;

export function startRun(options: MigrateOptions): MigrationRun {
  const connect: ConnectLink =
    options.connect ?? ((endpoint, link) => connectAgent(endpoint, options.softwareVersion, link));
  const started = performance.now();
  const elapsed = (): number => Math.round(performance.now() - started);
  const run: MigrationRun = {
    id: `m-${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`,
    options,
    holdMs: options.holdMs ?? DEFAULT_HOLD_MS,
    plainPages: options.plainPages === true,
    hooks: options.hooks ?? NO_TEST_HOOKS,
    phase: 'preflight',
    expectedPageBytes: 0,
    carriedAheadBytes: 0,
    elapsed,
    emit: (phase, from, message, extra = {}) => options.onEvent?.({ atMs: elapsed(), phase, from, message, ...extra }),
    connect: (endpoint) => connect(endpoint, { onProgress, signal: options.signal }),
  };
  // An agent's progress event without a phase belongs to the phase the migration is in.
  const onProgress = (p: ProgressMessage): void =>
    run.emit((p.phase as Phase | undefined) ?? run.phase, p.source ?? 'agent', p.message ?? '', {
      round: p.round || undefined,
      // 64-bit fields: numbers here, whatever the decoder made of them.
      bytes: p.bytes === null || p.bytes === undefined ? undefined : Number(p.bytes),
      pages: p.pages === null || p.pages === undefined ? undefined : Number(p.pages),
      transfer: p.transfer === true ? transfer(Number(p.bytes ?? 0), Number(p.bytesPerSecond ?? 0)) : undefined,
    });
  const transfer = (bytes: number, bytesPerSecond: number): MigrationEvent['transfer'] => {
    const expectedBytes = run.expectedPageBytes > 0 ? run.expectedPageBytes : undefined;
    const leftMs =
      expectedBytes !== undefined && bytesPerSecond > 0
        ? Math.max(0, Math.round(((expectedBytes - bytes) / bytesPerSecond) * 1000))
        : undefined;
    return { bytes, bytesPerSecond, expectedBytes, leftMs };
  };
  return run;
}

/**
 * Connects to both agents at once; if either cannot be reached, the other
 * connection is closed and the first failure thrown (nothing was asked of
 * either).
 */
export async function connectBoth(run: MigrationRun): Promise<MigrationContext> {
  const { from, to } = run.options;
  const connected = await Promise.allSettled([run.connect(from), run.connect(to)]);
  const failed = connected.find((r) => r.status === 'rejected');
  if (failed !== undefined) {
    for (const r of connected) if (r.status === 'fulfilled') r.value.close();
    throw failed.reason;
  }
  const [source, destination] = connected.map((r) => (r as PromiseFulfilledResult<AgentLink>).value) as [
    AgentLink,
    AgentLink,
  ];
  return Object.assign(run, {
    source,
    destination,
    sourceName: source.peerName || from.url,
    destinationName: destination.peerName || to.url,
  });
}
