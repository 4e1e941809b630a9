import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { InvalidArgumentError } from 'commander';
import { afterAll, describe, expect, it } from 'vitest';
import { directory, holdMs, migrationTarget, nodeName } from '../../controller/cli/index.js';
import { InvalidInputError } from '../../src/errors.js';
import { projectRoot } from '../../src/paths.js';

const execFileAsync = promisify(execFile);
const scratch = mkdtempSync(join(tmpdir(), 'ferry-cli-'));
const config = join(scratch, 'config');
/** A lab that is not up: host names a and b must not resolve to anything. */
const LAB = `nolab${process.pid % 10_000}`;
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

describe('command-line values', () => {
  it('a PID is 1 to 4194303; anything else that is not a workload name is refused', () => {
    expect(migrationTarget('4194303')).toEqual({ pid: 4194303 });
    expect(migrationTarget('00042')).toEqual({ pid: 42 });
    expect(migrationTarget('web-1')).toEqual({ workload: 'web-1' });
    // 4294967297 would reach the agent as PID 1: protobuf's int32 keeps the low 32 bits.
    for (const bad of ['0', '4194304', '99999999999', '2147483648', '4294967297']) {
      expect(() => migrationTarget(bad)).toThrow(InvalidInputError);
      expect(() => migrationTarget(bad)).toThrow(`${bad} is not a PID`);
    }
    for (const bad of ['../etc', '-1', '', '.hidden', 'a/b', 'x'.repeat(65)]) {
      expect(() => migrationTarget(bad)).toThrow(/neither a PID nor a workload name/);
    }
  });

  it('a hold is a second to a day, in whole milliseconds, as the agents accept it', () => {
    expect(holdMs('1000')).toBe(1000);
    expect(holdMs('86400000')).toBe(86_400_000);
    for (const bad of ['0', '999', '86400001', '4294967296', '1.5', '-5', '', '1e4', ' 2000']) {
      expect(() => holdMs(bad)).toThrow(InvalidArgumentError);
    }
  });

  it('an agent name is a plain name, never a path', () => {
    expect(nodeName('node-7.example')).toBe('node-7.example');
    for (const bad of ['', '../../etc', 'a/b', '.', '..', 'a b', 'x'.repeat(65), 'a\nb']) {
      expect(() => nodeName(bad)).toThrow(InvalidArgumentError);
    }
  });

  it('a directory is made absolute, and an empty one is refused', () => {
    expect(directory('data')).toBe(resolve('data'));
    expect(() => directory('')).toThrow(InvalidArgumentError);
    expect(() => directory('a\0b')).toThrow(InvalidArgumentError);
  });
});

async function ferry(args: readonly string[]): Promise<{ code: number; stderr: string }> {
  try {
    const { stderr } = await execFileAsync(process.execPath, [join(projectRoot(), 'bin', 'ferry'), ...args], {
      // A command that starts what it should have refused would run on: the timeout says so.
      timeout: 20_000,
      env: { ...process.env, FERRY_CONFIG: config, FERRY_LAB: LAB, HOME: scratch },
    });
    return { code: 0, stderr };
  } catch (error) {
    const e = error as { code?: number; stderr?: string; killed?: boolean };
    return { code: e.killed === true ? -1 : typeof e.code === 'number' ? e.code : -1, stderr: e.stderr ?? '' };
  }
}

const migrate = ['migrate', '1', '--from', 'a', '--to', 'b'];
const run = ['run', '--insecure', '--on', 'ws://127.0.0.1:1', '--name', 'w'];
const agent = ['agent', '--insecure', '--listen', '127.0.0.1:0', '--data-dir', join(scratch, 'agent')];
const labels = Array.from({ length: 33 }, (_, i) => ['--label', `k${i}=v`]).flat();

