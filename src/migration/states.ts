/**
 * The states of a migration on each agent and the moves between them,
 * declared once. Agents journal every state before acting on it
 * (agent/journal.ts) and every journal write goes through advance(), so a
 * move that is not in this table is refused before it reaches the disk.
 * docs/migration.md draws the same table; a unit test keeps the two equal.
 * No I/O here.
 *
 * The switchover's invariant, in this table's terms: the source's process
 * ends only through `committing`, written before CRIU hears "yes"; the
 * destination's copy runs only through `resuming`, which follows a commit.
 * Nothing leaves a final state.
 */
import { FerryError } from '../errors.js';

export type Role = 'source' | 'destination';
export type SourceState = 'dumping' | 'held' | 'committing' | 'committed' | 'aborted';
export type DestinationState = 'prepared' | 'restored' | 'resuming' | 'resumed' | 'discarded';
export type MigrationState = SourceState | DestinationState;

/**
 * Where a move may happen beyond the normal run of a migration: `recovery`
 * (an agent settling what a crash left, from the process's existence and
 * the source's word) and `postcopy` (the destination runs before every page
 * has arrived, so a commit can still end without a copy there).
 */
export type Circumstance = 'recovery' | 'postcopy';

export interface Transition<S extends MigrationState = MigrationState> {
  from: S;
  to: S;
  /** What makes it happen. */
  on: string;
  /** Only in these circumstances; absent: always. */
  only?: readonly Circumstance[];
}

export const INITIAL: { readonly source: SourceState; readonly destination: DestinationState } = {
  source: 'dumping',
  destination: 'prepared',
};

export const FINAL_STATES: ReadonlySet<MigrationState> = new Set<MigrationState>([
  'committed',
  'aborted',
  'resumed',
  'discarded',
]);

export const SOURCE_TRANSITIONS: readonly Transition<SourceState>[] = [
  { from: 'dumping', to: 'held', on: 'frozen, images streamed, CRIU waits for the answer' },
  { from: 'dumping', to: 'aborted', on: 'the dump failed or was cancelled; CRIU thawed the process' },
  { from: 'held', to: 'committing', on: 'commit: journalled before CRIU hears "yes"' },
  { from: 'held', to: 'aborted', on: 'abort, lease end or lost controller: CRIU hears "no" and thaws the process' },
  { from: 'committing', to: 'committed', on: 'CRIU ended the source copy' },
  {
    from: 'committing',
    to: 'aborted',
    on: 'the crash came before CRIU heard "yes": it thawed the process',
    only: ['recovery'],
  },
  {
    from: 'committing',
    to: 'aborted',
    on: 'the destination lost its copy before every page arrived: the source continues',
    only: ['postcopy'],
  },
];

export const DESTINATION_TRANSITIONS: readonly Transition<DestinationState>[] = [
  { from: 'prepared', to: 'restored', on: 'CRIU restored the copy and holds it before it runs' },
  { from: 'prepared', to: 'discarded', on: 'abort, or the restore failed' },
  { from: 'restored', to: 'resuming', on: 'resume after the commit: journalled before CRIU hears "yes"' },
  { from: 'restored', to: 'discarded', on: 'abort, or the source says it rolled back' },
  {
    from: 'restored',
    to: 'resumed',
    on: 'the source committed; restored again from the kept images',
    only: ['recovery'],
  },
  { from: 'resuming', to: 'resumed', on: 'the copy runs (post-copy: with every page)' },
  { from: 'resuming', to: 'discarded', on: 'the memory fetch failed: the copy was killed', only: ['postcopy'] },
  { from: 'resuming', to: 'discarded', on: 'the source says it rolled back', only: ['recovery'] },
];

export function transitionsOf(role: Role): readonly Transition[] {
  return role === 'source' ? SOURCE_TRANSITIONS : DESTINATION_TRANSITIONS;
}

export function isFinalState(state: string | null | undefined): boolean {
  return FINAL_STATES.has(state as MigrationState);
}

/** A move the table does not allow: a bug, refused before anything acts on it. */
export class IllegalTransitionError extends FerryError {
  readonly code = 'ILLEGAL_TRANSITION';
  constructor(
    readonly migrationId: string,
    readonly role: Role,
    readonly from: MigrationState | undefined,
    readonly to: MigrationState,
  ) {
    super(
      from === undefined
        ? `migration ${migrationId} cannot begin as ${to} on the ${role}`
        : `migration ${migrationId} cannot move from ${from} to ${to} on the ${role}`,
    );
  }
}

/**
 * Checks one move of a migration: `from` undefined begins it. Staying in a
 * state is always allowed (a record gains a PID or a note; a rollback
 * reached by two paths records it twice); nothing leaves a final state.
 * Returns the transition taken, or undefined for a stay.
 */
export function checkTransition(
  id: string,
  role: Role,
  from: MigrationState | undefined,
  to: MigrationState,
  circumstances: readonly Circumstance[] = [],
): Transition | undefined {
  if (from === undefined) {
    if (to !== INITIAL[role]) throw new IllegalTransitionError(id, role, from, to);
    return undefined;
  }
  if (from === to) return undefined;
  if (FINAL_STATES.has(from)) throw new IllegalTransitionError(id, role, from, to);
  const found = transitionsOf(role).find(
    (t) => t.from === from && t.to === to && (t.only === undefined || t.only.some((c) => circumstances.includes(c))),
  );
  if (found === undefined) throw new IllegalTransitionError(id, role, from, to);
  return found;
}
