import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Command, CommanderError, Option } from 'commander';
import { NO_TEST_HOOKS, type TestHooks } from '../../src/hooks.js';
import { projectRoot } from '../../src/paths.js';
import { configDir } from '../agents/index.js';
import { registerCertificate, registerInit } from './cluster-commands.js';
import { interruptSignal, type CliContext } from './context.js';
import { registerFleetCommands } from './fleet-commands.js';
import { registerInstallCommands } from './install-commands.js';
import { registerDemo, registerLab } from './lab-commands.js';
import { registerMigrate, registerRecover, registerStatus } from './migration-commands.js';
import { registerAgent, registerCheck } from './node-commands.js';
import { ExitCode, reportError } from './output.js';
import { registerPs, registerRun } from './workload-commands.js';

const version = (JSON.parse(readFileSync(join(projectRoot(), 'package.json'), 'utf8')) as { version: string }).version;

/** The `ferry` program: its global options and help, then its commands in the order --help lists them. */
export function buildProgram(hooks: TestHooks = NO_TEST_HOOKS): Command {
  const program = new Command('ferry')
    .description('Live migration of running Linux processes between machines, driven by CRIU.')
    .version(version, '-V, --version')
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride()
    .addHelpText(
      'after',
      `
AGENT is a URL (wss://HOST:PORT), a node name from the inventory (ferry install), or the
name of a lab host (a, b) of the lab that is up. Agents speak mutual TLS: the controller shows
the certificate \`ferry init\` made (in --config, default ~/.config/ferry); to a lab host,
named or by its URL, the lab's own.

Exit codes: 0 done, 1 failed (a source process keeps running), 2 bad input (nothing changed),
3 outcome unknown.

Start with:
  ferry demo                        a live migration between two local lab hosts
  ferry lab up                      two hosts (network namespaces) with agents: a and b
  ferry run --on a --name web -- CMD...
  ferry migrate web --from a --to b`,
    );

  program
    .addOption(
      new Option('--config <DIR>', 'the cluster configuration: CA, controller identity, inventory')
        .env('FERRY_CONFIG')
        .default(configDir(), 'FERRY_CONFIG or ~/.config/ferry'),
    )
    .hook('preAction', () => {
      process.env.FERRY_CONFIG = program.opts<{ config: string }>().config;
    });

  const context: CliContext = { version, interrupt: interruptSignal, hooks };
  for (const register of [
    registerInit,
    registerCertificate,
    registerMigrate,
    registerRun,
    registerPs,
    registerStatus,
    registerRecover,
    registerAgent,
    registerLab,
    registerCheck,
    registerDemo,
    registerFleetCommands,
    registerInstallCommands,
  ])
    register(program, context);
  return program;
}

let stdoutGuarded = false;

/**
 * Runs the `ferry` command line on `argv` (as process.argv: the node
 * binary and the script first) and resolves with its exit code: 0 done,
 * 1 failed, 2 bad input, 3 outcome unknown. `context.hooks` is where a
 * test may pause what the command runs (test/harness/ferry gives them);
 * bin/ferry gives none.
 */
export async function runCli(argv: readonly string[], options: { hooks?: TestHooks } = {}): Promise<number> {
  if (!stdoutGuarded) {
    stdoutGuarded = true;
    // A reader that stops early (`ferry migrate --help | head`) is no error of ours.
    process.stdout.on('error', (error: NodeJS.ErrnoException) => {
      if (error.code === 'EPIPE') process.exit(process.exitCode ?? 0);
      throw error;
    });
  }
  const args = argv.slice(2);
  const program = buildProgram(options.hooks);
  const asJson = args.includes('--json');
  try {
    await program.parseAsync(args, { from: 'user' });
    return typeof process.exitCode === 'number' ? process.exitCode : ExitCode.ok;
  } catch (error) {
    if (error instanceof CommanderError) {
      // Help and version exit 0; a usage mistake is bad input.
      return error.exitCode === 0 ? ExitCode.ok : ExitCode.badInput;
    }
    return reportError(error, asJson);
  }
}
