import type { Command } from 'commander';
import { DEFAULT_LAB, labDown, labExec, labUp, runDemo } from '../lab/index.js';
import { byteSize, labName, wholeNumber } from './arguments.js';
import type { CliContext } from './context.js';
import { json, progress } from './output.js';
import { renderEvent, renderReport } from './report.js';

/** `ferry lab up|down|exec`: hosts on this machine with an agent each. */
export function registerLab(program: Command, _context: CliContext): void {
  const lab = program
    .command('lab')
    .description(
      'Local hosts that share nothing but the kernel (own network, root file system, PIDs, hostname, IPC), an agent on each; docs/lab.md',
    );
  lab
    .command('up')
    .description('Create the lab hosts a and b and start an agent on each (idempotent)')
    .option('--name <NAME>', 'lab name (prefixes its namespaces)', labName, DEFAULT_LAB)
    .option('--json', 'print the lab as JSON')
    .option('--insecure', 'plaintext agents without TLS (default: mutual TLS with a throwaway lab CA)')
    .option('--hosts <N>', 'how many hosts (2 to 8: a, b, c, ...)', wholeNumber, 2)
    .option('--capacity <SIZE>', 'memory each host offers workloads (they share this machine’s)', byteSize)
    .action(async (opts: { name: string; json?: boolean; insecure?: boolean; hosts: number; capacity?: number }) => {
      const up = await labUp({
        name: opts.name,
        insecure: opts.insecure,
        hosts: opts.hosts,
        capacityBytes: opts.capacity,
      });
      if (opts.json === true) json(up);
      else
        for (const h of up.hosts) process.stdout.write(`${h.host}  ${h.url}  (netns ${h.netns}, log ${h.logFile})\n`);
    });
  lab
    .command('down')
    .description('Stop the lab: its agents, everything running in its hosts, its namespaces')
    .option('--name <NAME>', 'lab name', labName, DEFAULT_LAB)
    .action(async (opts: { name: string }) => {
      const existed = await labDown(opts.name);
      process.stdout.write(existed ? `lab ${opts.name} is down\n` : `lab ${opts.name} was not up\n`);
    });
  lab
    .command('exec')
    .description("Run a command in all of a lab host's namespaces, in this directory if the host has it")
    .argument('<HOST>', 'a, b, ...')
    .argument('<CMD...>', 'the command, after --')
    .option('--name <NAME>', 'lab name', labName, DEFAULT_LAB)
    .action(async (host: string, cmd: string[], opts: { name: string }) => {
      process.exitCode = await labExec(opts.name, host, cmd);
    });
}

/** `ferry demo`: a live migration between lab hosts with a client connected, narrated. */
export function registerDemo(program: Command, { version, interrupt }: CliContext): void {
  program
    .command('demo')
    .description(
      'Bring up the lab, start an HTTP server on host a with a client on c asking it, migrate it live to b, show the client served on',
    )
    .option('--keep', 'leave the lab and the workload running at the end')
    .option('--json', 'print the migration report, with what the client saw, as JSON on stdout')
    .addHelpText('after', '\nNeeds root. Tears down what it created unless --keep.')
    .action(async (opts: { keep?: boolean; json?: boolean }) => {
      const report = await runDemo({
        keep: opts.keep,
        softwareVersion: version,
        signal: interrupt(),
        say: progress,
        render: { event: renderEvent, report: renderReport },
      });
      if (opts.json === true) json(report);
    });
}
