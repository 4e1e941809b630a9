import { X509Certificate } from 'node:crypto';
import { lookup } from 'node:dns/promises';
import { isIP } from 'node:net';
import { isFinalState } from '../../src/migration/index.js';
import { WireConnection, type MigrationRecord } from '../../src/wire/index.js';
import { controllerIdentity, migrationRecords } from '../agents/index.js';
import { NodeBusyError, NodeUnsuitableError } from './errors.js';
import { layout } from './layout.js';
import { sh, type SshSession, type SshTarget } from './ssh.js';

/**
 * What the controller asks of a node over SSH and of its agent: whether it
 * suits the agent, whether the agent runs, answers or holds a migration,
 * and whether its certificate can be kept.
 */

/** A certificate closer to its end than this is reissued by an install. */
const RENEW_BEFORE_MS = 30 * 86_400_000;
/** How long an agent may take to answer after it was (re)started. */
const ANSWER_TIMEOUT_MS = 30_000;

/** The address the agent listens on and its certificate names: the node's as this controller reaches it. */
export async function agentAddress(target: SshTarget): Promise<string> {
  if (isIP(target.host) !== 0) return target.host;
  return (await lookup(target.host, { family: 4 })).address;
}

/** What the node says about itself, in one round trip. */
export interface NodeInspection {
  arch: string;
  uid: number;
  systemd: boolean;
  /** The installed bundle's hash, or 'none'. */
  installedHash: string;
  /** Whether `address` is one of the node's own: the agent can only listen on those. */
  addressIsLocal: 'yes' | 'no' | 'unknown';
}

export async function inspect(session: SshSession, prefix: string, address: string): Promise<NodeInspection> {
  const p = layout(prefix);
  const out = await session.run(
    [
      'uname -m',
      'id -u',
      'test -d /run/systemd/system && echo systemd || echo no-systemd',
      `cat ${sh(p.hash)} 2>/dev/null || echo none`,
      `if command -v ip >/dev/null 2>&1; then ip -o addr show | grep -qF ${sh(` ${address}/`)} && echo yes || echo no; else echo unknown; fi`,
    ].join('; '),
    'inspecting the node',
  );
  const [arch = '', uid = '', init = '', installedHash = 'none', local = 'unknown'] = out.trim().split('\n');
  return {
    arch,
    uid: Number(uid),
    systemd: init === 'systemd',
    installedHash: installedHash.trim() || 'none',
    addressIsLocal: local === 'yes' || local === 'no' ? local : 'unknown',
  };
}

/** Refuses a node the agent cannot run on as installed, before anything there changes. */
export function checkSuitable(target: SshTarget, facts: NodeInspection, address: string): void {
  if (facts.arch !== 'x86_64')
    throw new NodeUnsuitableError(`${target.name} is ${facts.arch}; the bundle is for x86_64`);
  if (facts.uid !== 0) {
    throw new NodeUnsuitableError(`${target.user} is not root on ${target.name}: CRIU and the agent need root`, {
      hint: `log in as root: ssh://root@${target.host}${target.port === 22 ? '' : `:${target.port}`}`,
    });
  }
  if (facts.addressIsLocal === 'no') {
    throw new NodeUnsuitableError(
      `${address}, where this controller reaches ${target.name}, is not an address of the node (NAT or a proxy?): its agent could not listen there`,
      { hint: 'install from where the node is reachable at one of its own addresses; peers connect to it there too' },
    );
  }
}

/** The end of the agent's log on the node, to say why it does not answer. */
export async function logTail(session: SshSession, prefix: string, systemd: boolean): Promise<string> {
  const r = await session.exec(
    systemd
      ? 'journalctl -u ferry-agent.service -n 15 --no-pager 2>/dev/null'
      : `tail -n 15 ${sh(layout(prefix).log)} 2>/dev/null`,
  );
  return r.stdout.trimEnd();
}

