import { execFile } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { createReadStream, mkdtempSync, rmSync, statSync } from 'node:fs';
import { lookup } from 'node:dns/promises';
import { isIP } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { Readable, Transform } from 'node:stream';
import { promisify } from 'node:util';
import pLimit from 'p-limit';
import { AbortedError, FerryError } from '../src/errors.js';
import { projectRoot } from '../src/paths.js';
import { issueIdentity, loadAuthority } from '../src/tls/index.js';
import { WireConnection, type MigrationRecord } from '../src/wire/index.js';
import {
  authorityDir,
  controllerIdentity,
  findNode,
  listWorkloads,
  migrationRecords,
  removeNode,
  upsertNode,
} from './agents/index.js';
import { sh, SshSession, type SshOptions, type SshTarget } from './ssh.js';

const execFileAsync = promisify(execFile);
export const DEFAULT_PREFIX = '/opt/ferry';
export const AGENT_PORT = 7070;
/** A certificate closer to its end than this is reissued by an install. */
const RENEW_BEFORE_MS = 30 * 86_400_000;
/** How long an agent may take to answer after it was (re)started. */
const ANSWER_TIMEOUT_MS = 30_000;

/** The node cannot run the agent as Ferry installs it (architecture, user, address). */
export class NodeUnsuitableError extends FerryError {
  readonly code = 'NODE_UNSUITABLE';
}

/** Restarting or removing the agent now would break something in progress there. */
export class NodeBusyError extends FerryError {
  readonly code = 'NODE_BUSY';
}

/** The agent did not answer over mutual TLS; `logTail` is the end of its log on the node. */
export class AgentNotAnsweringError extends FerryError {
  readonly code = 'AGENT_NOT_ANSWERING';
  constructor(
    readonly url: string,
    readonly logTail: string,
    options: { hint?: string; cause?: unknown } = {},
  ) {
    super(
      `the agent did not answer at ${url}${options.cause === undefined ? '' : `: ${(options.cause as Error).message}`}` +
        (logTail === '' ? '' : `; the end of its log:\n${logTail}`),
      options,
    );
  }
}

export interface InstallOptions extends SshOptions {
  prefix: string;
  agentPort: number;
  upgrade: boolean;
  parallel: number;
  softwareVersion: string;
  /** One line per step, as it happens: "NODE: what". */
  onStep?: (node: string, step: string) => void;
  /**
   * Stops the work between steps, and during the copy of the bundle (the
   * running installation is untouched until the copy is complete). A
   * restart that has begun is finished: a node is not left without its agent.
   */
  signal?: AbortSignal | undefined;
}

/** done: changed something; unchanged: already right; verified: checked, nothing to change; failed. */
export type TaskState = 'done' | 'unchanged' | 'verified' | 'failed';

export interface NodeResult {
  node: string;
  target: string;
  ok: boolean;
  tasks: { task: string; state: TaskState; detail: string }[];
  error?: { code: string; message: string; hint?: string | undefined } | undefined;
  url?: string | undefined;
  ms: number;
}

/** The agent bundle, built (or taken from the cache) once for all nodes. */
async function bundle(): Promise<{ file: string; hash: string; bytes: number }> {
  const { stdout } = await execFileAsync('bash', [join(projectRoot(), 'scripts', 'bundle')], {
    maxBuffer: 1 << 20,
  });
  const file = stdout.trim();
  const hash = /ferry-agent-([0-9a-f]{64})\.tar\.gz$/.exec(basename(file))?.[1];
  if (hash === undefined) throw new Error(`scripts/bundle printed ${file}`);
  return { file, hash, bytes: statSync(file).size };
}

/** Everything of an installation lives under its prefix: removing the prefix removes it (but a systemd unit). */
interface Layout {
  app: string;
  tls: string;
  data: string;
  log: string;
  pid: string;
  supervisor: string;
  hash: string;
}

