/**
 * A lab host as a test looks at it from outside, the way an operator
 * logged in to that machine would: its files, its processes (by the PIDs
 * its own /proc shows, which mean nothing on this machine), commands run
 * in it. The migration under test never uses any of this.
 */
import { execFile } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { enterHost, killInHost, onHost, type LabHost } from '../../controller/lab/index.js';
import { readCounterState, type CounterState } from '../../src/counter.js';

const execFileAsync = promisify(execFile);

export { onHost };

/** A workload's own directory on a host (its working directory, which moves with it), as the host names it. */
export function homeIn(h: LabHost, workload: string): string {
  return join(h.dataDir, 'workloads', workload);
}

/** A file in a workload's own directory on a host, as this machine reaches it. */
export function homeFile(h: LabHost, workload: string, name: string): string {
  return onHost(h, join(homeIn(h, workload), name));
}

/** The first number (or the field-th) of a file on a host. */
export function readNumberOn(h: LabHost, path: string, field = 0): number {
  return Number(readFileSync(onHost(h, path), 'utf8').trim().split(/\s+/)[field]);
}

/** The example counter's state in a workload's directory on a host, or undefined before it wrote one. */
export function counterOn(h: LabHost, workload: string, file = 'state'): CounterState | undefined {
  return readCounterState(homeFile(h, workload, file));
}

/** The process state letter (R, S, T, Z...) of a host's PID, or undefined when the host has no such process. */
export function stateOn(h: LabHost, pid: number): string | undefined {
  try {
    const stat = readFileSync(onHost(h, `/proc/${pid}/stat`), 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
  } catch {
    return undefined;
  }
}

/** The host runs a process with this PID (not a zombie). */
export function runsOn(h: LabHost, pid: number): boolean {
  const state = stateOn(h, pid);
  return state !== undefined && state !== 'Z' && state !== 'X';
}

/** nsenter's arguments that run a command in the host (for a process the test keeps). */
export function enterHostArgs(h: LabHost): string[] {
  return enterHost(h.init);
}

/** Runs a command in the host; resolves with its output, rejects when it fails. */
export async function inHost(h: LabHost, argv: readonly string[]): Promise<string> {
  const { stdout } = await execFileAsync('nsenter', [...enterHost(h.init), ...argv], { timeout: 30_000 });
  return stdout;
}

/** Kills a host's process by its PID there (SIGKILL unless told otherwise); quiet when it is gone. */
export function killOn(h: LabHost, pid: number, signal = 'KILL'): Promise<void> {
  return killInHost(h, pid, signal);
}

/** The host's processes other than its init, its agent and the agent's CRIU: the workloads and what they started. */
export function workloadPidsOn(h: LabHost): number[] {
  return readdirSync(onHost(h, '/proc'))
    .filter((e) => /^\d+$/.test(e))
    .map(Number)
    .filter((pid) => {
      if (pid === 1) return false;
      try {
        const exe = readlinkSync(onHost(h, `/proc/${pid}/exe`));
        if (exe.endsWith('/node') || exe.includes('ld-linux')) return false;
        const ppid = Number(/\nPPid:\s+(\d+)/.exec(readFileSync(onHost(h, `/proc/${pid}/status`), 'utf8'))?.[1]);
        // The init's own sleep: it waits in it between reaping.
        return !(ppid === 1 && exe.endsWith('/sleep'));
      } catch {
        return false;
      }
    });
}

/** The host's PID whose command line is exactly this, or undefined. */
export function pidOn(h: LabHost, argv: readonly string[]): number | undefined {
  const wanted = argv.join('\0') + '\0';
  for (const e of readdirSync(onHost(h, '/proc'))) {
    if (!/^\d+$/.test(e)) continue;
    try {
      if (readFileSync(onHost(h, `/proc/${e}/cmdline`), 'utf8') === wanted) return Number(e);
    } catch {
      // gone meanwhile
    }
  }
  return undefined;
}

/** The files a host's process holds open, for a failure message. */
export function fdsOn(h: LabHost, pid: number): string {
  try {
    const dir = onHost(h, `/proc/${pid}/fd`);
    return readdirSync(dir)
      .map((fd) => `${fd}->${readlinkSync(join(dir, fd))}`)
      .join(' ');
  } catch (error) {
    return (error as Error).message;
  }
}

/** Where a lab host's agent looks for the test's pause points (test/harness/hooks.ts): inside the host, its own. */
export const HOST_PAUSE_DIR = '/run/ferry-test-pause';

/** The environment that points a host's agent at its pause directory (labUp's agentEnv, restartAgent). */
export const hostPauseEnv = { FERRY_TEST_PAUSE_DIR: HOST_PAUSE_DIR };

/** A host's pause directory as this machine reaches it, made if missing. */
export function pauseDirOn(h: LabHost): string {
  const dir = onHost(h, HOST_PAUSE_DIR);
  mkdirSync(dir, { recursive: true });
  return dir;
}

/**
 * The host's PID running this command, or undefined: as pidOn, but its
 * program may have been found under another path (a shim such as pyenv's
 * python3 execs the real one by its full path), so argv[0] is compared by
 * its last component only.
 */
export function commandPidOn(h: LabHost, argv: readonly string[]): number | undefined {
  const name = (path: string): string => path.slice(path.lastIndexOf('/') + 1);
  for (const e of readdirSync(onHost(h, '/proc'))) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const words = readFileSync(onHost(h, `/proc/${e}/cmdline`), 'utf8')
        .split('\0')
        .slice(0, -1);
      if (
        words.length === argv.length &&
        name(words[0] ?? '') === name(argv[0] ?? '') &&
        words.every((w, i) => i === 0 || w === argv[i])
      )
        return Number(e);
    } catch {
      // gone meanwhile
    }
  }
  return undefined;
}
