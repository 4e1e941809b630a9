import { spawn } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  KnownHosts,
  listenUrlOf,
  parseTarget,
  readIdentity,
  sh,
  supervisorScript,
  systemdUnit,
} from '../../controller/install/index.js';
import { ed25519KeyPair } from '../helpers/sshd.js';
import { waitFor } from '../helpers/wait.js';

const dir = mkdtempSync(join(tmpdir(), 'ferry-ssh-unit-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** An ssh-ed25519 key blob as the wire carries it: string "ssh-ed25519", then 32 key bytes. */
function keyBlob(): Buffer {
  const type = Buffer.from('ssh-ed25519');
  const key = randomBytes(32);
  const length = (n: number): Buffer => Buffer.from([0, 0, 0, n]);
  return Buffer.concat([length(type.length), type, length(key.length), key]);
}

describe('known_hosts', () => {
  it('knows plain, bracketed-port and hashed entries, and tells a changed key from an unknown host', () => {
    const a = keyBlob();
    const b = keyBlob();
    const c = keyBlob();
    const salt = randomBytes(20);
    const hashed = `|1|${salt.toString('base64')}|${createHmac('sha1', salt).update('[10.0.0.3]:2222').digest('base64')}`;
    const file = join(dir, 'known_hosts');
    writeFileSync(
      file,
      [
        '# comment',
        `node1,10.0.0.1 ssh-ed25519 ${a.toString('base64')}`,
        `[10.0.0.2]:2222 ssh-ed25519 ${b.toString('base64')} root@x`,
        `${hashed} ssh-ed25519 ${c.toString('base64')}`,
        `@revoked * ssh-ed25519 ${keyBlob().toString('base64')}`,
        '',
      ].join('\n'),
    );
    const k = new KnownHosts(file);
    expect(k.verdict('10.0.0.1', 22, a)).toBe('known');
    expect(k.verdict('node1', 22, a)).toBe('known');
    expect(k.verdict('10.0.0.1', 22, b)).toBe('changed');
    expect(k.verdict('10.0.0.2', 2222, b)).toBe('known');
    expect(k.verdict('10.0.0.2', 22, b)).toBe('unknown');
    expect(k.verdict('10.0.0.3', 2222, c)).toBe('known');
    expect(k.verdict('10.0.0.3', 2222, a)).toBe('changed');
    expect(k.verdict('10.0.0.9', 22, a)).toBe('unknown');
  });

  it('offers the host key types on record first, so a server with several keys shows the known one', () => {
    const file = join(dir, 'types');
    writeFileSync(file, `[10.0.0.7]:2222 ssh-rsa ${keyBlob().toString('base64')}\n`);
    const k = new KnownHosts(file);
    expect(k.keyTypes('10.0.0.7', 2222)).toEqual(['ssh-rsa']);
    expect(k.hostKeyAlgorithms('10.0.0.7', 2222).slice(0, 4)).toEqual([
      'rsa-sha2-512',
      'rsa-sha2-256',
      'ssh-rsa',
      'ssh-ed25519',
    ]);
    expect(k.hostKeyAlgorithms('10.0.0.8', 22)[0]).toBe('ssh-ed25519');
  });

  it('adds a new host the way ssh writes it', () => {
    const file = join(dir, 'added');
    const key = keyBlob();
    new KnownHosts(file).add('10.0.0.5', 2200, key);
    expect(readFileSync(file, 'utf8')).toBe(`[10.0.0.5]:2200 ssh-ed25519 ${key.toString('base64')}\n`);
    expect(new KnownHosts(file).verdict('10.0.0.5', 2200, key)).toBe('known');
  });
});

describe('targets and the node side', () => {
  it('parses ssh:// targets, named or not, with root and port 22 by default', () => {
    expect(parseTarget('ssh://10.0.0.5')).toMatchObject({ name: '10.0.0.5', user: 'root', host: '10.0.0.5', port: 22 });
    expect(parseTarget('web2=ssh://admin@Web2.example:2222')).toMatchObject({
      name: 'web2',
      user: 'admin',
      host: 'web2.example',
      port: 2222,
    });
    expect(() => parseTarget('ssh://root:secret@h')).toThrow(/not ssh:\/\/USER@HOST/);
  });

  it('quotes words for the remote shell', () => {
    expect(sh("it's")).toBe(`'it'\\''s'`);
  });

  it('writes a systemd unit that restarts the agent, and a supervisor with a pid file where there is no systemd', () => {
    const command = ['/opt/ferry/app/node', '/opt/ferry/app/dist/controller/main.js', 'agent', '--name', 'n1'];
    const unit = systemdUnit(command);
    expect(unit).toMatch(
      /^ExecStart=\/opt\/ferry\/app\/node \/opt\/ferry\/app\/dist\/controller\/main.js agent --name n1$/m,
    );
    expect(unit).toMatch(/^Restart=always$/m);
    expect(unit).toMatch(/^WantedBy=multi-user.target$/m);
    const script = supervisorScript('/opt/ferry', command);
    expect(script).toMatch(/echo \$\$ >'\/opt\/ferry\/run\/agent.pid'/);
    expect(script).toMatch(/while :; do/);
  });

  it('reads the agent’s listen address back from its unit or supervisor', () => {
    const command = ['/opt/ferry/app/node', 'main.js', 'agent', '--listen', '10.0.0.5:7070'];
    expect(listenUrlOf(systemdUnit(command))).toBe('wss://10.0.0.5:7070');
    expect(listenUrlOf(supervisorScript('/opt/ferry', command))).toBe('wss://10.0.0.5:7070');
    expect(listenUrlOf(supervisorScript('/opt/ferry', [...command.slice(0, 4), '[fd00::5]:7070']))).toBe(
      'wss://[fd00::5]:7070',
    );
    expect(listenUrlOf('')).toBeUndefined();
  });

  it('keeps workloads when systemd stops the agent', () => {
    expect(systemdUnit(['/x'])).toMatch(/^KillMode=process$/m);
  });

  it('the supervisor writes its pid file, restarts what exits with its exit status logged, and stops on one signal', async () => {
    const prefix = join(dir, 'prefix');
    mkdirSync(join(prefix, 'run'), { recursive: true });
    mkdirSync(join(prefix, 'log'), { recursive: true });
    const script = join(dir, 'supervisor');
    writeFileSync(script, supervisorScript(prefix, ['/bin/sh', '-c', 'echo started; exit 3']));
    const child = spawn('sh', [script], { detached: true, stdio: 'ignore' });
    const exited = new Promise((resolve) => child.once('exit', resolve));
    const log = join(prefix, 'log', 'agent.log');
    try {
      await waitFor(() => existsSync(log) && readFileSync(log, 'utf8').split('started').length > 2, {
        what: 'the command to be started twice',
      });
      expect(Number(readFileSync(join(prefix, 'run', 'agent.pid'), 'utf8'))).toBe(child.pid);
      expect(readFileSync(log, 'utf8')).toMatch(/supervisor: the agent exited \(3\), restarting in 1 s/);
    } finally {
      process.kill(-(child.pid as number), 'SIGTERM');
    }
    await exited;
  });
});

describe('the SSH key', () => {
  it('takes a private key, and refuses a public or passphrase-protected one as bad input', () => {
    const plain = ed25519KeyPair();
    const locked = ed25519KeyPair({ passphrase: 'secret', cipher: 'aes256-cbc', rounds: 16 });
    writeFileSync(join(dir, 'id'), plain.private);
    writeFileSync(join(dir, 'id.pub'), plain.public);
    writeFileSync(join(dir, 'locked'), locked.private);
    expect(readIdentity(join(dir, 'id')).toString()).toBe(plain.private);
    expect(() => readIdentity(join(dir, 'id.pub'))).toThrow(/is a public key/);
    expect(() => readIdentity(join(dir, 'locked'))).toThrow(/passphrase/);
    expect(() => readIdentity(join(dir, 'missing'))).toThrow(/cannot read the key file/);
    try {
      readIdentity(join(dir, 'locked'));
    } catch (error) {
      expect(error).toMatchObject({ code: 'INVALID_INPUT', hint: expect.stringMatching(/ssh-add/) as unknown });
    }
  });
});