function layout(prefix: string): Layout {
  return {
    app: `${prefix}/app`,
    tls: `${prefix}/etc/tls`,
    data: `${prefix}/data`,
    log: `${prefix}/log/agent.log`,
    pid: `${prefix}/run/agent.pid`,
    supervisor: `${prefix}/bin/agent-supervisor`,
    hash: `${prefix}/bundle.sha256`,
  };
}

/** The agent's command line on the node: its own node binary, so the node needs no Node.js. */
function agentCommand(prefix: string, name: string, address: string, port: number): string[] {
  const p = layout(prefix);
  return [
    `${p.app}/node`,
    `${p.app}/dist/controller/main.js`,
    'agent',
    '--name',
    name,
    '--listen',
    `${address}:${port}`,
    '--data-dir',
    p.data,
    '--tls-dir',
    p.tls,
  ];
}

/** Restarts the agent when it dies; stopped by signalling its process group (the pid file holds the leader). */
export function supervisorScript(prefix: string, command: string[]): string {
  const p = layout(prefix);
  return `#!/bin/sh
# Ferry agent supervisor (no systemd on this node): restarts the agent if it
# exits. Stop it with: kill -TERM -$(cat ${p.pid})
echo $$ >${sh(p.pid)}
trap 'kill -TERM "$agent" 2>/dev/null; wait "$agent"; exit 0' TERM INT
while :; do
  FERRY_LOG=info ${command.map(sh).join(' ')} >>${sh(p.log)} 2>&1 &
  agent=$!
  wait "$agent"
  status=$?
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) supervisor: the agent exited ($status), restarting in 1 s" >>${sh(p.log)}
  sleep 1
done
`;
}

/**
 * KillMode=process: stopping or restarting the agent (an upgrade) must not
 * end the workloads it started, which live in its cgroup; they are detached
 * sessions that outlive the agent, as under the supervisor.
 */
export function systemdUnit(command: string[]): string {
  return `[Unit]
Description=Ferry agent (live migration with CRIU)
After=network-online.target
Wants=network-online.target

[Service]
Environment=FERRY_LOG=info
ExecStart=${command.map((w) => (/[\s"'\\]/.test(w) ? JSON.stringify(w) : w)).join(' ')}
Restart=always
RestartSec=1
KillMode=process

[Install]
WantedBy=multi-user.target
`;
}

const UNIT = '/etc/systemd/system/ferry-agent.service';

/** The address the agent listens on and its certificate names: the node's as this controller reaches it. */
async function agentAddress(target: SshTarget): Promise<string> {
  if (isIP(target.host) !== 0) return target.host;
  return (await lookup(target.host, { family: 4 })).address;
}

const agentUrl = (address: string, port: number): string =>
  `wss://${address.includes(':') ? `[${address}]` : address}:${port}`;

/** The URL an installed agent listens on, read from its unit or supervisor (`--listen IP:PORT`). */
export function listenUrlOf(service: string): string | undefined {
  const listen = /'?--listen'?\s+'?([^'\s]+)'?/.exec(service)?.[1];
  const match = listen === undefined ? null : /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(listen);
  const host = match?.[1] ?? match?.[2];
  return host === undefined ? undefined : agentUrl(host, Number(match?.[3]));
}

const MiB = (bytes: number): string => `${(bytes / 2 ** 20).toFixed(1)} MiB`;

/** Reports the bytes sent at each quarter of the bundle. */
class Progress extends Transform {
  #sent = 0;
  #next = 0.25;
  constructor(
    readonly total: number,
    readonly report: (text: string) => void,
  ) {
    super();
  }
  override _transform(chunk: Buffer, _: BufferEncoding, done: (error?: Error | null, data?: Buffer) => void): void {
    this.#sent += chunk.length;
    while (this.#sent / this.total >= this.#next) {
      this.report(`copying the bundle: ${MiB(Math.min(this.#sent, this.total))} of ${MiB(this.total)}`);
      this.#next += 0.25;
    }
    done(null, chunk);
  }
}

type Step = (task: string, state: TaskState, detail: string) => void;

/**
 * Runs one node's work with its task list; a failure ends that node's work
 * only, recorded with its code and hint, so the other nodes go on.
 */
