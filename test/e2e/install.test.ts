import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Inventory } from '../../controller/agents/index.js';
import { install, KnownHosts, parseTarget, type NodeResult } from '../../controller/install/index.js';
import { labDown, labUp, type Lab, type LabHost } from '../helpers/lab.js';
import type { MigrationReport } from '../../controller/migration/index.js';
import { projectRoot } from '../../src/paths.js';
import { runFerry, type CliResult } from '../helpers/cli.js';
import { requireRoot } from '../helpers/root.js';
import { inHost } from '../helpers/hosts.js';
import { Sshd } from '../helpers/sshd.js';
import { waitFor } from '../helpers/wait.js';

// Named by the process: two runs side by side (another checkout's suite) get labs of their own.
const LAB = `in${process.pid % 100_000}`;
const PORT = '7170'; // the lab's own agents have 7070 on the same addresses
const scratch = mkdtempSync(join(tmpdir(), 'ferry-install-'));
const config = join(scratch, 'config');
const knownHosts = join(scratch, 'known_hosts');
const pause = join(scratch, 'pause');
/** The migrated workload's PID on n2. */
let ticker = 0;
/** What the counter workload has counted so far (it writes "count N" to its state file). */
const count = (): number =>
  Number(readFileSync(`${n2.root}/opt/ferry/data/workloads/ticker/state`, 'utf8').trim().split(/\s+/)[1]);
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
const results = (r: CliResult): NodeResult[] => JSON.parse(r.stdout) as NodeResult[];

/** The supervisor's PID on a node, from its pid file (in the node's own /opt). */
const supervisorPid = (s: Sshd): number => Number(readFileSync(`${s.root}/opt/ferry/run/agent.pid`, 'utf8'));

const installedHash = (s: Sshd): string => readFileSync(`${s.root}/opt/ferry/bundle.sha256`, 'utf8');

/** A PID on a node (its own PID namespace) runs. */
const runsOnNode = (s: Sshd, pid: number): boolean => existsSync(`${s.root}/proc/${pid}`);

/** The agent process its supervisor runs now, if any: a child running the node's own bundle. */
function agentPid(s: Sshd): number | undefined {
  const supervisor = supervisorPid(s);
  const children = readFileSync(`${s.root}/proc/${supervisor}/task/${supervisor}/children`, 'utf8').trim().split(/\s+/);
  return children.map(Number).find((pid) => {
    try {
      return readFileSync(`${s.root}/proc/${pid}/cmdline`, 'utf8').startsWith('/opt/ferry/app/node\0');
    } catch {
      return false;
    }
  });
}

