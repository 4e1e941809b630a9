import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { collectDefaultMetrics, Counter, Histogram, Registry } from 'prom-client';
import { log } from '../src/log.js';

export type MigrationRole = 'source' | 'destination';
/** Committed: the process moved (the source copy ended, or the destination's copy runs). Aborted: it stayed on the source. */
export type MigrationOutcome = 'committed' | 'aborted';
/**
 * Steps an agent times itself. Source: pre_dump (one pre-copy round), dump
 * (the final dump, from the freeze), image_stream, held (frozen, waiting for
 * the commit). Destination: restore (up to the held copy), held (waiting for
 * resume), resume (until the copy runs).
 */
export type AgentPhase = 'pre_dump' | 'dump' | 'image_stream' | 'held' | 'restore' | 'resume';

/**
 * One agent's Prometheus metrics, in a registry of its own rather than
 * prom-client's global one, so that several agents (tests) can live in one
 * process without sharing counters.
 */
export class AgentMetrics {
  readonly registry = new Registry();
  readonly #migrations: Counter<'role' | 'outcome'>;
  readonly #phases: Histogram<'role' | 'phase'>;
  readonly #pages: Counter;
  readonly #bytes: Counter<'kind'>;
  readonly #downtime: Histogram;
  readonly #criuRestarts: Counter;

  constructor(agentName: string) {
    const registers = [this.registry];
    this.registry.setDefaultLabels({ agent: agentName });
    collectDefaultMetrics({ register: this.registry, prefix: 'ferry_agent_' });
    // Labels are created up front so that a scrape shows every series at 0 before the first migration.
    this.#migrations = new Counter({
      name: 'ferry_migrations_total',
      help: 'Migrations this agent took part in that reached an outcome, by its role and the outcome',
      labelNames: ['role', 'outcome'],
      registers,
    });
    for (const role of ['source', 'destination'] as const)
      for (const outcome of ['committed', 'aborted'] as const) this.#migrations.inc({ role, outcome }, 0);
    this.#phases = new Histogram({
      name: 'ferry_phase_duration_seconds',
      help: 'Duration of the steps this agent does in a migration, by role and phase',
      labelNames: ['role', 'phase'],
      buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
      registers,
    });
    this.#pages = new Counter({
      name: 'ferry_sent_pages_total',
      // From CRIU's statistics, which it writes only for dumps that complete: an aborted final dump's pages are not here.
      help: 'Memory pages this agent sent to destination page servers in pre-copy rounds and committed final dumps',
      registers,
    });
    this.#bytes = new Counter({
      name: 'ferry_sent_bytes_total',
      help: 'Bytes this agent sent to destinations: memory pages, and the other images streamed agent to agent',
      labelNames: ['kind'],
      registers,
    });
    for (const kind of ['pages', 'images']) this.#bytes.inc({ kind }, 0);
    this.#downtime = new Histogram({
      name: 'ferry_downtime_seconds',
      help: 'Downtime of migrations into this agent: from the freeze on the source to the copy running here',
      buckets: [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 3, 5, 10, 20, 30],
      registers,
    });
    this.#criuRestarts = new Counter({
      name: 'ferry_criu_service_restarts_total',
      help: 'Times this agent restarted its criu service after it died',
      registers,
    });
  }

  migration(role: MigrationRole, outcome: MigrationOutcome): void {
    this.#migrations.inc({ role, outcome });
  }

  phase(role: MigrationRole, phase: AgentPhase, ms: number): void {
    this.#phases.observe({ role, phase }, ms / 1000);
  }

  pagesSent(pages: number, pageSize: number): void {
    this.#pages.inc(pages);
    this.#bytes.inc({ kind: 'pages' }, pages * pageSize);
  }

  imagesSent(bytes: number): void {
    this.#bytes.inc({ kind: 'images' }, bytes);
  }

  downtime(ms: number): void {
    this.#downtime.observe(ms / 1000);
  }

  criuRestarted(): void {
    this.#criuRestarts.inc();
  }
}

/**
 * Serves /metrics over plain HTTP. Read-only and unauthenticated: it says
 * how many migrations ran and how long they took, nothing that controls the
 * agent, so it is kept apart from the agent's mutual-TLS port.
 */
export class MetricsServer {
  private constructor(readonly server: Server) {}

  static async listen(metrics: AgentMetrics, host: string, port: number): Promise<MetricsServer> {
    const server = createServer((request, response) => {
      const path = (request.url ?? '').split('?')[0];
      if (request.method !== 'GET' || path !== '/metrics') {
        response.writeHead(404, { 'content-type': 'text/plain' }).end('only GET /metrics here\n');
        return;
      }
      metrics.registry.metrics().then(
        (text) => response.writeHead(200, { 'content-type': metrics.registry.contentType }).end(text),
        (error: unknown) => {
          log.error('metrics', { error: (error as Error).message });
          response.writeHead(500, { 'content-type': 'text/plain' }).end('cannot collect metrics\n');
        },
      );
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    return new MetricsServer(server);
  }

  get port(): number {
    return (this.server.address() as AddressInfo).port;
  }

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
