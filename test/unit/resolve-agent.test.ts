import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { resolveAgent } from '../../controller/cli/index.js';
import type { Lab, LabHost } from '../../controller/lab/index.js';
import type { FerryError } from '../../src/errors.js';
import { createAuthority, issueIdentity } from '../../src/tls/index.js';

/**
 * AGENT arguments naming a lab host: by name (a, b) or by the URL `ferry
 * lab up` printed, both reach it with the lab's own controller identity,
 * with no `ferry init` needed. The lab's state is given, not read from
 * /run: no root, no lab up.
 */
const scratch = mkdtempSync(join(tmpdir(), 'ferry-resolve-'));
const previousConfig = process.env.FERRY_CONFIG;
let lab: Lab;
let insecureLab: Lab;

function host(name: string, url: string, controllerTls: string | undefined): LabHost {
  return {
    host: name,
    netns: `t-${name}`,
    address: new URL(url).hostname,
    url,
    init: 1,
    pid: 1,
    dataDir: scratch,
    imagesDir: scratch,
    logFile: join(scratch, 'agent.log'),
    controllerTls,
  };
}

beforeAll(async () => {
  // No cluster configuration: anything that needs `ferry init`'s identity is refused.
  process.env.FERRY_CONFIG = join(scratch, 'no-config');
  const authority = await createAuthority(join(scratch, 'ca'), 'lab t');
  const controllerTls = join(scratch, 'controller');
  await issueIdentity(authority, { role: 'controller', name: 'lab-t' }, controllerTls);
  const base = { dir: scratch, bridge: 't-br', subnet: '10.199.30.0/24' };
  lab = {
    name: 't',
    ...base,
    controllerTls,
    hosts: [host('a', 'wss://10.199.30.1:7070', controllerTls), host('b', 'wss://10.199.30.2:7070', controllerTls)],
  };
  insecureLab = { name: 't', ...base, hosts: [host('a', 'ws://10.199.30.1:7070', undefined)] };
});

afterAll(() => {
  if (previousConfig === undefined) delete process.env.FERRY_CONFIG;
  else process.env.FERRY_CONFIG = previousConfig;
  rmSync(scratch, { recursive: true, force: true });
});

/** What `ferry` would print for the refusal: its message and its hint. */
function refusal(resolve: () => unknown): string {
  try {
    resolve();
  } catch (error) {
    return `${(error as FerryError).message}; hint: ${(error as FerryError).hint}`;
  }
  throw new Error('resolved, not refused');
}

const inLab = (state: Lab | undefined) => ({ lab: 't', readLab: (name: string) => (name === 't' ? state : undefined) });

describe('an AGENT argument naming a lab host', () => {
  it('by the URL `ferry lab up` printed resolves like its name: the lab’s identity, no `ferry init`', () => {
    const byUrl = resolveAgent('wss://10.199.30.2:7070', inLab(lab));
    expect(byUrl.url).toBe('wss://10.199.30.2:7070');
    expect(byUrl.tls?.name).toBe('lab-t');
    expect(byUrl).toEqual(resolveAgent('b', inLab(lab)));
    // Written with a trailing slash, as a browser would: the same host.
    expect(resolveAgent('wss://10.199.30.1:7070/', inLab(lab))).toEqual(resolveAgent('a', inLab(lab)));
  });

  it('of an insecure lab resolves by its ws:// URL without --insecure, as by its name', () => {
    const byUrl = resolveAgent('ws://10.199.30.1:7070', inLab(insecureLab));
    expect(byUrl).toEqual({ url: 'ws://10.199.30.1:7070', tls: undefined });
    expect(byUrl).toEqual(resolveAgent('a', inLab(insecureLab)));
  });

  it('other URLs are as before: wss:// needs `ferry init`, ws:// needs --insecure', () => {
    const elsewhere = ['wss://10.199.30.9:7070', 'wss://10.199.30.1:7071'];
    for (const url of elsewhere) {
      expect(refusal(() => resolveAgent(url, inLab(lab)))).toMatch(/hint: run `ferry init`/);
    }
    // A TLS lab host's address over plaintext is not that host.
    expect(refusal(() => resolveAgent('ws://10.199.30.1:7070', inLab(lab)))).toMatch(/is a plaintext agent URL/);
    // Without the lab up, its URLs are plain URLs.
    expect(refusal(() => resolveAgent('wss://10.199.30.1:7070', inLab(undefined)))).toMatch(/hint: run `ferry init`/);
  });
});
