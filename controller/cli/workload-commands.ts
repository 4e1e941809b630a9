import type { Command } from 'commander';
import { isAbsolute, normalize } from 'node:path';
import { parseServiceAddress } from '../../src/address.js';
import { InvalidInputError } from '../../src/errors.js';
import { WORKLOAD_NAME } from '../../src/wire/index.js';
import { listWorkloads, runWorkload } from '../agents/index.js';
import { label } from './arguments.js';
import type { CliContext } from './context.js';
import { insecureOption } from './options.js';
import { json, renderTable } from './output.js';
import { resolveAgent, type ResolveOptions } from './resolve.js';

/** A --carry or --shared path: absolute on the agent's host (it names a file there, not here), repeatable. */
function carryPath(value: string, previous: string[] = []): string[] {
  const path = normalize(value).replace(/(.)\/$/, '$1');
  if (!isAbsolute(path) || path === '/') {
    throw new InvalidInputError(`${value}: give an absolute path below / on the agent's host`, {
      hint: 'for example --carry /srv/app/data',
    });
  }
  return [...previous, path];
}

/** `ferry run`: start a migratable workload on an agent. */
export function registerRun(program: Command, { version }: CliContext): void {
  program
    .command('run')
    .description('Start a command as a migratable workload on an agent')
    .requiredOption('--on <AGENT>', 'the agent to run it on')
    .option('--name <NAME>', 'a name to migrate it by (default: the command name)')
    .option('--label <KEY=VALUE>', 'a label rebalancing can select on (--exclude); repeat', label)
    .option('--pin', 'never moved by rebalancing or drain (ferry migrate still can)')
    .option(
      '--address <IP/PREFIX>',
      'a service address for the workload: added on this agent now, moved with the workload (IPv4)',
    )
    .option('--address-hook <PATH>', 'run at every move of the address (take / return; see docs/network.md)')
    .option('--carry <PATH>', 'a file or directory on the agent that moves with it (repeat; docs/files.md)', carryPath)
    .option('--shared <PATH>', 'a path on storage every node sees: checked, never copied (repeat)', carryPath)
    .option('--json', 'print the workload as JSON')
    .addOption(insecureOption())
    .argument('<CMD...>', 'the command, after --')
    .addHelpText(
      'after',
      `
The command runs in its own PID namespace (so its PIDs never collide where it is restored),
detached, in its own session, in its own directory on the agent (its working directory), with its
output in a log file beside it.

A migration carries the workload's directory and its log to the destination, and every --carry
path: a file, or a directory with all it holds (docs/files.md). Files it holds open elsewhere must
already be on the destination, the same (preflight checks, and refuses a move that would fail).

With --address, the agent adds the address to the interface that routes to it and announces it,
before the command starts; clients should connect to it. A migration withdraws it from the source
once the process is frozen and adds it on the destination before the restore, so that connections
to it survive the move; a rollback puts it back. Without it, a listener moves but answers at the
destination's own address, and connections from clients elsewhere cannot move (docs/network.md).

Examples:
  ferry run --on a --name counter -- sh -c 'i=0; while :; do i=$((i+1)); echo $i; sleep 1; done'
  ferry run --on a --name web --address 10.0.0.50/24 -- python3 -m http.server 8080
  ferry run --on a --name db --carry /srv/db -- sqlite3 /srv/db/app.sqlite`,
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
          address?: string;
          addressHook?: string;
          carry?: string[];
          shared?: string[];
        } & ResolveOptions,
      ) => {
        const address = opts.address === undefined ? undefined : parseServiceAddress(opts.address).cidr;
        if (opts.addressHook !== undefined && address === undefined)
          throw new InvalidInputError('--address-hook needs --address', { hint: 'add --address IP/PREFIX' });
        if (opts.addressHook !== undefined && !isAbsolute(opts.addressHook))
          throw new InvalidInputError(`--address-hook ${opts.addressHook} is not an absolute path`, {
            hint: 'agents run it by path on every node the workload moves to',
          });
        const name = opts.name ?? (cmd[0] ?? '').split('/').at(-1) ?? '';
        if (!WORKLOAD_NAME.test(name))
          throw new InvalidInputError(`bad workload name ${JSON.stringify(name)}`, {
            hint: 'use letters, digits, . _ -',
          });
        const w = await runWorkload(resolveAgent(opts.on, opts), name, cmd, version, {
          labels: opts.label,
          pinned: opts.pin,
          address,
          addressHook: opts.addressHook,
          carry: opts.carry,
          shared: opts.shared,
        });
        if (opts.json === true) json(w);
        else
          process.stdout.write(
            `started ${w.name} on ${w.agent} as PID ${w.pid}${w.address ? ` at ${w.address}` : ''}; output: ${w.logFile}\n`,
          );
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
      const rows = [['NAME', 'PID', 'STATE', 'AGENT', 'ADDRESS', 'COMMAND']];
      for (const w of workloads)
        rows.push([
          w.name ?? '',
          String(w.pid ?? ''),
          w.state ?? '',
          w.agent ?? '',
          w.address || '-',
          (w.argv ?? []).join(' '),
        ]);
      process.stdout.write(renderTable(rows) + '\n');
    });
}
