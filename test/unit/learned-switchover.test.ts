import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { switchoverKey } from '../../agent/destination/index.js';
import { LearnedRates } from '../../agent/rates.js';
import { DEFAULT_COST, estimate, explain } from '../../controller/migration/convergence.js';
import { FakeController, fakeAgent, type FakeAgent } from '../helpers/fake-agent.js';

/**
 * The switchover's fixed cost, learned per agent pair: the destination
 * takes the downtime less the final copy and its own restore at each
 * resume, keyed by the source, and the prediction uses it in place of the
 * constant measured on the project's machine.
 */
const SOURCE_URL = 'wss://10.0.0.1:7070';
let agents: FakeAgent[] = [];

afterEach(() => {
  for (const a of agents) {
    for (const m of a.context.migrations.all()) m.abort.abort(new Error('test over'));
    a.cleanup();
  }
  agents = [];
});

async function resumed(a: FakeAgent, id: string, downtimeBeforeMs: number, copyMs: number): Promise<void> {
  a.destination.prepare({ migrationId: id, sourceUrl: SOURCE_URL, holdMs: 60_000 });
  await a.destination.pageServer({ migrationId: id, round: 'final' }, new FakeController());
  await a.destination.restore({ migrationId: id, round: 'final' }, new FakeController());
  await a.destination.resume({ migrationId: id, downtimeBeforeMs, copyMs });
}

describe('the learned switchover cost', () => {
  it('is the downtime less the copy and the restore, a moving average per source', async () => {
    const a = fakeAgent();
    agents.push(a);
    expect(a.context.rates.cost(switchoverKey(SOURCE_URL))).toBe(0);
    await resumed(a, 'm-1', 400, 100);
    const first = a.context.rates.cost(switchoverKey(SOURCE_URL));
    // About 300 ms: 400 less the 100 of copy, less the fake restore's few ms, plus the resume's own.
    expect(first).toBeGreaterThan(250);
    expect(first).toBeLessThan(350);
    await resumed(a, 'm-2', 200, 100);
    const second = a.context.rates.cost(switchoverKey(SOURCE_URL));
    expect(second).toBeGreaterThan(150);
    expect(second).toBeLessThan(first);
    expect(a.context.rates.cost(switchoverKey('wss://10.0.0.9:7070'))).toBe(0);
  });

  it('grows with the memory moved: a line through the sizes seen, each size predicted apart', () => {
    const dir = mkdtempSync(join(tmpdir(), 'ferry-rates-'));
    try {
      const rates = new LearnedRates(dir);
      const MiB = 1024 ** 2;
      // What the bench saw on the lab hosts: about 100 ms at 8 MiB, 600 ms at 1 GiB, alternating.
      for (let i = 0; i < 4; i++) {
        rates.learnCost('k', 100 + i, 8 * MiB);
        rates.learnCost('k', 600 - i, 1024 * MiB);
      }
      expect(rates.cost('k', 8 * MiB)).toBeGreaterThan(80);
      expect(rates.cost('k', 8 * MiB)).toBeLessThan(120);
      expect(rates.cost('k', 1024 * MiB)).toBeGreaterThan(560);
      expect(rates.cost('k', 1024 * MiB)).toBeLessThan(640);
      const half = rates.cost('k', 512 * MiB);
      expect(half).toBeGreaterThan(300);
      expect(half).toBeLessThan(400);
      // One size only: its average, whatever is asked.
      rates.learnCost('one', 200, 64 * MiB);
      rates.learnCost('one', 100, 64 * MiB);
      expect(rates.cost('one', 1024 * MiB)).toBeCloseTo(rates.cost('one', 8 * MiB), 5);
      expect(rates.cost('one', 64 * MiB)).toBeGreaterThan(100);
      expect(rates.cost('one', 64 * MiB)).toBeLessThan(200);
      // Costs that fall as memory grows (noise): never a negative slope, the average instead.
      rates.learnCost('down', 500, 8 * MiB);
      rates.learnCost('down', 100, 1024 * MiB);
      expect(rates.cost('down', 8 * MiB)).toBeCloseTo(rates.cost('down', 1024 * MiB), 5);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('still reads a cost learned by an earlier version (one average, whatever the size)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'ferry-rates-'));
    try {
      writeFileSync(join(dir, 'rates.json'), JSON.stringify({ restore: 900, costs: { k: 250 } }));
      const rates = new LearnedRates(dir);
      expect(rates.cost('k', 1024 ** 3)).toBe(250);
      expect(rates.get('restore')).toBe(900);
      rates.learnCost('k', 100, 1024 ** 3);
      expect(rates.cost('k', 1024 ** 3)).toBe(100);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('replaces the constant in the prediction, and the explanation says where it came from', () => {
    const assumed = estimate([], { residentBytes: 8 * 1024 * 1024, cost: DEFAULT_COST });
    const learned = estimate([], {
      residentBytes: 8 * 1024 * 1024,
      cost: { ...DEFAULT_COST, fixedMs: 40, fixedLearned: true },
    });
    expect(assumed.predictedDowntimeMs - learned.predictedDowntimeMs).toBeCloseTo(DEFAULT_COST.fixedMs - 40, 5);
    expect(explain(learned)).toContain('switchover 40 ms (past switchovers)');
    expect(explain(assumed)).not.toContain('past switchovers');
  });
});
