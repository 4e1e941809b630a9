import { Option, type Command } from 'commander';
import { isFinalState } from '../../src/migration/index.js';
import { DEFAULT_HOLD_MS, type MigrationRecord } from '../../src/wire/index.js';
import { migrationRecords } from '../agents/index.js';
import { migrate, POSTCOPY_RISK } from '../migration/index.js';
import { collect, holdMs, migrationTarget, positiveNumber, wholeNumberIn } from './arguments.js';
import type { CliContext } from './context.js';
import { insecureOption, wrap } from './options.js';
import { json } from './output.js';
import { eventPrinter, renderReport } from './report.js';
import { resolveAgent, type ResolveOptions } from './resolve.js';

/** `ferry migrate`: one live migration, its progress on stderr and its report. */
export function registerMigrate(program: Command, { version, interrupt, hooks }: CliContext): void {
  program
    .command('migrate')
    .description('Move a running process to another agent; it keeps its PID, memory and open files')
    .argument('<PID|NAME>', 'a PID on the source agent, or a workload name (ferry ps)')
    .requiredOption('--from <AGENT>', 'the agent where the process runs now')
    .requiredOption('--to <AGENT>', 'the agent to move it to')
    .addOption(
      new Option('--strategy <S>', 'how memory is copied')
        .choices(['auto', 'precopy', 'stop-and-copy', 'postcopy'])
        .default('auto'),
    )
    .option(
      '--max-downtime <ms>',
      'the downtime budget: pre-copy rounds go on until the predicted downtime fits',
      positiveNumber,
      300,
    )
    .option('--strict-downtime', 'abort (the process keeps running on the source) rather than go over the budget')
    .option(
      '--plain-pages',
      'send memory pages unencrypted, only on a network you trust: CRIU’s TLS cuts the page rate several times (docs/security.md); the control connections stay mutual TLS',
    )
    .option(
      '--tcp-close',
      'close the TCP connections that cannot move (preflight lists them) instead of refusing: their clients see a reset',
    )
    .option('--max-rounds <N>', 'most pre-copy rounds before the switchover', wholeNumberIn(1, 100), 8)
    .option('--max-traffic <X>', 'stop pre-copy once it sent X times the resident memory', positiveNumber, 3)
    .option('--precopy-timeout <ms>', 'stop pre-copy rounds after this long (default: no limit)', positiveNumber)
    .option(
      '--hold <ms>',
      'how long each agent holds its side of the switchover waiting for the next step before settling it alone',
      holdMs,
      DEFAULT_HOLD_MS,
    )
    .option('--json', 'print the report as one JSON document on stdout, progress on stderr')
    .addOption(insecureOption())
    .addHelpText(
      'after',
      `
Steps: preflight (both agents, CPU, space, PID), pre-copy rounds while the process runs
(only where the kernel tracks dirty memory), then the switchover: the process is frozen on
the source, the rest of its state goes to the destination, the copy there is restored but held,
and only then is the source copy ended and the destination's started. Any failure before that
point leaves the process running on the source as it was (exit code 1).

Pre-copy stops, in this order, when: the predicted downtime fits --max-downtime; a round wrote
64 pages or fewer; the rounds stop converging (a round wrote more than 1.1x, or over 0.9x, of
the one before); --max-rounds; --max-traffic; --precopy-timeout. The prediction is
switchover cost + restore of the resident memory + the pages expected dirty at the switchover
over the measured bandwidth; progress shows it after every round and the report compares it with
the downtime measured. Over budget, Ferry goes ahead and says so, unless --strict-downtime.

${wrap(
  '--strategy postcopy moves everything but the memory, starts the process on the destination at ' +
    'once, and lets it fetch its memory from the source on demand and in the background: the ' +
    'downtime does not grow with the memory. Only where a probe on both agents (a small lazy ' +
    `migration on each) worked; never chosen by auto. The risk: ${POSTCOPY_RISK}. The source keeps ` +
    'the process frozen and serving until every page has arrived; only then is its copy ended. ' +
    'docs/postcopy.md.',
)}`,
    )
    .action(
      async (
        target: string,
        opts: {
          from: string;
          to: string;
          strategy: 'auto' | 'precopy' | 'stop-and-copy' | 'postcopy';
          maxDowntime: number;
          strictDowntime?: boolean;
          plainPages?: boolean;
          tcpClose?: boolean;
          maxRounds: number;
          maxTraffic: number;
          precopyTimeout?: number;
          hold: number;
          json?: boolean;
          insecure?: boolean;
        },
      ) => {
        const what = migrationTarget(target);
        const from = resolveAgent(opts.from, opts);
        const to = resolveAgent(opts.to, opts);
        const report = await migrate({
          pid: 'pid' in what ? what.pid : undefined,
          workload: 'workload' in what ? what.workload : undefined,
          from,
          to,
          strategy: opts.strategy,
          limits: {
            maxDowntimeMs: opts.maxDowntime,
            maxRounds: opts.maxRounds,
            maxTrafficFactor: opts.maxTraffic,
            deadlineMs: opts.precopyTimeout,
          },
          strictDowntime: opts.strictDowntime,
          plainPages: opts.plainPages,
          tcpClose: opts.tcpClose,
          holdMs: opts.hold,
          softwareVersion: version,
          onEvent: eventPrinter(),
          signal: interrupt(),
          hooks,
        });
        if (opts.json === true) json(report);
        else process.stdout.write(renderReport(report) + '\n');
      },
    );
}

