import { resolve } from 'node:path';
import { InvalidArgumentError } from 'commander';
import { InvalidInputError } from '../src/errors.js';
import { HOLD_MS, MAX_PID, PEER_NAME, WORKLOAD_NAME } from '../src/wire/index.js';

/**
 * Parsers for command-line values that the wire or the file system would
 * otherwise take badly: a PID past what protobuf's int32 carries wraps
 * around, a hold past a uint32 wraps to the default, a node name with a
 * slash becomes a path. Each refuses with a reason; the CLI exits 2.
 */

/** What `ferry migrate` moves: a PID on the source agent, or the name of one of its workloads. */
export function migrationTarget(text: string): { pid: number } | { workload: string } {
  if (/^\d+$/.test(text)) {
    const pid = Number(text);
    if (pid < 1 || pid > MAX_PID) {
      throw new InvalidInputError(`${text} is not a PID`, { hint: `Linux PIDs run from 1 to ${MAX_PID}` });
    }
    return { pid };
  }
  if (!WORKLOAD_NAME.test(text)) {
    throw new InvalidInputError(`${JSON.stringify(text)} is neither a PID nor a workload name`, {
      hint: 'give a PID, or a name `ferry ps --on AGENT` lists',
    });
  }
  return { workload: text };
}

/** --hold: what each agent is told on the wire, so the same bounds. */
export function holdMs(text: string): number {
  const ms = /^\d+$/.test(text) ? Number(text) : NaN;
  if (!(ms >= HOLD_MS.min && ms <= HOLD_MS.max)) {
    throw new InvalidArgumentError(`expected milliseconds from ${HOLD_MS.min} to ${HOLD_MS.max} (a day)`);
  }
  return ms;
}

/** An agent's name: it names its images directory and travels in every handshake. */
export function nodeName(text: string): string {
  if (text === '' || !PEER_NAME.test(text)) {
    throw new InvalidArgumentError(
      '1 to 64 letters, digits, dots, dashes and underscores, starting with a letter or digit',
    );
  }
  return text;
}

/**
 * A directory an agent keeps state in, made absolute now: paths derived
 * from it travel to other agents (a workload's log), where a relative one
 * would mean another place.
 */
export function directory(text: string): string {
  if (text.trim() === '' || text.includes('\0')) throw new InvalidArgumentError('expected a directory');
  return resolve(text);
}

/** A parser for a whole number from min to max (default: the largest safe integer). */
export function wholeNumberIn(min: number, max = Number.MAX_SAFE_INTEGER): (text: string) => number {
  const range = max === Number.MAX_SAFE_INTEGER ? `of ${min} or more` : `from ${min} to ${max}`;
  return (text) => {
    const n = /^\d+$/.test(text) ? Number(text) : NaN;
    if (!(n >= min && n <= max)) throw new InvalidArgumentError(`expected a whole number ${range}`);
    return n;
  };
}
