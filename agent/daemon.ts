import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { CriuService, resolveCriuBinary, type PageTls } from '../src/criu/index.js';
import { NO_TEST_HOOKS, type TestHooks } from '../src/hooks.js';
import { log } from '../src/log.js';
import type { Identity } from '../src/tls/index.js';
import {
  WireServer,
  type MigrationRecord,
  type ReplyOf,
  type RequestHandlers,
  type WireConnection,
} from '../src/wire/index.js';
import type { AgentContext } from './context.js';
import { DestinationRole, isDestination } from './destination/index.js';

import { AgentStoppingError } from './errors.js';
import { Journal, type JournalEntry } from './journal.js';
import { AgentMetrics, type MetricsServer } from './metrics.js';
import { Migrations, type LocalMigration } from './migrations.js';
import { NodeFacts } from './node.js';
import { realAddresses } from './address.js';
import { realPageLinks } from './page-stream.js';
import { criuPort, networkLock, realPeers, realProcesses } from './ports.js';
import { LearnedRates } from './rates.js';
import { Recovery } from './recovery.js';
import { route } from './routing.js';
import { runWorkload } from './run.js';
import { isSource, SourceRole } from './source/index.js';

import { Workloads } from './workloads.js';

export interface AgentOptions {
  name: string;
  host: string;
  port: number;
  /** Workload records and logs. */
  dataDir: string;
  /** Images, one directory per migration; tmpfs by default so nothing touches a disk. */
  imagesRoot?: string | undefined;
  /** The address page servers listen on and peers reach; default: host. Must be a numeric IP. */
  advertise?: string | undefined;
  criu?: string | undefined;
  softwareVersion: string;
  /**
   * Mutual TLS with this identity for every connection, and CRIU's TLS for
   * pages; undefined only under an explicit --insecure.
   */
  tls?: Identity | undefined;
  /**
   * The memory workloads may use here, when it is not the machine's: agents
   * sharing one kernel (lab hosts, containers) each report their own share.
   */
  capacityBytes?: number | undefined;
  /** Serve Prometheus metrics on this address (plain HTTP, read-only). */
  metrics?: { host: string; port: number } | undefined;
  /** Where tests step in (test/harness); production leaves it unset. */
  hooks?: TestHooks | undefined;
}

/**
 * The daemon on every node: it supervises the node's `criu service`,
 * listens for Ferry's protocol, authorizes each request by the peer's
 * certificate and hands it to the role that answers it: the node's facts,
 * the source or the destination of a migration, recovery.
 */
export class Agent {
  readonly journal: Journal;
  readonly rates: LearnedRates;
  readonly metrics = new AgentMetrics();
  readonly workloads: Workloads;
  readonly #migrations: Migrations<LocalMigration>;
  readonly #node: NodeFacts;
  readonly #source: SourceRole;
  readonly #destination: DestinationRole;
  readonly #recovery: Recovery;
  readonly #handlers: RequestHandlers<WireConnection>;
  #server: WireServer | undefined;
  #metricsServer: MetricsServer | undefined;

  private constructor(
    readonly options: AgentOptions,
    readonly service: CriuService,
    readonly imagesRoot: string,
  ) {
    this.journal = new Journal(options.dataDir, (entry) =>
      this.metrics.migrations.inc({ role: entry.role, outcome: entry.state }),
    );
    this.rates = new LearnedRates(options.dataDir);
    this.workloads = new Workloads(options.dataDir, options.name);
    this.#migrations = new Migrations(options.dataDir);
    const tls = options.tls;
    const pageTls: PageTls | undefined =
      tls === undefined ? undefined : { cacert: tls.files.ca, cert: tls.files.cert, key: tls.files.key };
    const context: AgentContext = {
      node: options.name,
      advertise: options.advertise ?? options.host,
      imagesRoot,
      dataDir: options.dataDir,
      pageTls,
      criu: criuPort(service.client(), service),
      peers: realPeers({ name: options.name, softwareVersion: options.softwareVersion, tls }),
      processes: realProcesses,
      addresses: realAddresses(service.binary.path),
      pages: realPageLinks,
      journal: this.journal,
      workloads: this.workloads,
      migrations: this.#migrations,
      rates: this.rates,
      metrics: this.metrics,
      hooks: options.hooks ?? NO_TEST_HOOKS,
      networkLock: networkLock(),
    };
    this.#node = new NodeFacts(context, { criuBinary: service.binary.path, capacityBytes: options.capacityBytes });
    this.#source = new SourceRole(context);
    this.#destination = new DestinationRole(context, () => this.#node.draining);
    this.#recovery = new Recovery(context);
    this.#handlers = this.#requestHandlers(context);
  }

