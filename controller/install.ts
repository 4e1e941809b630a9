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
import { InvalidInputError } from '../src/errors.js';
import { projectRoot } from '../src/paths.js';
import { issueIdentity, loadAuthority } from '../src/tls/index.js';
import { WireConnection } from '../src/wire/index.js';
import { authorityDir, controllerIdentity, findNode, removeNode, upsertNode } from './config.js';
import { sh, SshSession, type SshOptions, type SshTarget } from './ssh.js';

const execFileAsync = promisify(execFile);
export const DEFAULT_PREFIX = '/opt/ferry';
export const AGENT_PORT = 7070;
/** A certificate closer to its end than this is reissued by an install. */
const RENEW_BEFORE_MS = 30 * 86_400_000;

export interface InstallOptions extends SshOptions {
  prefix: string;
  agentPort: number;
  upgrade: boolean;
  parallel: number;
  softwareVersion: string;
  /** One line per step, as it happens: "NODE: what". */
  onStep?: (node: string, step: string) => void;
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

function layout(prefix: string): Record<string, string> {
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
    p.data ?? '',
    '--tls-dir',
    p.tls ?? '',
  ];
}

/** Restarts the agent when it dies; stopped by signalling its process group (the pid file holds the leader). */
export function supervisorScript(prefix: string, command: string[]): string {
  const p = layout(prefix);
  return `#!/bin/sh
# Ferry agent supervisor (no systemd on this node): restarts the agent if it
# exits. Stop it with: kill -TERM -$(cat ${p.pid})
echo $$ >${sh(p.pid ?? '')}
trap 'kill -TERM "$agent" 2>/dev/null; wait "$agent"; exit 0' TERM INT
while :; do
  FERRY_LOG=info ${command.map(sh).join(' ')} >>${sh(p.log ?? '')} 2>&1 &
  agent=$!
  wait "$agent"
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) supervisor: the agent exited ($?), restarting in 1 s" >>${sh(p.log ?? '')}
  sleep 1
done
`;
}

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
KillMode=mixed

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
    if (this.#sent / this.total >= this.#next) {
      this.report(`copying the bundle: ${Math.round((this.#sent / this.total) * 100)} %`);
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
): Promise<NodeResult> {
  const started = performance.now();
  const tasks: NodeResult['tasks'] = [];
  const step: Step = (task, state, detail) => {
    tasks.push({ task, state, detail });
    onStep?.(target.name, `${{ done: '+', unchanged: '=', verified: '✓', failed: '!' }[state]} ${task}: ${detail}`);
  };
  try {
    const url = await work(step);
    return { node: target.name, target: target.text, ok: true, tasks, url, ms: performance.now() - started };
  } catch (error) {
    const e = error as Error & { code?: string; hint?: string };
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

async function installOne(
  target: SshTarget,
  b: { file: string; hash: string; bytes: number },
  options: InstallOptions,
): Promise<NodeResult> {
  const p = layout(options.prefix);
  let session: SshSession | undefined;
  return onNode(target, options.onStep, 'install', async (step) => {
    try {
      const address = await agentAddress(target);
      session = await SshSession.open(target, options);
      step(
        'host key',
        session.hostKey === 'known' ? 'unchanged' : 'done',
        session.hostKey === 'known' ? 'matches known_hosts' : 'new host, added to known_hosts (--trust-new-hosts)',
      );
      const facts = (
        await session.run(
          `uname -m; test -d /run/systemd/system && echo systemd || echo no-systemd; cat ${sh(p.hash ?? '')} 2>/dev/null || echo none`,
          'inspecting the node',
        )
      )
        .trim()
        .split('\n');
      const [arch, init, installedHash] = facts;
      if (arch !== 'x86_64') throw new InvalidInputError(`${target.name} is ${arch}; the bundle is for x86_64`);
      const systemd = init === 'systemd';

      // 1. The bundle: copied only when it differs (or --upgrade), swapped in whole.
      let restart = false;
      if (installedHash !== b.hash || options.upgrade) {
        await session.run(
          `rm -rf ${sh(`${p.app}.new`)} && mkdir -p ${sh(`${p.app}.new`)}`,
          'preparing the bundle directory',
        );
        await session.run(
          `tar -xzf - -C ${sh(`${p.app}.new`)} --strip-components=1`,
          'unpacking the bundle',
          createReadStream(b.file).pipe(new Progress(b.bytes, (t) => options.onStep?.(target.name, `  ${t}`))),
        );
        restart = true;
        step('bundle', 'done', `${(b.bytes / 2 ** 20).toFixed(0)} MiB copied (${b.hash.slice(0, 12)})`);
      } else {
        step('bundle', 'unchanged', `already ${b.hash.slice(0, 12)}`);
      }

      // 2. The node's certificate: kept while it is this cluster's, names this address and is far from expiring.
      const remoteCert = await session.exec(`cat ${sh(`${p.tls}/cert.pem`)} ${sh(`${p.tls}/ca.pem`)} 2>/dev/null`);
      const authority = loadAuthority(authorityDir());
      if (options.upgrade || !certificateFits(remoteCert.stdout, authority.certPem, address, target.name)) {
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
              `umask 077 && mkdir -p ${sh(p.tls ?? '')} && cat >${sh(`${p.tls}/${file}.tmp`)} && ` +
                `chmod ${file === 'key.pem' ? 600 : 644} ${sh(`${p.tls}/${file}.tmp`)} && mv ${sh(`${p.tls}/${file}.tmp`)} ${sh(`${p.tls}/${file}`)}`,
              `writing ${file}`,
              Readable.from([content]),
            );
          }
          restart = true;
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

      // 3. The service: systemd where it is the init, else the supervisor with a pid file.
      const command = agentCommand(options.prefix, target.name, address, options.agentPort);
      if (restart && installedHash !== 'none') await stopAgent(session, options.prefix, systemd);
      if (restart) {
        await session.run(
          `if [ -d ${sh(`${p.app}.new`)} ]; then rm -rf ${sh(`${p.app}.old`)}; ` +
            `[ -d ${sh(p.app ?? '')} ] && mv ${sh(p.app ?? '')} ${sh(`${p.app}.old`)}; mv ${sh(`${p.app}.new`)} ${sh(p.app ?? '')}; ` +
            `rm -rf ${sh(`${p.app}.old`)}; echo ${sh(b.hash)} >${sh(p.hash ?? '')}; fi`,
          'swapping the bundle in',
        );
      }
      const wanted = systemd ? systemdUnit(command) : supervisorScript(options.prefix, command);
      const file = systemd ? UNIT : (p.supervisor ?? '');
      const current = await session.exec(`cat ${sh(file)} 2>/dev/null`);
      const running = await agentRunning(session, options.prefix, systemd);
      if (current.stdout !== wanted || !running || restart) {
        if (running) await stopAgent(session, options.prefix, systemd);
        await session.run(
          `mkdir -p ${sh(`${options.prefix}/bin`)} ${sh(`${options.prefix}/run`)} ${sh(`${options.prefix}/log`)} ${sh(p.data ?? '')} && ` +
            `printf %s ${sh(wanted)} >${sh(file)} && chmod 755 ${sh(file)}`,
          'writing the service',
        );
        if (systemd) {
          await session.run(
            'systemctl daemon-reload && systemctl enable --now ferry-agent.service && systemctl restart ferry-agent.service',
            'starting the agent (systemd)',
          );
        } else {
          await session.run(`setsid -f sh ${sh(file)} </dev/null >/dev/null 2>&1`, 'starting the agent');
        }
        step(
          'agent',
          'done',
          systemd ? 'systemd unit ferry-agent.service started' : `started under its supervisor (pid file ${p.pid})`,
        );
      } else {
        step('agent', 'unchanged', systemd ? 'systemd unit running' : 'running under its supervisor');
      }

      // 4. It answers, over mutual TLS, as the node it should be.
      const url = `wss://${address.includes(':') ? `[${address}]` : address}:${options.agentPort}`;
      const answered = await waitForAgent(url, options.softwareVersion);
      if (answered !== target.name)
        throw new InvalidInputError(`the agent at ${url} calls itself ${answered}, not ${target.name}`);
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
  });
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
    `pid=$(cat ${sh(p.pid ?? '')} 2>/dev/null) && kill -0 "$pid" 2>/dev/null && grep -q agent-supervisor /proc/"$pid"/cmdline`,
  );
  return r.code === 0;
}

async function stopAgent(session: SshSession, prefix: string, systemd: boolean): Promise<void> {
  if (systemd) {
    await session.exec('systemctl stop ferry-agent.service');
    return;
  }
  const p = layout(prefix);
  // The supervisor leads its own process group (setsid): one signal stops it and the agent.
  await session.exec(
    `pid=$(cat ${sh(p.pid ?? '')} 2>/dev/null) && grep -q agent-supervisor /proc/"$pid"/cmdline && kill -TERM -"$pid"; ` +
      `for i in $(seq 50); do [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done; rm -f ${sh(p.pid ?? '')}`,
  );
}

async function waitForAgent(url: string, softwareVersion: string): Promise<string> {
  const tls = controllerIdentity();
  const deadline = Date.now() + 30_000;
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
      if (Date.now() > deadline) {
        throw new InvalidInputError(`the agent did not answer at ${url}: ${(error as Error).message}`, {
          hint: 'its log is PREFIX/log/agent.log on the node',
        });
      }
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
}

async function uninstallOne(target: SshTarget, options: UninstallOptions): Promise<NodeResult> {
  let session: SshSession | undefined;
  return onNode(target, options.onStep, 'uninstall', async (step) => {
    try {
      const known = findNode(target.name);
      if (!options.force && known !== undefined) {
        // A node with a migration in flight keeps its agent: it holds a process or a copy of one.
        const tls = controllerIdentity();
        const c = await WireConnection.connect(
          known.url,
          { role: 'controller', name: tls.name, softwareVersion: options.softwareVersion },
          { tls },
        ).catch(() => undefined);
        if (c !== undefined) {
          try {
            const open = ((await c.request({ statusQuery: {} }, 'migrationList')).migrations ?? []).filter(
              (m) => !['committed', 'aborted', 'resumed', 'discarded'].includes(m.state ?? ''),
            );
            if (open.length > 0) {
              throw new InvalidInputError(`${target.name} has ${open.length} migration(s) in flight`, {
                hint: `let them finish or settle them (ferry recover --on ${target.name}); --force removes it anyway`,
              });
            }
          } finally {
            c.close();
          }
        }
      }
      session = await SshSession.open(target, options);
      const p = layout(options.prefix);
      const systemd = (await session.exec('test -d /run/systemd/system')).code === 0;
      await stopAgent(session, options.prefix, systemd);
      if (systemd) await session.exec(`systemctl disable ferry-agent.service; rm -f ${UNIT}; systemctl daemon-reload`);
      step('agent', 'done', 'stopped');
      const present = (await session.exec(`test -e ${sh(p.app ?? '')}`)).code === 0;
      await session.run(
        `rm -rf ${sh(options.prefix)} ${sh(`/dev/shm/ferry/${target.name}`)}`,
        'removing the installation',
      );
      step('files', present ? 'done' : 'unchanged', present ? `${options.prefix} removed` : 'nothing installed');
      step('inventory', removeNode(target.name) ? 'done' : 'unchanged', `${target.name} removed`);
      return undefined;
    } finally {
      session?.close();
    }
  });
}

export async function uninstall(targets: SshTarget[], options: UninstallOptions): Promise<NodeResult[]> {
  const limit = pLimit(options.parallel);
  return Promise.all(targets.map((t) => limit(() => uninstallOne(t, options))));
}
