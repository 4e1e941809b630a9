import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { beforeAll, describe, expect, it } from 'vitest';
import type { MigrationReport } from '../../controller/migration/index.js';
import { projectRoot } from '../../src/paths.js';
import { requireRoot } from '../helpers/root.js';

const execFileAsync = promisify(execFile);

beforeAll(() => requireRoot());

describe('ferry demo', () => {
  it('migrates a counting workload from lab host a to b, shows it counting on there, and removes the lab', async () => {
    const { stdout, stderr } = await execFileAsync(join(projectRoot(), 'bin', 'ferry'), ['demo', '--json'], {
      timeout: 120_000,
    });
    const report = JSON.parse(stdout) as MigrationReport;
    expect(report.from.agent).toBe('a');
    expect(report.to.agent).toBe('b');
    expect(stderr).toMatch(/ a │ count \d+/);
    expect(stderr).toMatch(/ b │ count \d+/);
    expect(stderr).toMatch(/in host b's network namespace/);
    expect(stderr).toMatch(/it counted on without starting over/);
    // The counts on b go on from those on a.
    const countsA = [...stderr.matchAll(/ a │ count (\d+)/g)].map((m) => Number(m[1]));
    const countsB = [...stderr.matchAll(/ b │ count (\d+)/g)].map((m) => Number(m[1]));
    expect(Math.min(...countsB)).toBeGreaterThan(Math.max(...countsA));
    expect(existsSync('/run/netns/ferrydemo-a')).toBe(false);
  });
});