beforeAll(async () => {
  requireRoot();
  lab = await labUp({ name: LAB });
  n1 = await Sshd.start(lab.hosts[0] as LabHost, join(scratch, 'n1'));
  n2 = await Sshd.start(lab.hosts[1] as LabHost, join(scratch, 'n2'));
  // Both nodes accept the same client key.
  n2.authorize(...n1.authorized());
  mkdirSync(pause);
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
      expect(runsOnNode(s, supervisorPid(s))).toBe(true);
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
    const pids = [supervisorPid(n1), supervisorPid(n2), agentPid(n1), agentPid(n2)];
    const node = statSync(`${n1.root}/opt/ferry/app/node`).mtimeMs;
    const cert = readFileSync(`${n1.root}/opt/ferry/etc/tls/cert.pem`, 'utf8');
    const started = performance.now();
    const r = await ferry(...installArgs(target('n1', n1), target('n2', n2)), '--json');
    console.log(`idempotent re-run on 2 nodes: ${Math.round(performance.now() - started)} ms`);
    expect(r.code, r.stderr).toBe(0);
    for (const result of results(r)) {
      expect(
        result.tasks.every((t) => t.state !== 'done'),
        JSON.stringify(result.tasks),
      ).toBe(true);
    }
    expect([supervisorPid(n1), supervisorPid(n2), agentPid(n1), agentPid(n2)]).toEqual(pids);
    expect(statSync(`${n1.root}/opt/ferry/app/node`).mtimeMs).toBe(node);
    expect(readFileSync(`${n1.root}/opt/ferry/etc/tls/cert.pem`, 'utf8')).toBe(cert);
  });

  it('the supervisor restarts an agent that dies, and it answers again', async () => {
    const supervisor = supervisorPid(n1);
    const agent = agentPid(n1);
    expect(agent).toBeDefined();
    await inHost(n1.host, ['kill', '-KILL', String(agent)]);
    await waitFor(() => agentPid(n1) !== undefined && agentPid(n1) !== agent, { what: 'a new agent on n1' });
    expect(supervisorPid(n1)).toBe(supervisor);
    const ps = await ferry('ps', '--on', 'n1');
    expect(ps.code, ps.stderr).toBe(0);
    expect(readFileSync(`${n1.root}/opt/ferry/log/agent.log`, 'utf8')).toMatch(/supervisor: the agent exited \(137\)/);
  });

  it('migrates a workload between the installed nodes; neither is restarted or removed while it is in flight', async () => {
    const counter = join(projectRoot(), 'dist', 'examples', 'counter');
    // Its state file in its own directory, which moves with it.
    const run = await ferry('run', '--on', 'n1', '--name', 'ticker', '--json', '--', counter, 'state');
    expect(run.code, run.stderr).toBe(0);
    // The controller stops once both agents hold the migration: the source frozen, the destination restored.
    writeFileSync(join(pause, 'armed'), 'controller.after-held');
    const migration = runFerry(['migrate', 'ticker', '--from', 'n1', '--to', 'n2', '--json'], {
      FERRY_CONFIG: config,
      FERRY_TEST_PAUSE_DIR: pause,
    });
    const marker = join(pause, 'controller.after-held');
    await waitFor(() => existsSync(marker), { what: 'the migration to be held on both nodes', timeoutMs: 30_000 });
    try {
      const pids = [supervisorPid(n1), supervisorPid(n2)];
      const removal = await ferry('uninstall', 'n1', 'n2', '--identity', n1.clientKey, '--known-hosts', knownHosts);
      expect(removal.code).toBe(1);
      expect(removal.stdout).toMatch(/n1\s+FAILED.*1 migration\(s\) in flight \(\S+ source held\)/);
      expect(removal.stdout).toMatch(/n2\s+FAILED.*1 migration\(s\) in flight/);
      expect(removal.stdout).toMatch(/hint: .*ferry recover --on n1/);
      const upgrade = await ferry(...installArgs(target('n1', n1)), '--upgrade', '--json');
      expect(upgrade.code).toBe(1);
      expect(results(upgrade)[0]?.error?.code).toBe('NODE_BUSY');
      expect(results(upgrade)[0]?.tasks.map((t) => t.task)).toEqual(['host key', 'install']);
      expect([supervisorPid(n1), supervisorPid(n2)]).toEqual(pids);
      expect(existsSync(`${n1.root}/opt/ferry/app.new`)).toBe(false);
    } finally {
      rmSync(marker, { force: true });
    }
    const m = await migration;
    expect(m.code, m.stdout + m.stderr).toBe(0);
    const report = JSON.parse(m.stdout) as MigrationReport;
    expect(report.to.agent).toBe('n2');
    const frozen = count();
    await waitFor(() => count() > frozen + 1, { what: 'the workload to count on n2' });
    expect(existsSync(`${n2.root}/opt/ferry/data/workloads/ticker.log`)).toBe(true);
    ticker = report.to.pid;
  });

  it('--upgrade replaces the bundle and restarts the agent; its workloads keep running', async () => {
    const before = supervisorPid(n2);
    const r = await ferry(...installArgs(target('n2', n2)), '--upgrade', '--json');
    expect(r.code, r.stderr).toBe(0);
    const [result] = results(r);
    expect(result?.tasks.find((t) => t.task === 'bundle')?.state).toBe('done');
    expect(result?.tasks.find((t) => t.task === 'agent')?.state).toBe('done');
    await waitFor(() => existsSync(`${n2.root}/opt/ferry/run/agent.pid`) && supervisorPid(n2) !== before, {
      what: 'a new supervisor',
    });
    const ps = await ferry('ps', '--on', 'n2', '--json');
    expect(ps.code, ps.stderr).toBe(0);
    expect(JSON.parse(ps.stdout)).toMatchObject([{ name: 'ticker', pid: ticker, state: 'running' }]);
    const now = count();
    await waitFor(() => count() > now, { what: 'the workload to count on after the upgrade' });
  });

  it('a cancelled install stops during the copy and leaves the node as it was', async () => {
    const before = { supervisor: supervisorPid(n2), agent: agentPid(n2), hash: installedHash(n2) };
    const cancel = new AbortController();
    const saved = process.env.FERRY_CONFIG;
    process.env.FERRY_CONFIG = config;
    let result: NodeResult | undefined;
    try {
      [result] = await install([parseTarget(target('n2', n2))], {
        knownHosts: new KnownHosts(knownHosts),
        trustNewHosts: false,
        identity: n1.clientKey,
        prefix: '/opt/ferry',
        agentPort: Number(PORT),
        upgrade: true,
        parallel: 1,
        softwareVersion: 'test',
        // As Ctrl-C would, a quarter into the copy.
        onStep: (_, text) => {
          if (text.includes('copying the bundle')) cancel.abort();
        },
        signal: cancel.signal,
      });
    } finally {
      process.env.FERRY_CONFIG = saved;
    }
    expect(result?.ok).toBe(false);
    expect(result?.error).toMatchObject({ code: 'ABORTED', message: 'install on n2 was cancelled' });
    expect(result?.tasks.map((t) => t.task)).toEqual(['host key', 'install']);
    expect({ supervisor: supervisorPid(n2), agent: agentPid(n2), hash: installedHash(n2) }).toEqual(before);
    expect((await ferry('ps', '--on', 'n2')).code).toBe(0);
  });

  it('refuses a host whose key changed, even with --trust-new-hosts; the other hosts are done, and the summary says why each failed', async () => {
    const agentBefore = supervisorPid(n1);
    n1.newHostKey();
    await n1.restart();
    // n3: an address where no sshd listens.
    const n3 = `n3=ssh://root@${n2.host.address}:2299`;
    const r = await ferry(...installArgs(target('n1', n1), target('n2', n2), n3), '--trust-new-hosts', '--upgrade');
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/n1\s+FAILED.*host key of .* is not the one in/);
    expect(r.stdout).toMatch(/hint: .*ssh-keygen -R/);
    expect(r.stdout).toMatch(/n2\s+ok/);
    expect(r.stdout).toMatch(/n3\s+FAILED.*cannot log in to root@\[[\d.]+\]:2299: .*ECONNREFUSED/);
    expect(r.stdout).toMatch(/1 of 3 node\(s\) installed; 2 failed/);
    // Nothing was done to n1: its agent runs on as it was, and n3 is in no inventory.
    expect(supervisorPid(n1)).toBe(agentBefore);
    expect(runsOnNode(n1, agentBefore)).toBe(true);
    const inventory = JSON.parse(readFileSync(join(config, 'inventory.json'), 'utf8')) as Inventory;
    expect(inventory.nodes.map((n) => n.name)).toEqual(['n1', 'n2']);
  });

  it('uninstall refuses while a workload runs there, then stops the agent, removes its files and its inventory entry', async () => {
    const refused = await ferry('uninstall', 'n2', '--identity', n1.clientKey, '--known-hosts', knownHosts);
    expect(refused.code).toBe(1);
    expect(refused.stdout).toMatch(/n2\s+FAILED.*runs 1 workload\(s\): ticker \(PID \d+\)/);
    expect(refused.stdout).toMatch(/hint: migrate them/);
    expect(existsSync(`${n2.root}/opt/ferry/app`)).toBe(true);

    await inHost(n2.host, ['kill', '-KILL', String(ticker)]);
    await waitFor(() => !runsOnNode(n2, ticker), { what: 'the workload to end' });
    const pid = supervisorPid(n2);
    const r = await ferry('uninstall', 'n2', '--identity', n1.clientKey, '--known-hosts', knownHosts, '--json');
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(results(r)[0]?.tasks.map((t) => [t.task, t.state])).toEqual([
      ['in use', 'verified'],
      ['agent', 'done'],
      ['files', 'done'],
      ['inventory', 'done'],
    ]);
    await waitFor(() => !runsOnNode(n2, pid), { what: 'the supervisor to end' });
    expect(existsSync(`${n2.root}/opt/ferry`)).toBe(false);
    const inventory = JSON.parse(readFileSync(join(config, 'inventory.json'), 'utf8')) as Inventory;
    expect(inventory.nodes.map((n) => n.name)).toEqual(['n1']);
    const ps = await ferry('ps', '--on', 'n2');
    expect(ps.code).toBe(2);
    expect(ps.stderr).toMatch(/unknown agent "n2"/);
  });

  it('refuses bad arguments with exit code 2 before touching any host', async () => {
    for (const [args, message] of [
      [['install', 'http://root@host'], /not ssh:\/\/USER@HOST/],
      [['install', 'ssh://root@host/some/path'], /not ssh:\/\/USER@HOST/],
      [['install', 'Bad Name=ssh://root@host'], /not an ssh:\/\/ URL|cannot name a node/],
      [['install', 'a=ssh://root@h1', 'a=ssh://root@h2'], /named twice/],
      [['install', 'ssh://root@h1', '--prefix', 'relative'], /absolute/],
      [['uninstall', 'nosuchnode'], /neither an ssh:\/\/ URL nor a node/],
      [['install', 'ssh://root@h1', '--identity', `${n1.clientKey}.pub`], /is a public key/],
      [['install', 'ssh://root@h1', '--parallel', '0'], /whole number/],
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
