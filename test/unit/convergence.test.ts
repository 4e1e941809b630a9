import { describe, expect, it } from 'vitest';
import {
  DEFAULT_COST,
  DEFAULT_LIMITS,
  decide,
  estimate,
  explain,
  floorMs,
  type PolicyContext,
  type RoundSample,
} from '../../controller/migration/index.js';

const MiB = 1024 * 1024;

/** Rounds as [pages written, duration ms, memwrite ms] rows, as CRIU's stats-dump and the agent report them. */
function rounds(...rows: [number, number, number?][]): RoundSample[] {
  return rows.map(([pagesWritten, durationMs, memwriteMs]) => ({
    pagesWritten,
    pagesSkipped: 0,
    durationMs,
    memwriteMs: memwriteMs ?? 0,
  }));
}

function context(residentMb: number, overrides: Partial<PolicyContext> = {}): PolicyContext {
  return {
    residentBytes: residentMb * MiB,
    elapsedMs: 0,
    limits: DEFAULT_LIMITS,
    cost: DEFAULT_COST,
    ...overrides,
  };
}

/** Runs the policy round by round, as the migration does, and returns where it stopped. */
function replay(all: RoundSample[], ctx: PolicyContext): { stoppedAfter: number; rule: string | undefined } {
  for (let k = 1; k <= all.length; k++) {
    const d = decide(all.slice(0, k), ctx);
    if (d.stop) return { stoppedAfter: k, rule: d.rule };
  }
  return { stoppedAfter: -1, rule: undefined };
}

describe('the downtime estimate', () => {
  it('before any round, assumes the default bandwidth and the whole resident set', () => {
    const e = estimate([], context(64));
    expect(e.bandwidthFrom).toBe('assumed');
    expect(e.expectedPages).toBe((64 * MiB) / 4096);
    expect(e.copyMs).toBeCloseTo((64 * MiB) / DEFAULT_COST.defaultBandwidthBytesPerMs);
    expect(e.predictedDowntimeMs).toBeCloseTo(e.fixedMs + e.restoreMs + e.copyMs);
    expect(explain(e)).toMatch(/assumed/);
    const learned = estimate(
      [],
      context(64, { cost: { ...DEFAULT_COST, defaultBandwidthBytesPerMs: 10_000, bandwidthLearned: true } }),
    );
    expect(learned.bandwidthFrom).toBe('learned');
    expect(learned.copyMs).toBeCloseTo((64 * MiB) / 10_000);
    expect(explain(learned)).toMatch(/its past dumps/);
  });

  it('takes the bandwidth from CRIU’s write time and the dirty rate from the round before', () => {
    // 256 MiB copied in 1 s of writing, then 4,000 pages dirtied during that second, written in 40 ms.
    const e = estimate(rounds([65_536, 1_200, 1_000], [4_000, 60, 40]), context(256));
    expect(e.bandwidthFrom).toBe('rounds');
    expect(e.bandwidthBytesPerMs).toBeCloseTo(((65_536 + 4_000) * 4096) / 1_040);
    expect(e.dirtyPagesPerMs).toBeCloseTo(4_000 / 1_200);
    expect(e.expectedPages).toBe(Math.ceil((4_000 / 1_200) * 60));
    expect(explain(e)).not.toMatch(/assumed/);
  });

  it('never expects more dirty pages than the process has', () => {
    const e = estimate(rounds([1_000, 10], [16_000, 5_000]), context(16));
    expect(e.expectedPages).toBe((16 * MiB) / 4096);
  });

  it('has a floor no number of rounds goes below: switchover plus restoring resident memory', () => {
    const floor = floorMs(context(1024));
    expect(floor).toBeCloseTo(DEFAULT_COST.fixedMs + (1024 * MiB) / DEFAULT_COST.restoreBytesPerMs);
    expect(estimate(rounds([262_144, 4_000, 3_000], [10, 1, 1]), context(1024)).predictedDowntimeMs).toBeGreaterThan(
      floor,
    );
  });
});

