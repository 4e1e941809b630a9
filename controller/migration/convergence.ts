import { PAGE_SIZE, formatBytes } from '../../src/units.js';

/**
 * The pre-copy convergence policy: after each round, estimate what the
 * downtime would be if the switchover happened now, and decide whether
 * another round is worth it. Pure functions over measured rounds, so the
 * rules are tested on recorded statistics (test/unit/convergence.test.ts).
 *
 * Predicted downtime = F + R + P / B, where
 *   B  bandwidth: bytes the last rounds wrote / CRIU's time writing them;
 *   D  dirty rate: pages round k wrote / duration of round k-1 (they were
 *      dirtied while k-1 ran);
 *   P  pages expected dirty at the switchover: D × duration of the last round;
 *   F  fixed switchover cost: freeze, streaming the other images, the
 *      protocol's round trips, commit and resume;
 *   R  the destination's restore, which reads every page of every round,
 *      so it grows with resident memory, not with P; its rate is what the
 *      destination's past restores showed (Facts.restoreBytesPerMs).
 * (QEMU's rule is the same idea without R: its destination already holds
 * the memory.)
 */

export interface RoundSample {
  pagesWritten: number;
  pagesSkipped: number;
  /** The round's wall time on the source (pre-dump request to answer). */
  durationMs: number;
  /** CRIU's time writing pages to the page server (stats-dump memwrite); 0 when unknown. */
  memwriteMs: number;
}

export interface PolicyLimits {
  /** The downtime budget. */
  maxDowntimeMs: number;
  /** Stop when a round wrote this few pages: nothing is left to gain. */
  fewPages: number;
  /** Not converging: a round wrote more than this × the previous one... */
  growth: number;
  /** ...or more than this × the previous one (the dirty set stopped shrinking). */
  stall: number;
  maxRounds: number;
  /** Stop when everything sent reaches this × resident memory. */
  maxTrafficFactor: number;
  /** Stop rounds after this long in pre-copy; undefined: no deadline. */
  deadlineMs: number | undefined;
}

export const DEFAULT_LIMITS: PolicyLimits = {
  maxDowntimeMs: 300,
  fewPages: 64,
  growth: 1.1,
  stall: 0.9,
  maxRounds: 8,
  maxTrafficFactor: 3,
  deadlineMs: undefined,
};

/** What a switchover costs besides copying the last dirty pages. */
export interface SwitchoverCost {
  fixedMs: number;
  /** How fast the destination restores memory from its page images. */
  restoreBytesPerMs: number;
  /** Page transfer rate to assume before any round measured one. */
  defaultBandwidthBytesPerMs: number;
  /** Whether that rate is the source's own past (else a constant). */
  bandwidthLearned?: boolean | undefined;
  /** Whether fixedMs is what switchovers between these two agents cost before (else a constant). */
  fixedLearned?: boolean | undefined;
}

/**
 * Measured on the project's lab hosts (docs/convergence.md): a 64 MiB
 * process switches over in about 0.5 s, of which the fixed part is about
 * 150 ms; a restore reads about 1.5 GiB/s from tmpfs page images; a dump
 * writes about 600 MiB/s into the agents' TLS page stream (scripts/bench-pages.ts:
 * 500-700 MiB/s for 1 GiB; CRIU's own TLS, which this used to assume, about 220).
 */
export const DEFAULT_COST: SwitchoverCost = {
  fixedMs: 150,
  restoreBytesPerMs: (1.5 * 1024 ** 3) / 1000,
  defaultBandwidthBytesPerMs: (600 * 1024 ** 2) / 1000,
};

export interface Estimate {
  bandwidthBytesPerMs: number;
  /** Where the bandwidth comes from: this migration's rounds, the source's past dumps, or a constant. */
  bandwidthFrom: 'rounds' | 'learned' | 'assumed';
  dirtyPagesPerMs: number | undefined;
  expectedPages: number;
  fixedMs: number;
  /** Where the fixed cost comes from: past switchovers between these agents, or a constant. */
  fixedFrom: 'learned' | 'assumed';
  restoreMs: number;
  copyMs: number;
  predictedDowntimeMs: number;
}

export type StopRule = 'budget' | 'few-pages' | 'not-converging' | 'max-rounds' | 'traffic' | 'deadline';

export interface Decision {
  stop: boolean;
  rule: StopRule | undefined;
  reason: string;
  estimate: Estimate;
  meetsBudget: boolean;
}

export interface PolicyContext {
  residentBytes: number;
  /** Time spent in pre-copy so far. */
  elapsedMs: number;
  limits: PolicyLimits;
  cost: SwitchoverCost;
}

/** Bandwidth over the last two rounds together: one short round's timing is too noisy alone. */
function bandwidth(rounds: readonly RoundSample[]): number | undefined {
  let bytes = 0;
  let ms = 0;
  for (const r of rounds.slice(-2)) {
    const time = r.memwriteMs > 0 ? r.memwriteMs : r.durationMs;
    if (r.pagesWritten === 0 || time <= 0) continue;
    bytes += r.pagesWritten * PAGE_SIZE;
    ms += time;
  }
  return bytes > 0 && ms > 0 ? bytes / ms : undefined;
}

