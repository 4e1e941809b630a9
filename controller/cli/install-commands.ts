import { Option, type Command } from 'commander';
import { InvalidInputError } from '../../src/errors.js';
import { formatDuration } from '../../src/units.js';
import { wholeNumberIn } from './arguments.js';
import type { CliContext } from './context.js';
import { AGENT_PORT, findNode } from '../agents/index.js';
import {
  DEFAULT_PREFIX,
  defaultKnownHosts,
  install,
  KnownHosts,
  parseTarget,
  readIdentity,
  uninstall,
  type NodeResult,
  type SshTarget,
} from '../install/index.js';

function summary(results: readonly NodeResult[], verb: string): string {
  const rows = [['NODE', 'RESULT', 'TIME', 'DETAIL']];
  for (const r of results) {
    const changed = r.tasks.filter((t) => t.state === 'done').map((t) => t.task);
    const detail = r.ok
      ? `${r.url ?? ''}${r.url === undefined ? '' : ' '}(${changed.length === 0 ? 'nothing changed' : `changed: ${changed.join(', ')}`})`
      : `${r.error?.message ?? 'failed'}${r.error?.hint === undefined ? '' : `\n    hint: ${r.error.hint}`}`;
    rows.push([r.node, r.ok ? 'ok' : 'FAILED', formatDuration(r.ms), detail]);
  }
  const widths = [0, 1, 2].map((i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  const failed = results.filter((r) => !r.ok).length;
  return [
    ...rows.map((r) => r.map((c, i) => (i < 3 ? c.padEnd(widths[i] ?? 0) : c)).join('  ')),
    '',
    `${results.length - failed} of ${results.length} node(s) ${verb}${failed > 0 ? `; ${failed} failed` : ''}`,
  ].join('\n');
}

const sshOptions = (command: Command): Command =>
  command
    .option(
      '--identity <FILE>',
      'SSH private key (default: the ssh agent’s keys and ~/.ssh/id_ed25519, id_ecdsa or id_rsa)',
    )
    .option('--known-hosts <FILE>', 'host keys to trust', defaultKnownHosts())
    .option(
      '--trust-new-hosts',
      'accept and record the key of a host never seen before (a changed key is always refused)',
    )
    .option('--parallel <N>', 'nodes worked on at once', wholeNumberIn(1, 65535), 4)
    .option('--json', 'print the results as one JSON document');

interface SshCliOptions {
  identity?: string;
  knownHosts: string;
  trustNewHosts?: boolean;
  parallel: number;
  json?: boolean;
}

export function registerInstallCommands(
  program: Command,
  { version: softwareVersion, interrupt: signal }: CliContext,
): void {
  sshOptions(
    program
      .command('install')
      .description('Install (or upgrade) the agent on nodes over SSH, and add them to the inventory')
      .argument('<TARGET...>', 'ssh://USER@HOST[:PORT], or NAME=ssh://USER@HOST[:PORT] to name the node')
      .option('--prefix <DIR>', 'installation directory on the nodes', DEFAULT_PREFIX)
      .addOption(
        new Option('--agent-port <PORT>', 'port the agents listen on')
          .argParser(wholeNumberIn(1, 65535))
          .default(AGENT_PORT),
      )
      .option('--upgrade', 'copy the bundle and reissue the certificate even if unchanged, and restart the agent'),
  )
    .addHelpText(
      'after',
      `
Per node: checks its host key against known_hosts (an unknown key is refused unless
--trust-new-hosts; a changed one always), copies the agent bundle (node, the agent, the CRIU
prefix: the node needs no Node.js and no CRIU) unless the same bundle is there, issues its
certificate from the cluster CA (\`ferry init\` first), starts the agent as a systemd unit
where systemd runs, else under a small supervisor with a pid file, waits until it answers over
mutual TLS, and records it in the inventory. Running it again changes nothing. An agent with a
migration in flight is not restarted. Exit code 1 if any node failed (the summary says why);
the others are done anyway.

Example: ferry install ssh://root@10.0.0.5 web2=ssh://root@web2.example:2222`,
    )
    .action(
      async (targets: string[], opts: SshCliOptions & { prefix: string; agentPort: number; upgrade?: boolean }) => {
        const parsed = targets.map(parseTarget);
        duplicates(parsed);
        if (opts.identity !== undefined) readIdentity(opts.identity);
        if (!opts.prefix.startsWith('/') || opts.prefix === '/')
          throw new InvalidInputError(`--prefix must be an absolute directory, not ${opts.prefix}`);
        const results = await install(parsed, {
          knownHosts: new KnownHosts(opts.knownHosts),
          trustNewHosts: opts.trustNewHosts === true,
          identity: opts.identity,
          prefix: opts.prefix,
          agentPort: opts.agentPort,
          upgrade: opts.upgrade === true,
          parallel: opts.parallel,
          softwareVersion,
          onStep: (node, text) => process.stderr.write(`${node}: ${text}\n`),
          signal: signal(),
        });
        if (opts.json === true) process.stdout.write(JSON.stringify(results, null, 2) + '\n');
        else process.stdout.write(summary(results, 'installed') + '\n');
        if (results.some((r) => !r.ok)) process.exitCode = 1;
      },
    );

  sshOptions(
    program
      .command('uninstall')
      .description('Stop and remove the agent from nodes, and drop them from the inventory')
      .argument('<TARGET...>', 'a node of the inventory, or ssh://USER@HOST[:PORT]')
      .option('--prefix <DIR>', 'installation directory (default: the inventory’s, else /opt/ferry)')
      .option('--force', 'remove it without asking its agent (migrations in flight, running workloads)'),
  )
    .addHelpText(
      'after',
      `
Per node: asks its agent whether a migration is in flight there or a workload runs there, and
refuses if so (or if the agent does not answer) unless --force; then stops the agent (the
systemd unit or the supervisor), removes the unit and the installation directory with the
agent's journal, workload logs and images, and drops the node from the inventory. Workloads
still running are not stopped: with --force they go on without an agent. Exit code 1 if any
node failed; the others are done anyway.

Example: ferry uninstall web2 ssh://root@10.0.0.5`,
    )
    .action(async (targets: string[], opts: SshCliOptions & { prefix?: string; force?: boolean }) => {
      const interrupted = signal();
      const resolved = targets.map((t) => {
        if (t.includes('ssh://'))
          return { target: parseTarget(t), prefix: opts.prefix ?? findNode(parseTarget(t).name)?.prefix };
        const node = findNode(t);
        if (node === undefined) {
          throw new InvalidInputError(`${t} is neither an ssh:// URL nor a node of the inventory`, {
            hint: 'give ssh://USER@HOST, or a name `ferry nodes` lists',
          });
        }
        return { target: parseTarget(`${node.name}=${node.ssh}`), prefix: opts.prefix ?? node.prefix };
      });
      duplicates(resolved.map((r) => r.target));
      if (opts.identity !== undefined) readIdentity(opts.identity);
      const results: NodeResult[] = [];
      // Grouped by prefix: nodes installed in different directories are removed from each.
      for (const prefix of new Set(resolved.map((r) => r.prefix ?? DEFAULT_PREFIX))) {
        results.push(
          ...(await uninstall(
            resolved.filter((r) => (r.prefix ?? DEFAULT_PREFIX) === prefix).map((r) => r.target),
            {
              knownHosts: new KnownHosts(opts.knownHosts),
              trustNewHosts: opts.trustNewHosts === true,
              identity: opts.identity,
              prefix,
              force: opts.force === true,
              parallel: opts.parallel,
              softwareVersion,
              onStep: (node, text) => process.stderr.write(`${node}: ${text}\n`),
              signal: interrupted,
            },
          )),
        );
      }
      if (opts.json === true) process.stdout.write(JSON.stringify(results, null, 2) + '\n');
      else process.stdout.write(summary(results, 'uninstalled') + '\n');
      if (results.some((r) => !r.ok)) process.exitCode = 1;
    });
}

function duplicates(targets: readonly SshTarget[]): void {
  const names = targets.map((t) => t.name);
  const twice = names.find((n, i) => names.indexOf(n) !== i);
  if (twice !== undefined)
    throw new InvalidInputError(`node ${twice} is named twice`, { hint: 'name each NAME=ssh://...' });
}
