import { beforeAll, describe, expect, it } from 'vitest';
import { ferryCli } from '../helpers/cli.js';
import { requireRoot } from '../helpers/root.js';

const run = ferryCli;

beforeAll(() => requireRoot());

describe('the ferry command', () => {
  it('teaches its commands and exit codes in --help', async () => {
    const { code, stdout } = await run('--help');
    expect(code).toBe(0);
    expect(stdout).toMatch(/check \[options\]/);
    expect(stdout).toMatch(/demo \[options\]/);
    expect(stdout).toMatch(/migrate \[options\] <PID\|NAME>/);
    expect(stdout).toMatch(/2 bad input \(nothing changed\)/);
  });

  it('exits 2 with a pointer to --help on bad input', async () => {
    const unknown = await run('frobnicate');
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toMatch(/unknown command 'frobnicate'/);
    const badNumber = await run('migrate', '1', '--from', 'a', '--to', 'b', '--max-rounds', 'lots');
    expect(badNumber.code).toBe(2);
    expect(badNumber.stderr).toMatch(/--max-rounds .* expected a whole number/);
    const badChoice = await run('migrate', '1', '--from', 'a', '--to', 'b', '--strategy', 'fast');
    expect(badChoice.code).toBe(2);
    expect(badChoice.stderr).toMatch(/Allowed choices are auto, precopy, stop-and-copy/);
  });

  it('exits 1 with the hint when told to use a CRIU binary that does not exist', async () => {
    const { code, stderr } = await run('check', '--criu', '/nonexistent/criu');
    expect(code).toBe(1);
    expect(stderr).toMatch(/ferry: the CRIU binary \/nonexistent\/criu .* is missing/);
    expect(stderr).toMatch(/hint: /);
  });

  it('reports CRIU and the kernel features as JSON', async () => {
    const { code, stdout } = await run('check', '--json');
    expect(code).toBe(0);
    const report = JSON.parse(stdout) as { criu: { version: string; source: string }; features: { memTrack: boolean } };
    expect(report.criu.version).toMatch(/^4\.\d+/);
    expect(report.criu.source).toBe('project');
    expect(typeof report.features.memTrack).toBe('boolean');
  });
});
