import { resolve } from 'node:path';
import { InvalidArgumentError } from 'commander';
import { InvalidInputError } from '../../src/errors.js';
import { isIP } from 'node:net';
import { parseBytes } from '../../src/units.js';
import { HOLD_MS, LABEL_KEY, MAX_PID, PEER_NAME, WORKLOAD_NAME } from '../../src/wire/index.js';
import { LAB_NAME } from '../lab/index.js';

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

/** A repeatable option's values, in the order given. */
export const collect = (value: string, previous: string[] = []): string[] => [...previous, value];

/** A whole number, any size JavaScript holds exactly. */
export function wholeNumber(value: string): number {
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(Number(value)))
    throw new InvalidArgumentError('expected a whole number');
  return Number(value);
}

/** A size above zero: 512M, 2G, 1.5GiB or bytes. */
export function byteSize(value: string): number {
  const bytes = parseBytes(value);
  if (bytes === undefined || bytes <= 0) throw new InvalidArgumentError('expected a size: 512M, 2G, 1.5GiB or bytes');
  return bytes;
}

/** --label KEY=VALUE, repeatable: each adds to the labels before it. */
export function label(value: string, previous: Record<string, string> = {}): Record<string, string> {
  const [key = '', ...rest] = value.split('=');
  if (!LABEL_KEY.test(key) || rest.length === 0)
    throw new InvalidArgumentError('expected KEY=VALUE (keys: lower-case letters, digits, . _ / -)');
  return { ...previous, [key]: rest.join('=') };
}

/** A number above 0, decimals allowed. */
export function positiveNumber(value: string): number {
  if (!/^\d+(\.\d+)?$/.test(value) || !(Number(value) > 0 && Number.isFinite(Number(value))))
    throw new InvalidArgumentError('expected a number above 0');
  return Number(value);
}

/** HOST:PORT with a numeric IP ([v6]:PORT for IPv6). */
export function hostPort(value: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(value);
  const host = match?.[1] ?? match?.[2];
  const port = Number(match?.[3]);
  if (host === undefined || !(port >= 0 && port <= 65535)) throw new InvalidArgumentError('expected HOST:PORT');
  if (isIP(host) === 0)
    throw new InvalidArgumentError('HOST must be a numeric IP address (CRIU page servers need one)');
  return { host, port };
}

/** A lab's name: it prefixes its namespaces and interfaces. */
export function labName(value: string): string {
  if (!LAB_NAME.test(value))
    throw new InvalidArgumentError('1 to 10 lower-case letters and digits, starting with a letter');
  return value;
}