/**
 * Refuses to restart or remove an agent that holds a migration in flight: it
 * holds a frozen process or a copy of one, and its peer waits on it.
 * Undefined when the agent did not answer (it cannot hold anything then that
 * its journal, kept across restarts, would not settle).
 */
export async function migrationsInFlight(url: string, softwareVersion: string): Promise<MigrationRecord[] | undefined> {
  try {
    const records = await migrationRecords({ url, tls: controllerIdentity() }, softwareVersion, false);
    return records.filter((m) => !isFinalState(m.state));
  } catch {
    return undefined;
  }
}

export function busy(node: string, open: readonly MigrationRecord[], action: string): NodeBusyError {
  return new NodeBusyError(
    `${node} has ${open.length} migration(s) in flight (${open.map((m) => `${m.migrationId} ${m.role} ${m.state}`).join(', ')}): not ${action} its agent now`,
    { hint: `let them finish, or settle them with \`ferry recover --on ${node}\`, then run again` },
  );
}

export function certificateFits(pems: string, caPem: string, address: string, name: string): boolean {
  const blocks = pems.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (blocks.length < 2) return false;
  try {
    const cert = new X509Certificate(blocks[0] ?? '');
    const ca = new X509Certificate(caPem);
    return (
      cert.checkIssued(ca) &&
      cert.verify(ca.publicKey) &&
      (blocks[1] ?? '').trim() === caPem.trim() &&
      new Date(cert.validTo).getTime() - Date.now() > RENEW_BEFORE_MS &&
      cert.checkIP(address) !== undefined &&
      cert.subject.split('\n').includes(`CN=${name}`)
    );
  } catch {
    return false;
  }
}

export async function agentRunning(session: SshSession, prefix: string, systemd: boolean): Promise<boolean> {
  if (systemd) return (await session.exec('systemctl is-active --quiet ferry-agent.service')).code === 0;
  const p = layout(prefix);
  const r = await session.exec(
    `pid=$(cat ${sh(p.pid)} 2>/dev/null) && kill -0 "$pid" 2>/dev/null && grep -q agent-supervisor /proc/"$pid"/cmdline`,
  );
  return r.code === 0;
}

/** Stops the agent; true when it had to be killed (it did not end within 10 s of SIGTERM). */
export async function stopAgent(session: SshSession, prefix: string, systemd: boolean): Promise<boolean> {
  if (systemd) {
    // systemd escalates to SIGKILL itself (TimeoutStopSec).
    await session.exec('systemctl stop ferry-agent.service');
    return false;
  }
  const p = layout(prefix);
  // The supervisor leads its own process group (setsid): one signal reaches it, the agent and CRIU's
  // service, not the workloads (sessions of their own). The pid is only signalled while it is still
  // the supervisor: a pid file can outlive its process, and pids are reused.
  const r = await session.exec(
    `pid=$(cat ${sh(p.pid)} 2>/dev/null); ` +
      `if [ -n "$pid" ] && grep -q agent-supervisor /proc/"$pid"/cmdline 2>/dev/null; then ` +
      `kill -TERM -"$pid"; i=0; while kill -0 -"$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; ` +
      `if kill -0 -"$pid" 2>/dev/null; then kill -KILL -"$pid"; echo killed; fi; ` +
      `i=0; while kill -0 -"$pid" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; fi; ` +
      `rm -f ${sh(p.pid)}`,
  );
  return r.stdout.includes('killed');
}

export async function waitForAgent(url: string, softwareVersion: string): Promise<string> {
  const tls = controllerIdentity();
  const deadline = Date.now() + ANSWER_TIMEOUT_MS;
  for (;;) {
    try {
      const c = await WireConnection.connect(
        url,
        { role: 'controller', name: tls.name, softwareVersion },
        { tls, timeoutMs: 2_000 },
      );
      const name = c.peerName;
      c.close();
      return name;
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await new Promise((r) => setTimeout(r, 250));
    }
  }
}
