import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync,
  cpSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { FerryError, InvalidInputError } from '../../src/errors.js';
import { projectRoot } from '../../src/paths.js';
import { isAlive } from '../../src/proc.js';
import { createAuthority, issueIdentity, loadIdentity } from '../../src/tls/index.js';
import { WireConnection } from '../../src/wire/index.js';
import { AGENT_PORT, type AgentEndpoint } from '../agents/index.js';

const execFileAsync = promisify(execFile);

/** The lab's name prefixes its namespaces and interfaces (at most 15 characters each). */
export const LAB_NAME = /^[a-z][a-z0-9]{0,9}$/;
export const DEFAULT_LAB = 'ferry';

export interface LabHost {
  /** "a", "b", ... */
  host: string;
  netns: string;
  address: string;
  url: string;
  /** The host's init (PID 1 of its PID namespace), as this machine sees it: it holds the host's namespaces. */
  init: number;
  /** The agent, as this machine sees it. */
  pid: number;
  /** The agent's data directory, inside the host (every host has the same path, as installed machines do). */
  dataDir: string;
  /** The agent's images directory, inside the host. */
  imagesDir: string;
  /** The agent's output (its console), on this machine: outside the host. */
  logFile: string;
  /** The agent's identity directory, inside the host; absent when the lab runs --insecure. */
  tlsDir?: string | undefined;
  /** The identity a controller shows this host's agent (the lab's own); absent when --insecure. */
  controllerTls?: string | undefined;
}

export interface Lab {
  name: string;
  dir: string;
  bridge: string;
  subnet: string;
  hosts: LabHost[];
  /** The lab's throwaway controller identity (its own CA); absent when the lab runs --insecure. */
  controllerTls?: string | undefined;
  capacityBytes?: number | undefined;
  metrics?: boolean | undefined;
  /** The program the agents run (`ferry`'s main.js unless the lab was brought up with another). */
  agentProgram?: string | undefined;
}

/** The endpoint of a lab's host, with the lab's own throwaway controller identity. */
export function hostEndpoint(host: LabHost): AgentEndpoint {
  return { url: host.url, tls: host.controllerTls === undefined ? undefined : loadIdentity(host.controllerTls) };
}

export class LabError extends FerryError {
  readonly code = 'LAB';
}

export interface LabUpOptions {
  name?: string | undefined;
  hosts?: number | undefined;
  /** Extra environment for a host's agent (tests use it), by host letter. */
  agentEnv?: Record<string, Record<string, string>> | undefined;
  /** Plaintext agents without authentication (prints a warning); default: mutual TLS with a throwaway CA. */
  insecure?: boolean | undefined;
  /** Memory each host offers workloads (`ferry agent --capacity`): lab hosts share one machine's. */
  capacityBytes?: number | undefined;
  /** Each agent serves Prometheus metrics on its address, port METRICS_PORT. */
  metrics?: boolean | undefined;
  /**
   * The `ferry` program the agents run, when not this one (dist/controller/main.js):
   * the tests give theirs (test/harness), which adds their hooks. Kept for restartAgent.
   */
  agentProgram?: string | undefined;
  /** How long each agent may take to answer once started (default 30 s; a machine under emulation needs more). */
  agentStartMs?: number | undefined;
}

export const METRICS_PORT = 9464;

/** Where a lab host's agent keeps its data and images, inside the host. */
const HOST_DATA_DIR = '/var/lib/ferry';
const HOST_IMAGES_DIR = '/var/lib/ferry/images';
const HOST_TLS_DIR = '/etc/ferry/tls';

/**
 * A path inside a lab host, as this machine reaches it (through the host
 * init's root): what an operator logged in to that host would see there.
 * For tests and tools that look at a host from outside; the migration
 * itself never uses it.
 */
export function onHost(h: Pick<LabHost, 'init'>, path: string): string {
  return join(`/proc/${h.init}/root`, path);
}

const SHM = existsSync('/dev/shm') ? '/dev/shm' : '/tmp';

function labDir(name: string): string {
  return join(existsSync('/run') ? '/run' : '/tmp', 'ferry', `lab-${name}`);
}

/** The lab's state, or undefined when it is not up. */
export function readLab(name = DEFAULT_LAB): Lab | undefined {
  const file = join(labDir(name), 'lab.json');
  if (!existsSync(file)) return undefined;
  return JSON.parse(readFileSync(file, 'utf8')) as Lab;
}

