import { execFile } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { projectRoot } from '../../src/paths.js';

const execFileAsync = promisify(execFile);
const script = join(projectRoot(), 'scripts', 'kernel-lab');
const caches: string[] = [];
afterAll(() => caches.forEach((c) => rmSync(c, { recursive: true, force: true })));

/** A kernel-lab cache that claims to be complete but lacks `missing`. */
function brokenCache(missing: 'qemu' | 'kernel'): string {
  const cache = mkdtempSync(join(tmpdir(), 'ferry-kl-guard-'));
  caches.push(cache);
  const prefix = join(cache, 'prefix');
  mkdirSync(join(prefix, 'usr', 'bin'), { recursive: true });
  mkdirSync(join(prefix, 'bin'), { recursive: true });
  mkdirSync(join(prefix, 'boot'), { recursive: true });
  writeFileSync(join(prefix, '.complete'), '');
  for (const tool of [missing === 'qemu' ? undefined : 'usr/bin/qemu-system-x86_64', 'bin/busybox']) {
    if (tool === undefined) continue;
    writeFileSync(join(prefix, tool), '#!/bin/sh\nexit 0\n');
    chmodSync(join(prefix, tool), 0o755);
  }
  return cache;
}

async function run(cache: string, ...args: string[]): Promise<{ code: number; stderr: string }> {
  try {
    await execFileAsync(script, args, { env: { ...process.env, FERRY_KERNEL_LAB_CACHE: cache } });
    return { code: 0, stderr: '' };
  } catch (error) {
    const e = error as { code?: number; stderr?: string };
    return { code: e.code ?? -1, stderr: e.stderr ?? '' };
  }
}

describe('the kernel lab when it cannot start', () => {
  it('says that qemu is missing, and fails', async () => {
    const { code, stderr } = await run(brokenCache('qemu'), '--', 'true');
    expect(code).toBe(1);
    expect(stderr).toMatch(/kernel-lab: qemu-system-x86_64 missing from .* \(delete .* and retry\)/);
  });

  it('says that the kernel is missing, and fails', async () => {
    const { code, stderr } = await run(brokenCache('kernel'), '--', 'true');
    expect(code).toBe(1);
    expect(stderr).toMatch(/kernel-lab: no kernel in .*\/boot/);
  });

  it('refuses to run without a command', async () => {
    const { code, stderr } = await run(brokenCache('kernel'));
    expect(code).toBe(2);
    expect(stderr).toMatch(/give a command after --/);
  });
});
