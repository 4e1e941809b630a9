import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import pLimit from 'p-limit';
import { AbortedError } from '../../src/errors.js';
import { issueIdentity, loadAuthority } from '../../src/tls/index.js';
import { authorityDir, controllerIdentity, findNode, upsertNode } from '../agents/index.js';
import { bundle, copyBundle, MiB, type Bundle } from './bundle.js';
import { AgentNotAnsweringError } from './errors.js';
import { agentCommand, agentUrl, layout, listenUrlOf, supervisorScript, systemdUnit, UNIT } from './layout.js';
import {
  agentAddress,
  agentRunning,
  busy,
  certificateFits,
  checkSuitable,
  inspect,
  logTail,
  migrationsInFlight,
  stopAgent,
  waitForAgent,
} from './node.js';
import { sh, SshSession, type SshOptions, type SshTarget } from './ssh.js';
import { onNode, type NodeResult } from './tasks.js';

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

async function installOne(target: SshTarget, b: Bundle, options: InstallOptions): Promise<NodeResult> {
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
          try {
            await copyBundle(s, b, `${p.app}.new`, (t) => options.onStep?.(target.name, `  ${t}`), options.signal);
          } catch (error) {
            cancelled();
            throw error;
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

/** `ferry install`: every target in parallel (bounded); one failing does not stop the others. */
export async function install(targets: SshTarget[], options: InstallOptions): Promise<NodeResult[]> {
  controllerIdentity(); // refuses early, with its hint, without `ferry init`
  loadAuthority(authorityDir());
  const b = await bundle();
  const limit = pLimit(options.parallel);
  return Promise.all(targets.map((t) => limit(() => installOne(t, b, options))));
}
