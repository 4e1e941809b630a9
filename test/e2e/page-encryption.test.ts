import { existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostEndpoint, labDown, labUp, type Lab, type LabHost } from '../helpers/lab.js';
import { migrate } from '../../controller/migration/index.js';
import { runWorkload } from '../../controller/agents/index.js';
import { projectRoot } from '../../src/paths.js';
import { hostPauseEnv, killOn, onHost, pauseDirOn } from '../helpers/hosts.js';
import { requireRoot } from '../helpers/root.js';
import { waitFor } from '../helpers/wait.js';

const LAB = `pg${process.pid % 100_000}`;
let lab: Lab;
let a: LabHost;
let b: LabHost;

beforeAll(async () => {
  requireRoot();
  // b's agent pauses in its own pause directory, inside host b.
  lab = await labUp({ name: LAB, agentEnv: { b: hostPauseEnv } });
  [a, b] = lab.hosts as [LabHost, LabHost];
}, 120_000);

afterAll(async () => {
  await labDown(LAB);
});

/**
 * Migrates a counter and resolves with what the destination's agent logged
 * about its page connection meanwhile (the agents carry the pages:
 * agent/page-stream.ts), and what its page server logged.
 */
async function pageLogs(name: string, plainPages: boolean): Promise<{ agent: string; pageServer: string }> {
  const counter = join(projectRoot(), 'dist', 'examples', 'counter');
  // Its state file is in its own directory (its working directory), which moves with it.
  await runWorkload(hostEndpoint(a), name, [counter, 'state', '20', '16'], 'test');
  rmSync(pauseDirOn(b), { recursive: true, force: true });
  const pause = pauseDirOn(b);
  writeFileSync(join(pause, 'armed'), 'destination.after-restore-held');
  const logStart = readFileSync(b.logFile, 'utf8').length;
  const migration = migrate({
    workload: name,
    from: hostEndpoint(a),
    to: hostEndpoint(b),
    plainPages,
    softwareVersion: 'test',
  });
  const marker = join(pause, 'destination.after-restore-held');
  await waitFor(() => existsSync(marker), { what: 'the destination to hold its copy' });
  // The page server's log is in the destination's images directory, on host b.
  const images = onHost(b, b.imagesDir);
  const logs = readdirSync(images)
    .map((id) => join(images, id, 'final', 'page-server.log'))
    .filter((f) => existsSync(f));
  const pageServer = logs.map((f) => readFileSync(f, 'utf8')).join('\n');
  rmSync(marker);
  const report = await migration;
  await killOn(b, report.to.pid);
  expect(logs.length).toBe(1);
  await waitFor(() => /page (stream ended|connection)/.test(readFileSync(b.logFile, 'utf8').slice(logStart)), {
    what: 'the destination agent to log its page connection',
  });
  return { agent: readFileSync(b.logFile, 'utf8').slice(logStart), pageServer };
}

describe('page encryption', () => {
  it('is on by default: the agents carry the pages over mutual TLS 1.3, and the page server reads them from its agent', async () => {
    const { agent, pageServer } = await pageLogs('enc', false);
    expect(agent).toMatch(/page stream ended peer=\S+ protocol=TLSv1\.3 cipher=TLS_AES_128_GCM_SHA256/);
    expect(pageServer).toContain('Reusing ps socket');
  });

  it('--plain-pages sends pages without TLS, and the migration still completes', async () => {
    const { agent, pageServer } = await pageLogs('plain', true);
    expect(agent).toMatch(/page connection peer=\S+ tls=false/);
    expect(agent).not.toMatch(/page stream ended .*TLS/);
    expect(pageServer).toContain('Reusing ps socket');
  });
});
