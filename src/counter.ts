import { readFileSync } from 'node:fs';

/**
 * What the example counter (examples/counter.c) publishes in its state file:
 * "PID COUNT", with "corrupt" after them once its memory check failed.
 */
export interface CounterState {
  pid: number;
  count: number;
  corrupt: boolean;
}

/** The counter's state, or undefined before it wrote one. */
export function readCounterState(file: string): CounterState | undefined {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
  const match = /^(\d+) (\d+)( corrupt)?/.exec(text);
  if (match === null) return undefined;
  return { pid: Number(match[1]), count: Number(match[2]), corrupt: match[3] !== undefined };
}
