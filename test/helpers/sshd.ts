import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { utils } from 'ssh2';
import type { LabHost } from '../../controller/lab/index.js';
import { projectRoot } from '../../src/paths.js';
import { waitFor } from './wait.js';

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
 * A real OpenSSH server (Debian's, from scripts/install-sshd) in a lab
 * host's network namespace. It runs in a private mount namespace where a
 * tmpfs /run holds its privilege-separation directory, a bind-mounted
 * passwd file names its privilege-separation user, and tmpfs /opt and
 * /dev/shm are the node's own (what is installed there, and an agent's
 * images, stay there, as on a separate machine), so the machine's own files
 * never change. Root logs in with the
 * key in `clientKey`. The node's files are visible at `root`.
 */
export class Sshd {
  #child: ChildProcess | undefined;
  #holder: number | undefined;
  hostKey = '';

  private constructor(
    readonly host: LabHost,
    readonly dir: string,
    readonly port: number,
    readonly clientKey: string,
  ) {}

  static async start(host: LabHost, dir: string, port = 2222): Promise<Sshd> {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const client = ed25519KeyPair();
    writeFileSync(join(dir, 'client_key'), client.private, { mode: 0o600 });
    writeFileSync(join(dir, 'authorized_keys'), client.public + '\n', { mode: 0o600 });
    const passwd = readFileSync('/etc/passwd', 'utf8');
    writeFileSync(
      join(dir, 'passwd'),
      passwd +
        (passwd.endsWith('\n') ? '' : '\n') +
        'sshd:x:64999:65534:privilege separation:/run/sshd:/usr/sbin/nologin\n',
    );
    const sshd = new Sshd(host, dir, port, join(dir, 'client_key'));
    sshd.newHostKey();
    await sshd.#run();
    return sshd;
  }

  /** A new host key: what a reinstalled or impersonated machine shows. Takes effect at the next start. */
  newHostKey(): void {
    const key = ed25519KeyPair();
    writeFileSync(join(this.dir, 'host_key'), key.private, { mode: 0o600 });
    this.hostKey = key.public;
  }

  /** A known_hosts line for this server, as `ssh` would write it. */
  knownHostsLine(): string {
    return `[${this.host.address}]:${this.port} ${this.hostKey.split(' ').slice(0, 2).join(' ')}\n`;
  }

  /** The node's file system as its processes see it (its own /opt and /run). */
  get root(): string {
    return `/proc/${this.#holder}/root`;
  }

  get url(): string {
    return `ssh://root@${this.host.address}:${this.port}`;
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.#run();
  }

  async #run(): Promise<void> {
    const binary = execFileSync('bash', [join(projectRoot(), 'scripts', 'install-sshd')], { encoding: 'utf8' }).trim();
    const prefix = join(binary, '..', '..', '..');
    const config = join(this.dir, 'sshd_config');
    writeFileSync(
      config,
      [
        `Port ${this.port}`,
        `ListenAddress ${this.host.address}`,
        `HostKey ${join(this.dir, 'host_key')}`,
        `PidFile ${join(this.dir, 'sshd.pid')}`,
        `AuthorizedKeysFile ${join(this.dir, 'authorized_keys')}`,
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
    if (this.#holder === undefined) {
      // The node's namespaces live in a holder process, so that sshd can restart (a new host key) without the
      // node losing its files, and processes it started keep running.
      const script =
        'mount -t tmpfs -o mode=755 tmpfs /run && mkdir -m 755 /run/sshd && mount -t tmpfs -o mode=755 tmpfs /opt && ' +
        'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && ' +
        'mount --bind "$1" /etc/passwd && touch /run/node-ready && exec sleep infinity';
      const holder = spawn(
        'nsenter',
        [
          `--net=/run/netns/${this.host.netns}`,
          '--',
          'unshare',
          '--mount',
          '--propagation',
          'private',
          '--',
          'sh',
          '-c',
          script,
          'sh',
          join(this.dir, 'passwd'),
        ],
        { stdio: 'ignore', detached: true },
      );
      holder.unref();
      this.#holder = holder.pid;
      // The marker comes after the last mount: sshd must not start before its passwd entry is in place.
      await waitFor(() => existsSync(`/proc/${holder.pid}/root/run/node-ready`), {
        what: 'the node’s mount namespace',
        timeoutMs: 30_000,
      });
    }
    this.#child = spawn(
      'nsenter',
      [
        '--target',
        String(this.#holder),
        '--mount',
        '--net',
        '--',
        'env',
        `LD_LIBRARY_PATH=${libraries}`,
        binary,
        '-D',
        '-e',
        '-f',
        config,
      ],
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

  /** Stops sshd and ends the node's namespace holder (what runs in the lab host is the lab's to stop). */
  async dispose(): Promise<void> {
    await this.stop();
    if (this.#holder !== undefined) {
      try {
        if (readFileSync(`/proc/${this.#holder}/cmdline`, 'utf8').startsWith('sleep'))
          process.kill(this.#holder, 'SIGKILL');
      } catch {
        // gone
      }
    }
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