describe('the stop rules, on recorded rounds', () => {
  it('a converging process stops as soon as the predicted downtime fits the budget', () => {
    // 64 MiB with a small hot set on a fast link: round 2 is already tiny.
    const recorded = rounds([16_384, 250, 200], [800, 20, 15], [120, 5, 3]);
    const d = decide(recorded.slice(0, 2), context(64));
    expect(d.stop).toBe(true);
    expect(d.rule).toBe('budget');
    expect(d.meetsBudget).toBe(true);
    expect(d.estimate.predictedDowntimeMs).toBeLessThanOrEqual(300);
  });

  it('does not stop for the budget after one round: the dirty rate is not known yet', () => {
    const d = decide(rounds([256, 5, 4]), context(1));
    expect(d.rule).not.toBe('budget');
  });

  it('the kernel lab’s converging workload (256 MiB, 16 MiB hot) stops when the dirty set stops shrinking', () => {
    // Recorded under TCG: 65,564 pages in 2.9 s, then the hot set twice.
    const recorded = rounds([65_564, 2_900], [4_517, 430], [4_517, 620]);
    expect(decide(recorded.slice(0, 1), context(256)).stop).toBe(false);
    const second = decide(recorded.slice(0, 2), context(256));
    expect(second.stop).toBe(false);
    expect(second.reason).toMatch(/over the 300 ms budget; another round/);
    const third = decide(recorded, context(256));
    expect(third).toMatchObject({ stop: true, rule: 'not-converging', meetsBudget: false });
    expect(third.reason).toMatch(/100 % of round 2's pages: the dirty set no longer shrinks/);
  });

  it('a process that dirties faster than the copy (a round grows) stops at once', () => {
    const d = decide(rounds([65_536, 3_000], [75_000, 3_300]), context(256));
    expect(d).toMatchObject({ stop: true, rule: 'not-converging' });
    expect(d.reason).toMatch(/faster than it is copied/);
  });

  it('a round of 64 pages or fewer ends the rounds even when the budget is out of reach', () => {
    const tight = context(1024, { limits: { ...DEFAULT_LIMITS, maxDowntimeMs: 50 } });
    const d = decide(rounds([262_144, 4_000], [20_000, 300], [60, 2]), tight);
    expect(d).toMatchObject({ stop: true, rule: 'few-pages', meetsBudget: false });
  });

  it('a slowly shrinking dirty set runs into the round cap', () => {
    const tight = context(1024, { limits: { ...DEFAULT_LIMITS, maxDowntimeMs: 50, maxRounds: 4 } });
    const recorded = rounds([262_144, 8_000], [100_000, 3_000], [85_000, 2_600], [72_000, 2_200], [61_000, 1_900]);
    expect(replay(recorded, tight)).toEqual({ stoppedAfter: 4, rule: 'max-rounds' });
  });

  it('stops once the rounds sent three times the resident memory', () => {
    const tight = context(100, { limits: { ...DEFAULT_LIMITS, maxDowntimeMs: 50 } });
    // 100 MiB resident, each round 88 % of the one before.
    const recorded = rounds([25_600, 1_000], [22_600, 900], [19_900, 800], [17_500, 700], [15_400, 600]);
    expect(replay(recorded, tight)).toEqual({ stoppedAfter: 4, rule: 'traffic' });
  });

  it('stops at the pre-copy deadline', () => {
    const limited = context(256, { elapsedMs: 31_000, limits: { ...DEFAULT_LIMITS, deadlineMs: 30_000 } });
    expect(decide(rounds([65_536, 20_000], [30_000, 11_000]), limited)).toMatchObject({ stop: true, rule: 'deadline' });
  });

  it('noisy timings do not flip the decision of a converging process', () => {
    // Same pages, durations jittering by up to ±60 %: the dirty set shrinks every round.
    const steady = rounds([65_536, 2_000, 1_800], [12_000, 400, 350], [2_400, 90, 70], [480, 20, 15]);
    const noisy = rounds([65_536, 3_200, 2_900], [12_000, 160, 140], [2_400, 140, 110], [480, 8, 6]);
    const budget = context(256, { limits: { ...DEFAULT_LIMITS, maxDowntimeMs: 500 } });
    const a = replay(steady, budget);
    const b = replay(noisy, budget);
    expect(a.rule).toBe('budget');
    expect(b.rule).toBe('budget');
    expect(Math.abs(a.stoppedAfter - b.stoppedAfter)).toBeLessThanOrEqual(1);
  });

  it('one slow round’s bandwidth is averaged with the round before', () => {
    const e = estimate(rounds([10_000, 100, 100], [5_000, 5_000, 5_000]), context(64));
    // Alone, the second round says 4 MB/s; with the first it is about 8 MB/s.
    expect(e.bandwidthBytesPerMs).toBeCloseTo((15_000 * 4096) / 5_100);
  });
});
