// @peculiar/x509 resolves its classes through tsyringe, which needs the Reflect polyfill first.
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import { randomBytes, webcrypto } from 'node:crypto';
import type { webcrypto as WebCrypto } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { InvalidInputError } from '../errors.js';
import { writePrivate, type Role, ROLE_UNIT, type Identity, loadIdentity } from './identity.js';

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

/** ECDSA P-256: fast to generate and sign, and spoken by both OpenSSL (Node) and GnuTLS (CRIU). */
const ALGORITHM = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;
const DAY_MS = 86_400_000;
/** The CA outlives every certificate it signs; node certificates are reissued by `ferry install --upgrade`. */
const CA_DAYS = 3650;
const NODE_DAYS = 825;

/** The cluster's certificate authority: whoever holds its key can admit controllers and agents. */
export interface Authority {
  dir: string;
  certPem: string;
  keyPem: string;
}

export interface IssueRequest {
  role: Role;
  /** The subject's common name: the node's or controller's name. */
  name: string;
  /** Host names and IP addresses the holder is reached at (agents); each goes into subjectAltName. */
  hosts?: readonly string[];
  notBefore?: Date;
  notAfter?: Date;
}

export class AuthorityError extends InvalidInputError {
  override readonly code = 'TLS_AUTHORITY';
}

const CA_CERT = 'ca.pem';
const CA_KEY = 'key.pem';

async function generateKeys(): Promise<WebCrypto.CryptoKeyPair> {
  return webcrypto.subtle.generateKey(ALGORITHM, true, ['sign', 'verify']);
}

async function keyPem(key: WebCrypto.CryptoKey): Promise<string> {
  const der = Buffer.from(await webcrypto.subtle.exportKey('pkcs8', key));
  return x509.PemConverter.encode(der, 'PRIVATE KEY');
}

function serial(): string {
  // Positive and unique: the top bit cleared so DER does not read it as negative.
  const bytes = randomBytes(16);
  bytes[0] = bytes[0]! & 0x7f;
  return bytes.toString('hex');
}

/** Escapes a value for an X.500 name string (RFC 4514). */
function rdn(value: string): string {
  return value.replace(/([,+"\\<>;=#])/g, '\\$1');
}

/**
 * Creates a new cluster CA in DIR (ca.pem, key.pem with mode 0600). Refuses
 * when one is already there: replacing it would orphan every agent.
 */
export async function createAuthority(dir: string, clusterName: string): Promise<Authority> {
  if (existsSync(join(dir, CA_CERT)) || existsSync(join(dir, CA_KEY))) {
    throw new AuthorityError(`a cluster authority already exists in ${dir}`, {
      hint: 'keep it (every agent trusts it); remove the directory only to start a new cluster',
    });
  }
  const keys = await generateKeys();
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial(),
    name: `CN=${rdn(`${clusterName} cluster authority`)}, O=ferry`,
    notBefore: new Date(now - 60_000),
    notAfter: new Date(now + CA_DAYS * DAY_MS),
    keys,
    signingAlgorithm: ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  const authority = { dir, certPem: cert.toString('pem'), keyPem: await keyPem(keys.privateKey) };
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  writePrivate(join(dir, CA_KEY), authority.keyPem);
  writePrivate(join(dir, CA_CERT), authority.certPem, 0o644);
  return authority;
}

export function loadAuthority(dir: string): Authority {
  const certFile = join(dir, CA_CERT);
  const keyFile = join(dir, CA_KEY);
  if (!existsSync(certFile) || !existsSync(keyFile)) {
    throw new AuthorityError(`no cluster authority in ${dir}`, { hint: 'run `ferry init` first' });
  }
  return { dir, certPem: readFileSync(certFile, 'utf8'), keyPem: readFileSync(keyFile, 'utf8') };
}

/**
 * Signs a certificate for a controller or an agent and writes the holder's
 * identity directory (ca.pem, cert.pem, key.pem). Agents serve and connect
 * (serverAuth + clientAuth); a controller only connects.
 */
export async function issueIdentity(authority: Authority, request: IssueRequest, outDir: string): Promise<Identity> {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/.test(request.name)) {
    throw new AuthorityError(`${JSON.stringify(request.name)} cannot name a certificate`, {
      hint: 'use letters, digits, dots, dashes and underscores (at most 63)',
    });
  }
  const caCert = new x509.X509Certificate(authority.certPem);
  const caKey = await webcrypto.subtle.importKey(
    'pkcs8',
    x509.PemConverter.decodeFirst(authority.keyPem),
    ALGORITHM,
    false,
    ['sign'],
  );
  const keys = await generateKeys();
  const now = Date.now();
  const hosts = request.hosts ?? [];
  const extensions: x509.Extension[] = [
    new x509.BasicConstraintsExtension(false, undefined, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
    new x509.ExtendedKeyUsageExtension(
      request.role === 'agent'
        ? [x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]
        : [x509.ExtendedKeyUsage.clientAuth],
    ),
    await x509.AuthorityKeyIdentifierExtension.create(caCert),
  ];
  if (hosts.length > 0) {
    extensions.push(
      new x509.SubjectAlternativeNameExtension(hosts.map((host) => ({ type: isIP(host) ? 'ip' : 'dns', value: host }))),
    );
  }
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial(),
    subject: `CN=${rdn(request.name)}, OU=${ROLE_UNIT[request.role]}, O=ferry`,
    issuer: caCert.subject,
    notBefore: request.notBefore ?? new Date(now - 60_000),
    notAfter: request.notAfter ?? new Date(now + NODE_DAYS * DAY_MS),
    publicKey: keys.publicKey,
    signingKey: caKey,
    signingAlgorithm: ALGORITHM,
    extensions,
  });
  mkdirSync(outDir, { recursive: true, mode: 0o700 });
  writePrivate(join(outDir, 'key.pem'), await keyPem(keys.privateKey));
  writePrivate(join(outDir, 'cert.pem'), cert.toString('pem'), 0o644);
  writePrivate(join(outDir, 'ca.pem'), authority.certPem, 0o644);
  return loadIdentity(outDir, { allowExpired: true });
}
