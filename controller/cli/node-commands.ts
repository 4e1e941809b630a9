import { hostname } from 'node:os';
import { isIP } from 'node:net';
import type { Command } from 'commander';
import { Agent } from '../../agent/index.js';
import { InvalidInputError } from '../../src/errors.js';
import { log } from '../../src/log.js';
import { loadIdentity, type Identity } from '../../src/tls/index.js';
import { PEER_NAME } from '../../src/wire/index.js';
import { AGENT_PORT } from '../agents/index.js';
import { byteSize, directory, hostPort, nodeName } from './arguments.js';
import { printCheck, runCheck } from './check.js';
import type { CliContext } from './context.js';
import { criuOption } from './options.js';
import { json } from './output.js';

/** `ferry agent`: the daemon of this node, until SIGTERM or Ctrl-C. */
export function registerAgent(program: Command, { version, hooks }: CliContext): void {
  program
    .command('agent')
    .description('Run the agent daemon of this node')
    .option('--listen <HOST:PORT>', 'address to listen on (a numeric IP)', hostPort, {
      host: '127.0.0.1',
      port: AGENT_PORT,
    })
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
          hooks,
        });
        await new Promise<void>((resolve) => {
          process.once('SIGTERM', resolve);
          process.once('SIGINT', resolve);
        });
        log.info('stopping');
        await agent.stop();
      },
    );
}

/** `ferry check`: which CRIU Ferry uses here and what this kernel supports. */
export function registerCheck(program: Command, { interrupt }: CliContext): void {
  program
    .command('check')
    .description('Show which CRIU Ferry uses, run its kernel check, and list the features this kernel has')
    .addOption(criuOption())
    .option('--json', 'print one JSON document and nothing else on stdout')
    .action(async (opts: { criu?: string; json?: boolean }) => {
      const report = await runCheck({ criu: opts.criu, signal: interrupt() });
      if (opts.json === true) json(report);
      else printCheck(report);
    });
}
