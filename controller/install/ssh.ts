import { createHmac } from 'node:crypto';
import { appendFileSync, existsSync, mkdirSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import type { Readable } from 'node:stream';
import { createRequire } from 'node:module';
import type * as Ssh2 from 'ssh2';
import type { Client, ConnectConfig, ServerHostKeyAlgorithm } from 'ssh2';
import { FerryError, InvalidInputError } from '../../src/errors.js';
import { NODE_NAME } from '../agents/index.js';

/**
 * ssh2, loaded on first use: it takes a third of a second to load (its
 * crypto set-up), which every `ferry` command and every agent start would
 * pay, when only install and uninstall use it.
 */
const ssh2 = ((): (() => typeof Ssh2) => {
  const require = createRequire(import.meta.url);
  let loaded: typeof Ssh2 | undefined;
  return () => (loaded ??= require('ssh2') as typeof Ssh2);
})();

/** ssh://USER@HOST[:PORT], optionally named: NAME=ssh://... */
export interface SshTarget {
  name: string;
  user: string;
  host: string;
  port: number;
  text: string;
}

export class SshError extends FerryError {
  readonly code: string;
  constructor(code: string, message: string, options: { hint?: string; cause?: unknown } = {}) {
    super(message, options);
    this.code = code;
  }
}

/** Parses every target before any is touched: one bad argument changes nothing anywhere. */
export function parseTarget(text: string): SshTarget {
  const eq = text.indexOf('=');
  const named = eq > 0 && !text.slice(0, eq).includes('/');
  const name = named ? text.slice(0, eq) : undefined;
  const rest = named ? text.slice(eq + 1) : text;
  let url: URL;
  try {
    url = new URL(rest);
  } catch {
    throw new InvalidInputError(`${JSON.stringify(text)} is not an ssh:// URL`, {
      hint: 'write ssh://USER@HOST[:PORT], optionally NAME=ssh://USER@HOST',
    });
  }
  if (url.protocol !== 'ssh:' || url.hostname === '' || url.pathname !== '' || url.password !== '') {
    throw new InvalidInputError(`${JSON.stringify(text)} is not ssh://USER@HOST[:PORT]`, {
      hint: 'no path and no password: keys only (--identity or an ssh agent)',
    });
  }
  const host = url.hostname.replace(/^\[|\]$/g, '').toLowerCase();
  const nodeName = (name ?? host).toLowerCase();
  if (!NODE_NAME.test(nodeName)) {
    throw new InvalidInputError(`${JSON.stringify(nodeName)} cannot name a node`, {
      hint: 'name it: NAME=ssh://... (lower-case letters, digits, dots, dashes)',
    });
  }
  return {
    name: nodeName,
    user: decodeURIComponent(url.username) || 'root',
    host,
    port: url.port === '' ? 22 : Number(url.port),
    text,
  };
}

export function defaultKnownHosts(): string {
  return join(homedir(), '.ssh', 'known_hosts');
}

/** How the host's key compares with known_hosts. */
export type HostKeyVerdict = 'known' | 'unknown' | 'changed' | 'revoked';

/**
 * OpenSSH's known_hosts, read the way ssh reads it: plain and hashed
 * (|1|salt|hmac) host patterns, [host]:port for ports other than 22,
 * comma-separated names, @revoked lines. @cert-authority lines are not
 * supported (skipped).
 */
export class KnownHosts {
  constructor(readonly file: string) {}

  static hostPattern(host: string, port: number): string {
    return port === 22 ? host : `[${host}]:${port}`;
  }

  verdict(host: string, port: number, key: Buffer): HostKeyVerdict {
    const name = KnownHosts.hostPattern(host, port);
    const keyText = key.toString('base64');
    let seen = false;
    let matched = false;
    for (const line of existsSync(this.file) ? readFileSync(this.file, 'utf8').split('\n') : []) {
      const fields = line.trim().split(/\s+/);
      if (fields.length < 3 || fields[0]?.startsWith('#')) continue;
      const marker = fields[0]?.startsWith('@') ? fields.shift() : undefined;
      const [patterns = '', , blob = ''] = fields;
      if (marker === '@cert-authority') continue;
      if (!patterns.split(',').some((p) => matchesHost(p, name))) continue;
      if (marker === '@revoked') {
        if (blob === keyText) return 'revoked';
        continue;
      }
      seen = true;
      if (blob === keyText) matched = true;
    }
    if (matched) return 'known';
    return seen ? 'changed' : 'unknown';
  }

  /** The key types known_hosts holds for the host, in file order. */
  keyTypes(host: string, port: number): string[] {
    const name = KnownHosts.hostPattern(host, port);
    const types: string[] = [];
    for (const line of existsSync(this.file) ? readFileSync(this.file, 'utf8').split('\n') : []) {
      const fields = line.trim().split(/\s+/);
      if (fields.length < 3 || fields[0]?.startsWith('#') || fields[0]?.startsWith('@')) continue;
      const [patterns = '', type = ''] = fields;
      if (patterns.split(',').some((p) => matchesHost(p, name)) && !types.includes(type)) types.push(type);
    }
    return types;
  }

  /**
   * Host key algorithms to offer, those of the known keys first, as OpenSSH
   * orders them: a server with several keys then shows the one on record,
   * not another type that would read as a changed key.
   */
  hostKeyAlgorithms(host: string, port: number): ServerHostKeyAlgorithm[] {
    const preferred = this.keyTypes(host, port).flatMap((type): ServerHostKeyAlgorithm[] =>
      type === 'ssh-rsa' ? ['rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa'] : HOST_KEY_ALGORITHMS.filter((a) => a === type),
    );
    return [...new Set([...preferred, ...HOST_KEY_ALGORITHMS])];
  }

  /** Trust on first use: appends the key, as `ssh -o StrictHostKeyChecking=accept-new` does. */
  add(host: string, port: number, key: Buffer): void {
    mkdirSync(dirname(this.file), { recursive: true, mode: 0o700 });
    const type = key.subarray(4, 4 + key.readUInt32BE(0)).toString();
    const existing = existsSync(this.file) ? readFileSync(this.file, 'utf8') : '';
    const separator = existing === '' || existing.endsWith('\n') ? '' : '\n';
    appendFileSync(this.file, `${separator}${KnownHosts.hostPattern(host, port)} ${type} ${key.toString('base64')}\n`, {
      mode: 0o600,
    });
  }
}

/** ssh2's own default list and order (it has no way to move one of them to the front). */
const HOST_KEY_ALGORITHMS: readonly ServerHostKeyAlgorithm[] = [
  'ssh-ed25519',
  'ecdsa-sha2-nistp256',
  'ecdsa-sha2-nistp384',
  'ecdsa-sha2-nistp521',
  'rsa-sha2-512',
  'rsa-sha2-256',
  'ssh-rsa',
];

function matchesHost(pattern: string, name: string): boolean {
  if (pattern.startsWith('|1|')) {
    const [, , salt = '', hash = ''] = pattern.split('|');
    return createHmac('sha1', Buffer.from(salt, 'base64')).update(name).digest('base64') === hash;
  }
  if (pattern.startsWith('!')) return false;
  if (!pattern.includes('*') && !pattern.includes('?')) return pattern.toLowerCase() === name.toLowerCase();
  const re = new RegExp(
    `^${pattern
      .replace(/[.+^${}()|[\]\\]/g, '\\$&')
      .replace(/\*/g, '.*')
      .replace(/\?/g, '.')}$`,
    'i',
  );
  return re.test(name);
}

export interface SshOptions {
  knownHosts: KnownHosts;
  /** Accept and record a host never seen before (never a changed one). */
  trustNewHosts: boolean;
  /** A private key file; else the ssh agent (SSH_AUTH_SOCK); else ~/.ssh/id_ed25519, id_ecdsa, id_rsa. */
  identity?: string | undefined;
  timeoutMs?: number | undefined;
}

export interface ExecResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** One SSH connection to a node, opened only after its host key checked out. */
export class SshSession {
  private constructor(
    readonly target: SshTarget,
    readonly client: Client,
    readonly hostKey: 'known' | 'trusted now',
  ) {}

  static async open(target: SshTarget, options: SshOptions): Promise<SshSession> {
    const client = new (ssh2().Client)();
    let verdict: HostKeyVerdict | undefined;
    let trustedNow = false;
    const config: ConnectConfig = {
      host: target.host,
      port: target.port,
      username: target.user,
      readyTimeout: options.timeoutMs ?? 15_000,
      algorithms: { serverHostKey: options.knownHosts.hostKeyAlgorithms(target.host, target.port) },
      hostVerifier: (key: Buffer) => {
        verdict = options.knownHosts.verdict(target.host, target.port, key);
        if (verdict === 'unknown' && options.trustNewHosts) {
          options.knownHosts.add(target.host, target.port, key);
          trustedNow = true;
          return true;
        }
        return verdict === 'known';
      },
      ...authentication(options.identity),
    };
    await new Promise<void>((resolve, reject) => {
      client.once('ready', () => resolve());
      client.once('error', (error) => reject(error));
      client.connect(config);
    }).catch((error: unknown) => {
      client.end();
      const where = KnownHosts.hostPattern(target.host, target.port);
      if (verdict === 'unknown') {
        throw new SshError('SSH_HOST_UNKNOWN', `${where} is not in ${options.knownHosts.file}`, {
          hint: `check its key out of band, then add it (ssh-keyscan -p ${target.port} ${target.host}), or pass --trust-new-hosts to accept it this once`,
        });
      }
      if (verdict === 'changed') {
        throw new SshError(
          'SSH_HOST_KEY_CHANGED',
          `the host key of ${where} is not the one in ${options.knownHosts.file}: someone may be impersonating it, or it was reinstalled`,
          {
            hint: `if you know it was reinstalled: ssh-keygen -R '${where}' -f ${options.knownHosts.file}, then run again (--trust-new-hosts never accepts a changed key)`,
          },
        );
      }
      if (verdict === 'revoked') throw new SshError('SSH_HOST_KEY_REVOKED', `the host key of ${where} is revoked`);
      const message = (error as Error).message;
      throw new SshError('SSH_CONNECT', `cannot log in to ${target.user}@${where}: ${message}`, {
        hint: /authentication/i.test(message)
          ? 'give a key it accepts with --identity FILE, or load one in ssh-agent'
          : 'check the address and that sshd runs there',
        cause: error,
      });
    });
    return new SshSession(target, client, trustedNow ? 'trusted now' : 'known');
  }

  /** Runs a command (through the user's shell); `input` is streamed to its stdin. */
  exec(command: string, input?: Readable): Promise<ExecResult> {
    return new Promise((resolve, reject) => {
      this.client.exec(command, (error, channel) => {
        if (error) {
          reject(error);
          return;
        }
        let stdout = '';
        let stderr = '';
        channel.on('data', (d: Buffer) => (stdout += d.toString()));
        channel.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
        channel.on('close', (code: number | null) => resolve({ code: code ?? -1, stdout, stderr }));
        if (input === undefined) channel.end();
        else input.pipe(channel);
      });
    });
  }

  /** Runs a command that must succeed; its stderr explains a failure. */
  async run(command: string, what: string, input?: Readable): Promise<string> {
    const r = await this.exec(command, input);
    if (r.code !== 0) {
      throw new SshError(
        'NODE_COMMAND',
        `${what} failed on ${this.target.name} (exit ${r.code}): ${r.stderr.trim().slice(-500)}`,
      );
    }
    return r.stdout;
  }

  close(): void {
    this.client.end();
  }
}

/**
 * The private key in FILE, checked before any host is touched: a missing,
 * unreadable, public or passphrase-protected key is bad input (exit 2).
 */
export function readIdentity(file: string): Buffer {
  let key: Buffer;
  try {
    key = readFileSync(file);
  } catch (error) {
    throw new InvalidInputError(`cannot read the key file ${file}: ${(error as Error).message}`, {
      hint: 'give --identity an SSH private key',
      cause: error,
    });
  }
  const parsed = ssh2().utils.parseKey(key);
  if (parsed instanceof Error) {
    throw new InvalidInputError(`${file} is not a usable SSH private key: ${parsed.message}`, {
      hint: /passphrase/.test(parsed.message)
        ? `load it into an ssh agent (ssh-add ${file}) and leave --identity out`
        : 'give --identity an SSH private key (ssh-keygen -t ed25519 makes one)',
    });
  }
  if (!parsed.isPrivateKey()) {
    throw new InvalidInputError(`${file} is a public key`, { hint: 'give --identity the private key, not the .pub' });
  }
  return key;
}

function authentication(identity: string | undefined): Partial<ConnectConfig> {
  if (identity !== undefined) return { privateKey: readIdentity(identity) };
  // As ssh does, both the agent's keys and the default key file (ssh2 tries the file first). A default
  // file that cannot be used without a passphrase is left to the agent.
  const agent =
    process.env.SSH_AUTH_SOCK === undefined || process.env.SSH_AUTH_SOCK === '' ? undefined : process.env.SSH_AUTH_SOCK;
  const key = ['id_ed25519', 'id_ecdsa', 'id_rsa']
    .map((name) => join(homedir(), '.ssh', name))
    .filter((f) => existsSync(f))
    .map((f) => readFileSync(f))
    .find((k) => !(ssh2().utils.parseKey(k) instanceof Error));
  if (agent !== undefined || key !== undefined) {
    return { ...(agent === undefined ? {} : { agent }), ...(key === undefined ? {} : { privateKey: key }) };
  }
  throw new InvalidInputError('no SSH key to log in with', {
    hint: 'pass --identity FILE, start an ssh-agent with a key, or create ~/.ssh/id_ed25519',
  });
}

/** Quotes one word for the remote POSIX shell. */
export function sh(word: string): string {
  return `'${word.replace(/'/g, `'\\''`)}'`;
}
