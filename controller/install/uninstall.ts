import pLimit from 'p-limit';
import { AbortedError } from '../../src/errors.js';
import { controllerIdentity, findNode, listWorkloads, removeNode } from '../agents/index.js';
import { AgentNotAnsweringError, NodeBusyError } from './errors.js';
import { layout, listenUrlOf, UNIT } from './layout.js';
import { agentRunning, busy, migrationsInFlight, stopAgent } from './node.js';
import { sh, SshSession, type SshOptions, type SshTarget } from './ssh.js';
import { onNode, type NodeResult } from './tasks.js';

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
