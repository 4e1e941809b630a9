import { InvalidInputError } from '../../src/errors.js';
import { controllerIdentity, findNode, readInventory, type AgentEndpoint } from '../agents/index.js';
import { DEFAULT_LAB, hostEndpoint, readLab, type Lab } from '../lab/index.js';

export interface ResolveOptions {
  /** Allow plaintext ws:// agents. */
  insecure?: boolean | undefined;
  /** The lab whose host names (a, b, ...) and URLs are understood; default FERRY_LAB or "ferry". */
  lab?: string | undefined;
  /** Where the lab's state is read; default its state file (tests give one). */
  readLab?: ((name: string) => Lab | undefined) | undefined;
}

/**
 * Turns an AGENT argument into an endpoint: a wss:// URL (the controller's
 * identity from `ferry init`), a ws:// URL (only with --insecure), the name
 * of a node in the inventory, or a host of the lab that is up. A lab host,
 * named or by the URL `ferry lab up` printed, is reached with the lab's own
 * controller identity (and plaintext if the lab is --insecure).
 */
export function resolveAgent(agent: string, options: ResolveOptions = {}): AgentEndpoint {
  const labName = options.lab ?? process.env.FERRY_LAB ?? DEFAULT_LAB;
  const lab = (): Lab | undefined => (options.readLab ?? readLab)(labName);
  if (/^wss?:\/\//.test(agent)) {
    let url: URL;
    try {
      url = new URL(agent);
    } catch {
      throw new InvalidInputError(`${agent} is not a valid URL`, { hint: 'write it as wss://HOST:PORT' });
    }
    if (url.port === '') throw new InvalidInputError(`${agent} has no port`, { hint: 'write it as wss://HOST:PORT' });
    if (url.pathname !== '/' || url.search !== '' || url.username !== '') {
      throw new InvalidInputError(`${agent} has more than a host and a port`, { hint: 'write it as wss://HOST:PORT' });
    }
    const normalized = `${url.protocol}//${url.host}`;
    const labHost = lab()?.hosts.find((h) => h.url === normalized);
    if (labHost !== undefined) return hostEndpoint(labHost);
    const plain = url.protocol === 'ws:';
    if (plain && options.insecure !== true) {
      throw new InvalidInputError(`${agent} is a plaintext agent URL`, {
        hint: 'use wss:// (agents speak mutual TLS), or pass --insecure to talk to an agent started with --insecure',
      });
    }
    return { url: normalized, tls: plain ? undefined : controllerIdentity() };
  }
  const node = findNode(agent);
  if (node !== undefined) return { url: node.url, tls: controllerIdentity() };
  const up = lab();
  const host = up?.hosts.find((h) => h.host === agent);
  if (host !== undefined) return hostEndpoint(host);
  const known = [
    ...readInventory().nodes.map((n) => n.name),
    ...(up?.hosts.map((h) => `${h.host} (lab ${labName})`) ?? []),
  ];
  throw new InvalidInputError(`unknown agent ${JSON.stringify(agent)}`, {
    hint:
      known.length === 0
        ? 'give a URL (wss://HOST:PORT), install a node (`ferry install`), or run `ferry lab up` and use its hosts a and b'
        : `give a URL (wss://HOST:PORT) or one of: ${known.join(', ')}`,
  });
}
