import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { FerryError, InvalidInputError } from '../src/errors.js';
import { isAlive } from '../src/proc.js';
import { workloadHome } from './carry.js';
import { processFacts } from './process.js';
import type { WorkloadInfo, WorkloadSpec } from '../src/wire/index.js';

export interface WorkloadRecord {
  name: string;
  /** PID (in the agent's PID namespace) of the workload's root: the init of its own PID namespace. */
  pid: number;
  argv: string[];
  logFile: string;
  startedAtMs: number;
  labels?: Record<string, string>;
  /** Never moved by rebalancing (an explicit `ferry migrate` still may). */
  pinned?: boolean;
  /** The service address it owns (IP/PREFIX), on this node while it runs here; it moves with it. */
  address?: string;
  /** Run at the address step of a migration (docs/network.md). */
  addressHook?: string;
  /** Paths it carries when it moves, besides its home and log (docs/files.md). */
  carry?: string[];
  /** Paths on storage every node sees: checked, never copied. */
  shared?: string[];
}

export class WorkloadError extends FerryError {
  readonly code = 'WORKLOAD';
}

/**
 * Migratable workloads: commands started in their own PID namespace (so
 * their PIDs never collide where they are restored), in their own session,
 * detached, in their own directory (DATA/workloads/NAME), with output to a
 * log file beside it. Recorded in DATA/workloads.json.
 */
export class Workloads {
  readonly #file: string;
  readonly #logDir: string;

