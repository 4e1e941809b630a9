import type { Command } from 'commander';
import { configDir } from '../agents/index.js';
import type { CliContext } from './context.js';
import { certificate, initCluster } from './init.js';
import { json } from './output.js';

/** `ferry init`: the cluster CA and this controller’s certificate. */
export function registerInit(program: Command, _context: CliContext): void {
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
}

/** `ferry certificate`: an agent certificate for a node installed by hand. */
export function registerCertificate(program: Command, _context: CliContext): void {
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
}