/**
 * Two (or more) hosts on this machine: one network namespace each, joined
 * by a bridge that the controller (in the root namespace) also sits on,
 * with an agent listening on each host's address. Idempotent: a lab that
 * is up and whose agents answer is returned as it is.
 */
export async function labUp(options: LabUpOptions = {}): Promise<Lab> {
  const name = options.name ?? DEFAULT_LAB;
  if (!LAB_NAME.test(name)) {
    throw new InvalidInputError(`bad lab name ${JSON.stringify(name)}`, {
      hint: 'use 1 to 10 lower-case letters and digits',
    });
  }
  const count = options.hosts ?? 2;
  if (!Number.isInteger(count) || count < 2 || count > 8) throw new InvalidInputError('a lab has 2 to 8 hosts');
  if (process.getuid?.() !== 0)
    throw new LabError('the lab needs root (network namespaces, CRIU)', { hint: 'run as root' });
  const existing = readLab(name);
  if (existing !== undefined) {
    if (await allAnswer(existing)) return existing;
    await labDown(name);
  }
  const dir = labDir(name);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  releaseSubnet(name); // a claim a crashed run of this lab left behind
  const subnet = claimSubnet(name);
  const bridge = `${name}-br`;
  const lab: Lab = {
    name,
    dir,
    bridge,
    subnet: `${subnet}.0/24`,
    hosts: [],
    capacityBytes: options.capacityBytes,
    agentProgram: options.agentProgram,
    metrics: options.metrics,
  };
  const tlsRoot = join(dir, 'tls');
  try {
    // A throwaway cluster CA: the lab runs exactly as an installed cluster does, mutual TLS included.
    const authority = options.insecure === true ? undefined : await createAuthority(join(tlsRoot, 'ca'), `lab ${name}`);
    if (authority !== undefined) {
      lab.controllerTls = join(tlsRoot, 'controller');
      await issueIdentity(authority, { role: 'controller', name: `lab-${name}` }, lab.controllerTls);
    }
    await ip('link', 'add', bridge, 'type', 'bridge');
    await ip('addr', 'add', `${subnet}.254/24`, 'dev', bridge);
    await ip('link', 'set', bridge, 'up');
    for (let i = 0; i < count; i++) {
      const host = String.fromCharCode(97 + i);
      const netns = `${name}-${host}`;
      const address = `${subnet}.${i + 1}`;
      const hostVeth = `${name}-${host}0`;
      await ip('netns', 'add', netns);
      await ip('link', 'add', hostVeth, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', netns);
      await ip('link', 'set', hostVeth, 'master', bridge, 'up');
      await ip('-n', netns, 'addr', 'add', `${address}/24`, 'dev', 'eth0');
      await ip('-n', netns, 'link', 'set', 'eth0', 'up');
      await ip('-n', netns, 'link', 'set', 'lo', 'up');
      const state = join(SHM, `ferry-lab-${name}`, host);
      const init = await startHost(netns, host, state);
      const logFile = join(dir, host, 'agent.log');
      mkdirSync(join(dir, host), { recursive: true, mode: 0o700 });
      const hostPart = { init, dataDir: HOST_DATA_DIR, imagesDir: HOST_IMAGES_DIR };
      mkdirSync(onHost(hostPart, HOST_IMAGES_DIR), { recursive: true, mode: 0o700 });
      let tlsDir: string | undefined;
      if (authority !== undefined) {
        const issued = join(tlsRoot, host);
        await issueIdentity(authority, { role: 'agent', name: host, hosts: [address] }, issued);
        // The host's identity on its own disk, as `ferry install` puts it on a node.
        mkdirSync(onHost(hostPart, HOST_TLS_DIR), { recursive: true, mode: 0o700 });
        cpSync(issued, onHost(hostPart, HOST_TLS_DIR), { recursive: true });
        tlsDir = HOST_TLS_DIR;
      }
      const pid = await startAgent(
        init,
        host,
        address,
        HOST_DATA_DIR,
        HOST_IMAGES_DIR,
        logFile,
        tlsDir,
        options.agentEnv?.[host] ?? {},
        lab,
      );
      const url = `${tlsDir === undefined ? 'ws' : 'wss'}://${address}:${AGENT_PORT}`;
      lab.hosts.push({
        host,
        netns,
        address,
        url,
        init,
        pid,
        dataDir: HOST_DATA_DIR,
        imagesDir: HOST_IMAGES_DIR,
        logFile,
        tlsDir,
        controllerTls: lab.controllerTls,
      });
      writeFileSync(join(dir, 'lab.json'), JSON.stringify(lab, null, 2) + '\n');
    }
    for (const h of lab.hosts) await waitForAgent(lab, h, options.agentStartMs);
    return lab;
  } catch (error) {
    await labDown(name).catch(() => undefined);
    throw error;
  }
}

/** Stops the lab's agents and everything running in its hosts, and removes its namespaces and files. */
export async function labDown(name = DEFAULT_LAB): Promise<boolean> {
  const lab = readLab(name);
  const dir = labDir(name);
  const netnses = (lab?.hosts ?? []).map((h) => h.netns);
  // Also what a half-made lab may have left without state.
  for (const letter of 'abcdefgh') {
    const netns = `${name}-${letter}`;
    if (!netnses.includes(netns) && existsSync(`/run/netns/${netns}`)) netnses.push(netns);
  }
  // A host's init going takes its whole PID namespace with it: the agent, its workloads, CRIU.
  for (const h of lab?.hosts ?? []) {
    try {
      process.kill(h.init, 'SIGKILL');
    } catch {
      // gone
    }
  }
  for (const netns of netnses) {
    const pids = await ipOut('netns', 'pids', netns).catch(() => '');
    for (const pid of pids.split(/\s+/).filter(Boolean)) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        // gone
      }
    }
  }
  for (const netns of netnses) await ip('netns', 'del', netns).catch(() => undefined);
  await ip('link', 'del', `${name}-br`).catch(() => undefined);
  // The kernel removes a deleted namespace's interfaces after `ip netns del`
  // returns; a lab brought up again at once would find its veth names taken.
  for (let i = 0; i < 100; i++) {
    const links = await ipOut('-o', 'link', 'show').catch(() => '');
    if (!links.split('\n').some((l) => l.includes(` ${name}-`))) break;
    await sleep(50);
  }
  for (const h of lab?.hosts ?? []) for (let i = 0; i < 100 && isAlive(h.init); i++) await sleep(20);
  rmSync(join(SHM, `ferry-lab-${name}`), { recursive: true, force: true });
  rmSync(dir, { recursive: true, force: true });
  releaseSubnet(name);
  return lab !== undefined || netnses.length > 0;
}

