import { mkdtempSync, rmSync, writeFileSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  CriuNotFoundError,
  CriuProtocolError,
  decodeStats,
  mainReason,
  parseCriuVersion,
  readLogExcerpt,
  resolveCriuBinary,
} from '../../src/criu/index.js';
import { StatsEntry } from '../../src/criu/rpc.js';

const dir = mkdtempSync(join(tmpdir(), 'ferry-unit-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function statsFile(entry: Parameters<typeof StatsEntry.encode>[0]): Uint8Array {
  const body = StatsEntry.encode(entry).finish();
  const head = Buffer.alloc(12);
  head.writeUInt32LE(0x55105940, 0);
  head.writeUInt32LE(0x57093306, 4);
  head.writeUInt32LE(body.length, 8);
  return Buffer.concat([head, body]);
}

describe('stats files', () => {
  it('decodes a dump entry after the two magics and the length', () => {
    const entry = decodeStats(statsFile({ dump: { frozenTime: 1234, pagesWritten: 4096, pagesSkippedParent: 7 } }));
    expect(entry.dump?.frozenTime).toBe(1234);
    expect(Number(entry.dump?.pagesWritten)).toBe(4096);
    expect(Number(entry.dump?.pagesSkippedParent)).toBe(7);
  });

  it('rejects a file with the wrong magic', () => {
    const bytes = statsFile({ dump: {} });
    bytes[0] = 0;
    expect(() => decodeStats(bytes, 'stats-dump')).toThrow(/stats-dump is not a CRIU stats image/);
  });

  it('rejects a truncated file', () => {
    const bytes = statsFile({ dump: { frozenTime: 1, pagesWritten: 2 } });
    expect(() => decodeStats(bytes.subarray(0, bytes.length - 2))).toThrow(CriuProtocolError);
    expect(() => decodeStats(bytes.subarray(0, 5))).toThrow(/too short/);
  });
});

describe('CRIU logs', () => {
  it('keeps real errors and leaves out the harmless RLIMIT_NOFILE line', async () => {
    const file = join(dir, 'restore.log');
    writeFileSync(
      file,
      [
        "(00.000100) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted",
        '(00.000200) Opening images',
        "(00.000300) Error (criu/cr-restore.c:1480): Can't fork for 42: File exists",
        '(00.000400) Restoring FAILED.',
        '',
      ].join('\n'),
    );
    const excerpt = await readLogExcerpt(file);
    expect(excerpt?.errors).toEqual(["Can't fork for 42: File exists (criu/cr-restore.c:1480)"]);
    expect(excerpt?.tail.at(-1)).toBe('(00.000400) Restoring FAILED.');
  });

  it('names the specific error, not the summary CRIU logs after it', () => {
    expect(
      mainReason([
        "sockets: Can't get 1:16 opt: Operation not supported (criu/sockets.c:628)",
        'Dump files (pid: 7) failed with -1 (criu/cr-dump.c:1681)',
        'Dumping FAILED. (criu/cr-dump.c:2111)',
      ]),
    ).toBe("sockets: Can't get 1:16 opt: Operation not supported (criu/sockets.c:628)");
    expect(mainReason(['Dumping FAILED. (criu/cr-dump.c:2111)'])).toBe('Dumping FAILED. (criu/cr-dump.c:2111)');
    expect(mainReason([])).toBeUndefined();
  });

  it('returns nothing for a log that does not exist', async () => {
    expect(await readLogExcerpt(join(dir, 'none.log'))).toBeUndefined();
  });
});

describe('which CRIU runs', () => {
  it('refuses an explicit binary that does not exist instead of falling back', () => {
    expect(() => resolveCriuBinary('/nonexistent/criu')).toThrow(CriuNotFoundError);
    expect(() => resolveCriuBinary('/nonexistent/criu')).toThrow(/\/nonexistent\/criu .* is missing or not executable/);
  });

  it('takes an explicit executable as the setting', () => {
    const fake = join(dir, 'criu');
    writeFileSync(fake, '#!/bin/sh\necho "Version: 4.1.1"\n');
    chmodSync(fake, 0o755);
    expect(resolveCriuBinary(fake)).toEqual({ path: fake, source: 'setting' });
  });

  it('reads the version CRIU prints', () => {
    expect(parseCriuVersion('Version: 4.1.1\n')).toMatchObject({ major: 4, minor: 1, sublevel: 1, text: '4.1.1' });
    expect(parseCriuVersion('Version: 3.17\nGitID: v3.17\n').text).toBe('3.17');
    expect(() => parseCriuVersion('criu: command not found')).toThrow(CriuNotFoundError);
  });
});

describe('lazy pages logs', () => {
  it('reads the autobound port, the pages copied and the first error, as CRIU 4.1 logs them', async () => {
    const { lazyPagesCopied, lazyPortFromLog, logReason } = await import('../../src/criu/index.js');
    const dump = join(dir, 'lazy-dump.log');
    writeFileSync(
      dump,
      [
        "(00.027590) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted",
        '(00.046236) Starting page server on port 0',
        '(00.046240) Using 38781 port',
        '(02.541590) Error (criu/page-pipe.c:424): page-pipe: splice: -1: Bad file descriptor',
        '(02.541754) Error (criu/cr-dump.c:2019): Lazy pages transfer FAILED.',
      ].join('\n'),
    );
    expect(lazyPortFromLog(dump)).toBe(38781);
    // The RLIMIT line is CRIU's noise on every run here, not the failure.
    expect(await logReason(dump)).toBe('page-pipe: splice: -1: Bad file descriptor (criu/page-pipe.c:424)');
    const lazy = join(dir, 'lazy-pages.log');
    writeFileSync(
      lazy,
      'uffd: 1-1: UFFD transferred pages: (65536/65600)\nuffd: 1-4: UFFD transferred pages: (12/12)\n',
    );
    expect(lazyPagesCopied(lazy)).toBe(65548);
    expect(lazyPortFromLog(join(dir, 'missing.log'))).toBeUndefined();
    expect(lazyPagesCopied(join(dir, 'missing.log'))).toBe(0);
    expect(await logReason(lazy)).toBeUndefined();
  });
});
