import { open } from 'node:fs/promises';

/**
 * Lines CRIU logs as errors although the operation succeeds. In sandboxes
 * CRIU cannot raise RLIMIT_NOFILE for itself and says so on every run.
 */
const HARMLESS_ERRORS = [/rlimit: Can't setup RLIMIT_NOFILE for self/];

export interface LogExcerpt {
  readonly tail: string[];
  readonly errors: string[];
}

/** The last `lines` lines of a CRIU log and its meaningful "Error" lines (from the same window). */
export async function readLogExcerpt(file: string, lines = 40, maxBytes = 256 * 1024): Promise<LogExcerpt | undefined> {
  let handle;
  try {
    handle = await open(file, 'r');
  } catch {
    return undefined;
  }
  try {
    const { size } = await handle.stat();
    const length = Math.min(size, maxBytes);
    const buffer = Buffer.alloc(length);
    await handle.read(buffer, 0, length, size - length);
    const all = buffer.toString('utf8').split('\n');
    if (size > length) all.shift(); // a partial first line
    while (all.length > 0 && all.at(-1) === '') all.pop();
    const errors = all.filter((l) => isCriuError(l) && !isHarmless(l)).map(stripPrefix);
    return { tail: all.slice(-lines), errors: errors.slice(-10) };
  } finally {
    await handle.close();
  }
}

function isCriuError(line: string): boolean {
  return /\bError \(/.test(line) || /\bBUG at\b/.test(line);
}

export function isHarmless(line: string): boolean {
  return HARMLESS_ERRORS.some((re) => re.test(line));
}

/** "(00.012345) Error (criu/cr-dump.c:123): msg" → "msg (criu/cr-dump.c:123)". */
function stripPrefix(line: string): string {
  const match = /Error \(([^)]*)\):\s*(.*)$/.exec(line);
  if (match === null) return line.replace(/^\(\s*[\d.]+\)\s*/, '').trim();
  return `${match[2]?.trim()} (${match[1]})`;
}