/**
 * Stops a lab host's agent (SIGKILL, as a crash would) if it runs, and starts
 * a new one with `env` added to its environment; resolves once it answers.
 */
export async function restartAgent(name: string, host: string, env: Record<string, string> = {}): Promise<LabHost> {
  const lab = readLab(name);
  const h = lab?.hosts.find((x) => x.host === host);
  if (lab === undefined || h === undefined) throw new InvalidInputError(`no host ${host} in lab ${name}`);
  try {
    process.kill(h.pid, 'SIGKILL');
  } catch {
    // already gone
  }
  for (let i = 0; i < 200 && isAlive(h.pid); i++) await sleep(25);
  h.pid = await startAgent(h.init, h.host, h.address, h.dataDir, h.imagesDir, h.logFile, h.tlsDir, env, lab);
  writeFileSync(join(lab.dir, 'lab.json'), JSON.stringify(lab, null, 2) + '\n');
  await waitForAgent(lab, h);
  return h;
}

const SUBNETS = join(existsSync('/run') ? '/run' : '/tmp', 'ferry', 'subnets');

/**
 * A /24 for the lab that no other lab on this machine uses: labs run side by
 * side (tests do), and two bridges with one subnet would confuse routing.
 * Claimed by an atomic mkdir, released by labDown.
 */
function claimSubnet(name: string): string {
  mkdirSync(SUBNETS, { recursive: true });
  const start = createHash('sha256').update(name).digest()[0] ?? 0;
  for (let i = 0; i < 200; i++) {
    const subnet = `10.199.${((start + i) % 200) + 20}`;
    try {
      mkdirSync(join(SUBNETS, subnet));
    } catch {
      continue; // another lab has it
    }
    writeFileSync(join(SUBNETS, subnet, 'lab'), name);
    return subnet;
  }
  throw new LabError('no free subnet for a lab (200 labs up?)', { hint: `remove stale claims in ${SUBNETS}` });
}

function releaseSubnet(name: string): void {
  if (!existsSync(SUBNETS)) return;
  for (const subnet of readdirSync(SUBNETS)) {
    const owner = join(SUBNETS, subnet, 'lab');
    if (existsSync(owner) && readFileSync(owner, 'utf8') === name)
      rmSync(join(SUBNETS, subnet), { recursive: true, force: true });
  }
}

