import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CARRY_MANIFEST, carriedRoots, packCarried, placeCarried, readManifest } from '../../agent/carry.js';

const scratch = mkdtempSync(join(tmpdir(), 'ferry-carry-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

/** A source's files under `root`, packed into a round directory, and an empty place for them. */
function packed(name: string): { home: string; round: string } {
  const home = join(scratch, name, 'srv', 'app');
  mkdirSync(join(home, 'sub'), { recursive: true });
  writeFileSync(join(home, 'state'), 'count 42\n');
  writeFileSync(join(home, 'sub', 'data'), Buffer.alloc(100_000, 7));
  chmodSync(join(home, 'sub', 'data'), 0o640);
  const round = join(scratch, name, 'round');
  mkdirSync(round);
  const names = packCarried(round, [home]);
  expect(names).toEqual(['ferry-carry-0', 'ferry-carry-1', CARRY_MANIFEST]);
  return { home, round };
}

describe('carried files', () => {
  it('arrive with their content, mode and times, and a rollback removes what was not there', () => {
    const { home, round } = packed('roundtrip');
    const before = statSync(join(home, 'sub', 'data'));
    // The destination is another tree: the same paths, re-rooted by moving the source's away.
    const kept = `${home}.source`;
    rmSync(kept, { recursive: true, force: true });
    renameSync(home, kept);
    const placed = placeCarried(round, [home], 'm-test');
    expect(placed.files).toBe(2);
    expect(readFileSync(join(home, 'state'), 'utf8')).toBe('count 42\n');
    const after = statSync(join(home, 'sub', 'data'));
    expect(after.size).toBe(100_000);
    expect(after.mode & 0o7777).toBe(0o640);
    expect(Math.abs(after.mtimeMs - before.mtimeMs)).toBeLessThan(1);
    placed.undo();
    expect(existsSync(home)).toBe(false);
  });

  it('keep a replaced file aside until the migration commits, and put it back on rollback', () => {
    const { home, round } = packed('replace');
    writeFileSync(join(home, 'state'), 'older\n');
    const placed = placeCarried(round, [home], 'm-two');
    expect(readFileSync(join(home, 'state'), 'utf8')).toBe('count 42\n');
    expect(existsSync(join(home, 'state.ferry-m-two.old'))).toBe(true);
    placed.undo();
    expect(readFileSync(join(home, 'state'), 'utf8')).toBe('older\n');
    expect(existsSync(join(home, 'state.ferry-m-two.old'))).toBe(false);
  });

  it('are refused outside the paths the workload carries, and when damaged, with nothing left behind', () => {
    const { home, round } = packed('refused');
    expect(() => placeCarried(round, [join(home, 'sub')], 'm-3')).toThrow(/which the workload does not carry/);
    writeFileSync(join(round, 'ferry-carry-1'), 'tampered');
    rmSync(home, { recursive: true, force: true });
    expect(() => placeCarried(round, [home], 'm-4')).toThrow(/arrived damaged/);
    expect(existsSync(home)).toBe(false);
  });

  it('come with a manifest whose every field is checked; set-id bits are dropped', () => {
    const file = join(scratch, 'manifest.json');
    const entry = { path: '/srv/x', kind: 'dir', mode: 0o6755, uid: 0, gid: 0, mtimeMs: 1 };
    writeFileSync(file, JSON.stringify([entry]));
    expect(readManifest(file)[0]?.mode).toBe(0o755);
    for (const bad of [
      'not json',
      'null',
      JSON.stringify([{ ...entry, uid: -1 }]),
      JSON.stringify([{ ...entry, kind: 'device' }]),
      JSON.stringify([{ ...entry, kind: 'file' }]),
      JSON.stringify([{ ...entry, kind: 'file', size: 1, sha256: 'x', image: '../etc/passwd' }]),
      JSON.stringify([{ ...entry, path: 7 }]),
    ]) {
      writeFileSync(file, bad);
      expect(() => readManifest(file), bad).toThrow(/manifest.json: /);
    }
  });

  it('are the workload’s home, its log and its --carry paths, each once', () => {
    expect(
      carriedRoots('/var/lib/ferry', {
        name: 'web',
        logFile: '/var/lib/ferry/workloads/web.log',
        carry: ['/srv/a/', '/srv/a'],
      }),
    ).toEqual(['/var/lib/ferry/workloads/web', '/var/lib/ferry/workloads/web.log', '/srv/a']);
  });
});