/** The downtime if the switchover came now, after these rounds (none: stop-and-copy). */
export function estimate(
  rounds: readonly RoundSample[],
  context: Omit<PolicyContext, 'limits' | 'elapsedMs'>,
): Estimate {
  const { residentBytes, cost } = context;
  const residentPages = Math.ceil(residentBytes / PAGE_SIZE);
  const measuredBandwidth = bandwidth(rounds);
  const bandwidthBytesPerMs = measuredBandwidth ?? cost.defaultBandwidthBytesPerMs;
  const last = rounds.at(-1);
  const previous = rounds.at(-2);
  let dirtyPagesPerMs: number | undefined;
  let expectedPages = residentPages;
  if (last !== undefined && previous !== undefined && previous.durationMs > 0) {
    dirtyPagesPerMs = last.pagesWritten / previous.durationMs;
    expectedPages = Math.min(residentPages, Math.ceil(dirtyPagesPerMs * last.durationMs));
  } else if (last !== undefined) {
    // After one round the dirty rate is unknown; what the round itself wrote bounds nothing.
    // Assume the worst case the data allows: the whole resident set again.
    expectedPages = residentPages;
  }
  const copyMs = (expectedPages * PAGE_SIZE) / bandwidthBytesPerMs;
  const restoreMs = residentBytes / cost.restoreBytesPerMs;
  return {
    bandwidthBytesPerMs,
    bandwidthFrom: measuredBandwidth !== undefined ? 'rounds' : cost.bandwidthLearned === true ? 'learned' : 'assumed',
    dirtyPagesPerMs,
    expectedPages,
    fixedMs: cost.fixedMs,
    fixedFrom: cost.fixedLearned === true ? 'learned' : 'assumed',
    restoreMs,
    copyMs,
    predictedDowntimeMs: cost.fixedMs + restoreMs + copyMs,
  };
}

function ms(value: number): string {
  return value >= 10_000 ? `${(value / 1000).toFixed(1)} s` : `${Math.round(value)} ms`;
}

/** The smallest downtime any number of rounds could reach: F + R (nothing left to copy). */
export function floorMs(context: Omit<PolicyContext, 'limits' | 'elapsedMs'>): number {
  return context.cost.fixedMs + context.residentBytes / context.cost.restoreBytesPerMs;
}

/**
 * Decides after a round whether to stop the rounds, applying DESIGN.md's
 * rules in order: budget met, few pages, not converging, round cap,
 * traffic cap, deadline. Stopping without meeting the budget is allowed
 * here; whether to go ahead is --strict-downtime's call, not the policy's.
 */
export function decide(rounds: readonly RoundSample[], context: PolicyContext): Decision {
  const { limits } = context;
  const e = estimate(rounds, context);
  const meetsBudget = e.predictedDowntimeMs <= limits.maxDowntimeMs;
  const k = rounds.length;
  const last = rounds.at(-1);
  const previous = rounds.at(-2);
  const stop = (rule: StopRule, reason: string): Decision => ({ stop: true, rule, reason, estimate: e, meetsBudget });
  // The budget rule needs a measured dirty rate: after one round it is unknown.
  if (meetsBudget && e.dirtyPagesPerMs !== undefined) {
    return stop(
      'budget',
      `predicted downtime ${ms(e.predictedDowntimeMs)} is within the ${ms(limits.maxDowntimeMs)} budget`,
    );
  }
  if (last !== undefined && last.pagesWritten <= limits.fewPages) {
    return stop('few-pages', `round ${k} wrote ${last.pagesWritten} pages (${limits.fewPages} or fewer)`);
  }
  if (last !== undefined && previous !== undefined && previous.pagesWritten > 0) {
    const ratio = last.pagesWritten / previous.pagesWritten;
    if (ratio > limits.growth) {
      return stop(
        'not-converging',
        `round ${k} wrote ${Math.round(ratio * 100)} % of round ${k - 1}'s pages: the process dirties memory faster than it is copied`,
      );
    }
    if (ratio > limits.stall) {
      return stop(
        'not-converging',
        `round ${k} wrote ${Math.round(ratio * 100)} % of round ${k - 1}'s pages: the dirty set no longer shrinks`,
      );
    }
  }
  if (k >= limits.maxRounds) return stop('max-rounds', `reached ${limits.maxRounds} rounds`);
  const sent = rounds.reduce((sum, r) => sum + r.pagesWritten * PAGE_SIZE, 0);
  if (context.residentBytes > 0 && sent >= limits.maxTrafficFactor * context.residentBytes) {
    return stop(
      'traffic',
      `sent ${formatBytes(sent)}, ${limits.maxTrafficFactor}× the ${formatBytes(context.residentBytes)} resident`,
    );
  }
  if (limits.deadlineMs !== undefined && context.elapsedMs >= limits.deadlineMs) {
    return stop('deadline', `pre-copy ran ${ms(context.elapsedMs)}, the deadline is ${ms(limits.deadlineMs)}`);
  }
  return {
    stop: false,
    rule: undefined,
    reason: `predicted downtime ${ms(e.predictedDowntimeMs)} is over the ${ms(limits.maxDowntimeMs)} budget; another round`,
    estimate: e,
    meetsBudget,
  };
}

/** One line on how a prediction is made up, for progress and the report. */
export function explain(e: Estimate): string {
  const from = { rounds: '', learned: ' (its past dumps)', assumed: ' assumed' }[e.bandwidthFrom];
  const rate = `${formatBytes(e.bandwidthBytesPerMs * 1000)}/s${from}`;
  return (
    `${ms(e.predictedDowntimeMs)} = switchover ${ms(e.fixedMs)}${e.fixedFrom === 'learned' ? ' (past switchovers)' : ''} + restore ${ms(e.restoreMs)} + ` +
    `${e.expectedPages} dirty pages at ${rate} ${ms(e.copyMs)}`
  );
}
