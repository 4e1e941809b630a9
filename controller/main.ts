#!/usr/bin/env node
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { Agent } from '../agent/index.js';
import { InvalidInputError } from '../src/errors.js';
import { loadIdentity, type Identity } from '../src/tls/index.js';
import { log } from '../src/log.js';
import { parseBytes } from '../src/units.js';
import { projectRoot } from '../src/paths.js';
import { LABEL_KEY, PEER_NAME, WORKLOAD_NAME, type MigrationRecord } from '../src/wire/index.js';
import { resolveAgent, type ResolveOptions } from './agents.js';
import { directory, holdMs, migrationTarget, nodeName, wholeNumberIn } from './arguments.js';
import { configDir, listWorkloads, migrationRecords, runWorkload } from './agents/index.js';
import { registerFleetCommands } from './fleet.js';
import { registerInstallCommands } from './install-commands.js';
import { certificate, initCluster } from './init.js';
import { printCheck, runCheck } from './check.js';
import { DEFAULT_LAB, LAB_NAME, labDown, labExec, labUp, runDemo } from './lab/index.js';
import { migrate, POSTCOPY_RISK } from './migration/index.js';
import { ExitCode, renderTable, reportError } from './output.js';
import { renderEvent, renderReport } from './report.js';

const version = (JSON.parse(readFileSync(join(projectRoot(), 'package.json'), 'utf8')) as { version: string }).version;

/** Ctrl-C cancels the running command through its AbortSignal; a second one exits at once. */
function interruptSignal(): AbortSignal {
  const controller = new AbortController();
  process.once('SIGINT', () => {
    process.stderr.write('\nferry: interrupted, cleaning up (Ctrl-C again to quit now)\n');
    controller.abort();
    process.once('SIGINT', () => process.exit(130));
  });
  process.once('SIGTERM', () => controller.abort());
  return controller.signal;
}

function wholeNumber(value: string): number {
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(Number(value)))
    throw new InvalidArgumentError('expected a whole number');
  return Number(value);
}

function byteSize(value: string): number {
  const bytes = parseBytes(value);
  if (bytes === undefined || bytes <= 0) throw new InvalidArgumentError('expected a size: 512M, 2G, 1.5GiB or bytes');
  return bytes;
}

function label(value: string, previous: Record<string, string> = {}): Record<string, string> {
  const [key = '', ...rest] = value.split('=');
  if (!LABEL_KEY.test(key) || rest.length === 0)
    throw new InvalidArgumentError('expected KEY=VALUE (keys: lower-case letters, digits, . _ / -)');
  return { ...previous, [key]: rest.join('=') };
}

function positiveNumber(value: string): number {
  if (!/^\d+(\.\d+)?$/.test(value) || !(Number(value) > 0 && Number.isFinite(Number(value))))
    throw new InvalidArgumentError('expected a number above 0');
  return Number(value);
}

function hostPort(value: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(value);
  const host = match?.[1] ?? match?.[2];
  const port = Number(match?.[3]);
  if (host === undefined || !(port >= 0 && port <= 65535)) throw new InvalidArgumentError('expected HOST:PORT');
  if (isIP(host) === 0)
    throw new InvalidArgumentError('HOST must be a numeric IP address (CRIU page servers need one)');
  return { host, port };
}

function labName(value: string): string {
  if (!LAB_NAME.test(value))
    throw new InvalidArgumentError('1 to 10 lower-case letters and digits, starting with a letter');
  return value;
}

const insecureOption = () =>
  new Option('--insecure', 'allow plaintext ws:// agents (started with --insecure): no encryption, no authentication');

function json(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
}

const criuOption = () =>
  new Option('--criu <path>', 'the CRIU binary to use (default: the project prefix, then the system)').env(
    'FERRY_CRIU',
  );