/** Runs a command inside a lab host; resolves with its exit code. */
export async function labExec(name: string, host: string, argv: readonly string[]): Promise<number> {
  const lab = readLab(name);
  const h = lab?.hosts.find((x) => x.host === host);
  if (h === undefined) {
    throw new InvalidInputError(`no host ${host} in lab ${name}`, {
      hint: lab === undefined ? 'run `ferry lab up` first' : `hosts: ${lab.hosts.map((x) => x.host).join(', ')}`,
    });
  }
  if (argv.length === 0) throw new InvalidInputError('give a command after --');
  // In this directory when the host has it too (the project's is on every host), else at its root.
  const child = spawn(
    'nsenter',
    [...enterHost(h.init), 'sh', '-c', 'cd "$0" 2>/dev/null || cd /; exec "$@"', process.cwd(), ...argv],
    { stdio: 'inherit' },
  );
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code, signal) => resolve(code ?? (signal === null ? 1 : 128)));
  });
}

/** nsenter's arguments that run a command in all of a lab host's namespaces, at its root. */
export function enterHost(init: number): string[] {
  return ['-t', String(init), '--mount', '--uts', '--ipc', '--net', '--pid', '--root', '--wd', '--'];
}

/** Signals a process of a lab host by its PID there (SIGKILL unless told otherwise); quiet when it is gone. */
export async function killInHost(h: Pick<LabHost, 'init'>, pid: number, signal = 'KILL'): Promise<void> {
  if (pid <= 0) return;
  await execFileAsync('nsenter', [...enterHost(h.init), 'kill', `-${signal}`, String(pid)], { timeout: 10_000 }).catch(
    () => undefined,
  );
}

/**
 * Starts a lab host: its init (scripts/lab-host) as PID 1 of new mount,
 * UTS, IPC and PID namespaces inside the host's network namespace, on a
 * root file system of its own. Resolves with the init's PID once the host
 * is built.
 */
