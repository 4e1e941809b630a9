import { existsSync, rmSync } from 'node:fs';
import {
  createAuthority,
  IdentityError,
  issueIdentity,
  loadAuthority,
  loadIdentity,
  type Authority,
  type Identity,
} from '../../src/tls/index.js';
import { authorityDir, controllerIdentityDir, NODE_NAME } from '../agents/index.js';
import { InvalidInputError } from '../../src/errors.js';

export interface InitResult {
  config: string;
  authority: 'created' | 'kept';
  controller: 'issued' | 'kept' | 'reissued';
  controllerValidUntil: string;
  /** What to tell a person, line by line. */
  lines: string[];
}

/**
 * `ferry init`: the cluster CA and the controller's identity, each created
 * only when missing, so running it twice changes nothing. An expired or
 * foreign controller certificate is reissued from the same CA.
 */
export async function initCluster(config: string, clusterName: string): Promise<InitResult> {
  if (!/^[A-Za-z0-9][A-Za-z0-9 ._-]{0,40}$/.test(clusterName)) {
    throw new InvalidInputError(`${JSON.stringify(clusterName)} cannot name a cluster`, {
      hint: 'letters, digits, spaces, dots, dashes, underscores; at most 41',
    });
  }
  const caDir = authorityDir(config);
  let authority: Authority;
  let authorityState: InitResult['authority'] = 'kept';
  if (existsSync(caDir)) {
    authority = loadAuthority(caDir);
  } else {
    authority = await createAuthority(caDir, clusterName);
    authorityState = 'created';
  }
  const dir = controllerIdentityDir(config);
  let controller: InitResult['controller'] = 'issued';
  let identity: Identity | undefined;
  if (existsSync(dir)) {
    try {
      identity = loadIdentity(dir);
      if (identity.ca.trim() !== authority.certPem.trim()) identity = undefined;
      controller = identity === undefined ? 'reissued' : 'kept';
    } catch (error) {
      if (!(error instanceof IdentityError)) throw error;
      controller = 'reissued';
    }
    if (identity === undefined) rmSync(dir, { recursive: true, force: true });
  }
  identity ??= await issueIdentity(authority, { role: 'controller', name: 'controller' }, dir);
  const lines = [
    `cluster authority: ${authorityState === 'created' ? 'created' : 'already there, kept'} (${caDir})`,
    `controller certificate: ${controller === 'kept' ? 'valid, kept' : controller} (${dir}, valid until ${identity.notAfter.toISOString().slice(0, 10)})`,
  ];
  if (authorityState === 'created') {
    lines.push('', `Keep ${caDir}/key.pem secret: it admits agents and controllers to this cluster.`);
    lines.push('Next: ferry install ssh://USER@HOST ...   (or ferry certificate NODE --host IP --out DIR)');
  }
  return {
    config,
    authority: authorityState,
    controller,
    controllerValidUntil: identity.notAfter.toISOString(),
    lines,
  };
}

/** `ferry certificate`: an agent identity for a node installed by hand. */
export async function certificate(config: string, node: string, hosts: string[], out: string): Promise<Identity> {
  if (!NODE_NAME.test(node)) {
    throw new InvalidInputError(`bad node name ${JSON.stringify(node)}`, {
      hint: 'lower-case letters, digits, dots and dashes',
    });
  }
  if (hosts.length === 0) {
    throw new InvalidInputError('an agent certificate needs the addresses it is reached at', {
      hint: 'pass --host IP (repeat for each address or DNS name)',
    });
  }
  for (const host of hosts) {
    if (!/^[A-Za-z0-9.:-]{1,253}$/.test(host)) throw new InvalidInputError(`${JSON.stringify(host)} is not a host`);
  }
  if (existsSync(out)) {
    throw new InvalidInputError(`${out} already exists`, { hint: 'give a new directory; nothing was overwritten' });
  }
  return issueIdentity(loadAuthority(authorityDir(config)), { role: 'agent', name: node, hosts }, out);
}
