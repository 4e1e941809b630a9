import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { parseServiceAddress } from '../src/address.js';
import { CriuOperationError } from '../src/criu/index.js';
import { InvalidInputError } from '../src/errors.js';
import { log } from '../src/log.js';
import { meminfoBytes } from '../src/proc.js';
import type { BodyOf, ReplyOf } from '../src/wire/index.js';
import type { AgentContext } from './context.js';
import { unchanged } from './errors.js';
import { switchoverKey } from './destination/index.js';
import { probePostcopy, type PostcopySupport } from './postcopy-probe.js';
import { carriedRoots } from './carry.js';
import { fileNeeds, fileProblems } from './files.js';
import { unmovable } from './unmovable.js';
import { freeBytes, processFacts, processTree, takenPids } from './process.js';

/** How long a post-copy probe that worked is believed; one that failed is probed again next time. */
const POSTCOPY_PROBE_KEPT_MS = 10 * 60_000;

/**
 * What this node is and has: CRIU's version and features, the CPU, free
 * space, memory and load, the process a migration would take, whether the
 * node is draining. Read when asked: cheap enough that a cache would only
 * make it stale (the post-copy probe, a real small migration, aside).
 */
export class NodeFacts {
  #postcopyProbe: Promise<PostcopySupport> | undefined;

  constructor(
    private readonly context: AgentContext,
    private readonly self: { criuBinary: string; capacityBytes: number | undefined },
  ) {}

  get draining(): boolean {
    return existsSync(join(this.context.dataDir, 'draining'));
  }

  /** Kept on disk: a node being drained stays drained across agent restarts until undrained. */
  setDraining(draining: boolean): void {
    const file = join(this.context.dataDir, 'draining');
    if (draining) writeFileSync(file, `${new Date().toISOString()}\n`);
    else rmSync(file, { force: true });
    log.info(draining ? 'draining: this node takes no workloads' : 'undrained: this node takes workloads again');
  }