/** One line per migration of an agent's journal; with onlyOpen, those not yet in a final state. */
function printRecords(agent: string, records: MigrationRecord[], onlyOpen: boolean): void {
  const shown = onlyOpen ? records.filter((r) => !isFinalState(r.state)) : records;
  if (shown.length === 0) {
    process.stdout.write(`${agent}: ${onlyOpen ? 'no migration in flight' : 'nothing to settle'}\n`);
    return;
  }
  for (const r of shown) {
    process.stdout.write(
      `${agent}: ${r.migrationId} ${r.role} ${r.state}${r.pid ? ` PID ${r.pid}` : ''}${r.action ? ` (${r.action})` : ''}\n`,
    );
  }
}

/** `ferry status`: the migrations agents’ journals hold. */
export function registerStatus(program: Command, { version }: CliContext): void {
  program
    .command('status')
    .description('Show the migrations in flight on agents (from their journals)')
    .requiredOption('--on <AGENT>', 'an agent to ask (repeat for several)', collect)
    .option('--all', 'also the finished ones')
    .option('--json', 'print one JSON document')
    .addOption(insecureOption())
    .action(async (opts: { on: string[]; all?: boolean; json?: boolean } & ResolveOptions) => {
      const result: Record<string, MigrationRecord[]> = {};
      for (const agent of opts.on) result[agent] = await migrationRecords(resolveAgent(agent, opts), version, false);
      if (opts.json === true) json(result);
      else for (const [agent, records] of Object.entries(result)) printRecords(agent, records, opts.all !== true);
    });
}

/** `ferry recover`: settle what a crash or a cut network left half-done. */
export function registerRecover(program: Command, { version }: CliContext): void {
  program
    .command('recover')
    .description('Settle migrations left half-done on agents (a crash, a cut network), and say what was done')
    .requiredOption('--on <AGENT>', 'an agent to settle (repeat for several)', collect)
    .option('--json', 'print one JSON document')
    .addOption(insecureOption())
    .addHelpText(
      'after',
      `
Agents also settle on their own when they start and when a hold times out. The source agent
decides: before its commit the process resumes there and the destination discards its copy;
after it, the destination runs the copy (restored again from its kept images if needed).`,
    )
    .action(async (opts: { on: string[]; json?: boolean } & ResolveOptions) => {
      const result: Record<string, MigrationRecord[]> = {};
      for (const agent of opts.on) result[agent] = await migrationRecords(resolveAgent(agent, opts), version, true);
      if (opts.json === true) json(result);
      else for (const [agent, records] of Object.entries(result)) printRecords(agent, records, false);
    });
}
