import { createHash, type Hash } from 'node:crypto';
import {
  appendFileSync,
  chmodSync,
  closeSync,
  constants,
  chownSync,
  copyFileSync,
  existsSync,
  lchownSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  type Stats,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { execFileSync } from 'node:child_process';
import { basename, dirname, isAbsolute, join, normalize, relative } from 'node:path';
import { FerryError } from '../src/errors.js';
import { log } from '../src/log.js';
import { IMAGE_NAME, type WorkloadSpec } from '../src/wire/index.js';
import { sha256Of } from './images.js';

/**
 * The files a workload carries from host to host (docs/files.md): its own
 * directory (its working directory, DATA/workloads/NAME), its log, and the
 * paths it was started with `--carry`. Before the freeze they are copied
 * to the destination whole (packAhead); while the process is frozen only
 * what changed since travels with the final dump's images (a file that
 * grew sends its new end, one rewritten is sent again), so that CRIU finds
 * each at the size, mode and owner it recorded. The destination puts them
 * in place before the restore and takes them back if the migration rolls
 * back.
 */
export const CARRY_MANIFEST = 'ferry-carry.json';

export class CarryError extends FerryError {
  readonly code = 'CARRY';
}

/** The round whose images are the files copied ahead of the freeze. */
export const AHEAD_ROUND = 'carry';

/** How much of a file's end, as it was copied ahead, is read again while frozen to see it only grew. */
const TAIL_CHECK_BYTES = 64 * 1024;

/** A file copied ahead of the freeze, as the source remembers it. */
export interface AheadFile {
  ino: number;
  size: number;
  mtimeMs: number;
  /** Its image in the ahead round. */
  image: string;
  /** The hash of what was sent, to be continued with what is sent later. */
  hash: Hash;
  /** The last bytes sent, compared again at the freeze. */
  tail: Buffer;
}

export interface CarriedEntry {
  path: string;
  kind: 'dir' | 'file' | 'link' | 'fifo';
  mode: number;
  uid: number;
  gid: number;
  mtimeMs: number;
  /** Files: their size and content hash, and the image file that holds them (or their new end). */
  size?: number;
  sha256?: string;
  image?: string;
  /** Files copied ahead: the ahead round's image that holds their first baseSize bytes. */
  base?: string;
  baseSize?: number;
  /** Links: where they point. */
  target?: string;
}

/** The workload's own directory on an agent: its working directory, carried whole. */
export function workloadHome(dataDir: string, name: string): string {
  return join(dataDir, 'workloads', name);
}

/** Every path a workload carries, as absolute paths: its home, its log, its --carry paths. */
export function carriedRoots(dataDir: string, spec: Pick<WorkloadSpec, 'name' | 'logFile' | 'carry'>): string[] {
  const roots = [workloadHome(dataDir, spec.name ?? ''), spec.logFile ?? '', ...(spec.carry ?? [])];
  const clean = (p: string): string => normalize(p).replace(/(.)\/+$/, '$1');
  return [...new Set(roots.filter((p) => p !== '' && isAbsolute(p)).map(clean))];
}

/**
 * Before the freeze: copies every regular file under the roots into `dir`
 * (the ahead round), hashing it as it goes; returns the names to stream and
 * what was copied of each, by path.
 */
export function packAhead(dir: string, roots: readonly string[]): { names: string[]; files: Map<string, AheadFile> } {
  const files = new Map<string, AheadFile>();
  const names: string[] = [];
  for (const { path, st } of walk(roots)) {
    if (!st.isFile()) continue;
    const image = `ahead-${names.length}`;
    // Read once, written and hashed as read: what was copied, not what the file is now (it may grow meanwhile).
    const content = readFileSync(path);
    writeFileSync(join(dir, image), content);
    const hash = createHash('sha256').update(content);
    const tail = Buffer.from(content.subarray(Math.max(0, content.length - TAIL_CHECK_BYTES)));
    files.set(path, { ino: st.ino, size: content.length, mtimeMs: st.mtimeMs, image, hash, tail });
    names.push(image);
  }
  return { names, files };
}

/** Every path under the roots that exists, a directory before what it holds, in name order. */
function* walk(roots: readonly string[]): Generator<{ path: string; st: Stats }> {
  const visit = function* (path: string): Generator<{ path: string; st: Stats }> {
    let st;
    try {
      st = lstatSync(path);
    } catch {
      return;
    }
    yield { path, st };
    if (st.isDirectory()) for (const name of readdirSync(path).sort()) yield* visit(join(path, name));
  };
  for (const root of roots) yield* visit(root);
}

/**
 * While frozen: what the roots hold, into `dir` with a manifest; returns
 * the names to stream. A file copied ahead and unchanged sends nothing; one
 * that only grew sends its new end; any other, and every file not copied
 * ahead, is copied whole. A root that does not exist is left out
 * (preflight said so before the freeze).
 */
export function packCarried(dir: string, roots: readonly string[], ahead?: Map<string, AheadFile>): string[] {
  const entries: CarriedEntry[] = [];
  const names: string[] = [];
  for (const { path, st } of walk(roots)) {
    const base = { path, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, mtimeMs: st.mtimeMs };
    if (st.isDirectory()) {
      entries.push({ ...base, kind: 'dir' });
    } else if (st.isFile()) {
      const sent = ahead?.get(path);
      const image = `ferry-carry-${names.length}`;
      if (sent !== undefined && sent.ino === st.ino && st.size === sent.size && st.mtimeMs === sent.mtimeMs) {
        entries.push({
          ...base,
          kind: 'file',
          size: st.size,
          sha256: sent.hash.copy().digest('hex'),
          base: sent.image,
          baseSize: sent.size,
        });
        continue;
      }
      if (sent !== undefined && sent.ino === st.ino && st.size > sent.size && onlyGrew(path, sent)) {
        const end = readRange(path, sent.size, st.size - sent.size);
        writeFileSync(join(dir, image), end);
        entries.push({
          ...base,
          kind: 'file',
          size: st.size,
          sha256: sent.hash.copy().update(end).digest('hex'),
          image,
          base: sent.image,
          baseSize: sent.size,
        });
        names.push(image);
        continue;
      }
      copyFileSync(path, join(dir, image));
      // Hashed from the copy: what travels is what was checked.
      entries.push({ ...base, kind: 'file', size: st.size, sha256: sha256Of(join(dir, image)), image });
      names.push(image);
    } else if (st.isSymbolicLink()) {
      entries.push({ ...base, kind: 'link', target: readlinkSync(path) });
    } else if (st.isFIFO()) {
      entries.push({ ...base, kind: 'fifo' });
    }
    // Sockets and devices do not travel: CRIU makes a bound unix socket's node itself.
  }
  writeFileSync(join(dir, CARRY_MANIFEST), JSON.stringify(entries));
  return [...names, CARRY_MANIFEST];
}

/** What placing the carried files changed here, so that a rollback can take it back. */
export interface Placed {
  /** Puts back what was here before (the files replaced), and removes what was not. */
  undo(): void;
  /** Forgets the backups: the migration committed. */
  keep(): void;
  files: number;
  bytes: number;
}

/**
 * Puts the carried files of one migration in place: only under the roots
 * this agent itself derives from the workload (a path from the wire is not
 * trusted further), each checked against its hash, written beside its
 * place and renamed over it. A file already there with the same content is
 * left alone; one with other content is kept aside until the migration
 * commits.
 */
export function placeCarried(dir: string, roots: readonly string[], migrationId: string, aheadDir?: string): Placed {
  const manifest = join(dir, CARRY_MANIFEST);
  const created: string[] = [];
  const replaced: { path: string; aside: string }[] = [];
  let files = 0;
  let bytes = 0;
  const undo = (): void => {
    for (const { path, aside } of replaced.reverse()) {
      try {
        renameSync(aside, path);
      } catch (error) {
        log.warn('cannot put a replaced file back', { migration: migrationId, path, error: (error as Error).message });
      }
    }
    for (const path of created.reverse()) rmSync(path, { recursive: true, force: true });
  };
  const placed: Placed = {
    undo,
    keep: () => replaced.forEach(({ aside }) => rmSync(aside, { force: true })),
    files: 0,
    bytes: 0,
  };
  if (!existsSync(manifest)) return placed;
  const entries = readManifest(manifest);
  try {
    for (const e of entries) {
      const path = normalize(e.path);
      if (!isAbsolute(path) || !roots.some((r) => within(r, path))) {
        throw new CarryError(`the source sent ${JSON.stringify(e.path)}, which the workload does not carry`);
      }
      for (let up = dirname(path); !existsSync(up); up = dirname(up)) created.push(up);
      mkdirSync(dirname(path), { recursive: true });
      const there = lstatOrUndefined(path);
      if (e.kind === 'dir') {
        if (there === undefined) {
          mkdirSync(path);
          created.push(path);
        } else if (!there.isDirectory()) throw new CarryError(`${path} is a directory on the source, not here`);
        chmodSync(path, e.mode);
        chownSync(path, e.uid, e.gid);
        continue;
      }
      if (
        e.kind === 'file' &&
        e.base === undefined &&
        there?.isFile() === true &&
        there.size === e.size &&
        sha256Of(path) === e.sha256
      ) {
        continue;
      }
      const temporary = `${path}.ferry-${migrationId}.new`;
      if (e.kind === 'file' && e.base !== undefined) {
        // Its start came ahead of the freeze (checked by the stream's checksums then), moved into
        // place rather than copied; its new end, if any, is appended.
        const start = join(aheadDir ?? '', e.base);
        if (aheadDir === undefined || lstatOrUndefined(start)?.size !== e.baseSize) {
          throw new CarryError(`${path}: the copy sent ahead of the freeze is missing here`);
        }
        moveOrCopy(start, temporary);
        if (e.image !== undefined) appendFileSync(temporary, readFileSync(join(dir, e.image)));
        if (statSync(temporary).size !== e.size) throw new CarryError(`${path} arrived with the wrong size`);
        chmodSync(temporary, e.mode);
        chownSync(temporary, e.uid, e.gid);
        utimesSync(temporary, new Date(e.mtimeMs), new Date(e.mtimeMs));
        files += 1;
        bytes += e.size ?? 0;
      } else if (e.kind === 'file') {
        const image = join(dir, e.image ?? '');
        if (sha256Of(image) !== e.sha256) throw new CarryError(`${path} arrived damaged (checksum mismatch)`);
        copyFileSync(image, temporary);
        chmodSync(temporary, e.mode);
        chownSync(temporary, e.uid, e.gid);
        utimesSync(temporary, new Date(e.mtimeMs), new Date(e.mtimeMs));
        files += 1;
        bytes += e.size ?? 0;
      } else if (e.kind === 'link') {
        symlinkSync(e.target ?? '', temporary);
        lchownSync(temporary, e.uid, e.gid);
      } else {
        execFileSync('mkfifo', ['-m', (e.mode & 0o777).toString(8), temporary]);
        chownSync(temporary, e.uid, e.gid);
      }
      if (there !== undefined) {
        if (there.isDirectory()) throw new CarryError(`${path} is a directory here, not on the source`);
        const aside = `${path}.ferry-${migrationId}.old`;
        renameSync(path, aside);
        replaced.push({ path, aside });
      } else created.push(path);
      renameSync(temporary, path);
    }
  } catch (error) {
    undo();
    throw error;
  }
  placed.files = files;
  placed.bytes = bytes;
  return placed;
}

/**
 * The manifest as the source sent it: from a peer, so every field is
 * checked before mkdir, chmod and chown see it. Modes lose their set-user
 * and set-group bits: a peer does not plant privileged programs.
 */
export function readManifest(file: string): CarriedEntry[] {
  const bad = (why: string): never => {
    throw new CarryError(`${basename(file)}: ${why}`);
  };
  let parsed: unknown;
  try {
    parsed = statSync(file).size <= 16 * 1024 * 1024 ? JSON.parse(readFileSync(file, 'utf8')) : bad('too large');
  } catch (error) {
    if (error instanceof CarryError) throw error;
    bad('not a manifest of carried files');
  }
  if (!Array.isArray(parsed)) return bad('not a list of carried files');
  const id = (n: unknown): n is number => Number.isInteger(n) && (n as number) >= 0 && (n as number) < 2 ** 32 - 1;
  return parsed.map((raw: unknown): CarriedEntry => {
    const e = (raw ?? {}) as Record<string, unknown>;
    if (typeof e.path !== 'string' || e.path.includes('\0')) return bad('an entry without a path');
    if (!['dir', 'file', 'link', 'fifo'].includes(e.kind as string)) return bad(`${e.path}: unknown kind`);
    if (!id(e.mode) || !id(e.uid) || !id(e.gid)) return bad(`${e.path}: not a mode and owner`);
    const mtimeMs = typeof e.mtimeMs === 'number' && Number.isFinite(e.mtimeMs) ? e.mtimeMs : Date.now();
    const entry: CarriedEntry = {
      path: e.path,
      kind: e.kind as CarriedEntry['kind'],
      mode: e.mode & 0o1777,
      uid: e.uid,
      gid: e.gid,
      mtimeMs,
    };
    if (entry.kind === 'file') {
      const image = (name: unknown): boolean => typeof name === 'string' && IMAGE_NAME.test(name);
      if (e.base !== undefined && (!image(e.base) || !id(e.baseSize))) return bad(`${e.path}: a bad copy ahead`);
      if (
        !id(e.size) ||
        typeof e.sha256 !== 'string' ||
        (e.image !== undefined ? !image(e.image) : e.base === undefined)
      ) {
        return bad(`${e.path}: a file without its size, hash or image`);
      }
      Object.assign(entry, { size: e.size, sha256: e.sha256, image: e.image, base: e.base, baseSize: e.baseSize });
    }
    if (entry.kind === 'link') {
      if (typeof e.target !== 'string' || e.target.includes('\0')) return bad(`${e.path}: a link without a target`);
      entry.target = e.target;
    }
    return entry;
  });
}

/** The file still ends, where the copy ahead ended, with the bytes that copy ended with. */
function onlyGrew(path: string, sent: AheadFile): boolean {
  return readRange(path, sent.size - sent.tail.length, sent.tail.length).equals(sent.tail);
}

function readRange(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  try {
    const buffer = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = readSync(fd, buffer, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return buffer.subarray(0, done);
  } finally {
    closeSync(fd);
  }
}

function within(root: string, path: string): boolean {
  const rel = relative(root, path);
  return rel === '' || (!rel.startsWith('..') && !isAbsolute(rel));
}

/** A rename where it can (the same file system), a copy where it cannot. */
function moveOrCopy(from: string, to: string): void {
  try {
    renameSync(from, to);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EXDEV') throw error;
    copyFileSync(from, to);
  }
}

function lstatOrUndefined(path: string): ReturnType<typeof lstatSync> | undefined {
  try {
    return lstatSync(path);
  } catch {
    return undefined;
  }
}
