import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CriuProtocolError } from './errors.js';
import protobuf from 'protobufjs/minimal.js';
import { StatsEntry } from './rpc.js';

/** CRIU's image magics: every image starts with the "IMG_SERVICE" magic, then the file's own. */
const IMG_SERVICE_MAGIC = 0x55105940;
const STATS_MAGIC = 0x57093306;
/** The inventory has no common magic in front of its own. */
const INVENTORY_MAGIC = 0x58313116;
/** inventory_entry's dump_criu_run_id (images/inventory.proto). */
const INVENTORY_RUN_ID_FIELD = 13;

/** What CRIU measured during a dump or pre-dump (stats-dump). Times in microseconds. */
export interface DumpStats {
  freezingTimeUs: number;
  frozenTimeUs: number;
  memdumpTimeUs: number;
  memwriteTimeUs: number;
  pagesScanned: number;
  pagesSkippedParent: number;
  pagesWritten: number;
  pagesLazy: number;
}

/** What CRIU measured during a restore (stats-restore). Times in microseconds. */
export interface RestoreStats {
  pagesCompared: number;
  pagesSkippedCow: number;
  forkingTimeUs: number;
  restoreTimeUs: number;
  pagesRestored: number;
}

export async function readDumpStats(imagesDir: string): Promise<DumpStats> {
  const entry = await readStatsFile(join(imagesDir, 'stats-dump'));
  const d = entry.dump;
  if (d === null || d === undefined) throw new CriuProtocolError('stats-dump holds no dump statistics', 'stats');
  return {
    freezingTimeUs: d.freezingTime ?? 0,
    frozenTimeUs: d.frozenTime ?? 0,
    memdumpTimeUs: d.memdumpTime ?? 0,
    memwriteTimeUs: d.memwriteTime ?? 0,
    pagesScanned: Number(d.pagesScanned ?? 0),
    pagesSkippedParent: Number(d.pagesSkippedParent ?? 0),
    pagesWritten: Number(d.pagesWritten ?? 0),
    pagesLazy: Number(d.pagesLazy ?? 0),
  };
}

export async function readRestoreStats(imagesDir: string): Promise<RestoreStats> {
  const entry = await readStatsFile(join(imagesDir, 'stats-restore'));
  const r = entry.restore;
  if (r === null || r === undefined) throw new CriuProtocolError('stats-restore holds no restore statistics', 'stats');
  return {
    pagesCompared: Number(r.pagesCompared ?? 0),
    pagesSkippedCow: Number(r.pagesSkippedCow ?? 0),
    forkingTimeUs: r.forkingTime ?? 0,
    restoreTimeUs: r.restoreTime ?? 0,
    pagesRestored: Number(r.pagesRestored ?? 0),
  };
}

/** Decodes a stats file's bytes: two magics, a u32 length, one stats_entry. */
export function decodeStats(bytes: Uint8Array, file = 'stats file'): InstanceType<typeof StatsEntry> {
  if (bytes.length < 12) throw new CriuProtocolError(`${file} is too short (${bytes.length} bytes)`, 'stats');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const magic0 = view.getUint32(0, true);
  const magic1 = view.getUint32(4, true);
  if (magic0 !== IMG_SERVICE_MAGIC || magic1 !== STATS_MAGIC) {
    throw new CriuProtocolError(`${file} is not a CRIU stats image (magic ${hex(magic0)} ${hex(magic1)})`, 'stats');
  }
  const length = view.getUint32(8, true);
  if (12 + length > bytes.length) {
    throw new CriuProtocolError(
      `${file} is truncated (entry of ${length} bytes, ${bytes.length - 12} present)`,
      'stats',
    );
  }
  try {
    return StatsEntry.decode(bytes.subarray(12, 12 + length));
  } catch (cause) {
    throw new CriuProtocolError(`${file} does not decode: ${(cause as Error).message}`, 'stats', { cause });
  }
}

/**
 * The run id of the dump whose images these are (inventory.img's
 * dump_criu_run_id). CRIU names its nftables lock table after it
 * (`inet CRIU-<run id>`); undefined when the inventory has none.
 */
export async function readDumpRunId(imagesDir: string): Promise<string | undefined> {
  const file = join(imagesDir, 'inventory.img');
  const bytes = await readFile(file);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.length < 8 || view.getUint32(0, true) !== INVENTORY_MAGIC) {
    throw new CriuProtocolError(`${file} is not a CRIU inventory image`, 'inventory');
  }
  const length = view.getUint32(4, true);
  const reader = protobuf.Reader.create(bytes.subarray(8, Math.min(bytes.length, 8 + length)));
  while (reader.pos < reader.len) {
    const tag = reader.uint32();
    if (tag >>> 3 === INVENTORY_RUN_ID_FIELD && (tag & 7) === 2) return reader.string();
    reader.skipType(tag & 7);
  }
  return undefined;
}

async function readStatsFile(file: string): Promise<InstanceType<typeof StatsEntry>> {
  return decodeStats(await readFile(file), file);
}

function hex(n: number): string {
  return '0x' + n.toString(16).padStart(8, '0');
}
