import type { MovingAddress } from '../address-move.js';
import type { AheadFile } from '../carry.js';
import type { LocalMigration } from '../migrations.js';

/** A migration whose process runs (or ran) here. */
export interface SourceMigration extends LocalMigration {
  readonly role: 'source';
  readonly pid: number;
  /** The workload record's name, when the process is one of this agent's workloads. */
  readonly workload: string | undefined;
  /** The final dump, once it began: it ends when CRIU has heard the hold's answer and acted on it. */
  dump?: Promise<unknown> | undefined;
  finalRound?: string | undefined;
  /** The workload's service address, which leaves with it (docs/network.md). */
  address?: MovingAddress | undefined;
  /** The final dump asked CRIU for its nftables lock: its table stays here after a commit. */
  criuLock?: boolean | undefined;
  /** When it last finished a step it was asked for (performance.now()): before the freeze, its only sign of life. */
  idleSince: number;
  /** The carried files copied to the destination ahead of the freeze, by path (agent/carry.ts). */
  ahead?: Map<string, AheadFile> | undefined;
  /** Post-copy: the destination whose word ends or continues the stopped source. */
  postcopy?: SourcePostcopy | undefined;
}

export interface SourcePostcopy {
  readonly destinationUrl: string;
  /** Where CRIU serves the memory, once it does. */
  port?: number | undefined;
  /** The end of the transfer and of the source copy, settled by the destination's word. */
  settled?: Promise<'yes' | 'no'> | undefined;
}

export function isSource(m: LocalMigration | undefined): m is SourceMigration {
  return m?.role === 'source';
}