export function buildProgram(): Command {
  const program = new Command('ferry')
    .description('Live migration of running Linux processes between machines, driven by CRIU.')
    .version(version, '-V, --version')
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride()
    .addHelpText(
      'after',
      `
AGENT is a URL (wss://HOST:PORT), a node name from the inventory (ferry install), or the
name of a lab host (a, b) of the lab that is up. Agents speak mutual TLS: the controller shows
the certificate \`ferry init\` made (in --config, default ~/.config/ferry).

Exit codes: 0 done, 1 failed (a source process keeps running), 2 bad input (nothing changed),
3 outcome unknown.

Start with:
  ferry demo                        a live migration between two local lab hosts
  ferry lab up                      two hosts (network namespaces) with agents: a and b
  ferry run --on a --name web -- CMD...
  ferry migrate web --from a --to b`,
    );

  program
    .addOption(
      new Option('--config <DIR>', 'the cluster configuration: CA, controller identity, inventory')
        .env('FERRY_CONFIG')
        .default(configDir(), 'FERRY_CONFIG or ~/.config/ferry'),
    )
    .hook('preAction', () => {
      process.env.FERRY_CONFIG = program.opts<{ config: string }>().config;
    });

  program
    .command('init')
    .description('Create the cluster certificate authority and this controller’s certificate (idempotent)')
    .option('--name <NAME>', 'the cluster’s name, shown in its CA certificate', 'ferry')
    .option('--json', 'print what was created as JSON')
    .addHelpText(
      'after',
      `
Writes, under --config: ca/ (the cluster CA; its key signs every agent's certificate, mode 0600)
and controller/ (this controller's certificate). A second run keeps both, reissuing the
controller's certificate only if it expired. Then: ferry install ssh://USER@HOST ...`,
    )
    .action(async (opts: { name: string; json?: boolean }) => {
      const result = await initCluster(configDir(), opts.name);
      if (opts.json === true) json(result);
      else process.stdout.write(result.lines.join('\n') + '\n');
    });

  program
    .command('certificate')
    .description('Issue an agent certificate from the cluster CA, for an agent installed by hand')
    .argument('<NODE>', 'the node’s name (its certificate’s common name)')
    .requiredOption('--out <DIR>', 'where to write ca.pem, cert.pem and key.pem (give it to `ferry agent --tls-dir`)')
    .option(
      '--host <HOST>',
      'an IP address or DNS name the agent is reached at (repeat)',
      (v: string, p: string[] = []) => [...p, v],
    )
    .addHelpText(
      'after',
      `
The certificate must name the address the agent listens on: peers and CRIU's page-server
client check it. \`ferry install\` does all this for you over SSH.`,
    )
    .action(async (node: string, opts: { out: string; host?: string[] }) => {
      const identity = await certificate(configDir(), node, opts.host ?? [], opts.out);
      process.stdout.write(
        `issued ${identity.name} (agent, valid until ${identity.notAfter.toISOString().slice(0, 10)}) in ${identity.dir}\n`,
      );
    });

  program
    .command('migrate')
    .description('Move a running process to another agent; it keeps its PID, memory and open files')
    .argument('<PID|NAME>', 'a PID on the source agent, or a workload name (ferry ps)')
    .requiredOption('--from <AGENT>', 'the agent where the process runs now')
    .requiredOption('--to <AGENT>', 'the agent to move it to')
    .addOption(
      new Option('--strategy <S>', 'how memory is copied')
        .choices(['auto', 'precopy', 'stop-and-copy', 'postcopy'])
        .default('auto'),
    )
    .option(
      '--max-downtime <ms>',
      'the downtime budget: pre-copy rounds go on until the predicted downtime fits',
      positiveNumber,
      300,
    )
    .option('--strict-downtime', 'abort (the process keeps running on the source) rather than go over the budget')
    .option(
      '--plain-pages',
      'send memory pages unencrypted, only on a network you trust: CRIU’s TLS cuts the page rate several times (docs/security.md); the control connections stay mutual TLS',
    )
    .option('--max-rounds <N>', 'most pre-copy rounds before the switchover', wholeNumberIn(1, 100), 8)
    .option('--max-traffic <X>', 'stop pre-copy once it sent X times the resident memory', positiveNumber, 3)
    .option('--precopy-timeout <ms>', 'stop pre-copy rounds after this long (default: no limit)', positiveNumber)
    .option(
      '--hold <ms>',
      'how long each agent holds its side of the switchover waiting for the next step before settling it alone',
      holdMs,
      60_000,
    )
    .option('--json', 'print the report as one JSON document on stdout, progress on stderr')
    .addOption(insecureOption())
    .addHelpText(
      'after',
      `
Steps: preflight (both agents, CPU, space, PID), pre-copy rounds while the process runs
(only where the kernel tracks dirty memory), then the switchover: the process is frozen on
the source, the rest of its state goes to the destination, the copy there is restored but held,
and only then is the source copy ended and the destination's started. Any failure before that
point leaves the process running on the source as it was (exit code 1).

Pre-copy stops, in this order, when: the predicted downtime fits --max-downtime; a round wrote
64 pages or fewer; the rounds stop converging (a round wrote more than 1.1x, or over 0.9x, of
the one before); --max-rounds; --max-traffic; --precopy-timeout. The prediction is
switchover cost + restore of the resident memory + the pages expected dirty at the switchover
over the measured bandwidth; progress shows it after every round and the report compares it with
the downtime measured. Over budget, Ferry goes ahead and says so, unless --strict-downtime.

${wrap(
  '--strategy postcopy moves everything but the memory, starts the process on the destination at ' +
    'once, and lets it fetch its memory from the source on demand and in the background: the ' +
    'downtime does not grow with the memory. Only where a probe on both agents (a small lazy ' +
    `migration on each) worked; never chosen by auto. The risk: ${POSTCOPY_RISK}. The source keeps ` +
    'the process frozen and serving until every page has arrived; only then is its copy ended. ' +
    'docs/postcopy.md.',
)}`,
    )
    .action(
      async (
        target: string,
        opts: {
          from: string;
          to: string;
          strategy: 'auto' | 'precopy' | 'stop-and-copy' | 'postcopy';
          maxDowntime: number;
          strictDowntime?: boolean;
          plainPages?: boolean;
          maxRounds: number;
          maxTraffic: number;
          precopyTimeout?: number;
          hold: number;
          json?: boolean;
          insecure?: boolean;
        },
      ) => {
        const what = migrationTarget(target);
        const from = resolveAgent(opts.from, opts);
        const to = resolveAgent(opts.to, opts);
        const report = await migrate({
          pid: 'pid' in what ? what.pid : undefined,
          workload: 'workload' in what ? what.workload : undefined,
          from,
          to,
          strategy: opts.strategy,
          limits: {
            maxDowntimeMs: opts.maxDowntime,
            maxRounds: opts.maxRounds,
            maxTrafficFactor: opts.maxTraffic,
            deadlineMs: opts.precopyTimeout,
          },
          strictDowntime: opts.strictDowntime,
          plainPages: opts.plainPages,
          holdMs: opts.hold,
          softwareVersion: version,
          onEvent: (e) => process.stderr.write(renderEvent(e) + '\n'),
          signal: interruptSignal(),
        });
        if (opts.json === true) json(report);
        else process.stdout.write(renderReport(report) + '\n');
      },
    );

  program
    .command('run')
    .description('Start a command as a migratable workload on an agent')
    .requiredOption('--on <AGENT>', 'the agent to run it on')
    .option('--name <NAME>', 'a name to migrate it by (default: the command name)')
    .option('--label <KEY=VALUE>', 'a label rebalancing can select on (--exclude); repeat', label)
    .option('--pin', 'never moved by rebalancing or drain (ferry migrate still can)')
    .option('--json', 'print the workload as JSON')
    .addOption(insecureOption())
    .argument('<CMD...>', 'the command, after --')
    .addHelpText(
      'after',
      `
The command runs in its own PID namespace (so its PIDs never collide where it is restored),
detached, in its own session, with its output in a log file on the agent.

Example: ferry run --on a --name counter -- sh -c 'i=0; while :; do i=$((i+1)); echo $i; sleep 1; done'`,
    )
    .action(
      async (
        cmd: string[],
        opts: {
          on: string;
          name?: string;
          json?: boolean;
          label?: Record<string, string>;
          pin?: boolean;
        } & ResolveOptions,
      ) => {
        const name = opts.name ?? (cmd[0] ?? '').split('/').at(-1) ?? '';
        if (!WORKLOAD_NAME.test(name))
          throw new InvalidInputError(`bad workload name ${JSON.stringify(name)}`, {
            hint: 'use letters, digits, . _ -',
          });
        const w = await runWorkload(resolveAgent(opts.on, opts), name, cmd, version, {
          labels: opts.label,
          pinned: opts.pin,
        });
        if (opts.json === true) json(w);
        else process.stdout.write(`started ${w.name} on ${w.agent} as PID ${w.pid}; output: ${w.logFile}\n`);
      },
    );

  program
    .command('ps')
    .description('List the workloads of an agent')
    .requiredOption('--on <AGENT>', 'the agent to ask')
    .option('--json', 'print one JSON document')
    .addOption(insecureOption())
    .action(async (opts: { on: string; json?: boolean } & ResolveOptions) => {
      const workloads = await listWorkloads(resolveAgent(opts.on, opts), version);
      if (opts.json === true) {
        json(workloads);
        return;
      }
      const rows = [['NAME', 'PID', 'STATE', 'AGENT', 'COMMAND']];
      for (const w of workloads)
        rows.push([w.name ?? '', String(w.pid ?? ''), w.state ?? '', w.agent ?? '', (w.argv ?? []).join(' ')]);
      process.stdout.write(renderTable(rows) + '\n');
    });

  const collect = (value: string, previous: string[] = []): string[] => [...previous, value];
  const printRecords = (agent: string, records: MigrationRecord[], onlyOpen: boolean): void => {
    const shown = onlyOpen
      ? records.filter((r) => !['committed', 'aborted', 'resumed', 'discarded'].includes(r.state ?? ''))
      : records;
    if (shown.length === 0) {
      process.stdout.write(`${agent}: ${onlyOpen ? 'no migration in flight' : 'nothing to settle'}\n`);
      return;
    }
    for (const r of shown) {
      process.stdout.write(
        `${agent}: ${r.migrationId} ${r.role} ${r.state}${r.pid ? ` PID ${r.pid}` : ''}${r.action ? ` (${r.action})` : ''}\n`,
      );
    }
  };

  program
    .command('status')
    .description('Show the migrations in flight on agents (from their journals)')
    .requiredOption('--on <AGENT>', 'an agent to ask (repeat for several)', collect)
    .option('--all', 'also the finished ones')
    .option('--json', 'print one JSON document')
    .addOption(insecureOption())
    .action(async (opts: { on: string[]; all?: boolean; json?: boolean } & ResolveOptions) => {
      const result: Record<string, MigrationRecord[]> = {};
      for (const agent of opts.on) result[agent] = await migrationRecords(resolveAgent(agent, opts), version, false);
      if (opts.json === true) json(result);
      else for (const [agent, records] of Object.entries(result)) printRecords(agent, records, opts.all !== true);
    });

  program
    .command('recover')
    .description('Settle migrations left half-done on agents (a crash, a cut network), and say what was done')
    .requiredOption('--on <AGENT>', 'an agent to settle (repeat for several)', collect)
    .option('--json', 'print one JSON document')
    .addOption(insecureOption())
    .addHelpText(
      'after',
      `
Agents also settle on their own when they start and when a hold times out. The source agent
decides: before its commit the process resumes there and the destination discards its copy;
after it, the destination runs the copy (restored again from its kept images if needed).`,
    )
    .action(async (opts: { on: string[]; json?: boolean } & ResolveOptions) => {
      const result: Record<string, MigrationRecord[]> = {};
      for (const agent of opts.on) result[agent] = await migrationRecords(resolveAgent(agent, opts), version, true);
      if (opts.json === true) json(result);
      else for (const [agent, records] of Object.entries(result)) printRecords(agent, records, false);
    });

  program
    .command('agent')
    .description('Run the agent daemon of this node')
    .option('--listen <HOST:PORT>', 'address to listen on (a numeric IP)', hostPort, { host: '127.0.0.1', port: 7070 })
    .option('--name <NAME>', 'this node’s name', nodeName, hostname())
    .option('--data-dir <DIR>', 'workload records and logs', directory, '/var/lib/ferry')
    .option(
      '--images-dir <DIR>',
      'images, one directory per migration (default: tmpfs, /dev/shm/ferry/NAME)',
      directory,
    )
    .option('--advertise <IP>', 'address peers and page servers use (default: the listen address)')
    .option(
      '--tls-dir <DIR>',
      'this agent’s identity: ca.pem, cert.pem, key.pem (from ferry install or ferry certificate)',
      '/etc/ferry/tls',
    )
    .option(
      '--insecure',
      'serve plaintext without authentication: anyone who reaches the port can freeze, read or kill any process here',
    )
    .option('--capacity <SIZE>', 'memory this node offers workloads, when not the whole machine (512M, 4G)', byteSize)
    .option(
      '--metrics <HOST:PORT>',
      'serve Prometheus metrics at http://HOST:PORT/metrics (read-only counters; plain HTTP, so prefer a private address)',
      hostPort,
    )
    .addOption(criuOption())
    .action(
      async (opts: {
        capacity?: number;
        metrics?: { host: string; port: number };
        listen: { host: string; port: number };
        name: string;
        dataDir: string;
        imagesDir?: string;
        advertise?: string;
        criu?: string;
        tlsDir: string;
        insecure?: boolean;
      }) => {
        // The default, the host name, has not been through the --name parser.
        if (!PEER_NAME.test(opts.name) || opts.name === '') {
          throw new InvalidInputError(`the host name ${JSON.stringify(opts.name)} cannot name an agent`, {
            hint: 'pass --name NAME',
          });
        }
        const advertise = opts.advertise ?? opts.listen.host;
        let tls: Identity | undefined;
        if (opts.insecure === true) {
          process.stderr.write(
            `ferry agent: WARNING: --insecure: plaintext, no authentication. Anyone who can reach ${opts.listen.host}:${opts.listen.port} can freeze, read or kill any process on this node, and page transfers are not encrypted.\n`,
          );
        } else {
          tls = loadIdentity(opts.tlsDir);
          if (tls.role !== 'agent') {
            throw new InvalidInputError(`${opts.tlsDir} holds a ${tls.role} certificate, not an agent's`, {
              hint: 'issue one with `ferry certificate NODE --host IP --out DIR`',
            });
          }
        }
        if (isIP(advertise) === 0 || advertise === '0.0.0.0' || advertise === '::') {
          throw new InvalidInputError(`the agent needs an address peers can reach, not ${advertise}`, {
            hint: 'pass --advertise IP',
          });
        }
        const agent = await Agent.start({
          name: opts.name,
          host: opts.listen.host,
          port: opts.listen.port,
          dataDir: opts.dataDir,
          imagesRoot: opts.imagesDir,
          advertise,
          criu: opts.criu,
          softwareVersion: version,
          tls,
          capacityBytes: opts.capacity,
          metrics: opts.metrics,
        });
        await new Promise<void>((resolve) => {
          process.once('SIGTERM', resolve);
          process.once('SIGINT', resolve);
        });
        log.info('stopping');
        await agent.stop();
      },
    );

  const lab = program
    .command('lab')
    .description('Two local hosts (network namespaces) with agents, for trying Ferry out');
  lab
    .command('up')
    .description('Create the lab hosts a and b and start an agent on each (idempotent)')
    .option('--name <NAME>', 'lab name (prefixes its namespaces)', labName, DEFAULT_LAB)
    .option('--json', 'print the lab as JSON')
    .option('--insecure', 'plaintext agents without TLS (default: mutual TLS with a throwaway lab CA)')
    .option('--hosts <N>', 'how many hosts (2 to 8: a, b, c, ...)', wholeNumber, 2)
    .option('--capacity <SIZE>', 'memory each host offers workloads (they share this machine’s)', byteSize)
    .action(async (opts: { name: string; json?: boolean; insecure?: boolean; hosts: number; capacity?: number }) => {
      const up = await labUp({
        name: opts.name,
        insecure: opts.insecure,
        hosts: opts.hosts,
        capacityBytes: opts.capacity,
      });
      if (opts.json === true) json(up);
      else
        for (const h of up.hosts) process.stdout.write(`${h.host}  ${h.url}  (netns ${h.netns}, log ${h.logFile})\n`);
    });
  lab
    .command('down')
    .description('Stop the lab: its agents, everything running in its hosts, its namespaces')
    .option('--name <NAME>', 'lab name', labName, DEFAULT_LAB)
    .action(async (opts: { name: string }) => {
      const existed = await labDown(opts.name);
      process.stdout.write(existed ? `lab ${opts.name} is down\n` : `lab ${opts.name} was not up\n`);
    });
  lab
    .command('exec')
    .description('Run a command in a lab host')
    .argument('<HOST>', 'a, b, ...')
    .argument('<CMD...>', 'the command, after --')
    .option('--name <NAME>', 'lab name', labName, DEFAULT_LAB)
    .action(async (host: string, cmd: string[], opts: { name: string }) => {
      process.exitCode = await labExec(opts.name, host, cmd);
    });

  program
    .command('check')
    .description('Show which CRIU Ferry uses, run its kernel check, and list the features this kernel has')
    .addOption(criuOption())
    .option('--json', 'print one JSON document and nothing else on stdout')
    .action(async (opts: { criu?: string; json?: boolean }) => {
      const report = await runCheck({ criu: opts.criu, signal: interruptSignal() });
      if (opts.json === true) json(report);
      else printCheck(report);
    });

  program
    .command('demo')
    .description('Bring up the lab, start a counting workload on host a, migrate it live to b, show it counting on')
    .option('--keep', 'leave the lab and the workload running at the end')
    .option('--json', 'print the migration report as JSON on stdout')
    .addHelpText('after', '\nNeeds root. Tears down what it created unless --keep.')
    .action(async (opts: { keep?: boolean; json?: boolean }) => {
      const report = await runDemo({ keep: opts.keep, softwareVersion: version, signal: interruptSignal() });
      if (opts.json === true) json(report);
    });

  registerFleetCommands(program, version, interruptSignal);
  registerInstallCommands(program, version, interruptSignal);

  return program;
}

export async function main(argv: readonly string[]): Promise<number> {
  const program = buildProgram();
  const asJson = argv.includes('--json');
  try {
    await program.parseAsync([...argv], { from: 'user' });
    return typeof process.exitCode === 'number' ? process.exitCode : ExitCode.ok;
  } catch (error) {
    if (error instanceof CommanderError) {
      // Help and version exit 0; a usage mistake is bad input.
      return error.exitCode === 0 ? ExitCode.ok : ExitCode.badInput;
    }
    return reportError(error, asJson);
  }
}

// A reader that stops early (`ferry migrate --help | head`) is no error of ours.
process.stdout.on('error', (error: NodeJS.ErrnoException) => {
  if (error.code === 'EPIPE') process.exit(process.exitCode ?? 0);
  throw error;
});
process.exitCode = await main(process.argv.slice(2));

/** Wraps help text at 95 columns, as the hand-wrapped paragraphs around it. */
function wrap(text: string): string {
  return text.replace(/(.{1,95})(?:\s+|$)/g, '$1\n').trimEnd();
}
