import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readCounterState } from '../../src/counter.js';
import { projectRoot } from '../../src/paths.js';
import { waitFor } from './wait.js';

export interface CounterReading {
  pid: number;
  count: number;
}

/**
 * The counter workload (examples/counter.c), started in its own session
 * with no terminal, as CRIU wants it. It publishes "PID COUNT" to a state file
 * every tick; the count lives only in its memory.
 */
export class Counter {
  readonly exited: Promise<void>;

  private constructor(
    readonly child: ChildProcess,
    readonly dir: string,
  ) {
    this.exited = new Promise((resolve) => child.once('exit', () => resolve()));
  }

  static async start(options: { tickMs?: number; memoryMb?: number; hotMb?: number } = {}): Promise<Counter> {
    const dir = mkdtempSync(join(tmpdir(), 'ferry-counter-'));
    const binary = join(projectRoot(), 'dist', 'examples', 'counter');
    const args = [
      join(dir, 'state'),
      String(options.tickMs ?? 20),
      String(options.memoryMb ?? 0),
      String(options.hotMb ?? 0),
    ];
    const child = spawn(binary, args, { detached: true, stdio: 'ignore' });
    const counter = new Counter(child, dir);
    await waitFor(() => (counter.read()?.count ?? 0) >= 2, { what: 'the counter to start counting' });
    return counter;
  }

  #owns(pid: number): boolean {
    try {
      return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(this.dir);
    } catch {
      return false;
    }
  }

  get pid(): number {
    const pid = this.child.pid;
    if (pid === undefined) throw new Error('counter has no PID');
    return pid;
  }

  get stateFile(): string {
    return join(this.dir, 'state');
  }

  read(): CounterReading | undefined {
    const state = readCounterState(this.stateFile);
    return state === undefined ? undefined : { pid: state.pid, count: state.count };
  }

  count(): number {
    const reading = this.read();
    if (reading === undefined) throw new Error(`no count in ${this.stateFile}`);
    return reading.count;
  }

  /**
   * Kills the process and removes its directory. Only a PID that still runs
   * this counter (its command line names this counter's directory) is
   * killed: by cleanup time the PID may belong to another test's process.
   */
  cleanup(extraPids: readonly number[] = []): void {
    for (const pid of [this.child.pid, ...extraPids]) {
      if (pid === undefined || !this.#owns(pid)) continue;
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export { isAlive as isRunning, processState } from '../../src/proc.js';
