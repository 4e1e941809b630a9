import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { beforeAll, describe, expect, it } from 'vitest';
import type { DemoResult } from '../../controller/lab/index.js';
import { projectRoot } from '../../src/paths.js';
import { requireRoot } from '../helpers/root.js';

const execFileAsync = promisify(execFile);

beforeAll(() => requireRoot());

describe('ferry demo', () => {
  it('moves an HTTP server from lab host a to b while a client on c asks it, with no error, and removes the lab', async () => {
    const { stdout, stderr } = await execFileAsync(join(projectRoot(), 'bin', 'ferry'), ['demo', '--json'], {
      timeout: 120_000,
    });
    const report = JSON.parse(stdout) as DemoResult;
    expect(report.from.agent).toBe('a');
    expect(report.to.agent).toBe('b');
    expect(stderr).toMatch(/address 10\.\d+\.\d+\.80\/24 moves with web/);
    expect(stderr).toMatch(/socket tcp-established 10\.\d+\.\d+\.80:8080 ↔ .*: moves/);
    expect(stderr).toMatch(/answered by PID \d+ on host b:/);
    // The client's own account: every question answered, none failed.
    expect(report.client.asked, stderr).toBeGreaterThan(5);
    expect(report.client.errors, stderr).toBe(0);
    expect(report.client.answered).toBe(report.client.asked);
    expect(stderr).toMatch(/answered, 0 errors; its longest wait was \d+ ms/);
    // The count goes on from where it was on a: the same process, its memory moved.
    const served = [...stderr.matchAll(/ c │ served (\d+)/g)].map((m) => Number(m[1]));
    expect(served).toHaveLength(6);
    expect(served).toEqual([...served].sort((x, y) => x - y));
    expect(served[3]).toBeGreaterThan(served[2]!);
    expect(existsSync('/run/netns/ferrydemo-a')).toBe(false);
  });
});
