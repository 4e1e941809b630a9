#!/usr/bin/env node
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { projectRoot } from '../src/paths.js';
import { printCheck, runCheck } from './check.js';
import { runDemo } from './demo.js';
import { ExitCode, reportError } from './output.js';

const version = (JSON.parse(readFileSync(join(projectRoot(), 'package.json'), 'utf8')) as { version: string }).version;

/** Ctrl-C cancels the running command through its AbortSignal; a second one exits at once. */
function interruptSignal(): AbortSignal {
  const controller = new AbortController();
  process.once('SIGINT', () => {
    process.stderr.write('\nferry: interrupted, cleaning up (Ctrl-C again to quit now)\n');
    controller.abort();
    process.once('SIGINT', () => process.exit(130));
  });
  process.once('SIGTERM', () => controller.abort());
  return controller.signal;
}

function wholeNumber(value: string): number {
  if (!/^\d+$/.test(value)) throw new InvalidArgumentError('expected a whole number');
  return Number(value);
}

const criuOption = () =>
  new Option('--criu <path>', 'the CRIU binary to use (default: the project prefix, then the system)').env(
    'FERRY_CRIU',
  );

export function buildProgram(): Command {
  const program = new Command('ferry')
    .description('Live migration of running Linux processes between machines, driven by CRIU.')
    .version(version, '-V, --version')
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride()
    .addHelpText(
      'after',
      `
Exit codes: 0 done, 1 failed (a source process keeps running), 2 bad input (nothing changed),
3 outcome unknown.

Start with:
  ferry check     what CRIU and this kernel can do here
  ferry demo      checkpoint a running process and restore it`,
    );

  program
    .command('check')
    .description('Show which CRIU Ferry uses, run its kernel check, and list the features this kernel has')
    .addOption(criuOption())
    .option('--json', 'print one JSON document and nothing else on stdout')
    .addHelpText(
      'after',
      `
mem_track decides the strategy: with it, Ferry copies memory while the process runs (precopy);
without it, the process stops for the whole copy (stop-and-copy).`,
    )
    .action(async (opts: { criu?: string; json?: boolean }) => {
      const report = await runCheck({ criu: opts.criu, signal: interruptSignal() });
      if (opts.json === true) process.stdout.write(JSON.stringify(report, null, 2) + '\n');
      else printCheck(report);
    });

  program
    .command('demo')
    .description('Start a counting process, checkpoint it with CRIU, restore it, and show it counting on')
    .addOption(criuOption())
    .option('--memory <MiB>', 'memory the demo process holds', wholeNumber, 64)
    .option('--keep', 'leave the restored process running at the end')
    .option('--json', 'print the figures as one JSON document on stdout')
    .addHelpText(
      'after',
      `
The demo runs on this machine and needs root (CRIU does). It prints each step on stderr:
the process counting, the checkpoint (frozen time, pages written), the restore with the
same PID, and the count going on from where it stopped.`,
    )
    .action(async (opts: { criu?: string; memory: number; keep?: boolean; json?: boolean }) => {
      const report = await runDemo({
        criu: opts.criu,
        memoryMb: opts.memory,
        keep: opts.keep,
        signal: interruptSignal(),
      });
      if (opts.json === true) process.stdout.write(JSON.stringify(report, null, 2) + '\n');
    });

  return program;
}

export async function main(argv: readonly string[]): Promise<number> {
  const program = buildProgram();
  const json = argv.includes('--json');
  try {
    await program.parseAsync([...argv], { from: 'user' });
    return ExitCode.ok;
  } catch (error) {
    if (error instanceof CommanderError) {
      // Help and version exit 0; a usage mistake is bad input.
      return error.exitCode === 0 ? ExitCode.ok : ExitCode.badInput;
    }
    return reportError(error, json);
  }
}

process.exitCode = await main(process.argv.slice(2));
