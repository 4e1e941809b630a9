import { join } from 'node:path';
import { Option, type Command } from 'commander';
import { InvalidInputError } from '../../src/errors.js';
import { formatBytes, formatDuration } from '../../src/units.js';
import { configDir, readInventory } from '../agents/index.js';
import {
  applyPlan,
  DEFAULT_THRESHOLD,
  parseCron,
  parseSelector,
  plan,
  readNodes,
  runSchedule,
  setDraining,
  type MoveOutcome,
  type NodeRef,
  type NodeState,
  type Plan,
} from '../fleet/index.js';
import { DEFAULT_LAB, readLab } from '../lab/index.js';
import { collect, wholeNumberIn } from './arguments.js';
import type { CliContext } from './context.js';
import { progress, renderTable } from './output.js';
import { resolveAgent, type ResolveOptions } from './resolve.js';

/**
 * The commands that act on a set of nodes: nodes, rebalance, drain,
 * undrain, schedule. Nodes are named with --node (repeat); without it,
 * every node of the inventory, or else every host of the lab that is up.
 */

interface FleetOptions extends ResolveOptions {
  node?: string[];
  json?: boolean;
}

function fraction(value: string): number {
  const n = Number(value.replace(/%$/, '')) / (value.endsWith('%') ? 100 : 1);
  if (!(n > 0 && n < 1)) throw new InvalidInputError(`${value} is not a threshold between 0 and 1 (or 1 % and 99 %)`);
  return n;
}

export function fleetNodes(options: FleetOptions): NodeRef[] {
  let names = options.node ?? [];
  if (names.length === 0) names = readInventory().nodes.map((n) => n.name);
  if (names.length === 0) {
    const lab = readLab(options.lab ?? process.env.FERRY_LAB ?? DEFAULT_LAB);
    names = lab?.hosts.map((h) => h.host) ?? [];
  }
  if (names.length === 0) {
    throw new InvalidInputError('no nodes to work on', {
      hint: 'name them with --node AGENT (repeat), install some (`ferry install`), or bring up the lab (`ferry lab up`)',
    });
  }
  if (new Set(names).size !== names.length) throw new InvalidInputError('a node is named twice');
  return names.map((name) => ({ name, endpoint: resolveAgent(name, options) }));
}

const pct = (p: number): string => `${Math.round(p * 100)} %`;

export function renderNodes(nodes: readonly NodeState[]): string {
  const rows = [['NODE', 'MEMORY USED', 'OF', 'LOAD', 'WORKLOADS', 'STATE']];
  for (const n of nodes) {
    const used = n.totalBytes - n.availableBytes;
    rows.push([
      n.name,
      `${formatBytes(used)} (${pct(n.totalBytes > 0 ? used / n.totalBytes : 0)})`,
      formatBytes(n.totalBytes),
      `${n.load1.toFixed(2)}/${n.cpus}`,
      `${n.workloads.length} (${formatBytes(n.workloads.reduce((s, w) => s + w.residentBytes, 0))})`,
      n.draining ? 'draining' : 'ready',
    ]);
  }
  return renderTable(rows);
}

export function renderPlan(p: Plan): string {
  const lines: string[] = [];
  if (p.moves.length === 0) lines.push(`Nothing to move: every node is under ${pct(p.threshold)} memory.`);
  else {
    const rows = [['#', 'WORKLOAD', 'FROM', 'TO', 'SIZE', 'WHY']];
    p.moves.forEach((m, i) =>
      rows.push([String(i + 1), m.workload, m.from, m.to, formatBytes(m.residentBytes), m.reason]),
    );
    lines.push(renderTable(rows));
  }
  for (const s of p.stays) lines.push(`stays: ${s.workload} on ${s.node}: ${s.reason}`);
  lines.push('');
  const rows = [['NODE', 'MEMORY', 'WORKLOADS', '']];
  for (const n of p.nodes) {
    rows.push([
      n.name,
      `${pct(n.pressureBefore)} → ${pct(n.pressureAfter)}`,
      `${n.workloadsBefore} → ${n.workloadsAfter}`,
      n.draining ? 'draining' : '',
    ]);
  }
  lines.push(renderTable(rows));
  return lines.join('\n');
}

function renderOutcome(o: MoveOutcome): string {
  const m = o.move;
  const downtime = o.downtimeMs === undefined ? '' : ` (downtime ${formatDuration(o.downtimeMs)})`;
  return `${o.status.padEnd(7)} ${m.workload} ${m.from} → ${m.to}: ${o.detail}${downtime}`;
}

