/**
 * What the roles of a migration need from the world, as small interfaces:
 * CRIU, the other agent, the processes of this node. The daemon plugs in
 * the real ones (realPeers, realProcesses, the CRIU service's client); the
 * protocol's unit tests plug in fakes and run without root, CRIU or a
 * network.
 */
import { accessSync, constants } from 'node:fs';
import { join } from 'node:path';
import {
  readDumpRunId,
  readDumpStats,
  startLazyPagesDaemon,
  type CriuClient,
  type DumpStats,
  type LazyPagesDaemon,
  type LazyPagesDaemonOptions,
} from '../src/criu/index.js';
import { log } from '../src/log.js';
import { startTime } from '../src/proc.js';
import type { Identity } from '../src/tls/index.js';
import { WireConnection } from '../src/wire/index.js';
import { sameProcess, tracerOf } from './journal.js';
import { processFacts } from './process.js';

/** The CRIU calls a migration makes, and the statistics CRIU leaves in an images directory. */
export interface CriuPort extends Pick<
  CriuClient,
  'version' | 'featureCheck' | 'cpuinfoDump' | 'cpuinfoCheck' | 'preDump' | 'dump' | 'restore' | 'pageServer'
> {
  dumpStats(dir: string): Promise<DumpStats>;
  /** The dump's run id (inventory.img), which names CRIU's nftables lock table. */
  dumpRunId(dir: string): Promise<string | undefined>;
  /** `criu lazy-pages`: the destination's half of post-copy, which CRIU's RPC does not offer. */
  startLazyPages(options: Omit<LazyPagesDaemonOptions, 'binary'>): LazyPagesDaemon;
  /** The service's master process (its workers are its children), when it runs. */
  readonly servicePid: number | undefined;
}

export function criuPort(client: CriuClient, service: { binary: { path: string }; pid: number | undefined }): CriuPort {
  return {
    version: (o) => client.version(o),
    featureCheck: (o) => client.featureCheck(o),
    cpuinfoDump: (o) => client.cpuinfoDump(o),
    cpuinfoCheck: (o) => client.cpuinfoCheck(o),
    preDump: (o) => client.preDump(o),
    dump: (o) => client.dump(o),
    restore: (o) => client.restore(o),
    pageServer: (o) => client.pageServer(o),
    dumpStats: (dir) => readDumpStats(dir),
    dumpRunId: (dir) => readDumpRunId(dir),
    startLazyPages: (o) => startLazyPagesDaemon({ ...o, binary: service.binary.path }),
    get servicePid() {
      return service.pid;
    },
  };
}

/** What one agent asks another: a destination its source, a post-copy source its destination. */
export type PeerOutcome = 'committed' | 'aborted' | 'pending' | 'unknown' | 'unreachable';

/** The part of a connection to another agent that a role uses. */
export type PeerLink = Pick<WireConnection, 'call' | 'close'>;

export interface Peers {
  /** A connection to the other agent of a migration, introduced as an agent. */
  connect(url: string, role: 'source' | 'destination', timeoutMs?: number): Promise<PeerLink>;
  /** The other agent's word on a migration's outcome; 'unreachable' when it cannot be asked now. */
  outcome(id: string, url: string, role: 'source' | 'destination'): Promise<PeerOutcome>;
}

export function realPeers(self: { name: string; softwareVersion: string; tls: Identity | undefined }): Peers {
  const connect = (url: string, role: 'source' | 'destination', timeoutMs?: number): Promise<PeerLink> =>
    WireConnection.connect(
      url,
      { role: 'agent', name: self.name, softwareVersion: self.softwareVersion },
      { peer: `${role} ${url}`, timeoutMs, tls: self.tls },
    );
  return {
    connect,
    async outcome(id, url, role) {
      try {
        const peer = await connect(url, role, 3_000);
        try {
          const { state } = await peer.call('outcomeQuery', { migrationId: id }, { timeoutMs: 30_000 });
          return state === 'committed' || state === 'aborted' || state === 'pending' ? state : 'unknown';
        } finally {
          peer.close();
        }
      } catch (error) {
        log.warn(`cannot ask the ${role} for the outcome`, { migration: id, url, error: (error as Error).message });
        return 'unreachable';
      }
    },
  };
}

/** The processes of this node, as a migration sees them. */
export interface Processes {
  exists(pid: number): boolean;
  /** Its start time (/proc/PID/stat field 22): with the PID, names one process for good. */
  startTime(pid: number): number | undefined;
  /** The same process as recorded: same PID, same start time. */
  same(pid: number | undefined, start: number | undefined): boolean;
  /** Whoever ptraces it (CRIU, while it holds it), or 0. */
  tracer(pid: number): number;
  /** Sends a signal; a process that is gone already is not an error. */
  signal(pid: number, signal: NodeJS.Signals): void;
  /** Established TCP connections the process's tree holds (CRIU locks the network for them). */
  establishedTcp(pid: number): number;
}

/**
 * How CRIU should keep packets off the connections it dumps: its default,
 * iptables, where an iptables binary exists (it runs one); nftables, which
 * CRIU drives through libnftables, where none does. Decided once per agent.
 */
export function networkLock(): 'iptables' | 'nftables' {
  const path = (process.env.PATH ?? '').split(':').filter(Boolean);
  for (const dir of [...path, '/usr/sbin', '/sbin']) {
    try {
      accessSync(join(dir, 'iptables'), constants.X_OK);
      return 'iptables';
    } catch {
      // not there
    }
  }
  return 'nftables';
}

export const realProcesses: Processes = {
  exists: (pid) => processFacts(pid).exists === true,
  startTime,
  same: sameProcess,
  tracer: tracerOf,
  signal(pid, signal) {
    try {
      process.kill(pid, signal);
    } catch {
      // gone already
    }
  },
  establishedTcp: (pid) => (processFacts(pid).sockets ?? []).filter((s) => s.kind === 'tcp-established').length,
};
