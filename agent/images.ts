import { createHash } from 'node:crypto';
import { closeSync, constants, fstatSync, openSync, readdirSync, readFileSync, writeSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { FerryError } from '../src/errors.js';
import { IMAGE_CHUNK_BYTES, IMAGE_NAME, type ImageFile, type WireConnection } from '../src/wire/index.js';

export class ImageTransferError extends FerryError {
  readonly code = 'IMAGE_TRANSFER';
}

/**
 * The images a restore needs that the page server did not already receive:
 * everything the dump wrote on the source except page data (sent through the
 * page server), logs and statistics.
 */
export function imagesToStream(dir: string): string[] {
  return readdirSync(dir)
    .filter((name) => name.endsWith('.img') && !/^pages-\d+\.img$/.test(name))
    .sort();
}

export interface StreamResult {
  files: number;
  bytes: number;
}

/** Sends the named files of `dir` to the destination agent, chunk by chunk, then their checksums. */
export async function streamImages(
  peer: WireConnection,
  target: { migrationId: string; round: string },
  dir: string,
  names: readonly string[],
  options: {
    signal?: AbortSignal | undefined;
    /** When the process froze (performance.now()): the destination measures the downtime on from it. */
    frozenSince?: number | undefined;
  } = {},
): Promise<StreamResult> {
  const { signal } = options;
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
        await peer.request({ imageChunk: { ...target, name, offset, data } }, 'ack', { signal, timeoutMs: 30_000 });
        offset += bytesRead;
      } while (offset < size);
      manifest.push({ name, size, sha256: hash.digest('hex') });
      bytes += size;
    } finally {
      await handle.close();
    }
  }
  const frozenMs = options.frozenSince === undefined ? 0 : Math.round(performance.now() - options.frozenSince);
  await peer.request({ imagesDone: { ...target, files: manifest, frozenMs } }, 'ack', { signal, timeoutMs: 30_000 });
  return { files: manifest.length, bytes };
}

/**
 * Writes received chunks into one round's directory. Names are plain file
 * names (validated on the wire and again here); files are created, never
 * overwritten, and never followed through a symlink; chunks must arrive in
 * order.
 */
export class ImageReceiver {
  readonly #sizes = new Map<string, number>();

  constructor(readonly dir: string) {}

  write(name: string, offset: number, data: Uint8Array): void {
    if (!IMAGE_NAME.test(name)) throw new ImageTransferError(`refused image name ${JSON.stringify(name)}`);
    const expected = this.#sizes.get(name) ?? 0;
    if (offset !== expected) {
      throw new ImageTransferError(`${name}: chunk at offset ${offset}, expected ${expected}`);
    }
    const flags =
      offset === 0
        ? constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW
        : constants.O_WRONLY | constants.O_APPEND | constants.O_NOFOLLOW;
    const fd = openSync(join(this.dir, name), flags, 0o600);
    try {
      if (!fstatSync(fd).isFile()) throw new ImageTransferError(`${name} is not a regular file`);
      writeSync(fd, data);
    } finally {
      closeSync(fd);
    }
    this.#sizes.set(name, offset + data.length);
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
      const digest = createHash('sha256')
        .update(readFileSync(join(this.dir, name)))
        .digest('hex');
      if (digest !== f.sha256) throw new ImageTransferError(`${name}: checksum mismatch`);
      bytes += size;
    }
    return { files: files.length, bytes };
  }
}
