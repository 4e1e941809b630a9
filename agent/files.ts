/**
 * The files a process tree needs where it is restored (docs/files.md):
 * what it holds open, its working directories and roots, its executables
 * and mapped files, its named pipes. CRIU records each by path and, on
 * restore, opens it there again and checks its size and mode; so each must
 * be on the destination as it is here, or travel with the workload
 * (carried), or sit on storage both hosts see (shared). Preflight lists
 * them on the source and checks them on the destination before anything
 * is frozen.
 */
import { createHash } from 'node:crypto';
import { closeSync, constants, openSync, readdirSync, readFileSync, readlinkSync, readSync, statSync } from 'node:fs';
import { isAbsolute, relative } from 'node:path';
import type { FileNeed, FileProblem } from '../src/wire/index.js';

type Kind = 'exe' | 'map' | 'open' | 'fifo' | 'cwd' | 'root' | 'deleted' | 'proc';

/** The stronger need wins when one path is needed twice (an executable is also mapped and open). */
const STRENGTH: Kind[] = ['proc', 'exe', 'map', 'open', 'fifo', 'deleted', 'cwd', 'root'];

/** What the tree needs, by path, each marked carried or shared when it lies under one of those roots. */
export function fileNeeds(
  tree: readonly number[],
  roots: { carried: readonly string[]; shared: readonly string[] },
): FileNeed[] {
  const needs = new Map<string, FileNeed>();
  const treePids = new Set(tree.map(String));
  const add = (kind: Kind, path: string, statPath: string): void => {
    if (!isAbsolute(path) || (kind === 'root' && path === '/')) return;
    let k = kind;
    const procPid = /^\/proc\/(\d+)(\/|$)/.exec(path)?.[1];
    if (procPid !== undefined && treePids.has(procPid)) k = 'proc';
    else if (/^\/(proc|sys|dev)(\/|$)/.test(path) || path.startsWith('/memfd:') || path.startsWith('/SYSV')) return;
    const existing = needs.get(path);
    if (existing !== undefined && STRENGTH.indexOf(existing.kind as Kind) <= STRENGTH.indexOf(k)) return;
    let st;
    try {
      st = statSync(statPath);
    } catch {
      return; // closed or unmapped meanwhile
    }
    const need: FileNeed = {
      path,
      kind: k,
      size: st.isFile() ? st.size : 0,
      mode: st.mode,
      uid: st.uid,
      gid: st.gid,
      how: under(roots.carried, path) ? 'carried' : under(roots.shared, path) ? 'shared' : '',
      sha256: '',
    };
    if ((k === 'exe' || k === 'map') && need.how === '' && st.isFile()) need.sha256 = contentHash(statPath, st);
    needs.set(path, need);
  };
  for (const pid of tree) {
    const proc = `/proc/${pid}`;
    for (const [kind, link] of [
      ['exe', 'exe'],
      ['cwd', 'cwd'],
      ['root', 'root'],
    ] as const) {
      const target = readLink(`${proc}/${link}`);
      if (target !== undefined) add(target.endsWith(' (deleted)') ? 'deleted' : kind, strip(target), `${proc}/${link}`);
    }
    for (const fd of list(`${proc}/fd`)) {
      const target = readLink(`${proc}/fd/${fd}`);
      if (target === undefined || !target.startsWith('/')) continue; // pipes, sockets, anon inodes
      const deleted = target.endsWith(' (deleted)');
      let kind: Kind = deleted ? 'deleted' : 'open';
      if (!deleted) {
        try {
          if (statSync(`${proc}/fd/${fd}`).isFIFO()) kind = 'fifo';
        } catch {
          continue;
        }
      }
      add(kind, strip(target), `${proc}/fd/${fd}`);
    }
    let maps = '';
    try {
      maps = readFileSync(`${proc}/maps`, 'utf8');
    } catch {
      continue;
    }
    for (const line of maps.split('\n')) {
      const path = line.split(/\s+/).slice(5).join(' ');
      if (!path.startsWith('/')) continue;
      if (path.endsWith(' (deleted)')) add('deleted', strip(path), `${proc}/map_files/${line.split(' ')[0]}`);
      else add('map', path, path);
    }
  }
  return [...needs.values()].sort((x, y) => (x.path ?? '').localeCompare(y.path ?? ''));
}

