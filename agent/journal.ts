import {
  closeSync,
  existsSync,
  fsyncSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import {
  checkTransition,
  isFinalState,
  type Circumstance,
  type MigrationState,
  type Role,
} from '../src/migration/index.js';
import { startTime } from '../src/proc.js';
import type { WorkloadSpec } from '../src/wire/index.js';

/**
 * Where a migration stands on one agent. The source's record is the
 * authority on the outcome: "committing" is written (and synced) before
 * CRIU is told to end the source copy, so a crash at any point leaves a
 * record that, with the process's existence, says what happened. The
 * states and their moves are src/migration's table.
 */
export interface JournalEntry {
  id: string;
  role: Role;
  state: MigrationState;
  /** A post-copy migration: its commit can still end without a copy on the destination. */
  postcopy?: boolean | undefined;
  /** The process: on the source, the one being moved; on the destination, the restored copy. */
  pid?: number | undefined;
  /** Its start time (/proc/PID/stat field 22), so a reused PID is never taken for it. */
  pidStart?: number | undefined;
  /** The images of the migration on this agent. */
  dir: string;
  /** The other agent: on the destination, the source to ask for the outcome. */
  peerUrl: string;
  workload?: WorkloadSpec | undefined;
  /**
   * The interface the workload's service address was on when this agent let
   * it go (source) or took it (destination): recovery puts it back, or takes
   * it away, with the copy that runs or not.
   */
  addressDevice?: string | undefined;
  /** What recovery did, once it did something. */
  action?: string | undefined;
  updatedAtMs: number;
}

export function isFinal(entry: JournalEntry): boolean {
  return isFinalState(entry.state);
}

/** Fields a move may change besides the state. */
export type EntryChange = Partial<Pick<JournalEntry, 'pid' | 'pidStart' | 'action' | 'workload' | 'addressDevice'>>;

/** One file per migration in DATA/journal, replaced atomically and synced to disk before anyone acts on it. */
export class Journal {
  readonly #dir: string;
  readonly #onFinal: ((entry: JournalEntry) => void) | undefined;

  /** onFinal hears each migration once, when it reaches its final state (metrics count outcomes there). */
  constructor(dataDir: string, onFinal?: (entry: JournalEntry) => void) {
    this.#dir = join(dataDir, 'journal');
    this.#onFinal = onFinal;
    mkdirSync(this.#dir, { recursive: true, mode: 0o700 });
  }

  /** The first record of a migration, in its role's initial state. */
  begin(entry: Omit<JournalEntry, 'updatedAtMs'>): JournalEntry {
    checkTransition(entry.id, entry.role, undefined, entry.state);
    return this.#write(entry);
  }

  /**
   * Moves a migration to `state` (or, to the same state, records the
   * change), refusing any move src/migration's table does not allow:
   * every write after begin() comes through here. Recovery says so in
   * `circumstances`; post-copy entries carry theirs. Undefined when there
   * is no record of the migration.
   */
  advance(
    id: string,
    state: MigrationState,
    change: EntryChange = {},
    circumstances: readonly Circumstance[] = [],
  ): JournalEntry | undefined {
    const entry = this.read(id);
    return entry === undefined ? undefined : this.#move(entry, state, change, circumstances);
  }

  /** Records a change without a move (a decision taken, a PID learnt); undefined when there is no record. */
  note(id: string, change: EntryChange): JournalEntry | undefined {
    const entry = this.read(id);
    return entry === undefined ? undefined : this.#move(entry, entry.state, change, []);
  }

  #move(
    entry: JournalEntry,
    state: MigrationState,
    change: EntryChange,
    circumstances: readonly Circumstance[],
  ): JournalEntry {
    const all: Circumstance[] = entry.postcopy === true ? [...circumstances, 'postcopy'] : [...circumstances];
    checkTransition(entry.id, entry.role, entry.state, state, all);
    return this.#write({ ...entry, ...change, state });
  }

  #write(entry: Omit<JournalEntry, 'updatedAtMs'>): JournalEntry {
    const full: JournalEntry = { ...entry, updatedAtMs: Date.now() };
    const before = this.#onFinal === undefined ? undefined : this.read(entry.id);
    const file = join(this.#dir, `${entry.id}.json`);
    const tmp = `${file}.tmp`;
    const fd = openSync(tmp, 'w', 0o600);
    try {
      writeSync(fd, JSON.stringify(full, null, 2) + '\n');
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, file);
    const dirFd = openSync(this.#dir, 'r');
    try {
      fsyncSync(dirFd);
    } finally {
      closeSync(dirFd);
    }
    if (isFinal(full) && (before === undefined || !isFinal(before))) this.#onFinal?.(full);
    return full;
  }

  read(id: string): JournalEntry | undefined {
    const file = join(this.#dir, `${id}.json`);
    if (!existsSync(file)) return undefined;
    return JSON.parse(readFileSync(file, 'utf8')) as JournalEntry;
  }

  list(): JournalEntry[] {
    return readdirSync(this.#dir)
      .filter((name) => name.endsWith('.json'))
      .map((name) => JSON.parse(readFileSync(join(this.#dir, name), 'utf8')) as JournalEntry)
      .sort((x, y) => x.updatedAtMs - y.updatedAtMs);
  }
}

/** The PID of whoever ptraces the process (CRIU, while it holds it), or 0. */
export function tracerOf(pid: number): number {
  try {
    const line = readFileSync(`/proc/${pid}/status`, 'utf8')
      .split('\n')
      .find((l) => l.startsWith('TracerPid:'));
    return Number(line?.split(/\s+/)[1] ?? 0);
  } catch {
    return 0;
  }
}

/** The same process as recorded: same PID, same start time. */
export function sameProcess(pid: number | undefined, start: number | undefined): boolean {
  return pid !== undefined && start !== undefined && startTime(pid) === start;
}
