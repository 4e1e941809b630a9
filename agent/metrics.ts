import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Counter, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/**
 * The agent's Prometheus metrics, in a registry of its own (several agents
 * can share a process in tests). Served over plain HTTP by `--metrics`: it
 * exposes counts and durations only, nothing that controls the agent.
 */
export class AgentMetrics {
  readonly registry = new Registry();
  readonly migrations = new Counter({
    name: 'ferry_migrations_total',
    help: 'Migrations that ended here, by role (source, destination) and outcome (committed, aborted, resumed, discarded)',
    labelNames: ['role', 'outcome'] as const,
    registers: [this.registry],
  });
  readonly phaseSeconds = new Histogram({
    name: 'ferry_phase_duration_seconds',
    help: 'Duration of migration steps on this agent: predump (a pre-copy round), dump (final dump until held), stream (images to the destination), restore (until held)',
    labelNames: ['phase'] as const,
    buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
    registers: [this.registry],
  });
  readonly pagesSent = new Counter({
    name: 'ferry_pages_sent_total',
    help: 'Memory pages this agent sent to page servers (CRIU pages written, all rounds)',
    registers: [this.registry],
  });
  readonly bytesSent = new Counter({
    name: 'ferry_bytes_sent_total',
    help: 'Bytes this agent sent as a source: memory pages and streamed images',
    registers: [this.registry],
  });
  readonly downtimeSeconds = new Histogram({
    name: 'ferry_downtime_seconds',
    help: 'Downtime of migrations resumed here: from the freeze on the source until the process runs here',
    buckets: [0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30],
    registers: [this.registry],
  });
  readonly criuRestarts = new Counter({
    name: 'ferry_criu_service_restarts_total',
    help: 'Times the supervised criu service was restarted',
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'ferry_agent_' });
  }

  /** Serves /metrics on HOST:PORT; resolves once listening. */
  async serve(host: string, port: number): Promise<MetricsServer> {
    const server = createServer((req, res) => {
      if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('GET /metrics\n');
        return;
      }
      this.registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': this.registry.contentType }).end(text),
        (error: unknown) => res.writeHead(500).end(String(error)),
      );
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => resolve());
    });
    return new MetricsServer(server);
  }
}

export class MetricsServer {
  constructor(readonly server: Server) {}
  get port(): number {
    return (this.server.address() as AddressInfo).port;
  }
  close(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
