import { InvalidInputError } from '../../src/errors.js';
import type { TestHooks } from '../../src/hooks.js';
import { formatBytes } from '../../src/units.js';
import { LABEL_KEY, type NodeFacts } from '../../src/wire/index.js';
import { connectAgent, type AgentEndpoint } from '../agents/index.js';
import { migrate, type MigrationReport } from '../migration/index.js';

/**
 * Rebalancing: a plan of moves from the nodes' facts, and its execution.
 * The planner is a pure function of the facts (tested without agents);
 * every move is an ordinary live migration, so a failed move leaves its
 * workload running where it was.
 */

export interface WorkloadState {
  name: string;
  pid: number;
  residentBytes: number;
  labels: Record<string, string>;
  pinned: boolean;
}

export interface NodeState {
  name: string;
  totalBytes: number;
  availableBytes: number;
  draining: boolean;
  load1: number;
  cpus: number;
  workloads: WorkloadState[];
}

/** `key` (the label is present) or `key=value`. */
export interface LabelSelector {
  key: string;
  value: string | undefined;
}

export interface PlanOptions {
  /** Memory pressure (1 - available / total) every node should end under. */
  threshold: number;
  /** Workloads matching any of these are never moved. */
  exclude: readonly LabelSelector[];
  /** Only empty these (draining) nodes; nothing else moves. */
  drainOnly?: string | undefined;
}

export const DEFAULT_THRESHOLD = 0.8;

export interface Move {
  workload: string;
  pid: number;
  from: string;
  to: string;
  residentBytes: number;
  reason: string;
}

export interface Stay {
  workload: string;
  node: string;
  reason: string;
}

export interface NodeLoad {
  name: string;
  pressureBefore: number;
  pressureAfter: number;
  workloadsBefore: number;
  workloadsAfter: number;
  draining: boolean;
}

export interface Plan {
  threshold: number;
  moves: Move[];
  /** Workloads that should have moved and will not, with why. */
  stays: Stay[];
  nodes: NodeLoad[];
}

export function parseSelector(text: string): LabelSelector {
  const [key = '', ...rest] = text.split('=');
  if (!LABEL_KEY.test(key)) {
    throw new InvalidInputError(`${JSON.stringify(text)} is not a label selector`, {
      hint: 'write KEY or KEY=VALUE (keys: lower-case letters, digits, . _ / -)',
    });
  }
  return { key, value: rest.length === 0 ? undefined : rest.join('=') };
}

function matches(w: WorkloadState, selectors: readonly LabelSelector[]): LabelSelector | undefined {
  return selectors.find((s) => s.key in w.labels && (s.value === undefined || w.labels[s.key] === s.value));
}

const pressure = (n: { totalBytes: number; availableBytes: number }): number =>
  n.totalBytes > 0 ? 1 - n.availableBytes / n.totalBytes : 1;

const percent = (p: number): string => `${Math.round(p * 100)} %`;

/**
 * The moves that bring every node under the threshold and empty draining
 * nodes, with as few moves as it can: a draining node's workloads all go
 * (largest first, hardest to place); an overloaded node sheds the smallest
 * workload that alone brings it under, else its largest, and again. Each
 * workload goes to the node it leaves least loaded, never to a draining
 * node, never over the threshold, and moves at most once.
 */
