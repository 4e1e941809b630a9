import { execFile } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { delimiter, isAbsolute, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { projectRoot } from '../paths.js';
import { CriuNotFoundError } from './errors.js';

const execFileAsync = promisify(execFile);

/** Where the CRIU binary in use came from, in the order they are tried. */
export type CriuSource = 'setting' | 'project' | 'system';

export interface CriuBinary {
  readonly path: string;
  readonly source: CriuSource;
}

export interface CriuVersionInfo {
  readonly major: number;
  readonly minor: number;
  readonly sublevel: number;
  /** As CRIU prints it, e.g. "4.1.1". */
  readonly text: string;
}

/**
 * The oldest CRIU the project supports (scripts/install-criu pins the tested
 * one): 4.1 reads SO_PASSCRED on every socket, which Linux 6.16 refuses on
 * TCP and UDP sockets, so it cannot dump a process that has one (CRIU's fix,
 * commit 4b7398595, is in 4.2).
 */
export const CRIU_FLOOR = { major: 4, minor: 2, text: '4.2' } as const;

/** Whether a CRIU version ("4.1.1") is at or above the floor; unknown text is not. */
export function meetsCriuFloor(text: string | null | undefined): boolean {
  const [major = 0, minor = 0] = (text ?? '').split('.').map(Number);
  return major > CRIU_FLOOR.major || (major === CRIU_FLOOR.major && minor >= CRIU_FLOOR.minor);
}

/** The environment variable that names a CRIU binary explicitly. */
export const CRIU_BINARY_ENV = 'FERRY_CRIU';

/**
 * The single place that decides which CRIU runs: an explicit setting (the
 * argument, else $FERRY_CRIU), then the project's prefix installed by
 * scripts/install-criu, then `criu` on the system's PATH. An explicit
 * setting that does not exist is an error, never silently replaced.
 */
export function resolveCriuBinary(explicit: string | undefined = process.env[CRIU_BINARY_ENV]): CriuBinary {
  if (explicit !== undefined && explicit !== '') {
    const path = isAbsolute(explicit) ? explicit : resolve(explicit);
    if (!isExecutable(path)) {
      throw new CriuNotFoundError(
        `the CRIU binary ${path} (set by ${CRIU_BINARY_ENV} or --criu) is missing or not executable`,
        {
          hint: `point ${CRIU_BINARY_ENV} at an executable criu, or unset it to use the project's own (scripts/install-criu)`,
        },
      );
    }
    return { path, source: 'setting' };
  }
  const project = join(projectRoot(), '.criu', 'bin', 'criu');
  if (isExecutable(project)) return { path: project, source: 'project' };
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (dir === '') continue;
    const candidate = join(dir, 'criu');
    if (isExecutable(candidate)) return { path: candidate, source: 'system' };
  }
  for (const candidate of ['/usr/sbin/criu', '/usr/local/sbin/criu', '/sbin/criu']) {
    if (isExecutable(candidate)) return { path: candidate, source: 'system' };
  }
  throw new CriuNotFoundError('no CRIU binary found (no project prefix, none on PATH)', {
    hint: `run scripts/install-criu to install CRIU ${CRIU_FLOOR.text} or newer into the project, or set ${CRIU_BINARY_ENV}`,
  });
}

/** Runs `criu --version` and parses it. */
export async function criuBinaryVersion(binary: CriuBinary, signal?: AbortSignal): Promise<CriuVersionInfo> {
  let stdout: string;
  try {
    ({ stdout } = await execFileAsync(binary.path, ['--version'], { timeout: 10_000, signal }));
  } catch (cause) {
    throw new CriuNotFoundError(`${binary.path} --version failed: ${(cause as Error).message}`, {
      cause,
      hint: 'the binary may be broken or built for another system; reinstall with scripts/install-criu --force',
    });
  }
  return parseCriuVersion(stdout);
}

export function parseCriuVersion(output: string): CriuVersionInfo {
  const match = /^Version:\s*(\d+)\.(\d+)(?:\.(\d+))?/m.exec(output);
  if (match === null) {
    throw new CriuNotFoundError(`cannot read a version from criu --version: ${JSON.stringify(output.slice(0, 200))}`);
  }
  const [, major = '0', minor = '0', sublevel = '0'] = match;
  return {
    major: Number(major),
    minor: Number(minor),
    sublevel: Number(sublevel),
    text: `${major}.${minor}${match[3] === undefined ? '' : `.${sublevel}`}`,
  };
}

function isExecutable(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}
