import { InvalidInputError } from '../src/errors.js';
import { DEFAULT_LAB, readLab } from './lab.js';

/**
 * Turns an AGENT argument into a URL: a ws:// or wss:// URL as it is, or
 * the name of a host of the lab that is up ("a", "b"; the lab named by
 * FERRY_LAB, default "ferry").
 */
export function resolveAgent(agent: string, labName = process.env.FERRY_LAB ?? DEFAULT_LAB): string {
  if (/^wss?:\/\//.test(agent)) {
    let url: URL;
    try {
      url = new URL(agent);
    } catch {
      throw new InvalidInputError(`${agent} is not a valid URL`, { hint: 'write it as ws://HOST:PORT' });
    }
    if (url.port === '') throw new InvalidInputError(`${agent} has no port`, { hint: 'write it as ws://HOST:PORT' });
    return agent.replace(/\/$/, '');
  }
  const lab = readLab(labName);
  const host = lab?.hosts.find((h) => h.host === agent);
  if (host !== undefined) return host.url;
  throw new InvalidInputError(`unknown agent ${JSON.stringify(agent)}`, {
    hint:
      lab === undefined
        ? 'give a URL (ws://HOST:PORT), or run `ferry lab up` and use its host names a and b'
        : `give a URL (ws://HOST:PORT) or a host of lab ${labName}: ${lab.hosts.map((h) => h.host).join(', ')}`,
  });
}
