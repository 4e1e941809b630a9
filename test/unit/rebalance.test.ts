import { describe, expect, it } from 'vitest';
import { parseSelector, plan, type NodeState, type WorkloadState } from '../../controller/fleet/index.js';

const MiB = 1024 * 1024;

function w(name: string, mb: number, extra: Partial<WorkloadState> = {}): WorkloadState {
  return { name, pid: 100, residentBytes: mb * MiB, labels: {}, pinned: false, ...extra };
}

/** A node of `totalMb` whose used memory is its workloads plus `otherMb`. */
function node(name: string, totalMb: number, workloads: WorkloadState[], extra: Partial<NodeState> = {}): NodeState {
  const used = workloads.reduce((s, x) => s + x.residentBytes, 0);
  return {
    name,
    totalBytes: totalMb * MiB,
    availableBytes: totalMb * MiB - used,
    draining: false,
    load1: 0,
    cpus: 2,
    workloads,
    ...extra,
  };
}

describe('the rebalancing plan', () => {
  it('moves nothing when every node is under the threshold', () => {
    const p = plan([node('a', 1000, [w('x', 300)]), node('b', 1000, [])], { threshold: 0.8, exclude: [] });
    expect(p.moves).toEqual([]);
    expect(p.stays).toEqual([]);
  });

  it('sheds the smallest workload that alone brings an overloaded node under, to the least loaded node', () => {
    const p = plan(
      [
        node('a', 1000, [w('big', 400), w('mid', 250), w('small', 200)]),
        node('b', 1000, [w('y', 500)]),
        node('c', 1000, []),
      ],
      { threshold: 0.7, exclude: [] },
    );
    // a is at 85 %; it must free 150 MB: "small" (200) is the smallest that suffices.
    expect(p.moves).toEqual([expect.objectContaining({ workload: 'small', from: 'a', to: 'c' })]);
    expect(p.moves[0]?.reason).toMatch(/a at 85 % memory, over the 70 % threshold/);
    expect(p.nodes.find((n) => n.name === 'a')?.pressureAfter).toBeCloseTo(0.65);
  });

  it('takes the largest first when no single workload suffices, as few moves as it can', () => {
    const p = plan(
      [
        node('a', 1000, [w('p', 200), w('q', 200), w('r', 150), w('s', 150), w('t', 100)]),
        node('b', 1000, []),
        node('c', 1000, []),
      ],
      {
        threshold: 0.4,
        exclude: [],
      },
    );
    // 800 used, 400 allowed: 400 to shed.
    expect(p.moves.map((m) => m.workload).sort()).toEqual(['p', 'q']);
    expect(new Set(p.moves.map((m) => m.to))).toEqual(new Set(['b', 'c']));
    for (const n of p.nodes) expect(n.pressureAfter).toBeLessThanOrEqual(0.4);
  });

  it('never puts a node over the threshold, and says which workloads had to stay', () => {
    const p = plan([node('a', 1000, [w('huge', 900)]), node('b', 1000, [w('z', 500)])], {
      threshold: 0.8,
      exclude: [],
    });
    expect(p.moves).toEqual([]);
    expect(p.stays.map((s) => [s.workload, s.node])).toEqual([['huge', 'a']]);
    expect(p.stays[0]?.reason).toMatch(/too big for the room any other node has/);
  });

  it('leaves pinned workloads and --exclude’d labels where they are', () => {
    const p = plan(
      [
        node('a', 1000, [w('db', 500, { labels: { tier: 'db' } }), w('pinned', 300, { pinned: true }), w('web', 100)]),
        node('b', 1000, []),
      ],
      { threshold: 0.5, exclude: [parseSelector('tier=db')] },
    );
    expect(p.moves.map((m) => m.workload)).toEqual(['web']);
    expect(p.stays.map((s) => `${s.workload}: ${s.reason}`)).toEqual([
      expect.stringMatching(/^db: .*excluded \(tier=db\)/),
      expect.stringMatching(/^pinned: .*pinned/),
    ]);
  });

  it('empties a draining node, largest first, and places nothing on it', () => {
    const p = plan(
      [
        node('a', 1000, [w('x', 100), w('y', 300)], { draining: true }),
        node('b', 1000, [w('z', 700)]),
        node('c', 1000, []),
      ],
      { threshold: 0.8, exclude: [] },
    );
    expect(p.moves.map((m) => [m.workload, m.from, m.to, m.reason])).toEqual([
      ['y', 'a', 'c', 'a is draining'],
      ['x', 'a', 'c', 'a is draining'],
    ]);
    expect(p.nodes.find((n) => n.name === 'a')?.workloadsAfter).toBe(0);
  });

  it('does not move a workload twice in one run', () => {
    // b overloads after taking a's workload only if the planner were allowed to bounce it back.
    const p = plan(
      [
        node('a', 1000, [w('x', 600)], { draining: true }),
        node('b', 1000, [w('y', 300)]),
        node('c', 1000, [w('z', 300)]),
      ],
      {
        threshold: 0.8,
        exclude: [],
      },
    );
    const names = p.moves.map((m) => m.workload);
    expect(new Set(names).size).toBe(names.length);
  });

  it('with drainOnly, moves only that node’s workloads', () => {
    const p = plan(
      [node('a', 1000, [w('x', 100)], { draining: true }), node('b', 1000, [w('y', 950)]), node('c', 1000, [])],
      {
        threshold: 0.8,
        exclude: [],
        drainOnly: 'a',
      },
    );
    expect(p.moves.map((m) => m.workload)).toEqual(['x']);
  });

  it('rejects a label selector that is not KEY or KEY=VALUE', () => {
    expect(parseSelector('tier=db')).toEqual({ key: 'tier', value: 'db' });
    expect(parseSelector('critical')).toEqual({ key: 'critical', value: undefined });
    expect(() => parseSelector('Bad Key')).toThrow(/not a label selector/);
  });
});
