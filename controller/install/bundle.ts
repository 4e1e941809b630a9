import { execFile } from 'node:child_process';
import { createReadStream, statSync } from 'node:fs';
import { basename, join } from 'node:path';
import { Transform } from 'node:stream';
import { promisify } from 'node:util';
import { projectRoot } from '../../src/paths.js';
import { sh, type SshSession } from './ssh.js';

const execFileAsync = promisify(execFile);

/** The agent bundle: the archive, its content hash and its size. */
export interface Bundle {
  file: string;
  hash: string;
  bytes: number;
}

/** The agent bundle, built (or taken from the cache) once for all nodes. */
export async function bundle(): Promise<Bundle> {
  const { stdout } = await execFileAsync('bash', [join(projectRoot(), 'scripts', 'bundle')], {
    maxBuffer: 1 << 20,
  });
  const file = stdout.trim();
  const hash = /ferry-agent-([0-9a-f]{64})\.tar\.gz$/.exec(basename(file))?.[1];
  if (hash === undefined) throw new Error(`scripts/bundle printed ${file}`);
  return { file, hash, bytes: statSync(file).size };
}

export const MiB = (bytes: number): string => `${(bytes / 2 ** 20).toFixed(1)} MiB`;

/** Reports the bytes sent at each quarter of the bundle. */
class Progress extends Transform {
  #sent = 0;
  #next = 0.25;
  constructor(
    readonly total: number,
    readonly report: (text: string) => void,
  ) {
    super();
  }
  override _transform(chunk: Buffer, _: BufferEncoding, done: (error?: Error | null, data?: Buffer) => void): void {
    this.#sent += chunk.length;
    while (this.#sent / this.total >= this.#next) {
      this.report(`copying the bundle: ${MiB(Math.min(this.#sent, this.total))} of ${MiB(this.total)}`);
      this.#next += 0.25;
    }
    done(null, chunk);
  }
}

/**
 * Unpacks the bundle into `dir` on the node (beside the running
 * installation), reporting each quarter sent. Cancelling ends the
 * connection: the half-copied bundle stays there, unused.
 */
export async function copyBundle(
  session: SshSession,
  b: Bundle,
  dir: string,
  report: (text: string) => void,
  signal: AbortSignal | undefined,
): Promise<void> {
  const cut = (): void => session.close();
  signal?.addEventListener('abort', cut, { once: true });
  try {
    await session.run(
      `tar -xzf - -C ${sh(dir)} --strip-components=1`,
      'unpacking the bundle',
      createReadStream(b.file).pipe(new Progress(b.bytes, report)),
    );
  } finally {
    signal?.removeEventListener('abort', cut);
  }
}
