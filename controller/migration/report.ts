import { PAGE_SIZE } from '../../src/units.js';
import type { DumpStatsMessage } from '../../src/wire/index.js';
import type { MigrationContext, Strategy } from './context.js';
import { explain, type StopRule } from './convergence.js';
import type { Precopy } from './precopy.js';
import type { Preflight } from './preflight.js';
import type { Switchover } from './switchover.js';

export interface RoundReport {
  round: string;
  pagesWritten: number;
  pagesSkipped: number;
  bytes: number;
  durationMs: number;
}

export interface MigrationReport {
  migrationId: string;
  from: { agent: string; url: string; pid: number };
  to: { agent: string; url: string; pid: number };
  workload: string | undefined;
  strategy: Strategy;
  strategyReason: string;
  rounds: RoundReport[];
  /** Why the pre-copy rounds stopped (precopy only). */
  roundsStopReason: string | undefined;
  /** The downtime budget, what was predicted before the switchover and which rule ended the rounds. */
  policy: {
    budgetMs: number;
    strict: boolean;
    rule: StopRule | undefined;
    predictedDowntimeMs: number;
    prediction: string;
    meetsBudget: boolean;
  };
  final: RoundReport & {
    /** CRIU's frozen time on the source: from the freeze to the kill, so it includes the held switchover. */
    frozenMs: number;
    imageFiles: number;
    imageBytes: number;
    /** From the freeze until the source held the dump with its images streamed (dump + streaming). */
    heldMs: number;
    /** Streaming the non-page images to the destination. */
    streamMs: number;
    /** The destination's restore, up to the held point. */
    restoreMs: number;
  };
  /** The files the workload carries, sent ahead of the freeze (what changed since is in final.imageBytes). */
  carriedAheadBytes: number;
  /** Memory pages plus other images, all rounds, and the files carried ahead. */
  bytesSent: number;
  /** What the destination's page servers wrote, by file size. */
  pageImageBytes: number;
  residentBytes: number;
  phasesMs: { preflight: number; precopy: number; switchover: number; commit: number };
  totalMs: number;
  /** From the source's freeze to the destination's copy running. */
  downtimeMs: number;
  /** Post-copy: the memory fetched after the copy started running. */
  postcopy?: { fetchMs: number; lazyPages: number; lazyBytes: number; risk: string } | undefined;
  /** The sockets the process held, each as preflight saw it: what it was and what the migration did with it. */
  sockets: { kind: string; local: string; peer: string; state: string; fate: 'moved' | 'closed'; why: string }[];
}

export function roundReport(
  round: string,
  stats: DumpStatsMessage | null | undefined,
  durationMs: number,
): RoundReport {
  const pagesWritten = Number(stats?.pagesWritten ?? 0);
  return {
    round,
    pagesWritten,
    pagesSkipped: Number(stats?.pagesSkippedParent ?? 0),
    bytes: pagesWritten * PAGE_SIZE,
    durationMs,
  };
}

/** Everything a finished migration measured, in the report's order (its JSON is the --json output). */
export interface Outcome {
  preflight: Preflight;
  precopy: Precopy;
  switchover: Switchover;
  /** The source's statistics of the final dump (post-copy: of the settled commit). */
  finalStats: DumpStatsMessage | null | undefined;
  resumedPid: number;
  downtimeMs: number;
  phasesMs: MigrationReport['phasesMs'];
  postcopy: MigrationReport['postcopy'];
}

export function migrationReport(m: MigrationContext, o: Outcome): MigrationReport {
  const { held, restored } = o.switchover;
  const { rounds, limits, prediction } = o.precopy;
  const final = {
    ...roundReport('final', o.finalStats, 0),
    frozenMs: (o.finalStats?.frozenTimeUs ?? 0) / 1000,
    imageFiles: held.imageFiles ?? 0,
    imageBytes: Number(held.imageBytes ?? 0),
    heldMs: held.frozenMs ?? 0,
    streamMs: held.streamMs ?? 0,
    restoreMs: restored.restoreMs ?? 0,
  };
  return {
    migrationId: m.id,
    from: { agent: m.sourceName, url: m.options.from.url, pid: o.preflight.pid },
    to: { agent: m.destinationName, url: m.options.to.url, pid: o.resumedPid },
    workload: o.preflight.process.workload || undefined,
    strategy: o.preflight.strategy,
    strategyReason: o.preflight.strategyReason,
    rounds,
    roundsStopReason: o.precopy.stopReason,
    policy: {
      budgetMs: limits.maxDowntimeMs,
      strict: o.precopy.strict,
      rule: o.precopy.rule,
      predictedDowntimeMs: Math.round(prediction.predictedDowntimeMs),
      prediction: explain(prediction),
      meetsBudget: o.precopy.meetsBudget,
    },
    final,
    carriedAheadBytes: m.carriedAheadBytes,
    bytesSent:
      rounds.reduce((sum, r) => sum + r.bytes, 0) +
      final.bytes +
      final.imageBytes +
      m.carriedAheadBytes +
      (o.postcopy?.lazyBytes ?? 0),
    pageImageBytes: Number(restored.pageImageBytes ?? 0),
    residentBytes: Number(o.preflight.process.residentBytes ?? 0),
    phasesMs: o.phasesMs,
    totalMs: m.elapsed(),
    downtimeMs: Math.round(o.downtimeMs),
    postcopy: o.postcopy,
    sockets: (o.preflight.process.sockets ?? []).map((s) => ({
      kind: s.kind ?? '',
      local: s.local ?? '',
      peer: s.peer ?? '',
      state: s.state ?? '',
      // Preflight refused any socket that neither moves nor may be closed (--tcp-close).
      fate: s.moves === true ? 'moved' : 'closed',
      why: s.why ?? '',
    })),
  };
}
