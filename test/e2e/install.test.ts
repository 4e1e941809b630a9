import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Inventory } from '../../controller/config.js';
import type { NodeResult } from '../../controller/install.js';
import { labDown, labUp, type Lab, type LabHost } from '../../controller/lab.js';
import type { MigrationReport } from '../../controller/migration.js';
import { projectRoot } from '../../src/paths.js';
import { runFerry, type CliResult } from '../helpers/cli.js';
import { requireRoot } from '../helpers/root.js';
import { Sshd } from '../helpers/sshd.js';
import { waitFor } from '../helpers/wait.js';

const LAB = 'inst';
const PORT = '7170'; // the lab's own agents have 7070 on the same addresses
const scratch = mkdtempSync(join(tmpdir(), 'ferry-install-'));
const config = join(scratch, 'config');
const knownHosts = join(scratch, 'known_hosts');
let lab: Lab;
let n1: Sshd;
let n2: Sshd;

const ferry = (...args: string[]): Promise<CliResult> => runFerry(args, { FERRY_CONFIG: config, FERRY_LAB: LAB });
const installArgs = (...targets: string[]): string[] => [
  'install',
  ...targets,
  '--identity',
  n1.clientKey,
  '--known-hosts',
  knownHosts,
  '--agent-port',
  PORT,
];
const target = (name: string, s: Sshd): string => `${name}=${s.url}`;

/** The supervisor's PID on a node, from its pid file (in the node's own /opt). */
const supervisorPid = (s: Sshd): number => Number(readFileSync(`${s.root}/opt/ferry/run/agent.pid`, 'utf8'));

beforeAll(async () => {
  requireRoot();
  lab = await labUp({ name: LAB });
  n1 = await Sshd.start(lab.hosts[0] as LabHost, join(scratch, 'n1'));
  n2 = await Sshd.start(lab.hosts[1] as LabHost, join(scratch, 'n2'));
  // Both nodes accept the same client key.
  writeFileSync(join(n2.dir, 'authorized_keys'), readFileSync(join(n1.dir, 'authorized_keys')));
  expect((await ferry('init')).code).toBe(0);
}, 120_000);

afterAll(async () => {
  await n1?.dispose();
  await n2?.dispose();
  await labDown(LAB);
  rmSync(scratch, { recursive: true, force: true });
});

