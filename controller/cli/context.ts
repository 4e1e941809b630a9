import type { Command } from 'commander';
import type { TestHooks } from '../../src/hooks.js';

/** What every command is given by the program that registers it. */
export interface CliContext {
  /** Ferry's version, from package.json: agents and the controller compare theirs in the handshake. */
  version: string;
  /** A new AbortSignal that Ctrl-C (or SIGTERM) aborts, for the command's long operation. */
  interrupt: () => AbortSignal;
  /** Given to what a test may pause (migrations, rebalancing, the schedule); NO_TEST_HOOKS in production. */
  hooks: TestHooks;
}

/** Adds one command (or a few of one role) to the program. */
export type RegisterCommand = (program: Command, context: CliContext) => void;

/** Ctrl-C cancels the running command through its AbortSignal; a second one exits at once. */
export function interruptSignal(): AbortSignal {
  const controller = new AbortController();
  process.once('SIGINT', () => {
    process.stderr.write('\nferry: interrupted, cleaning up (Ctrl-C again to quit now)\n');
    controller.abort();
    process.once('SIGINT', () => process.exit(130));
  });
  process.once('SIGTERM', () => controller.abort());
  return controller.signal;
}
