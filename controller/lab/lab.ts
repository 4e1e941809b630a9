import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
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
  pid: number;
  dataDir: string;
  imagesDir: string;
  logFile: string;
  /** The agent's identity directory; absent when the lab runs --insecure. */
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
      const dataDir = join(dir, host);
      const imagesDir = join(existsSync('/dev/shm') ? '/dev/shm' : dir, `ferry-lab-${name}`, host);
      mkdirSync(dataDir, { recursive: true, mode: 0o700 });
      mkdirSync(imagesDir, { recursive: true, mode: 0o700 });
      const logFile = join(dataDir, 'agent.log');
      const tlsDir = authority === undefined ? undefined : join(tlsRoot, host);
      if (authority !== undefined && tlsDir !== undefined) {
        await issueIdentity(authority, { role: 'agent', name: host, hosts: [address] }, tlsDir);
      }
      const pid = startAgent(
        netns,
        host,
        address,
        dataDir,
        imagesDir,
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
        pid,
        dataDir,
        imagesDir,
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
  for (const h of lab?.hosts ?? []) rmSync(h.imagesDir, { recursive: true, force: true });
  rmSync(join('/dev/shm', `ferry-lab-${name}`), { recursive: true, force: true });
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
  h.pid = startAgent(h.netns, h.host, h.address, h.dataDir, h.imagesDir, h.logFile, h.tlsDir, env, lab);
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
  const child = spawn('ip', ['netns', 'exec', h.netns, ...argv], { stdio: 'inherit' });
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code, signal) => resolve(code ?? (signal === null ? 1 : 128)));
  });
}

function startAgent(
  netns: string,
  host: string,
  address: string,
  dataDir: string,
  imagesDir: string,
  logFile: string,
  tlsDir: string | undefined,
  env: Record<string, string>,
  lab: Pick<Lab, 'capacityBytes' | 'metrics' | 'agentProgram'>,
): number {
  const main = lab.agentProgram ?? join(projectRoot(), 'dist', 'controller', 'main.js');
  if (!existsSync(main)) throw new LabError(`${main} is missing`, { hint: 'run `npm run build`' });
  const out = openSync(logFile, 'a');
  // nsenter --net, not `ip netns exec`: the latter also makes a new mount
  // namespace per start, and a workload started by one agent run would sit
  // in a mount namespace the next run's CRIU cannot dump.
  const child = spawn(
    'nsenter',
    [
      `--net=/run/netns/${netns}`,
      '--',
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
  return child.pid;
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