describe('ferry install over SSH, to a real sshd', () => {
  it('refuses a host whose key is not in known_hosts, and installs nothing', async () => {
    const r = await ferry(...installArgs(target('n1', n1)));
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/n1\s+FAILED.*is not in .*known_hosts/);
    expect(r.stdout).toMatch(/hint: .*--trust-new-hosts/);
    expect(existsSync(`${n1.root}/opt/ferry`)).toBe(false);
  });

  it('installs two nodes in parallel: bundle, certificate, supervised agent, inventory; they answer over mutual TLS', async () => {
    writeFileSync(knownHosts, n1.knownHostsLine()); // n1 known; n2 trusted on first use
    const started = performance.now();
    const r = await ferry(...installArgs(target('n1', n1), target('n2', n2)), '--trust-new-hosts', '--json');
    console.log(`install of 2 nodes: ${Math.round(performance.now() - started)} ms`);
    expect(r.code, r.stderr).toBe(0);
    const results = JSON.parse(r.stdout) as NodeResult[];
    for (const result of results) {
      expect(result.ok).toBe(true);
      expect(result.tasks.map((t) => [t.task, t.state])).toEqual([
        ['host key', result.node === 'n1' ? 'unchanged' : 'done'],
        ['bundle', 'done'],
        ['certificate', 'done'],
        ['agent', 'done'],
        ['answers', 'verified'],
        ['inventory', 'done'],
      ]);
    }
    expect(readFileSync(knownHosts, 'utf8')).toContain(n2.knownHostsLine().trim());
    for (const s of [n1, n2]) {
      expect(statSync(`${s.root}/opt/ferry/etc/tls/key.pem`).mode & 0o777).toBe(0o600);
      expect(existsSync(`/proc/${supervisorPid(s)}`)).toBe(true);
    }
    const inventory = JSON.parse(readFileSync(join(config, 'inventory.json'), 'utf8')) as Inventory;
    expect(inventory.nodes.map((n) => [n.name, n.url])).toEqual([
      ['n1', `wss://${n1.host.address}:${PORT}`],
      ['n2', `wss://${n2.host.address}:${PORT}`],
    ]);
    // Every command that takes an AGENT takes the inventory's names.
    const ps = await ferry('ps', '--on', 'n2', '--json');
    expect(ps.code, ps.stderr).toBe(0);
    expect(JSON.parse(ps.stdout)).toEqual([]);
  });

  it('a second run changes nothing: same agent process, same files', async () => {
    const pids = [supervisorPid(n1), supervisorPid(n2)];
    const node = statSync(`${n1.root}/opt/ferry/app/node`).mtimeMs;
    const cert = readFileSync(`${n1.root}/opt/ferry/etc/tls/cert.pem`, 'utf8');
    const r = await ferry(...installArgs(target('n1', n1), target('n2', n2)), '--json');
    expect(r.code, r.stderr).toBe(0);
    for (const result of JSON.parse(r.stdout) as NodeResult[]) {
      expect(
        result.tasks.every((t) => t.state !== 'done'),
        JSON.stringify(result.tasks),
      ).toBe(true);
    }
    expect([supervisorPid(n1), supervisorPid(n2)]).toEqual(pids);
    expect(statSync(`${n1.root}/opt/ferry/app/node`).mtimeMs).toBe(node);
    expect(readFileSync(`${n1.root}/opt/ferry/etc/tls/cert.pem`, 'utf8')).toBe(cert);
  });

  it('the installed agents migrate a workload from one node to the other', async () => {
    const dir = mkdtempSync(join(scratch, 'work-'));
    const counter = join(projectRoot(), 'dist', 'examples', 'counter');
    const run = await ferry('run', '--on', 'n1', '--name', 'ticker', '--json', '--', counter, join(dir, 'state'));
    expect(run.code, run.stderr).toBe(0);
    const m = await ferry('migrate', 'ticker', '--from', 'n1', '--to', 'n2', '--json');
    expect(m.code, m.stdout + m.stderr).toBe(0);
    const report = JSON.parse(m.stdout) as MigrationReport;
    expect(report.to.agent).toBe('n2');
    // It counts on over there, its log in place on n2's own /opt.
    const count = (): number => Number(readFileSync(join(dir, 'state'), 'utf8').trim().split(/\s+/)[1]);
    const frozen = count();
    await waitFor(() => count() > frozen + 1, { what: 'the workload to count on n2' });
    expect(existsSync(`${n2.root}/opt/ferry/data/workloads/ticker.log`)).toBe(true);
    process.kill(report.to.pid, 'SIGKILL');
  });

  it('--upgrade replaces the bundle and restarts the agent', async () => {
    const before = supervisorPid(n2);
    const r = await ferry(...installArgs(target('n2', n2)), '--upgrade', '--json');
    expect(r.code, r.stderr).toBe(0);
    const [result] = JSON.parse(r.stdout) as NodeResult[];
    expect(result?.tasks.find((t) => t.task === 'bundle')?.state).toBe('done');
    expect(result?.tasks.find((t) => t.task === 'agent')?.state).toBe('done');
    await waitFor(() => existsSync(`${n2.root}/opt/ferry/run/agent.pid`) && supervisorPid(n2) !== before, {
      what: 'a new supervisor',
    });
    expect((await ferry('ps', '--on', 'n2')).code).toBe(0);
  });

  it('refuses a host whose key changed, even with --trust-new-hosts, and goes on with the others', async () => {
    const agentBefore = supervisorPid(n1);
    n1.newHostKey();
    await n1.restart();
    const r = await ferry(...installArgs(target('n1', n1), target('n2', n2)), '--trust-new-hosts', '--upgrade');
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/n1\s+FAILED.*host key of .* is not the one in/);
    expect(r.stdout).toMatch(/hint: .*ssh-keygen -R/);
    expect(r.stdout).toMatch(/n2\s+ok/);
    expect(r.stdout).toMatch(/1 of 2 node\(s\) installed; 1 failed/);
    // Nothing was done to n1: its agent runs on as it was.
    expect(supervisorPid(n1)).toBe(agentBefore);
    expect(existsSync(`/proc/${agentBefore}`)).toBe(true);
  });

  it('uninstall stops the agent, removes its files and its inventory entry', async () => {
    const pid = supervisorPid(n2);
    const r = await ferry('uninstall', 'n2', '--identity', n1.clientKey, '--known-hosts', knownHosts);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    await waitFor(() => !existsSync(`/proc/${pid}`), { what: 'the supervisor to end' });
    expect(existsSync(`${n2.root}/opt/ferry`)).toBe(false);
    const inventory = JSON.parse(readFileSync(join(config, 'inventory.json'), 'utf8')) as Inventory;
    expect(inventory.nodes.map((n) => n.name)).toEqual(['n1']);
  });

  it('refuses bad arguments with exit code 2 before touching any host', async () => {
    for (const [args, message] of [
      [['install', 'http://root@host'], /not ssh:\/\/USER@HOST/],
      [['install', 'ssh://root@host/some/path'], /not ssh:\/\/USER@HOST/],
      [['install', 'Bad Name=ssh://root@host'], /not an ssh:\/\/ URL|cannot name a node/],
      [['install', 'a=ssh://root@h1', 'a=ssh://root@h2'], /named twice/],
      [['install', 'ssh://root@h1', '--prefix', 'relative'], /absolute/],
      [['uninstall', 'nosuchnode'], /neither an ssh:\/\/ URL nor a node/],
    ] as const) {
      const r = await ferry(...args);
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toMatch(message);
    }
    const uninitialised = await runFerry(['install', n1.url], { FERRY_CONFIG: join(scratch, 'empty') });
    expect(uninitialised.code).toBe(2);
    expect(uninitialised.stderr).toMatch(/ferry init/);
  });
});