async function onNode(
  target: SshTarget,
  onStep: ((node: string, step: string) => void) | undefined,
  verb: 'install' | 'uninstall',
  work: (step: Step) => Promise<string | undefined>,
  signal: AbortSignal | undefined,
): Promise<NodeResult> {
  const started = performance.now();
  const tasks: NodeResult['tasks'] = [];
  const step: Step = (task, state, detail) => {
    tasks.push({ task, state, detail });
    onStep?.(target.name, `${{ done: '+', unchanged: '=', verified: '✓', failed: '!' }[state]} ${task}: ${detail}`);
  };
  try {
    if (signal?.aborted === true)
      throw new AbortedError(`${verb} on ${target.name}`, { hint: 'it had not begun there: nothing changed' });
    const url = await work(step);
    return { node: target.name, target: target.text, ok: true, tasks, url, ms: performance.now() - started };
  } catch (error) {
    const e = error as Error & { code?: unknown; hint?: string };
    step(verb, 'failed', e.message);
    const code = typeof e.code === 'string' ? e.code : `${verb.toUpperCase()}_FAILED`;
    return {
      node: target.name,
      target: target.text,
      ok: false,
      tasks,
      error: { code, message: e.message, hint: e.hint },
      ms: performance.now() - started,
    };
  }
}

/** What the node says about itself, in one round trip. */
interface NodeFacts {
  arch: string;
  uid: number;
  systemd: boolean;
  /** The installed bundle's hash, or 'none'. */
  installedHash: string;
  /** Whether `address` is one of the node's own: the agent can only listen on those. */
  addressIsLocal: 'yes' | 'no' | 'unknown';
}

