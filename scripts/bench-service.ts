/**
 * The bench's service rows: what a client sees when a service moves. An
 * HTTP server (examples/web.py) with its own service address and N MiB of
 * memory runs on lab host a; autocannon on host c keeps 8 connections
 * busy with it; Ferry migrates it to b (and the next run back to a) while
 * the load runs. Each run gives Ferry's downtime next to the longest a
 * request waited (the longest gap a client saw: retransmission backoff can
 * make it longer than the downtime), and the load's request and error
 * counts.
 *
 * Environment: BENCH_SERVICE_SIZES (MiB, "8,256"), BENCH_SERVICE_RUNS (5).
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { runWorkload } from '../controller/agents/index.js';
import { enterHost, hostEndpoint, labDown, labUp, type LabHost } from '../controller/lab/index.js';
import { migrate } from '../controller/migration/index.js';
import { projectRoot } from '../src/paths.js';
import { median } from './bench-matrix.js';

const LAB = 'fbsvc';
/** How long the load runs; the migration starts LEAD_MS into it. */
const LOAD_SECONDS = 10;
const LEAD_MS = 2_000;

interface ServiceSample {
  memoryMb: number;
  downtimeMs: number;
  longestMs: number;
  requests: number;
  failed: number;
}

interface LoadResult {
  requests: number;
  errors: number;
  timeouts: number;
  non2xx: number;
  latencyMaxMs: number;
}

function load(c: LabHost, url: string): Promise<LoadResult> {
  const script = join(projectRoot(), 'test', 'helpers', 'clients', 'load.mjs');
  const child = spawn('nsenter', [...enterHost(c.init), process.execPath, script, url, String(LOAD_SECONDS), '8'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  return new Promise((resolve, reject) =>
    child.once('exit', (code) =>
      code === 0 ? resolve(JSON.parse(out) as LoadResult) : reject(new Error(`the load generator exited with ${code}`)),
    ),
  );
}

async function answers(c: LabHost, url: string): Promise<boolean> {
  const child = spawn(
    'nsenter',
    [...enterHost(c.init), 'python3', '-c', `import urllib.request; urllib.request.urlopen("${url}", timeout=1)`],
    { stdio: 'ignore' },
  );
  return new Promise((resolve) => child.once('exit', (code) => resolve(code === 0)));
}

/** Runs the service rows; resolves with their table, ready to print. */
export async function serviceBench(): Promise<string> {
  const sizes = (process.env.BENCH_SERVICE_SIZES ?? '8,256').split(',').map(Number);
  const runs = Number(process.env.BENCH_SERVICE_RUNS ?? 5);
  process.stderr.write(
    `bench: service rows: an HTTP server of ${sizes.join('/')} MiB under load from host c, ${runs} moves each\n`,
  );
  await labDown(LAB);
  const lab = await labUp({ name: LAB, hosts: 3 });
  const [a, b, c] = lab.hosts as [LabHost, LabHost, LabHost];
  const samples: ServiceSample[] = [];
  try {
    for (const [i, memoryMb] of sizes.entries()) {
      const ip = `${a.address.replace(/\.\d+$/, '')}.${90 + i}`;
      const url = `http://${ip}:8080/`;
      const name = `web${memoryMb}`;
      await runWorkload(
        hostEndpoint(a),
        name,
        ['python3', join(projectRoot(), 'examples', 'web.py'), '--memory-mb', String(memoryMb)],
        'bench',
        { address: `${ip}/24` },
      );
      for (let t = 0; !(await answers(c, url)); t++) {
        if (t > 100) throw new Error(`${name} does not answer at ${url}`);
        await sleep(100);
      }
      let [from, to] = [a, b];
      for (let run = 0; run < runs; run++) {
        const loading = load(c, url);
        await sleep(LEAD_MS);
        const report = await migrate({
          workload: name,
          from: hostEndpoint(from),
          to: hostEndpoint(to),
          softwareVersion: 'bench',
        });
        const result = await loading;
        const sample = {
          memoryMb,
          downtimeMs: report.downtimeMs,
          longestMs: result.latencyMaxMs,
          requests: result.requests,
          failed: result.errors + result.timeouts + result.non2xx,
        };
        samples.push(sample);
        process.stderr.write(
          `  service ${memoryMb} MiB run ${run + 1} ${from.host} → ${to.host}: downtime ${sample.downtimeMs} ms, ` +
            `longest request ${sample.longestMs} ms, ${sample.requests} requests, ${sample.failed} failed\n`,
        );
        [from, to] = [to, from];
      }
    }
  } finally {
    await labDown(LAB);
  }
  const lines = [
    `service under load (autocannon, 8 connections, ${LOAD_SECONDS} s; medians of ${runs} moves): downtime against the longest gap a client saw`,
    '  memory   downtime   longest request   gap / downtime   requests   failed (all runs)',
  ];
  for (const memoryMb of sizes) {
    const s = samples.filter((x) => x.memoryMb === memoryMb);
    const d = median(s.map((x) => x.downtimeMs));
    const g = median(s.map((x) => x.longestMs));
    lines.push(
      `  ${`${memoryMb} MiB`.padEnd(8)} ${`${Math.round(d)} ms`.padStart(8)}   ${`${Math.round(g)} ms`.padStart(15)}   ` +
        `${(g / d).toFixed(2).padStart(14)}   ${String(Math.round(median(s.map((x) => x.requests)))).padStart(8)}   ` +
        `${s.reduce((n, x) => n + x.failed, 0)}`,
    );
  }
  return lines.join('\n');
}

// `node dist/scripts/bench-service.js`: the service rows alone.
if (import.meta.url === `file://${process.argv[1]}`) process.stdout.write((await serviceBench()) + '\n');