  constructor(
    readonly dataDir: string,
    readonly agentName: string,
  ) {
    this.#file = join(dataDir, 'workloads.json');
    this.#logDir = join(dataDir, 'workloads');
    mkdirSync(this.#logDir, { recursive: true });
  }

  async run(
    name: string,
    argv: readonly string[],
    placement: Pick<WorkloadRecord, 'labels' | 'pinned' | 'address' | 'addressHook' | 'carry' | 'shared'> = {},
  ): Promise<WorkloadRecord> {
    const existing = this.#load().find((w) => w.name === name);
    if (existing !== undefined && isAlive(existing.pid)) {
      throw new InvalidInputError(`a workload named ${name} already runs here (PID ${existing.pid})`, {
        hint: 'pick another --name',
      });
    }
    const logFile = join(this.#logDir, `${name}.log`);
    closeSync(openSync(logFile, 'a'));
    // Its own directory, where it starts: carried whole when it moves.
    const home = workloadHome(this.dataDir, name);
    mkdirSync(home, { recursive: true });
    // unshare forks the namespace's init, which setsid makes a session leader
    // without a terminal: what CRIU needs to dump the tree on its own. The
    // shell only redirects the command's output to the log and execs it, so
    // that unshare's own complaints (it reports its child's death) stay out.
    const launcher = spawn(
      'unshare',
      ['--pid', '--fork', '--', 'setsid', '--', '/bin/sh', '-c', 'exec "$@" >>"$0" 2>&1 </dev/null', logFile, ...argv],
      { detached: true, stdio: 'ignore', cwd: home },
    );
    launcher.unref();
    const launcherPid = launcher.pid;
    if (launcherPid === undefined) throw new WorkloadError(`cannot start unshare for ${argv[0]}`);
    const exited = new Promise<number | null>((resolve) => launcher.once('exit', (code) => resolve(code)));
    launcher.once('error', () => undefined);
    const pid = await namespaceInit(launcherPid, argv, exited);
    if (pid === undefined) {
      const tail = existsSync(logFile) ? readFileSync(logFile, 'utf8').slice(-400).trim() : '';
      throw new WorkloadError(`${argv.join(' ')} exited at once${tail === '' ? '' : `: ${tail}`}`, {
        hint: 'check the command; its output is in ' + logFile,
      });
    }
    const record: WorkloadRecord = {
      name,
      pid,
      argv: [...argv],
      logFile,
      startedAtMs: Date.now(),
      labels: { ...placement.labels },
      pinned: placement.pinned === true,
      ...(placement.address ? { address: placement.address } : {}),
      ...(placement.addressHook ? { addressHook: placement.addressHook } : {}),
      ...(placement.carry?.length ? { carry: [...placement.carry] } : {}),
      ...(placement.shared?.length ? { shared: [...placement.shared] } : {}),
    };
    this.#save([...this.#load().filter((w) => w.name !== name), record]);
    return record;
  }

  list(): WorkloadInfo[] {
    return this.#load().map((w) => ({
      name: w.name,
      pid: w.pid,
      argv: w.argv,
      logFile: w.logFile,
      startedAtMs: w.startedAtMs,
      state: isAlive(w.pid) ? 'running' : 'exited',
      agent: this.agentName,
      labels: w.labels ?? {},
      pinned: w.pinned === true,
      address: w.address ?? '',
      residentBytes: isAlive(w.pid) ? Number(processFacts(w.pid).residentBytes ?? 0) : 0,
    }));
  }

  find(name: string): WorkloadRecord | undefined {
    return this.#load().find((w) => w.name === name);
  }

  findByPid(pid: number): WorkloadRecord | undefined {
    return this.#load().find((w) => w.pid === pid);
  }

  /** A workload that arrived by migration. */
  adopt(spec: WorkloadSpec, pid: number): void {
    const record: WorkloadRecord = {
      name: spec.name ?? `pid-${pid}`,
      pid,
      argv: spec.argv ?? [],
      logFile: spec.logFile ?? '',
      startedAtMs: Number(spec.startedAtMs ?? Date.now()),
      labels: { ...spec.labels },
      pinned: spec.pinned === true,
      ...(spec.address ? { address: spec.address } : {}),
      ...(spec.addressHook ? { addressHook: spec.addressHook } : {}),
      ...(spec.carry?.length ? { carry: [...spec.carry] } : {}),
      ...(spec.shared?.length ? { shared: [...spec.shared] } : {}),
    };
    this.#save([...this.#load().filter((w) => w.name !== record.name), record]);
  }

  /**
   * A workload that left by migration: its record, and its directory and log, which went with it
   * (kept with `files: false`: a copy that died here leaves them for whoever looks into why).
   */
  forget(name: string, options: { files?: boolean } = {}): void {
    const record = this.find(name);
    this.#save(this.#load().filter((w) => w.name !== name));
    if (options.files === false) return;
    rmSync(workloadHome(this.dataDir, name), { recursive: true, force: true });
    if (record !== undefined && dirname(record.logFile) === this.#logDir) rmSync(record.logFile, { force: true });
  }

  #load(): WorkloadRecord[] {
    if (!existsSync(this.#file)) return [];
    return JSON.parse(readFileSync(this.#file, 'utf8')) as WorkloadRecord[];
  }

  #save(records: WorkloadRecord[]): void {
    const tmp = `${this.#file}.tmp`;
    writeFileSync(tmp, JSON.stringify(records, null, 2) + '\n');
    renameSync(tmp, this.#file);
  }
}

/** The child unshare forked: the init of the new PID namespace. */
async function namespaceInit(
  launcherPid: number,
  argv: readonly string[],
  exited: Promise<number | null>,
): Promise<number | undefined> {
  let gone = false;
  void exited.then(() => (gone = true));
  let init: number | undefined;
  // The init's PID does not change when it execs the command, but waiting
  // for the exec (up to 2 s: wrappers such as version-manager shims exec
  // more than once) means an early dump sees the command, not the shell.
  for (let i = 0; i < 400 && !gone; i++) {
    try {
      const first = readFileSync(`/proc/${launcherPid}/task/${launcherPid}/children`, 'utf8').trim().split(/\s+/)[0];
      if (first !== undefined && first !== '') init = Number(first);
    } catch {
      // not there yet, or already gone
    }
    if (init !== undefined && (runsCommand(init, argv) || i >= 400 - 1)) return isAlive(init) ? init : undefined;
    await sleep(5);
  }
  return gone || init === undefined || !isAlive(init) ? undefined : init;
}

/** The process runs the command: same arguments, and the same program name (a wrapper may give its full path). */
function runsCommand(pid: number, argv: readonly string[]): boolean {
  try {
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').slice(0, -1);
    const base = (s: string | undefined): string => (s ?? '').split('/').at(-1) ?? '';
    return (
      cmdline.length === argv.length &&
      base(cmdline[0]) === base(argv[0]) &&
      cmdline.slice(1).every((arg, i) => arg === argv[i + 1])
    );
  } catch {
    return false;
  }
}