/**
 * How each need that is neither carried nor deleted (CRIU copies a deleted
 * file into the images itself) differs here, the destination: missing,
 * another kind of file, another size, mode, owner or content.
 */
export function fileProblems(needs: readonly FileNeed[]): FileProblem[] {
  const problems: FileProblem[] = [];
  for (const n of needs) {
    const path = n.path ?? '';
    const kind = n.kind ?? '';
    const problem = (text: string): void => void problems.push({ path, kind, problem: text });
    if (kind === 'proc') {
      problem('names a process of the tree by its PID here, which it will not have there');
      continue;
    }
    if (n.how === 'carried' || kind === 'deleted') continue;
    let st;
    try {
      st = statSync(path);
    } catch {
      problem('is missing');
      continue;
    }
    const wanted = Number(n.mode ?? 0);
    if ((st.mode & constants.S_IFMT) !== (wanted & constants.S_IFMT)) {
      problem(`is ${typeName(st.mode)} here, ${typeName(wanted)} there`);
      continue;
    }
    if (st.isFile() && st.size !== Number(n.size ?? 0)) problem(`has ${st.size} bytes, ${Number(n.size ?? 0)} there`);
    if ((st.mode & 0o7777) !== (wanted & 0o7777)) {
      problem(`has mode ${(st.mode & 0o7777).toString(8)}, ${(wanted & 0o7777).toString(8)} there`);
    }
    if (st.uid !== n.uid || st.gid !== n.gid) problem(`is owned by ${st.uid}:${st.gid}, ${n.uid}:${n.gid} there`);
    if (n.sha256 && st.isFile() && st.size === Number(n.size ?? 0) && contentHash(path, st) !== n.sha256) {
      problem('has other content (another build of it)');
    }
  }
  return problems;
}

const hashes = new Map<string, string>();

/** A file's SHA-256, remembered by its identity and change time (executables and libraries rarely change). */
function contentHash(
  path: string,
  st: { dev: number; ino: number; size: number; mtimeMs: number; ctimeMs: number },
): string {
  const key = `${st.dev}:${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
  const known = hashes.get(key);
  if (known !== undefined) return known;
  const hash = createHash('sha256');
  const fd = openSync(path, constants.O_RDONLY);
  try {
    const buffer = Buffer.alloc(1024 * 1024);
    for (let n; (n = readSync(fd, buffer, 0, buffer.length, null)) > 0;) hash.update(buffer.subarray(0, n));
  } finally {
    closeSync(fd);
  }
  const digest = hash.digest('hex');
  if (hashes.size > 4096) hashes.clear();
  hashes.set(key, digest);
  return digest;
}

function typeName(mode: number): string {
  switch (mode & constants.S_IFMT) {
    case constants.S_IFDIR:
      return 'a directory';
    case constants.S_IFIFO:
      return 'a named pipe';
    case constants.S_IFREG:
      return 'a file';
    case constants.S_IFLNK:
      return 'a link';
    case constants.S_IFSOCK:
      return 'a socket';
    default:
      return 'a device';
  }
}

function under(roots: readonly string[], path: string): boolean {
  return roots.some((root) => {
    const rel = relative(root, path);
    return rel === '' || (!rel.startsWith('..') && !isAbsolute(rel));
  });
}

function strip(target: string): string {
  return target.replace(/ \(deleted\)$/, '');
}

function readLink(path: string): string | undefined {
  try {
    return readlinkSync(path);
  } catch {
    return undefined;
  }
}

function list(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}