async function inspect(session: SshSession, prefix: string, address: string): Promise<NodeFacts> {
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
function checkSuitable(target: SshTarget, facts: NodeFacts, address: string): void {
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
async function logTail(session: SshSession, prefix: string, systemd: boolean): Promise<string> {
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
async function migrationsInFlight(url: string, softwareVersion: string): Promise<MigrationRecord[] | undefined> {
  try {
    const records = await migrationRecords({ url, tls: controllerIdentity() }, softwareVersion, false);
    return records.filter((m) => !['committed', 'aborted', 'resumed', 'discarded'].includes(m.state ?? ''));
  } catch {
    return undefined;
  }
}

function busy(node: string, open: readonly MigrationRecord[], action: string): NodeBusyError {
  return new NodeBusyError(
    `${node} has ${open.length} migration(s) in flight (${open.map((m) => `${m.migrationId} ${m.role} ${m.state}`).join(', ')}): not ${action} its agent now`,
    { hint: `let them finish, or settle them with \`ferry recover --on ${node}\`, then run again` },
  );
}

async function installOne(
  target: SshTarget,
  b: { file: string; hash: string; bytes: number },
  options: InstallOptions,
): Promise<NodeResult> {
  const p = layout(options.prefix);
  let session: SshSession | undefined;
  const cancelled = (): void => {
    if (options.signal?.aborted === true)
      throw new AbortedError(`install on ${target.name}`, { hint: 'its installation was left as it was' });
  };
  return onNode(
    target,
    options.onStep,
    'install',
    async (step) => {
      try {
        const address = await agentAddress(target);
        const url = agentUrl(address, options.agentPort);
        const s = await SshSession.open(target, options);
        session = s;
        step(
          'host key',
          session.hostKey === 'known' ? 'unchanged' : 'done',
          session.hostKey === 'known' ? 'matches known_hosts' : 'new host, added to known_hosts (--trust-new-hosts)',
        );
        cancelled();
        const facts = await inspect(session, options.prefix, address);
        checkSuitable(target, facts, address);
        const { systemd } = facts;

        // What would change, decided before anything does.
        const bundleChanged = facts.installedHash !== b.hash || options.upgrade;
        const remoteCert = await session.exec(`cat ${sh(`${p.tls}/cert.pem`)} ${sh(`${p.tls}/ca.pem`)} 2>/dev/null`);
        const authority = loadAuthority(authorityDir());
        const certChanged =
          options.upgrade || !certificateFits(remoteCert.stdout, authority.certPem, address, target.name);
        const command = agentCommand(options.prefix, target.name, address, options.agentPort);
        const wanted = systemd ? systemdUnit(command) : supervisorScript(options.prefix, command);
        const serviceFile = systemd ? UNIT : p.supervisor;
        const current = (await session.exec(`cat ${sh(serviceFile)} 2>/dev/null`)).stdout;
        const running = await agentRunning(session, options.prefix, systemd);
        const restart = bundleChanged || certChanged || current !== wanted || !running;
        if (restart && running) {
          const open = await migrationsInFlight(listenUrlOf(current) ?? url, options.softwareVersion);
          if (open !== undefined && open.length > 0) throw busy(target.name, open, 'restarting');
        }

        // 1. The bundle: unpacked beside the running one, swapped in once the agent is stopped.
        cancelled();
        if (bundleChanged) {
          await session.run(
            `rm -rf ${sh(`${p.app}.new`)} && mkdir -p ${sh(`${p.app}.new`)}`,
            'preparing the bundle directory',
          );
          // Cancelling ends the connection: the half-copied bundle stays beside the running one, unused.
          const cut = (): void => s.close();
          options.signal?.addEventListener('abort', cut, { once: true });
          try {
            await s.run(
              `tar -xzf - -C ${sh(`${p.app}.new`)} --strip-components=1`,
              'unpacking the bundle',
              createReadStream(b.file).pipe(new Progress(b.bytes, (t) => options.onStep?.(target.name, `  ${t}`))),
            );
          } catch (error) {
            cancelled();
            throw error;
          } finally {
            options.signal?.removeEventListener('abort', cut);
          }
          step('bundle', 'done', `${MiB(b.bytes)} copied (${b.hash.slice(0, 12)})`);
        } else {
          step('bundle', 'unchanged', `already ${b.hash.slice(0, 12)}`);
        }

        // 2. The node's certificate: kept while it is this cluster's, names this address and is far from expiring.
        cancelled();
        if (certChanged) {
          const local = mkdtempSync(join(tmpdir(), 'ferry-install-'));
          try {
            const identity = await issueIdentity(
              authority,
              { role: 'agent', name: target.name, hosts: [...new Set([address, target.host])] },
              join(local, 'tls'),
            );
            // The key travels inside the SSH channel and is created 0600 (umask before the file exists).
            for (const [file, content] of [
              ['ca.pem', identity.ca],
              ['cert.pem', identity.cert],
              ['key.pem', identity.key],
            ] as const) {
              await session.run(
                `umask 077 && mkdir -p ${sh(p.tls)} && cat >${sh(`${p.tls}/${file}.tmp`)} && ` +
                  `chmod ${file === 'key.pem' ? 600 : 644} ${sh(`${p.tls}/${file}.tmp`)} && mv ${sh(`${p.tls}/${file}.tmp`)} ${sh(`${p.tls}/${file}`)}`,
                `writing ${file}`,
                Readable.from([content]),
              );
            }
            step(
              'certificate',
              'done',
              `issued for ${target.name} (${address}), valid until ${identity.notAfter.toISOString().slice(0, 10)}`,
            );
          } finally {
            rmSync(local, { recursive: true, force: true });
          }
        } else {
          step('certificate', 'unchanged', 'valid, this cluster’s, names the address');
        }

        // 3. The service: systemd where it is the init, else the supervisor with a pid file. Past this
        // point a cancel waits: the agent is stopped and started again as one step.
        cancelled();
        if (restart) {
          const killed = running && (await stopAgent(session, options.prefix, systemd));
          if (killed) options.onStep?.(target.name, '  the agent did not stop within 10 s of SIGTERM: killed');
          if (bundleChanged) {
            await session.run(
              `rm -rf ${sh(`${p.app}.old`)}; if [ -d ${sh(p.app)} ]; then mv ${sh(p.app)} ${sh(`${p.app}.old`)}; fi; ` +
                `mv ${sh(`${p.app}.new`)} ${sh(p.app)} && rm -rf ${sh(`${p.app}.old`)} && echo ${sh(b.hash)} >${sh(p.hash)}`,
              'swapping the bundle in',
            );
          }
          await session.run(
            `mkdir -p ${sh(`${options.prefix}/bin`)} ${sh(`${options.prefix}/run`)} ${sh(`${options.prefix}/log`)} ${sh(p.data)} && ` +
              `printf %s ${sh(wanted)} >${sh(serviceFile)} && chmod ${systemd ? 644 : 755} ${sh(serviceFile)}`,
            'writing the service',
          );
          if (systemd) {
            await session.run(
              'systemctl daemon-reload && systemctl enable ferry-agent.service && systemctl restart ferry-agent.service',
              'starting the agent (systemd)',
            );
          } else {
            // setsid: its own session, so it outlives this SSH session and one signal to its group stops it.
            await session.run(`setsid -f sh ${sh(serviceFile)} </dev/null >/dev/null 2>&1`, 'starting the agent');
          }
          step(
            'agent',
            'done',
            `${running ? 're' : ''}started ${systemd ? 'as systemd unit ferry-agent.service' : `under its supervisor (pid file ${p.pid})`}`,
          );
        } else {
          step('agent', 'unchanged', systemd ? 'systemd unit running' : 'running under its supervisor');
        }

        // 4. It answers, over mutual TLS, as the node it should be.
        const answered = await waitForAgent(url, options.softwareVersion).catch(async (error: unknown) => {
          throw new AgentNotAnsweringError(url, await logTail(s, options.prefix, systemd), {
            hint: `its log: ${systemd ? 'journalctl -u ferry-agent.service' : p.log} on the node`,
            cause: error,
          });
        });
        if (answered !== target.name) {
          throw new AgentNotAnsweringError(url, '', {
            hint: `an agent calling itself ${answered} answers there, not ${target.name}: is the port taken by another installation?`,
          });
        }
        step('answers', 'verified', `over mutual TLS at ${url}`);

        const before = findNode(target.name);
        const node = {
          name: target.name,
          ssh: target.text.replace(/^[^=]*=(?=ssh:)/, ''),
          url,
          prefix: options.prefix,
          bundle: b.hash,
        };
        if (
          before === undefined ||
          JSON.stringify({ ...before, installedAt: '' }) !== JSON.stringify({ ...before, ...node, installedAt: '' })
        ) {
          upsertNode({ ...before, ...node, installedAt: new Date().toISOString() });
          step('inventory', 'done', `${target.name} → ${url}`);
        } else {
          step('inventory', 'unchanged', `${target.name} → ${url}`);
        }
        return url;
      } finally {
        session?.close();
      }
    },
    options.signal,
  );
}

function certificateFits(pems: string, caPem: string, address: string, name: string): boolean {
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

async function agentRunning(session: SshSession, prefix: string, systemd: boolean): Promise<boolean> {
  if (systemd) return (await session.exec('systemctl is-active --quiet ferry-agent.service')).code === 0;
  const p = layout(prefix);
  const r = await session.exec(
    `pid=$(cat ${sh(p.pid)} 2>/dev/null) && kill -0 "$pid" 2>/dev/null && grep -q agent-supervisor /proc/"$pid"/cmdline`,
  );
  return r.code === 0;
}

/** Stops the agent; true when it had to be killed (it did not end within 10 s of SIGTERM). */
async function stopAgent(session: SshSession, prefix: string, systemd: boolean): Promise<boolean> {
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

async function waitForAgent(url: string, softwareVersion: string): Promise<string> {
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

/** `ferry install`: every target in parallel (bounded); one failing does not stop the others. */
export async function install(targets: SshTarget[], options: InstallOptions): Promise<NodeResult[]> {
  controllerIdentity(); // refuses early, with its hint, without `ferry init`
  loadAuthority(authorityDir());
  const b = await bundle();
  const limit = pLimit(options.parallel);
  return Promise.all(targets.map((t) => limit(() => installOne(t, b, options))));
}

export interface UninstallOptions extends SshOptions {
  prefix: string;
  force: boolean;
  parallel: number;
  softwareVersion: string;
  onStep?: (node: string, step: string) => void;
  /** Stops the work on nodes not yet begun, and before the agent is stopped; not in the middle of a removal. */
  signal?: AbortSignal | undefined;
}

async function uninstallOne(target: SshTarget, options: UninstallOptions): Promise<NodeResult> {
  const p = layout(options.prefix);
  let session: SshSession | undefined;
  return onNode(
    target,
    options.onStep,
    'uninstall',
    async (step) => {
      try {
        session = await SshSession.open(target, options);
        const systemd = (await session.exec('test -d /run/systemd/system')).code === 0;
        const service = (await session.exec(`cat ${sh(systemd ? UNIT : p.supervisor)} 2>/dev/null`)).stdout;
        const running = await agentRunning(session, options.prefix, systemd);
        const url = listenUrlOf(service) ?? findNode(target.name)?.url;

        if (!options.force && (running || service !== '')) {
          // Only the agent knows what runs there; without an answer nothing is removed unless forced.
          const unanswered = (why: string): AgentNotAnsweringError =>
            new AgentNotAnsweringError(url ?? `${target.name} (no URL known)`, '', {
              hint: `${why}, so Ferry cannot tell whether migrations are in flight or workloads run there: start it, or pass --force to remove it anyway (running workloads are then left without an agent)`,
            });
          if (!running || url === undefined) throw unanswered('the agent is not running');
          const endpoint = { url, tls: controllerIdentity() };
          const open = await migrationsInFlight(url, options.softwareVersion);
          if (open === undefined) throw unanswered('it does not answer');
          if (open.length > 0) throw busy(target.name, open, 'removing');
          const workloads = (await listWorkloads(endpoint, options.softwareVersion)).filter(
            (w) => w.state === 'running',
          );
          if (workloads.length > 0) {
            throw new NodeBusyError(
              `${target.name} runs ${workloads.length} workload(s): ${workloads.map((w) => `${w.name} (PID ${w.pid})`).join(', ')}`,
              {
                hint: `migrate them to another node (ferry migrate NAME --from ${target.name} --to NODE) or end them; --force removes the agent and leaves them running without one`,
              },
            );
          }
          step('in use', 'verified', 'no migration in flight, no workload running');
        }

        if (options.signal?.aborted === true)
          throw new AbortedError(`uninstall on ${target.name}`, { hint: 'nothing was removed there' });
        if (running) {
          const killed = await stopAgent(session, options.prefix, systemd);
          step('agent', 'done', killed ? 'killed (it did not stop within 10 s of SIGTERM)' : 'stopped');
        } else {
          step('agent', 'unchanged', 'not running');
        }
        if (systemd && service !== '') {
          await session.exec(`systemctl disable ferry-agent.service; rm -f ${UNIT}; systemctl daemon-reload`);
          step('service', 'done', `${UNIT} removed`);
        }
        const present = (await session.exec(`test -e ${sh(options.prefix)}`)).code === 0;
        await session.run(
          `rm -rf ${sh(options.prefix)} ${sh(`/dev/shm/ferry/${target.name}`)}`,
          'removing the installation',
        );
        step('files', present ? 'done' : 'unchanged', present ? `${options.prefix} removed` : 'nothing installed');
        const removed = removeNode(target.name);
        step('inventory', removed ? 'done' : 'unchanged', `${target.name} ${removed ? 'removed' : 'was not there'}`);
        return undefined;
      } finally {
        session?.close();
      }
    },
    options.signal,
  );
}

export async function uninstall(targets: SshTarget[], options: UninstallOptions): Promise<NodeResult[]> {
  const limit = pLimit(options.parallel);
  return Promise.all(targets.map((t) => limit(() => uninstallOne(t, options))));
}