  static async start(options: AgentOptions): Promise<Agent> {
    const imagesRoot =
      options.imagesRoot ?? join(existsSync('/dev/shm') ? '/dev/shm' : options.dataDir, 'ferry', options.name);
    mkdirSync(imagesRoot, { recursive: true, mode: 0o700 });
    mkdirSync(options.dataDir, { recursive: true, mode: 0o700 });
    let agent: Agent | undefined;
    const service = await CriuService.start({
      binary: resolveCriuBinary(options.criu),
      onStateChange: (e) => {
        log.info('criu service', { state: e.state, pid: e.pid, reason: e.reason });
        if (e.state === 'restarting') agent?.metrics.criuRestarts.inc();
      },
    });
    try {
      agent = new Agent(options, service, imagesRoot);
      const ready = agent;
      ready.#server = await WireServer.listen({
        host: options.host,
        port: options.port,
        name: options.name,
        softwareVersion: options.softwareVersion,
        tls: options.tls,
        onConnection: (_, peer) =>
          log.info('connected', {
            role: peer.role,
            name: peer.name,
            address: peer.address,
            ...(peer.certificate === undefined
              ? { tls: false }
              : { certificate: peer.certificate.name, fingerprint: peer.certificate.fingerprint }),
          }),
        onRefused: (refusal) => log.warn('refused a connection', refusal),
        onRequest: (envelope, connection) => route(ready.#handlers, envelope, connection),
      });
      if (options.metrics !== undefined) {
        ready.#metricsServer = await ready.metrics.serve(options.metrics.host, options.metrics.port);
        log.info('metrics', { url: `http://${urlHost(options.metrics.host)}:${ready.#metricsServer.port}/metrics` });
      }
      log.info('listening', { url: ready.url, criu: service.version?.text, images: imagesRoot });
      // Settle what a previous run of this agent left half-done.
      void ready.recover();
      return ready;
    } catch (error) {
      if (agent !== undefined) await agent.#server?.close();
      await service.stop();
      throw error;
    }
  }

  get url(): string {
    const port = this.#server?.port ?? this.options.port;
    return `${this.options.tls === undefined ? 'ws' : 'wss'}://${urlHost(this.options.host)}:${port}`;
  }

  /**
   * Stops as a crash would, only cleaner: every migration's signal fires,
   * which ends its CRIU calls (CRIU thaws a held source and kills a held
   * copy) without deciding anything in the journal; the next start's
   * recovery settles them with the source's word.
   */
  async stop(): Promise<void> {
    this.#recovery.stop();
    const stopping = new AgentStoppingError('the agent is stopping');
    for (const m of this.#migrations.all()) m.abort.abort(stopping);
    await this.#server?.close();
    await this.#metricsServer?.close();
    await this.service.stop();
  }

  /** Settles every migration this agent's journal has left half-done. */
  recover(): Promise<JournalEntry[]> {
    return this.#recovery.recover();
  }

  #requestHandlers(context: AgentContext): RequestHandlers<WireConnection> {
    const node = this.#node;
    const source = this.#source;
    const destination = this.#destination;
    return {
      factsQuery: (q) => node.facts(q),
      cpuCheck: (c) => node.cpuCheck(c),
      listWorkloads: () => ({ workloads: this.workloads.list() }),
      nodeQuery: () => node.nodeFacts(),
      setDraining: (d) => {
        node.setDraining(d.draining === true);
        return node.nodeFacts();
      },
      runWorkload: (r) => runWorkload(context, r),
      prepareDestination: (p) => destination.prepare(p),
      pageServerStart: (p, connection) => destination.pageServer(p, connection),
      preDumpRound: (p, connection) => source.preDump(p, connection),
      carryAhead: (p, connection) => source.carryAhead(p, connection),
      finalDump: (p, connection) => source.finalDump(p, connection),
      imageChunk: (c, connection) => destination.imageChunk(c, connection),
      imagesDone: (d, connection) => destination.imagesDone(d, connection),
      restore: (r, connection) => destination.restore(r, connection),
      commit: (c) => source.commit(c),
      resume: (r) => destination.resume(r),
      abort: (a) => this.#abort(a.migrationId ?? '', a.reason ?? ''),
      outcomeQuery: (q) => this.#outcome(q.migrationId ?? ''),
      recover: async () => ({ migrations: (await this.recover()).map(record) }),
      statusQuery: () => ({ migrations: this.journal.list().map(record) }),
    };
  }

  /** Rolls back whatever this agent holds for the migration. */
  async #abort(id: string, reason: string): Promise<Record<string, never>> {
    const m = this.#migrations.get(id);
    if (m === undefined) return {};
    log.warn('aborting', { migration: id, role: m.role, reason });
    if (isSource(m)) await this.#source.abort(m, reason);
    else if (isDestination(m)) await this.#destination.abort(m, reason);
    return {};
  }

  /**
   * The answer to "did it commit?": the source's, from its migration in
   * progress, its journal, or the process itself after a restart; a
   * post-copy destination's, with how its fetch went.
   */
  async #outcome(id: string): Promise<ReplyOf<'outcomeQuery'>> {
    const m = this.#migrations.get(id);
    if (isDestination(m)) {
      const own = this.#destination.outcome(m);
      if (own !== undefined) return own;
    }
    if (isSource(m)) return { state: await this.#source.outcome(m) };
    const entry = this.journal.read(id);
    if (m === undefined && entry?.role === 'destination') {
      if (entry.state === 'resumed') return { state: 'committed' };
      if (entry.state === 'discarded') return { state: 'aborted', detail: entry.action ?? '' };
      // Not settled here yet (a restart in between): a copy may run, so never "no copy".
      return { state: 'pending' };
    }
    if (entry === undefined || entry.role !== 'source') return { state: 'unknown' };
    if (entry.state === 'committed' || entry.state === 'aborted') return { state: entry.state };
    return { state: (await this.#recovery.source(entry)).state };
  }
}

function urlHost(host: string): string {
  return host.includes(':') ? `[${host}]` : host;
}

function record(e: JournalEntry): MigrationRecord {
  return {
    migrationId: e.id,
    role: e.role,
    state: e.state,
    pid: e.pid ?? 0,
    peerUrl: e.peerUrl,
    updatedAtMs: e.updatedAtMs,
    action: e.action ?? '',
  };
}
