import { X509Certificate } from 'node:crypto';
import { closeSync, existsSync, fchmodSync, openSync, readFileSync, renameSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import type { PeerCertificate, TLSSocket } from 'node:tls';
import { InvalidInputError } from '../errors.js';

/** What a certificate lets its holder do: a controller drives agents; agents also talk to each other. */
export type Role = 'controller' | 'agent';

/** The organisational unit that carries the role in a certificate's subject. */
export const ROLE_UNIT: Record<Role, string> = { controller: 'ferry-controller', agent: 'ferry-agent' };

/**
 * A holder's TLS identity, read from one directory: ca.pem (the cluster
 * CA it trusts), cert.pem (its certificate) and key.pem (mode 0600).
 */
export interface Identity {
  dir: string;
  files: { ca: string; cert: string; key: string };
  ca: string;
  cert: string;
  key: string;
  name: string;
  role: Role;
  notAfter: Date;
}

export class IdentityError extends InvalidInputError {
  override readonly code = 'TLS_IDENTITY';
}

/** Writes a file that only its owner may read, atomically, so a crash never leaves half a key. */
export function writePrivate(file: string, content: string, mode = 0o600): void {
  const temporary = `${file}.${process.pid}.tmp`;
  const fd = openSync(temporary, 'wx', 0o600);
  try {
    writeSync(fd, content);
    fchmodSync(fd, mode);
  } finally {
    closeSync(fd);
  }
  renameSync(temporary, file);
}

function roleOf(unit: string | undefined): Role | undefined {
  if (unit === ROLE_UNIT.controller) return 'controller';
  if (unit === ROLE_UNIT.agent) return 'agent';
  return undefined;
}

/** The value of one attribute in Node's multi-line subject ("CN=a\nOU=ferry-agent\nO=ferry"). */
function attribute(subject: string, key: string): string | undefined {
  for (const line of subject.split('\n')) {
    if (line.startsWith(`${key}=`)) return line.slice(key.length + 1);
  }
  return undefined;
}

/**
 * Reads and checks an identity directory: the three files exist, the key is
 * private, the certificate is the cluster CA's and (unless allowExpired) in
 * its validity period. Every refusal says how to mend it.
 */
export function loadIdentity(dir: string, options: { allowExpired?: boolean } = {}): Identity {
  const files = { ca: join(dir, 'ca.pem'), cert: join(dir, 'cert.pem'), key: join(dir, 'key.pem') };
  const missing = Object.values(files).filter((f) => !existsSync(f));
  if (missing.length > 0) {
    throw new IdentityError(`no TLS identity in ${dir} (missing ${missing.join(', ')})`, {
      hint: 'run `ferry init` on the controller (agents get theirs from `ferry install`), or pass --insecure for plaintext',
    });
  }
  const mode = statSync(files.key).mode & 0o777;
  if ((mode & 0o077) !== 0) {
    throw new IdentityError(`${files.key} can be read by others (mode ${mode.toString(8)})`, {
      hint: `chmod 600 ${files.key}`,
    });
  }
  const ca = readFileSync(files.ca, 'utf8');
  const cert = readFileSync(files.cert, 'utf8');
  let parsed: X509Certificate;
  let authority: X509Certificate;
  try {
    parsed = new X509Certificate(cert);
    authority = new X509Certificate(ca);
  } catch (error) {
    throw new IdentityError(`${dir} holds a file that is not a PEM certificate`, { cause: error });
  }
  if (!parsed.checkIssued(authority) || !parsed.verify(authority.publicKey)) {
    throw new IdentityError(`${files.cert} was not signed by the CA in ${files.ca}`, {
      hint: 'reissue the certificate from this cluster (`ferry install --upgrade` for an agent, `ferry init` for the controller)',
    });
  }
  const role = roleOf(attribute(parsed.subject, 'OU'));
  if (role === undefined) throw new IdentityError(`${files.cert} is not a Ferry certificate (no Ferry role)`);
  const notAfter = new Date(parsed.validTo);
  if (!options.allowExpired && notAfter.getTime() < Date.now()) {
    throw new IdentityError(`${files.cert} expired on ${notAfter.toISOString()}`, {
      hint: 'reissue it (`ferry install --upgrade` for an agent, `ferry init` for the controller)',
    });
  }
  return {
    dir,
    files,
    ca,
    cert,
    key: readFileSync(files.key, 'utf8'),
    name: attribute(parsed.subject, 'CN') ?? '',
    role,
    notAfter,
  };
}

/** The authenticated party on a TLS connection: its certificate's name and role. */
export interface Peer {
  name: string;
  role: Role;
  fingerprint: string;
  /** The addresses and names the certificate is valid for, as Node spells them ("IP Address:10.0.0.1, DNS:n1"). */
  subjectAltName: string;
}

/** Reads who is on the other end of an authorized TLS socket, or undefined if its certificate names no Ferry role. */
export function peerOf(socket: TLSSocket): Peer | undefined {
  const certificate: PeerCertificate = socket.getPeerCertificate();
  const unit = certificate.subject?.OU;
  const role = roleOf(Array.isArray(unit) ? unit[0] : unit);
  if (role === undefined) return undefined;
  const cn = certificate.subject.CN;
  return {
    name: (Array.isArray(cn) ? cn[0] : cn) ?? '',
    role,
    fingerprint: certificate.fingerprint256,
    subjectAltName: certificate.subjectaltname ?? '',
  };
}

/** TLS 1.3 only, mutual: Node refuses a client without a certificate from the cluster CA during the handshake. */
export function serverOptions(identity: Identity): {
  ca: string;
  cert: string;
  key: string;
  requestCert: true;
  rejectUnauthorized: true;
  minVersion: 'TLSv1.3';
} {
  return {
    ca: identity.ca,
    cert: identity.cert,
    key: identity.key,
    requestCert: true,
    rejectUnauthorized: true,
    minVersion: 'TLSv1.3',
  };
}

export function clientOptions(identity: Identity): {
  ca: string;
  cert: string;
  key: string;
  rejectUnauthorized: true;
  minVersion: 'TLSv1.3';
} {
  return { ca: identity.ca, cert: identity.cert, key: identity.key, rejectUnauthorized: true, minVersion: 'TLSv1.3' };
}