  /** Memory, load and workloads, read now. */
  nodeFacts(): ReplyOf<'nodeQuery'> {
    const meminfo = readFileSync('/proc/meminfo', 'utf8');
    const kib = (key: string): number => meminfoBytes(key, meminfo);
    const workloads = this.context.workloads.list().map((w) => ({ ...w, agent: this.context.node }));
    const capacity = this.self.capacityBytes;
    const used = workloads.reduce((sum, w) => sum + Number(w.residentBytes ?? 0), 0);
    return {
      name: this.context.node,
      memTotalBytes: capacity ?? kib('MemTotal'),
      memAvailableBytes: capacity === undefined ? kib('MemAvailable') : Math.max(0, capacity - used),
      load1: Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0]) || 0,
      cpus: availableParallelism(),
      draining: this.draining,
      workloads,
      sampledAtMs: Date.now(),
    };
  }

  /** Preflight's facts: CRIU, the CPU, space, the process (by PID or workload name) and what is taken here. */
  async facts(q: BodyOf<'factsQuery'>): Promise<ReplyOf<'factsQuery'>> {
    const { criu, imagesRoot, rates, workloads } = this.context;
    const [version, features] = await Promise.all([criu.version(), criu.featureCheck()]);
    const scratch = await mkdtemp(join(imagesRoot, 'cpuinfo-'));
    let cpuinfo: Uint8Array;
    try {
      await criu.cpuinfoDump({ imagesDir: scratch });
      cpuinfo = readFileSync(join(scratch, 'cpuinfo.img'));
    } finally {
      await rm(scratch, { recursive: true, force: true });
    }
    let pid = q.pid ?? 0;
    let record = pid > 0 ? workloads.findByPid(pid) : undefined;
    if (q.workload) {
      record = workloads.find(q.workload);
      if (record === undefined) {
        throw new InvalidInputError(`no workload named ${q.workload} on ${this.context.node}`, {
          hint: `\`ferry ps --on ${this.context.node}\` lists them`,
        });
      }
      pid = record.pid;
    }
    const workload = {
      workload: record?.name ?? '',
      workloadArgv: record?.argv ?? [],
      workloadLogFile: record?.logFile ?? '',
      workloadStartedAtMs: record?.startedAtMs ?? 0,
      workloadLabels: record?.labels ?? {},
      workloadPinned: record?.pinned === true,
      workloadAddress: record?.address ?? '',
      workloadAddressHook: record?.addressHook ?? '',
      workloadCarry: record?.carry ?? [],
      workloadShared: record?.shared ?? [],
    };
    return {
      agentName: this.context.node,
      criuVersion: version.text,
      memTrack: features.memTrack,
      lazyPages: features.lazyPages,
      cpuinfo,
      imagesFreeBytes: freeBytes(imagesRoot),
      address: this.context.advertise,
      process:
        pid > 0
          ? {
              ...processFacts(pid, serviceIp(record?.address)),
              ...workload,
              unmovable: unmovable(processTree(pid)),
              files: fileNeeds(processTree(pid), {
                carried: record === undefined ? [] : carriedRoots(this.context.dataDir, record),
                shared: record?.shared ?? [],
              }),
            }
          : null,
      takenPids: pid > 0 ? takenPids([pid]) : [],
      kernel: readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim(),
      restoreBytesPerMs: rates.get('restore'),
      pageWriteBytesPerMs: rates.get('pageWrite'),
      switchoverMs: q.peerUrl ? rates.cost(switchoverKey(q.peerUrl), Number(q.residentBytes ?? 0)) : 0,
      postcopy: q.probePostcopy === true ? await this.#postcopySupport() : null,
      addressProblem: q.address ? await this.context.addresses.problem(parseServiceAddress(q.address)) : '',
      addressHookProblem: q.addressHook ? this.context.addresses.hookProblem(q.addressHook) : '',
      fileProblems: fileProblems(q.files ?? []),
    };
  }

  /** Whether the source's CPU (its cpuinfo.img) can run here: CRIU's CPUINFO_CHECK. */
  async cpuCheck(c: BodyOf<'cpuCheck'>): Promise<ReplyOf<'cpuCheck'>> {
    const scratch = await mkdtemp(join(this.context.imagesRoot, 'cpucheck-'));
    try {
      writeFileSync(join(scratch, 'cpuinfo.img'), c.cpuinfo ?? new Uint8Array());
      await this.context.criu.cpuinfoCheck({ imagesDir: scratch });
      return {};
    } catch (error) {
      if (error instanceof CriuOperationError) {
        throw unchanged(
          new InvalidInputError(`the source's CPU cannot run here (${this.context.node}): ${error.message}`, {
            hint: 'pick a destination with the same CPU features',
          }),
        );
      }
      throw error;
    } finally {
      await rm(scratch, { recursive: true, force: true });
    }
  }

  /** The post-copy probe's answer: a success is reused for a while, a failure is probed again next time. */
  #postcopySupport(): Promise<PostcopySupport> {
    const last = this.#postcopyProbe;
    if (last !== undefined) return last;
    const probe = probePostcopy({
      criu: this.context.criu,
      criuBinary: this.self.criuBinary,
      scratchRoot: this.context.imagesRoot,
      address: this.context.advertise,
      tls: this.context.pageTls,
      nodeName: this.context.node,
    }).then((support) => {
      log.info(support.works ? 'post-copy probe: works' : 'post-copy probe: does not work', {
        reason: support.reason,
        ms: support.probeMs,
      });
      if (!support.works) this.#postcopyProbe = undefined;
      else setTimeout(() => (this.#postcopyProbe = undefined), POSTCOPY_PROBE_KEPT_MS).unref();
      return support;
    });
    this.#postcopyProbe = probe;
    probe.catch(() => (this.#postcopyProbe = undefined));
    return probe;
  }
}

/** The IP of a workload's service address ("10.0.0.50/24"), or undefined. */
function serviceIp(cidr: string | undefined): string | undefined {
  return cidr ? cidr.split('/')[0] : undefined;
}