const cases: [string[], RegExp][] = [
  [['migrate', '0', '--from', 'a', '--to', 'b'], /0 is not a PID/],
  [['migrate', '99999999999', '--from', 'a', '--to', 'b'], /99999999999 is not a PID/],
  [['migrate', '../etc', '--from', 'a', '--to', 'b'], /neither a PID nor a workload name/],
  [[...migrate, '--hold', '0'], /--hold .* expected milliseconds from 1000 to 86400000/],
  [[...migrate, '--hold', '4294967296'], /--hold .* expected milliseconds/],
  [[...migrate, '--max-rounds', '0'], /--max-rounds .* from 1 to 100/],
  [[...migrate, '--max-downtime', '9'.repeat(400)], /--max-downtime .* above 0/],
  [['migrate', '1', '--from', 'wss://10.0.0.1:7070/x', '--to', 'b'], /more than a host and a port/],
  [['migrate', '1', '--from', 'ws://10.0.0.1:7070', '--to', 'b'], /is a plaintext agent URL/],
  [['migrate', '1', '--from', 'nowhere', '--to', 'b'], /unknown agent "nowhere"/],
  [[...run.slice(0, -2), '--name', '../x', '--', 'true'], /bad workload name "..\/x"/],
  [[...run, '--label', 'Bad=1', '--', 'true'], /--label .* expected KEY=VALUE/],
  [[...run, ...labels, '--', 'true'], /an agent cannot run that: too many labels \(33, at most 32\)/],
  [[...run, '--', ...Array.from({ length: 257 }, () => 'x')], /too many arguments \(257, at most 256\)/],
  [[...run, '--', 'echo', 'x'.repeat(4097)], /string too long \(4097 characters\)/],
  [[...agent, '--name', '../../etc'], /--name .* 1 to 64 letters/],
  [['agent', '--insecure', '--listen', 'example.com:7070'], /HOST must be a numeric IP address/],
  [['agent', '--insecure', '--listen', '0.0.0.0:7070'], /needs an address peers can reach, not 0.0.0.0/],
  [[...agent, '--capacity', '0'], /--capacity .* expected a size/],
  [[...agent, '--data-dir', ''], /--data-dir .* expected a directory/],
  [['lab', 'up', '--name', 'Bad'], /--name .* 1 to 10 lower-case letters and digits/],
  [['lab', 'up', '--name', LAB, '--hosts', '9'], /a lab has 2 to 8 hosts/],
  [['lab', 'exec', 'z', '--name', LAB, '--', 'true'], /no host z in lab/],
  [['status', '--on', 'ws://10.0.0.1:7070'], /is a plaintext agent URL/],
  [['rebalance', '--threshold', '150%'], /150% is not a threshold/],
  [['rebalance', '--insecure', '--node', 'ws://127.0.0.1:1', '--exclude', 'Bad Key'], /is not a label selector/],
  [['schedule', '--cron', 'every minute'], /is not a cron expression/],
  [['install', 'not-a-url'], /is not an ssh:\/\/ URL/],
  [['install', '--prefix', 'opt/ferry', 'ssh://root@10.0.0.1'], /--prefix must be an absolute directory/],
  [['certificate', 'Bad/Name', '--out', join(scratch, 'cert'), '--host', '10.0.0.1'], /bad node name/],
  [['init', '--name', '../x'], /cannot name a cluster/],
];

describe('the ferry command refuses bad input with exit code 2 and changes nothing', () => {
  it(`in ${cases.length} cases, each with a reason`, async () => {
    const shmBefore = existsSync('/dev/shm/ferry') ? readdirSync('/dev/shm/ferry') : [];
    const results: { args: string[]; code: number; stderr: string; expected: RegExp }[] = [];
    // A few at a time: each is a Node process loading the whole CLI.
    for (let i = 0; i < cases.length; i += 4) {
      results.push(
        ...(await Promise.all(
          cases.slice(i, i + 4).map(async ([args, expected]) => ({ args, expected, ...(await ferry(args)) })),
        )),
      );
    }
    for (const r of results) {
      expect(r.code, `ferry ${r.args.join(' ').slice(0, 200)}: ${r.stderr}`).toBe(2);
      expect(r.stderr, `ferry ${r.args.join(' ').slice(0, 200)}`).toMatch(r.expected);
    }
    // Nothing was created: no configuration, no agent state or images, no lab.
    expect(readdirSync(scratch)).toEqual(['config'].filter((name) => existsSync(join(scratch, name))));
    expect(existsSync(config) ? readdirSync(config) : []).toEqual([]);
    expect(existsSync(join('/run/ferry', `lab-${LAB}`))).toBe(false);
    expect(existsSync('/dev/shm/ferry') ? readdirSync('/dev/shm/ferry') : []).toEqual(shmBefore);
    expect(existsSync('/dev/etc')).toBe(false);
  }, 120_000);
});