function summary(outcomes: readonly MoveOutcome[]): { text: string; failed: number } {
  const count = (s: MoveOutcome['status']): number => outcomes.filter((o) => o.status === s).length;
  const failed = count('failed') + count('skipped');
  const lines = [`${count('moved')} moved, ${count('failed')} failed, ${count('skipped')} not started`];
  for (const o of outcomes.filter((x) => x.status !== 'moved')) lines.push(`  ${renderOutcome(o)}`);
  return { text: lines.join('\n'), failed };
}

const write = (text: string): boolean => process.stdout.write(text.endsWith('\n') ? text : `${text}\n`);

function nodeOptions(command: Command): Command {
  return command
    .option('--node <AGENT>', 'a node to include (repeat; default: the inventory, else the lab’s hosts)', collect)
    .addOption(new Option('--insecure', 'allow plaintext ws:// agents'))
    .option('--json', 'print one JSON document on stdout');
}

function planOptions(command: Command): Command {
  return command
    .option(
      '--threshold <FRACTION>',
      'memory pressure every node should end under: 0.8 or 80%',
      fraction,
      DEFAULT_THRESHOLD,
    )
    .option('--exclude <LABEL>', 'never move workloads with this label (KEY or KEY=VALUE; repeat)', collect);
}

export function registerFleetCommands(
  program: Command,
  { version: softwareVersion, interrupt: signal, hooks }: CliContext,
): void {
  /** Applies a plan, the plan and each move's outcome on stderr as they come. */
  const run = (p: Plan, refs: NodeRef[], maxFailures: number, quiet: boolean): Promise<MoveOutcome[]> => {
    if (!quiet) progress(renderPlan(p));
    return applyPlan(p, refs, {
      softwareVersion,
      maxConsecutiveFailures: maxFailures,
      onMove: (o) => progress(renderOutcome(o)),
      signal: signal(),
      hooks,
    });
  };

  nodeOptions(
    program.command('nodes').description('Show the nodes’ memory, load, workloads and draining state'),
  ).action(async (opts: FleetOptions) => {
    const nodes = await readNodes(fleetNodes(opts), softwareVersion);
    if (opts.json === true) write(JSON.stringify(nodes, null, 2));
    else write(renderNodes(nodes));
  });

  planOptions(
    nodeOptions(
      program
        .command('rebalance')
        .description('Plan moves that bring every node under a memory threshold, and with --apply make them')
        .option('--plan', 'print the plan only (the default)')
        .option('--apply', 'make the moves: live migrations, at most one per node at a time')
        .option('--max-failures <N>', 'stop starting moves after N failures in a row', wholeNumberIn(1), 3),
    ),
  )
    .addHelpText(
      'after',
      `
The plan: workloads of draining nodes go elsewhere; a node over the threshold sheds the
smallest workload that brings it under (else its largest, and again); each goes to the node it
leaves least loaded, never to a draining node or over the threshold, and moves once at most.
Pinned workloads (ferry run --pin) and --exclude'd ones stay. With --apply a failed move leaves
its workload running where it was; the others go on. Exit code 1 if any move failed.

Example: ferry rebalance --threshold 70% --exclude tier=db --apply`,
    )
    .action(
      async (
        opts: FleetOptions & {
          plan?: boolean;
          apply?: boolean;
          threshold: number;
          exclude?: string[];
          maxFailures: number;
        },
      ) => {
        if (opts.plan === true && opts.apply === true) throw new InvalidInputError('--plan and --apply: pick one');
        const refs = fleetNodes(opts);
        const exclude = (opts.exclude ?? []).map(parseSelector);
        const started = performance.now();
        const p = plan(await readNodes(refs, softwareVersion), { threshold: opts.threshold, exclude });
        const planMs = performance.now() - started;
        if (opts.apply !== true) {
          if (opts.json === true) write(JSON.stringify({ plan: p, planMs: Math.round(planMs) }, null, 2));
          else write(renderPlan(p) + `\n(planned in ${formatDuration(planMs)}; --apply makes these moves)`);
          return;
        }
        const outcomes = await run(p, refs, opts.maxFailures, opts.json === true);
        const applyMs = performance.now() - started - planMs;
        const s = summary(outcomes);
        if (opts.json === true) {
          const brief = outcomes.map(({ report: _report, ...rest }) => rest);
          write(
            JSON.stringify(
              { plan: p, outcomes: brief, planMs: Math.round(planMs), applyMs: Math.round(applyMs) },
              null,
              2,
            ),
          );
        } else write(`${s.text}\n(planned in ${formatDuration(planMs)}, applied in ${formatDuration(applyMs)})`);
        if (s.failed > 0) process.exitCode = 1;
      },
    );

  nodeOptions(
    program
      .command('drain')
      .description('Mark a node draining (it takes no workloads) and move every workload off it')
      .argument('<NODE>', 'the node to empty (an AGENT)')
      .option('--max-failures <N>', 'stop starting moves after N failures in a row', wholeNumberIn(1), 3),
  )
    .addHelpText(
      'after',
      `
The node stays draining (also across agent restarts) until \`ferry undrain NODE\`: rebalancing
places nothing there. Pinned workloads stay and are listed. The other nodes are the inventory's
(or the lab's) unless named with --node. Exit code 1 if a workload could not be moved.`,
    )
    .action(async (name: string, opts: FleetOptions & { maxFailures: number }) => {
      const refs = fleetNodes(opts);
      if (!refs.some((r) => r.name === name)) refs.push({ name, endpoint: resolveAgent(name, opts) });
      const ref = refs.find((r) => r.name === name) as NodeRef;
      await setDraining(ref, true, softwareVersion);
      progress(`${name} is draining: it takes no workloads`);
      const p = plan(await readNodes(refs, softwareVersion), { threshold: 1, exclude: [], drainOnly: name });
      const outcomes = await run(p, refs, opts.maxFailures, opts.json === true);
      const s = summary(outcomes);
      const left = p.stays.length + s.failed;
      if (opts.json === true) {
        write(
          JSON.stringify({ node: name, plan: p, outcomes: outcomes.map(({ report: _r, ...rest }) => rest) }, null, 2),
        );
      } else {
        write(s.text);
        write(left === 0 ? `${name} is empty and draining.` : `${name} is draining; ${left} workload(s) remain on it.`);
      }
      if (left > 0) process.exitCode = 1;
    });

  program
    .command('undrain')
    .description('Let a draining node take workloads again')
    .argument('<NODE>', 'the node (an AGENT)')
    .addOption(new Option('--insecure', 'allow plaintext ws:// agents'))
    .action(async (name: string, opts: ResolveOptions) => {
      await setDraining({ name, endpoint: resolveAgent(name, opts) }, false, softwareVersion);
      write(`${name} takes workloads again`);
    });

  planOptions(
    nodeOptions(
      program
        .command('schedule')
        .description('Run rebalancing on a cron schedule, as a daemon, until stopped (SIGTERM or Ctrl-C)')
        .requiredOption('--cron <EXPR>', 'when to run: "*/15 * * * *" (five fields, or six with seconds first)')
        .option('--dry-run', 'plan and record, never move')
        .option(
          '--max-failures <N>',
          'after N failed moves in a row, stop applying (plan only) and say so',
          wholeNumberIn(1),
          3,
        )
        .option(
          '--history <FILE>',
          'where runs are recorded, one JSON line each (default: CONFIG/schedule-history.jsonl)',
        ),
    ),
  )
    .addHelpText(
      'after',
      `
A run never starts while the previous one is still going: that tick is skipped and logged.
Each run reads every node afresh, plans as \`ferry rebalance\`, and applies unless --dry-run.
To let systemd or Kubernetes do the scheduling instead, run \`ferry rebalance --apply\` from a
systemd timer or a CronJob (docs/rebalancing.md has both).`,
    )
    .action(
      async (
        opts: FleetOptions & {
          cron: string;
          dryRun?: boolean;
          maxFailures: number;
          history?: string;
          threshold: number;
          exclude?: string[];
        },
      ) => {
        parseCron(opts.cron);
        const refs = fleetNodes(opts);
        await runSchedule({
          cron: opts.cron,
          nodes: refs,
          plan: { threshold: opts.threshold, exclude: (opts.exclude ?? []).map(parseSelector) },
          dryRun: opts.dryRun === true,
          maxFailures: opts.maxFailures,
          historyFile: opts.history ?? join(configDir(), 'schedule-history.jsonl'),
          softwareVersion,
          signal: signal(),
          hooks,
          onRun: (r) =>
            progress(
              `run ${r.run} (${r.mode}) ${r.startedAt} → ${r.finishedAt}: ${r.outcome}; ${r.planned} planned, ${r.moved} moved, ${r.failed} failed${r.detail ? `; ${r.detail}` : ''}`,
            ),
        });
      },
    );
}
