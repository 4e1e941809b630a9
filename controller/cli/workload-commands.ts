import type { Command } from 'commander';
import { InvalidInputError } from '../../src/errors.js';
import { WORKLOAD_NAME } from '../../src/wire/index.js';
import { listWorkloads, runWorkload } from '../agents/index.js';
import { label } from './arguments.js';
import type { CliContext } from './context.js';
import { insecureOption } from './options.js';
import { json, renderTable } from './output.js';
import { resolveAgent, type ResolveOptions } from './resolve.js';

/** `ferry run`: start a migratable workload on an agent. */
export function registerRun(program: Command, { version }: CliContext): void {
  program
    .command('run')
    .description('Start a command as a migratable workload on an agent')
    .requiredOption('--on <AGENT>', 'the agent to run it on')
    .option('--name <NAME>', 'a name to migrate it by (default: the command name)')
    .option('--label <KEY=VALUE>', 'a label rebalancing can select on (--exclude); repeat', label)
    .option('--pin', 'never moved by rebalancing or drain (ferry migrate still can)')
    .option('--json', 'print the workload as JSON')
    .addOption(insecureOption())
    .argument('<CMD...>', 'the command, after --')
    .addHelpText(
      'after',
      `
The command runs in its own PID namespace (so its PIDs never collide where it is restored),
detached, in its own session, with its output in a log file on the agent.

Example: ferry run --on a --name counter -- sh -c 'i=0; while :; do i=$((i+1)); echo $i; sleep 1; done'`,
    )
    .action(
      async (
        cmd: string[],
        opts: {
          on: string;
          name?: string;
          json?: boolean;
          label?: Record<string, string>;
          pin?: boolean;
        } & ResolveOptions,
      ) => {
        const name = opts.name ?? (cmd[0] ?? '').split('/').at(-1) ?? '';
        if (!WORKLOAD_NAME.test(name))
          throw new InvalidInputError(`bad workload name ${JSON.stringify(name)}`, {
            hint: 'use letters, digits, . _ -',
          });
        const w = await runWorkload(resolveAgent(opts.on, opts), name, cmd, version, {
          labels: opts.label,
          pinned: opts.pin,
        });
        if (opts.json === true) json(w);
        else process.stdout.write(`started ${w.name} on ${w.agent} as PID ${w.pid}; output: ${w.logFile}\n`);
      },
    );
}

/** `ferry ps`: the workloads of an agent. */
export function registerPs(program: Command, { version }: CliContext): void {
  program
    .command('ps')
    .description('List the workloads of an agent')
    .requiredOption('--on <AGENT>', 'the agent to ask')
    .option('--json', 'print one JSON document')
    .addOption(insecureOption())
    .action(async (opts: { on: string; json?: boolean } & ResolveOptions) => {
      const workloads = await listWorkloads(resolveAgent(opts.on, opts), version);
      if (opts.json === true) {
        json(workloads);
        return;
      }
      const rows = [['NAME', 'PID', 'STATE', 'AGENT', 'COMMAND']];
      for (const w of workloads)
        rows.push([w.name ?? '', String(w.pid ?? ''), w.state ?? '', w.agent ?? '', (w.argv ?? []).join(' ')]);
      process.stdout.write(renderTable(rows) + '\n');
    });
}
