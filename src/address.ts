import { isIPv4 } from 'node:net';
import { InvalidInputError } from './errors.js';

/** A service address a workload owns: an IPv4 address and the prefix of its subnet ("10.0.0.50/24"). */
export interface ServiceAddress {
  readonly ip: string;
  readonly prefix: number;
  /** "IP/PREFIX", as `ip addr` takes it. */
  readonly cidr: string;
}

/**
 * Parses `--address IP/PREFIX`. IPv4 only: moving an IPv6 address needs an
 * unsolicited neighbour advertisement, which Ferry does not send yet
 * (docs/network.md). A bare IP gets /32, an address that routes through
 * the host's existing subnet.
 */
export function parseServiceAddress(text: string): ServiceAddress {
  const [ip = '', prefixText, ...rest] = text.trim().split('/');
  const hint = 'give an IPv4 address with its prefix length, for example 10.0.0.50/24';
  if (rest.length > 0 || !isIPv4(ip)) {
    throw new InvalidInputError(`"${text}" is not an IPv4 service address`, {
      hint: ip.includes(':') ? `IPv6 service addresses are not supported yet; ${hint}` : hint,
    });
  }
  const prefix = prefixText === undefined ? 32 : Number(prefixText);
  if (!/^\d{1,2}$/.test(prefixText ?? '32') || prefix < 1 || prefix > 32) {
    throw new InvalidInputError(`"${text}": the prefix length must be 1 to 32`, { hint });
  }
  const first = Number(ip.split('.')[0]);
  if (first === 0 || first === 127 || first >= 224 || ip === '255.255.255.255') {
    throw new InvalidInputError(`${ip} cannot be a service address (loopback, multicast or reserved)`, { hint });
  }
  return { ip, prefix, cidr: `${ip}/${prefix}` };
}
