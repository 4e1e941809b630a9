import { formatBytes } from '../../src/units.js';
import {
  DEFAULT_COST,
  DEFAULT_LIMITS,
  decide,
  estimate,
  explain,
  floorMs,
  type Estimate,
  type PolicyLimits,
  type RoundSample,
  type StopRule,
} from './convergence.js';
import type { MigrationContext } from './context.js';
import { DowntimeBudgetError } from './errors.js';
import type { Preflight } from './preflight.js';
import { roundReport, type RoundReport } from './report.js';

/** What the pre-copy phase leaves for the switchover and the report. */
export interface Precopy {
  rounds: RoundReport[];
  /** Why the rounds stopped (precopy only). */
  stopReason: string | undefined;
  rule: StopRule | undefined;
  limits: PolicyLimits;
  strict: boolean;
  /** The downtime predicted for the switchover from what the rounds measured. */
  prediction: Estimate;
  meetsBudget: boolean;
  /** The last round, the final dump's parent ('' without rounds). */
  parent: string;
}

/**
 * Memory copied while the process runs, round after round, for as long
 * as the convergence policy says it pays (precopy only); then the
 * downtime budget: over it, --strict-downtime stops here, else the
 * migration goes ahead and says so.
 */
export async function precopy(m: MigrationContext, p: Preflight): Promise<Precopy> {
  const { options, source, destination, sourceName } = m;
  const limits: PolicyLimits = { ...DEFAULT_LIMITS, ...definedOnly(options.limits ?? {}) };
  const strict = options.strictDowntime === true;
  // What these two nodes have shown before, where they have: a restore rate on the destination,
  // a page transfer rate on the source (used until a round measures this migration's own).
  const restoreRate = p.destinationFacts.restoreBytesPerMs ?? 0;
  const writeRate = p.sourceFacts.pageWriteBytesPerMs ?? 0;
  // And what a switchover between these two has cost besides its pages, where one happened before.
  const fixedMs = p.destinationFacts.switchoverMs ?? 0;
  const cost = options.cost ?? {
    ...DEFAULT_COST,
    ...(fixedMs > 0 ? { fixedMs, fixedLearned: true } : {}),
    ...(restoreRate > 0 ? { restoreBytesPerMs: restoreRate } : {}),
    ...(writeRate > 0 ? { defaultBandwidthBytesPerMs: writeRate, bandwidthLearned: true } : {}),
  };
  const residentBytes = Number(p.process.residentBytes ?? 0);
  const rounds: RoundReport[] = [];
  const samples: RoundSample[] = [];
  let stopReason: string | undefined;
  let rule: StopRule | undefined;
  // Post-copy's downtime does not include the memory: it arrives after the copy runs.
  const switchedBytes = p.strategy === 'postcopy' ? 0 : residentBytes;
  let prediction = estimate([], { residentBytes: switchedBytes, cost });
  let parent = '';
  const floor = floorMs({ residentBytes: switchedBytes, cost });
  if (strict && floor > limits.maxDowntimeMs) {
    throw new DowntimeBudgetError(
      `no strategy can keep the downtime within ${limits.maxDowntimeMs} ms: switching over and restoring ` +
        `${formatBytes(residentBytes)} alone takes about ${Math.round(floor)} ms`,
      { hint: `raise --max-downtime above ${Math.ceil(floor / 100) * 100}, or drop --strict-downtime` },
    );
  }
  if (p.strategy === 'precopy') {
    m.phase = 'precopy';
    const started = performance.now();
    for (let k = 1; ; k++) {
      const round = String(k);
      // The first round copies the whole memory; later ones what changed, which is not known ahead.
      m.expectedPageBytes = k === 1 ? residentBytes : 0;
      const ps = await destination.call('pageServerStart', {
        migrationId: m.id,
        round,
        parent,
        plainPages: m.plainPages,
      });
      m.emit('precopy', 'controller', `round ${k}: copying memory while the process runs`, { round });
      const done = await source.call(
        'preDumpRound',
        {
          migrationId: m.id,
          round,
          parent,
          pid: p.pid,
          pageServerAddress: ps.address,
          pageServerPort: ps.port,
          plainPages: m.plainPages,
        },
        { timeoutMs: 0, signal: options.signal },
      );
      const report = roundReport(round, done.stats, done.durationMs ?? 0);
      rounds.push(report);
      samples.push({
        pagesWritten: report.pagesWritten,
        pagesSkipped: report.pagesSkipped,
        durationMs: report.durationMs,
        memwriteMs: (done.stats?.memwriteTimeUs ?? 0) / 1000,
      });
      parent = round;
      const decision = decide(samples, {
        residentBytes,
        elapsedMs: performance.now() - started,
        limits,
        cost,
      });
      prediction = decision.estimate;
      const rate = report.durationMs > 0 ? `, ${formatBytes((report.bytes / report.durationMs) * 1000)}/s` : '';
      m.emit(
        'precopy',
        sourceName,
        `round ${k}: ${report.pagesWritten} pages written, ${report.pagesSkipped} unchanged, ${report.durationMs} ms${rate}; ` +
          `downtime now would be ${explain(decision.estimate)}`,
        { round, pages: report.pagesWritten, bytes: report.bytes },
      );
      if (decision.stop) {
        rule = decision.rule;
        stopReason = decision.reason;
        break;
      }
    }
    m.emit('precopy', 'controller', `rounds stop (${rule}): ${stopReason}`);
  }
  const meetsBudget = prediction.predictedDowntimeMs <= limits.maxDowntimeMs;
  if (!meetsBudget) {
    const over = `predicted downtime ${explain(prediction)}, over the ${limits.maxDowntimeMs} ms budget`;
    if (strict) {
      throw new DowntimeBudgetError(`${over}; --strict-downtime stops here`, {
        hint:
          p.strategy === 'precopy'
            ? 'raise --max-downtime, or allow more rounds (--max-rounds, --max-traffic) if the dirty set was still shrinking'
            : 'raise --max-downtime; pre-copy needs a source kernel that tracks dirty memory',
      });
    }
    m.emit(
      p.strategy === 'precopy' ? 'precopy' : 'preflight',
      'controller',
      `${over}; going ahead (--strict-downtime would stop here)`,
    );
  }
  return { rounds, stopReason, rule, limits, strict, prediction, meetsBudget, parent };
}

/** Drops keys set to undefined, so they do not override the defaults they leave unset. */
function definedOnly<T extends object>(value: T): Partial<T> {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined)) as Partial<T>;
}