export function plan(nodes: readonly NodeState[], options: PlanOptions): Plan {
  const state = new Map(nodes.map((n) => [n.name, { ...n, workloads: [...n.workloads] }]));
  const moved = new Set<string>();
  const moves: Move[] = [];
  const stays: Stay[] = [];
  const key = (node: string, workload: string): string => `${node}/${workload}`;

  const target = (w: WorkloadState, from: string, mustFit: boolean): string | undefined => {
    let best: { name: string; after: number } | undefined;
    for (const n of state.values()) {
      if (n.name === from || n.draining || n.availableBytes < w.residentBytes) continue;
      const after = pressure({ totalBytes: n.totalBytes, availableBytes: n.availableBytes - w.residentBytes });
      if (mustFit && after > options.threshold) continue;
      if (best === undefined || after < best.after) best = { name: n.name, after };
    }
    return best?.name;
  };

  const apply = (w: WorkloadState, from: string, to: string, reason: string): void => {
    const source = state.get(from);
    const destination = state.get(to);
    if (source === undefined || destination === undefined) return;
    source.availableBytes += w.residentBytes;
    source.workloads = source.workloads.filter((x) => x.name !== w.name);
    destination.availableBytes -= w.residentBytes;
    destination.workloads.push(w);
    moved.add(key(to, w.name));
    moves.push({ workload: w.name, pid: w.pid, from, to, residentBytes: w.residentBytes, reason });
  };

  const movable = (w: WorkloadState, node: string): string | undefined => {
    if (w.pinned) return 'pinned';
    const selector = matches(w, options.exclude);
    if (selector !== undefined)
      return `excluded (${selector.key}${selector.value === undefined ? '' : `=${selector.value}`})`;
    if (moved.has(key(node, w.name))) return 'already moved in this run';
    return undefined;
  };

  // 1. Draining nodes are emptied: their workloads must go, preferably under the threshold.
  for (const n of [...state.values()].filter((x) => x.draining)) {
    if (options.drainOnly !== undefined && n.name !== options.drainOnly) continue;
    for (const w of [...n.workloads].sort((a, b) => b.residentBytes - a.residentBytes)) {
      const why = movable(w, n.name);
      if (why !== undefined) {
        stays.push({ workload: w.name, node: n.name, reason: `${n.name} is draining, but the workload is ${why}` });
        continue;
      }
      const to = target(w, n.name, true) ?? target(w, n.name, false);
      if (to === undefined) {
        stays.push({
          workload: w.name,
          node: n.name,
          reason: `${n.name} is draining, but no other node has ${formatBytes(w.residentBytes)} free`,
        });
        continue;
      }
      apply(w, n.name, to, `${n.name} is draining`);
    }
  }
  if (options.drainOnly !== undefined) return finish();

  // 2. Overloaded nodes shed load, the most loaded first.
  const overloaded = [...state.values()]
    .filter((n) => !n.draining && pressure(n) > options.threshold)
    .sort((a, b) => pressure(b) - pressure(a));
  for (const n of overloaded) {
    const before = pressure(n);
    const refused = new Set<string>();
    while (pressure(n) > options.threshold) {
      const need = n.totalBytes - n.availableBytes - options.threshold * n.totalBytes;
      const candidates = n.workloads.filter((w) => !refused.has(w.name) && movable(w, n.name) === undefined);
      if (candidates.length === 0) break;
      const enough = candidates
        .filter((w) => w.residentBytes >= need)
        .sort((a, b) => a.residentBytes - b.residentBytes)[0];
      const pick = enough ?? [...candidates].sort((a, b) => b.residentBytes - a.residentBytes)[0];
      if (pick === undefined) break;
      const to = target(pick, n.name, true);
      if (to === undefined) {
        refused.add(pick.name);
        continue;
      }
      apply(
        pick,
        n.name,
        to,
        `${n.name} at ${percent(before)} memory, over the ${percent(options.threshold)} threshold`,
      );
    }
    if (pressure(n) > options.threshold) {
      for (const w of n.workloads) {
        const why =
          movable(w, n.name) ??
          (refused.has(w.name) ? 'too big for the room any other node has under the threshold' : undefined);
        if (why !== undefined) {
          stays.push({
            workload: w.name,
            node: n.name,
            reason: `${n.name} stays over the threshold: the workload is ${why}`,
          });
        }
      }
    }
  }
  return finish();

  function finish(): Plan {
    return {
      threshold: options.threshold,
      moves,
      stays,
      nodes: nodes.map((n) => {
        const after = state.get(n.name) ?? n;
        return {
          name: n.name,
          pressureBefore: pressure(n),
          pressureAfter: pressure(after),
          workloadsBefore: n.workloads.length,
          workloadsAfter: after.workloads.length,
          draining: n.draining,
        };
      }),
    };
  }
}

/** A node as the controller reaches it. */
export interface NodeRef {
  name: string;
  endpoint: AgentEndpoint;
}

export async function nodeFacts(node: NodeRef, softwareVersion: string): Promise<NodeFacts> {
  const c = await connectAgent(node.endpoint, softwareVersion);
  try {
    return await c.call('nodeQuery', {}, { timeoutMs: 30_000 });
  } finally {
    c.close();
  }
}

export async function setDraining(node: NodeRef, draining: boolean, softwareVersion: string): Promise<NodeFacts> {
  const c = await connectAgent(node.endpoint, softwareVersion);
  try {
    return await c.call('setDraining', { draining }, { timeoutMs: 30_000 });
  } finally {
    c.close();
  }
}

