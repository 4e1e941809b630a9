import { createHash } from 'node:crypto';
import { closeSync, constants, fstatSync, openSync, readdirSync, readSync, writeSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { FerryError } from '../src/errors.js';
import { formatBytes } from '../src/units.js';
import {
  IMAGE_CHUNK_BYTES,
  IMAGE_NAME,
  MAX_IMAGE_FILES,
  type ImageFile,
  type WireConnection,
} from '../src/wire/index.js';
import { freeBytes } from './process.js';

export class ImageTransferError extends FerryError {
  readonly code = 'IMAGE_TRANSFER';
}

/**
 * The images a restore needs that the page server did not already receive:
 * everything the dump wrote on the source except page data (sent through the
 * page server), logs and statistics.
 */
export function imagesToStream(dir: string, options: { pages?: boolean } = {}): string[] {
  return readdirSync(dir)
    .filter((name) => name.endsWith('.img') && (options.pages === true || !/^pages-\d+\.img$/.test(name)))
    .sort();
}

export interface StreamResult {
  files: number;
  bytes: number;
}

/** Sends the named files of `dir` to the destination agent, chunk by chunk, then their checksums. */
export async function streamImages(
  peer: Pick<WireConnection, 'call'>,
  target: { migrationId: string; round: string },
  dir: string,
  names: readonly string[],
  signal?: AbortSignal,
): Promise<StreamResult> {
  const manifest: ImageFile[] = [];
  let bytes = 0;
  for (const name of names) {
    const hash = createHash('sha256');
    const handle = await open(join(dir, name), 'r');
    try {
      const { size } = await handle.stat();
      let offset = 0;
      do {
        const chunk = Buffer.alloc(Math.min(IMAGE_CHUNK_BYTES, size - offset));
        const { bytesRead } = await handle.read(chunk, 0, chunk.length, offset);
        const data = chunk.subarray(0, bytesRead);
        hash.update(data);
        await peer.call('imageChunk', { ...target, name, offset, data }, { signal, timeoutMs: 30_000 });
        offset += bytesRead;
      } while (offset < size);
      manifest.push({ name, size, sha256: hash.digest('hex') });
      bytes += size;
    } finally {
      await handle.close();
    }
  }
  await peer.call('imagesDone', { ...target, files: manifest }, { signal, timeoutMs: 30_000 });
  return { files: manifest.length, bytes };
}

/** What one round's image stream may hold on a destination. */
export interface ImageStreamLimits {
  /** Files in the stream. */
  maxFiles: number;
  /** Bytes of all its files together. */
  maxBytes: number;
  /** Free space a chunk must leave in the images file system. */
  reserveBytes: number;
}

/**
 * The images besides page data are small (a process's core, mappings, file
 * descriptors: kilobytes to a few MiB; CRIU keeps ghost files under 1 MiB),
 * plus the workload's log. The images live in tmpfs, which is memory: a
 * stream that a peer never ends must not be able to take it all.
 */
export const IMAGE_STREAM_LIMITS: ImageStreamLimits = {
  maxFiles: MAX_IMAGE_FILES,
  maxBytes: 1024 * 1024 * 1024,
  reserveBytes: 64 * 1024 * 1024,
};

/**
 * Writes received chunks into one round's directory. Names are plain file
 * names (validated on the wire and again here); files are created, never
 * overwritten, and never followed through a symlink; chunks must arrive in
 * order; the stream is bounded (IMAGE_STREAM_LIMITS).
 */
export class ImageReceiver {
  readonly #sizes = new Map<string, number>();
  #bytes = 0;

  constructor(
    readonly dir: string,
    readonly limits: ImageStreamLimits = IMAGE_STREAM_LIMITS,
  ) {}

  write(name: string, offset: number, data: Uint8Array): void {
    if (!IMAGE_NAME.test(name)) throw new ImageTransferError(`refused image name ${JSON.stringify(name)}`);
    const expected = this.#sizes.get(name);
    if (offset !== (expected ?? 0)) {
      throw new ImageTransferError(`${name}: chunk at offset ${offset}, expected ${expected ?? 0}`);
    }
    if (expected === undefined && this.#sizes.size >= this.limits.maxFiles) {
      throw new ImageTransferError(`more than ${this.limits.maxFiles} image files in one stream`);
    }
    if (this.#bytes + data.length > this.limits.maxBytes) {
      throw new ImageTransferError(`the image stream exceeds ${formatBytes(this.limits.maxBytes)}`);
    }
    if (data.length > 0 && freeBytes(this.dir) - data.length < this.limits.reserveBytes) {
      throw new ImageTransferError(
        `${name}: the images file system would have less than ${formatBytes(this.limits.reserveBytes)} free`,
      );
    }
    const flags =
      offset === 0
        ? constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW
        : constants.O_WRONLY | constants.O_APPEND | constants.O_NOFOLLOW;
    let fd: number;
    try {
      fd = openSync(join(this.dir, name), flags, 0o600);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === 'EEXIST' || code === 'ELOOP') {
        throw new ImageTransferError(`${name} already exists in the round's directory`, { cause: error });
      }
      throw error;
    }
    try {
      if (!fstatSync(fd).isFile()) throw new ImageTransferError(`${name} is not a regular file`);
      writeSync(fd, data);
    } finally {
      closeSync(fd);
    }
    this.#sizes.set(name, offset + data.length);
    this.#bytes += data.length;
  }

  /** Checks every announced file's size and checksum; throws on the first mismatch. */
  verify(files: readonly ImageFile[]): { files: number; bytes: number } {
    let bytes = 0;
    for (const f of files) {
      const name = f.name ?? '';
      const size = Number(f.size ?? 0);
      const got = this.#sizes.get(name) ?? (size === 0 ? 0 : -1);
      if (got !== size) throw new ImageTransferError(`${name}: received ${got} bytes, expected ${size}`);
      if (size === 0 && !this.#sizes.has(name)) this.write(name, 0, new Uint8Array(0));
      if (sha256Of(join(this.dir, name)) !== f.sha256) throw new ImageTransferError(`${name}: checksum mismatch`);
      bytes += size;
    }
    return { files: files.length, bytes };
  }
}

/** Read in chunks: an image may be larger than is reasonable to hold in memory at once. */
export function sha256Of(file: string): string {
  const hash = createHash('sha256');
  const fd = openSync(file, constants.O_RDONLY | constants.O_NOFOLLOW);
  try {
    const buffer = Buffer.alloc(IMAGE_CHUNK_BYTES);
    for (;;) {
      const n = readSync(fd, buffer, 0, buffer.length, null);
      if (n === 0) break;
      hash.update(buffer.subarray(0, n));
    }
  } finally {
    closeSync(fd);
  }
  return hash.digest('hex');
}