async function startHost(netns: string, host: string, state: string): Promise<number> {
  rmSync(state, { recursive: true, force: true });
  mkdirSync(state, { recursive: true, mode: 0o700 });
  const child = spawn(
    'nsenter',
    [
      `--net=/run/netns/${netns}`,
      '--',
      'unshare',
      '--mount',
      '--uts',
      '--ipc',
      '--pid',
      '--fork',
      '--kill-child',
      '--',
      'sh',
      join(projectRoot(), 'scripts', 'lab-host'),
      host,
      state,
      ...hostLayers(),
    ],
    { detached: true, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  let timer: NodeJS.Timeout | undefined;
  const built = await new Promise<boolean>((resolve) => {
    createInterface({ input: child.stdout }).on('line', (line) => line === 'ready' && resolve(true));
    child.once('exit', () => resolve(false));
    timer = setTimeout(() => resolve(false), 20_000);
  });
  clearTimeout(timer);
  child.stdout.destroy();
  child.stderr.destroy();
  child.unref();
  const init = built ? firstChild(child.pid ?? 0) : undefined;
  if (init === undefined) {
    throw new LabError(`cannot build lab host ${host}: ${stderr.trim() || 'its init did not get ready in 20 s'}`, {
      hint: 'the lab needs overlayfs and mount, PID, UTS and IPC namespaces',
    });
  }
  return init;
}

/**
 * The first child of a process (the init unshare forked, the command nsenter
 * forked into a host), as this machine sees it: nsenter does not pass
 * signals on, so a command run in a host is signalled there.
 */
export function firstChild(parent: number): number | undefined {
  try {
    const first = readFileSync(`/proc/${parent}/task/${parent}/children`, 'utf8').trim().split(/\s+/)[0];
    return first === undefined || first === '' ? undefined : Number(first);
  } catch {
    return undefined;
  }
}

const PSEUDO = new Set([
  'proc',
  'sysfs',
  'devtmpfs',
  'devpts',
  'tmpfs',
  'ramfs',
  'cgroup',
  'cgroup2',
  'mqueue',
  'debugfs',
  'tracefs',
  'securityfs',
  'pstore',
  'bpf',
  'configfs',
  'fusectl',
  'hugetlbfs',
  'binfmt_misc',
  'autofs',
  'nsfs',
  'efivarfs',
  'rpc_pipefs',
  'nfsd',
  'fuse.gvfsd-fuse',
  'fuse.portal',
]);

/**
 * What each host overlays: this machine's root, its other disk file systems
 * (not the pseudo ones, nothing under /proc, /sys, /dev or /run, no file
 * bind mounts), and last the project directory.
 */
function hostLayers(): string[] {
  const layers = ['/'];
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const [left, right] = line.split(' - ');
    const target = left?.split(' ')[4]?.replace(/\\(\d{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    const fstype = right?.split(' ')[0];
    if (target === undefined || fstype === undefined || target === '/' || PSEUDO.has(fstype)) continue;
    if (/^\/(proc|sys|dev|run)(\/|$)/.test(target) || layers.includes(target)) continue;
    try {
      if (!statSync(target).isDirectory()) continue;
    } catch {
      continue;
    }
    layers.push(target);
  }
  layers.push(projectRoot());
  return layers;
}

async function startAgent(
  init: number,
  host: string,
  address: string,
  dataDir: string,
  imagesDir: string,
  logFile: string,
  tlsDir: string | undefined,
  env: Record<string, string>,
  lab: Pick<Lab, 'capacityBytes' | 'metrics' | 'agentProgram'>,
): Promise<number> {
  const main = lab.agentProgram ?? join(projectRoot(), 'dist', 'controller', 'main.js');
  if (!existsSync(main)) throw new LabError(`${main} is missing`, { hint: 'run `npm run build`' });
  const out = openSync(logFile, 'a');
  const child = spawn(
    'nsenter',
    [
      ...enterHost(init),
      process.execPath,
      main,
      'agent',
      '--name',
      host,
      '--listen',
      `${address}:${AGENT_PORT}`,
      '--data-dir',
      dataDir,
      '--images-dir',
      imagesDir,
      ...(tlsDir === undefined ? ['--insecure'] : ['--tls-dir', tlsDir]),
      ...(lab.capacityBytes === undefined ? [] : ['--capacity', String(lab.capacityBytes)]),
      ...(lab.metrics === true ? ['--metrics', `${address}:${METRICS_PORT}`] : []),
    ],
    { detached: true, stdio: ['ignore', out, out], env: { ...process.env, FERRY_LOG: 'info', ...env } },
  );
  closeSync(out);
  child.unref();
  if (child.pid === undefined) throw new LabError(`cannot start the agent of host ${host}`);
  // nsenter forks into the host's PID namespace: the agent is its child.
  for (let i = 0; i < 200; i++) {
    const agent = firstChild(child.pid);
    if (agent !== undefined) return agent;
    if (!isAlive(child.pid)) break;
    await sleep(10);
  }
  throw new LabError(`cannot start the agent of host ${host}`, { hint: `read ${logFile}` });
}

/** Resolves when the host's agent completes a handshake; throws why not. */
async function answers(lab: Lab, h: LabHost): Promise<void> {
  const c = await WireConnection.connect(
    h.url,
    { role: 'controller', name: 'lab', softwareVersion: '' },
    { timeoutMs: 1_000, tls: lab.controllerTls === undefined ? undefined : loadIdentity(lab.controllerTls) },
  );
  c.close();
}

async function waitForAgent(lab: Lab, h: LabHost, startMs = 30_000): Promise<void> {
  const deadline = Date.now() + startMs;
  for (;;) {
    try {
      await answers(lab, h);
      return;
    } catch (error) {
      if (Date.now() > deadline) {
        const tail = existsSync(h.logFile)
          ? readFileSync(h.logFile, 'utf8').trim().split('\n').slice(-5).join('\n')
          : '';
        throw new LabError(
          `the agent of host ${h.host} did not answer at ${h.url}: ${(error as Error).message}\n${tail}`,
          {
            hint: `read ${h.logFile}`,
          },
        );
      }
      await sleep(100);
    }
  }
}

async function allAnswer(lab: Lab): Promise<boolean> {
  for (const h of lab.hosts) {
    try {
      await answers(lab, h);
    } catch {
      return false;
    }
  }
  return lab.hosts.length > 0;
}

async function ip(...args: string[]): Promise<void> {
  await ipOut(...args);
}

async function ipOut(...args: string[]): Promise<string> {
  try {
    const { stdout } = await execFileAsync('ip', args, { timeout: 10_000 });
    return stdout;
  } catch (error) {
    const stderr = (error as { stderr?: string }).stderr?.trim() ?? '';
    throw new LabError(`ip ${args.join(' ')} failed: ${stderr || (error as Error).message}`);
  }
}