/** The nodes' states, asked of every agent at once; a node that does not answer fails the whole reading. */
export async function readNodes(nodes: readonly NodeRef[], softwareVersion: string): Promise<NodeState[]> {
  const facts = await Promise.all(nodes.map((n) => nodeFacts(n, softwareVersion)));
  return facts.map((f, i) => ({
    name: nodes[i]?.name ?? f.name ?? '',
    totalBytes: Number(f.memTotalBytes ?? 0),
    availableBytes: Number(f.memAvailableBytes ?? 0),
    draining: f.draining === true,
    load1: f.load1 ?? 0,
    cpus: f.cpus ?? 0,
    workloads: (f.workloads ?? [])
      .filter((w) => w.state === 'running')
      .map((w) => ({
        name: w.name ?? '',
        pid: w.pid ?? 0,
        residentBytes: Number(w.residentBytes ?? 0),
        labels: { ...w.labels },
        pinned: w.pinned === true,
      })),
  }));
}

export interface MoveOutcome {
  move: Move;
  status: 'moved' | 'failed' | 'skipped';
  detail: string;
  downtimeMs?: number | undefined;
  report?: MigrationReport | undefined;
  /** Epoch milliseconds; absent for a move never started. */
  startedAtMs?: number | undefined;
  finishedAtMs?: number | undefined;
}

export interface ApplyOptions {
  softwareVersion: string;
  /** Stop starting moves after this many failed in a row (the rest are skipped, and the summary says so). */
  maxConsecutiveFailures: number;
  onMove?: (outcome: MoveOutcome) => void;
  signal?: AbortSignal | undefined;
  /** Given to every migration of the plan (where a test may pause them); default none. */
  hooks?: TestHooks | undefined;
}

/**
 * Runs the plan's moves, at most one migration per node at a time (a node
 * is either a source or a destination of one move), going on past a failed
 * move; a failure leaves its workload running where it was.
 */
export async function applyPlan(p: Plan, nodes: readonly NodeRef[], options: ApplyOptions): Promise<MoveOutcome[]> {
  const endpoints = new Map(nodes.map((n) => [n.name, n.endpoint]));
  const busy = new Set<string>();
  const pending = [...p.moves];
  const outcomes: MoveOutcome[] = [];
  let failedInARow = 0;
  const running = new Set<Promise<void>>();
  const record = (o: MoveOutcome): void => {
    outcomes.push(o);
    options.onMove?.(o);
  };

  const start = (move: Move): void => {
    busy.add(move.from);
    busy.add(move.to);
    const from = endpoints.get(move.from);
    const to = endpoints.get(move.to);
    const startedAtMs = Date.now();
    const run = (async () => {
      try {
        if (from === undefined || to === undefined) throw new Error(`no endpoint for ${move.from} or ${move.to}`);
        const report = await migrate({
          workload: move.workload,
          from,
          to,
          softwareVersion: options.softwareVersion,
          signal: options.signal,
          hooks: options.hooks,
        });
        failedInARow = 0;
        record({
          move,
          status: 'moved',
          detail: `running on ${move.to} as PID ${report.to.pid}`,
          downtimeMs: report.downtimeMs,
          report,
          startedAtMs,
          finishedAtMs: Date.now(),
        });
      } catch (error) {
        failedInARow++;
        record({ move, status: 'failed', detail: (error as Error).message, startedAtMs, finishedAtMs: Date.now() });
      } finally {
        busy.delete(move.from);
        busy.delete(move.to);
      }
    })();
    running.add(run);
    void run.finally(() => running.delete(run));
  };

  while (pending.length > 0 || running.size > 0) {
    if (failedInARow >= options.maxConsecutiveFailures || options.signal?.aborted === true) {
      const why =
        options.signal?.aborted === true
          ? 'not started: interrupted'
          : `not started: ${failedInARow} moves failed in a row (the limit is ${options.maxConsecutiveFailures})`;
      for (const move of pending.splice(0)) record({ move, status: 'skipped', detail: why });
      await Promise.all(running);
      break;
    }
    const next = pending.findIndex((m) => !busy.has(m.from) && !busy.has(m.to));
    if (next >= 0) {
      const [move] = pending.splice(next, 1);
      if (move !== undefined) start(move);
      continue;
    }
    await Promise.race(running);
  }
  return outcomes;
}
