import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { utils } from 'ssh2';
import { enterHost, onHost, type LabHost } from '../../controller/lab/index.js';
import { projectRoot } from '../../src/paths.js';
import { waitFor } from './wait.js';

/** Where the test sshd keeps its configuration and keys, on its node. */
const SERVER_DIR = '/etc/ferry-test-sshd';

/**
 * An ed25519 key pair from ssh2, made again while it is malformed: ssh2
 * strips the leading zero bytes of the public key, so about 1 in 256 pairs
 * has a 31-byte key that neither ssh2 nor OpenSSH reads (mscdex/ssh2#1390).
 */
export function ed25519KeyPair(options?: { passphrase: string; cipher: string; rounds: number }): {
  private: string;
  public: string;
} {
  for (;;) {
    const pair =
      options === undefined ? utils.generateKeyPairSync('ed25519') : utils.generateKeyPairSync('ed25519', options);
    if (
      !(utils.parseKey(pair.public) instanceof Error) &&
      !(utils.parseKey(pair.private, options?.passphrase) instanceof Error)
    )
      return pair;
  }
}

/**
 * A real OpenSSH server (Debian's, from scripts/install-sshd) inside a lab
 * host, in all of its namespaces: what is installed over it stays on that
 * host, as on a separate machine. Its configuration and host key are on
 * the host (/etc/ferry-test-sshd), its privilege-separation user is added
 * to the host's own /etc/passwd; root logs in with the key in `clientKey`,
 * which stays on this machine. The node's files are visible at `root`.
 */
export class Sshd {
  #child: ChildProcess | undefined;
  hostKey = '';

  private constructor(
    readonly host: LabHost,
    readonly dir: string,
    readonly port: number,
    readonly clientKey: string,
  ) {}

  static async start(host: LabHost, dir: string, port = 2222): Promise<Sshd> {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const sshd = new Sshd(host, dir, port, join(dir, 'client_key'));
    mkdirSync(sshd.#onNode(SERVER_DIR), { recursive: true, mode: 0o700 });
    mkdirSync(sshd.#onNode('/run/sshd'), { recursive: true, mode: 0o755 });
    const client = ed25519KeyPair();
    writeFileSync(sshd.clientKey, client.private, { mode: 0o600 });
    writeFileSync(`${sshd.clientKey}.pub`, client.public + '\n');
    sshd.authorize(client.public);
    const passwd = readFileSync(sshd.#onNode('/etc/passwd'), 'utf8');
    if (!/^sshd:/m.test(passwd)) {
      writeFileSync(
        sshd.#onNode('/etc/passwd'),
        passwd +
          (passwd.endsWith('\n') ? '' : '\n') +
          'sshd:x:64999:65534:privilege separation:/run/sshd:/usr/sbin/nologin\n',
      );
    }
    sshd.newHostKey();
    await sshd.#run();
    return sshd;
  }

  /** The public keys that may log in as root (replacing those before). */
  authorize(...publicKeys: string[]): void {
    writeFileSync(this.#onNode(`${SERVER_DIR}/authorized_keys`), publicKeys.map((k) => k.trim() + '\n').join(''), {
      mode: 0o600,
    });
  }

  /** The public keys that may log in now. */
  authorized(): string[] {
    return readFileSync(this.#onNode(`${SERVER_DIR}/authorized_keys`), 'utf8')
      .trim()
      .split('\n');
  }

  /** A new host key: what a reinstalled or impersonated machine shows. Takes effect at the next start. */
  newHostKey(): void {
    const key = ed25519KeyPair();
    writeFileSync(this.#onNode(`${SERVER_DIR}/host_key`), key.private, { mode: 0o600 });
    this.hostKey = key.public;
  }

  /** A known_hosts line for this server, as `ssh` would write it. */
  knownHostsLine(): string {
    return `[${this.host.address}]:${this.port} ${this.hostKey.split(' ').slice(0, 2).join(' ')}\n`;
  }

  /** The node's file system as its processes see it. */
  get root(): string {
    return onHost(this.host, '');
  }

  get url(): string {
    return `ssh://root@${this.host.address}:${this.port}`;
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.#run();
  }

  #onNode(path: string): string {
    return onHost(this.host, path);
  }

  async #run(): Promise<void> {
    const binary = execFileSync('bash', [join(projectRoot(), 'scripts', 'install-sshd')], { encoding: 'utf8' }).trim();
    const prefix = join(binary, '..', '..', '..');
    const config = `${SERVER_DIR}/sshd_config`;
    writeFileSync(
      this.#onNode(config),
      [
        `Port ${this.port}`,
        `ListenAddress ${this.host.address}`,
        `HostKey ${SERVER_DIR}/host_key`,
        `PidFile ${SERVER_DIR}/sshd.pid`,
        `AuthorizedKeysFile ${SERVER_DIR}/authorized_keys`,
        'PermitRootLogin prohibit-password',
        'PasswordAuthentication no',
        'KbdInteractiveAuthentication no',
        'UsePAM no',
        'StrictModes no',
        'LogLevel VERBOSE',
        '',
      ].join('\n'),
    );
    const libraries = [join(prefix, 'usr/lib/x86_64-linux-gnu'), join(prefix, 'lib/x86_64-linux-gnu')].join(':');
    this.#child = spawn(
      'nsenter',
      [...enterHost(this.host.init), 'env', `LD_LIBRARY_PATH=${libraries}`, binary, '-D', '-e', '-f', config],
      { stdio: ['ignore', 'ignore', 'pipe'], detached: true },
    );
    let log = '';
    this.#child.stderr?.on('data', (d: Buffer) => {
      log += d.toString();
      writeFileSync(join(this.dir, 'sshd.log'), log);
    });
    const child = this.#child;
    try {
      // A loaded machine (the suite runs beside other work) can take a while; an sshd that exits fails at once.
      await waitFor(async () => child.exitCode !== null || (await this.#listening()), {
        what: `sshd on ${this.host.address}:${this.port}`,
        timeoutMs: 30_000,
        intervalMs: 50,
      });
    } catch (error) {
      throw new Error(`${(error as Error).message}; its log: ${log.slice(-500) || '(empty)'}`);
    }
    if (child.exitCode !== null) throw new Error(`sshd exited (${child.exitCode}): ${log.slice(-500)}`);
  }

  #listening(): Promise<boolean> {
    return new Promise((resolve) => {
      const socket = connect({ host: this.host.address, port: this.port });
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
  }

  /** Stops sshd (what runs in the lab host is the lab's to stop). */
  async dispose(): Promise<void> {
    await this.stop();
  }

  async stop(): Promise<void> {
    const child = this.#child;
    if (child?.pid === undefined || child.exitCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    try {
      process.kill(-child.pid, 'SIGTERM');
    } catch {
      // gone
    }
    await exited;
  }
}
