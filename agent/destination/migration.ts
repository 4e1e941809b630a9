import type { LazyPagesDaemon } from '../../src/criu/index.js';
import type { Deferred } from '../../src/deferred.js';
import type { WireConnection, WorkloadSpec } from '../../src/wire/index.js';
import type { MovingAddress } from '../address-move.js';
import type { Placed } from '../carry.js';
import type { ImageReceiver } from '../images.js';
import type { PageListener } from '../page-stream.js';
import type { LocalMigration } from '../migrations.js';

/** A migration whose copy is being made (or runs) here. */
export interface DestinationMigration extends LocalMigration {
  readonly role: 'destination';
  readonly workload: WorkloadSpec | undefined;
  /** The workload's service address, which arrives with it (docs/network.md). */
  readonly address: MovingAddress | undefined;
  readonly receivers: Map<string, ImageReceiver>;
  /** CRIU's page servers for its rounds: each waits for one dump, and for ever if none comes. */
  readonly pageServers: { pid: number; start: number | undefined }[];
  /** Each round's page-flow count, ended (with its last count) when the round is known to be over. */
  readonly pageFlows: Map<string, () => void>;
  /** The rounds' page listeners (and their connections), ended with the migration. */
  readonly pageStreams: PageListener[];
  readonly sourceUrl: string;
  readonly holdMs: number;
  restore?: Promise<unknown> | undefined;
  /** What CRIU hears at post-restore: given by the hold's release. */
  readonly answer: Deferred<boolean>;
  /** The copy CRIU restored and holds before it runs. */
  restoredPid?: number | undefined;
  /** Where the restore's progress went (the controller's connection): the post-copy fetch's goes there too. */
  progressTo?: Pick<WireConnection, 'progress'> | undefined;
  /** The carried files put in place before the restore, taken back if it is discarded. */
  placed?: Placed | undefined;
  /** How long its restore took, to its hold, and the page images it read. */
  restoreMs?: number | undefined;
  restoredBytes?: number | undefined;
  /** Post-copy: the daemon fetching the memory from the source, and how it ended. */
  postcopy?: DestinationPostcopy | undefined;
}

export interface DestinationPostcopy {
  readonly daemon: LazyPagesDaemon;
  resumedAt?: number | undefined;
  result?: { ok: boolean; detail: string; ms: number; pages: number } | undefined;
}

export function isDestination(m: LocalMigration | undefined): m is DestinationMigration {
  return m?.role === 'destination';
}
