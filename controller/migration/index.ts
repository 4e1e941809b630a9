import { randomBytes } from 'node:crypto';
import pRetry from 'p-retry';
import { FerryError, InvalidInputError, type FerryErrorOptions } from '../../src/errors.js';
import { pauseAt } from '../../src/testpoints.js';
import { PAGE_SIZE, formatBytes } from '../../src/units.js';
import {
  PeerGoneError,
  type WireConnection,
  type DumpStatsMessage,
  type Facts,
  type ProgressMessage,
} from '../../src/wire/index.js';
import { AgentUnreachableError, connectAgent, localized, type AgentEndpoint } from '../agents/index.js';
import {
  DEFAULT_COST,
  DEFAULT_LIMITS,
  decide,
  estimate,
  explain,
  floorMs,
  type PolicyLimits,
  type RoundSample,
  type StopRule,
  type SwitchoverCost,
} from './convergence.js';

export {
  DEFAULT_COST,
  DEFAULT_LIMITS,
  decide,
  estimate,
  explain,
  floorMs,
  type Decision,
  type Estimate,
  type PolicyContext,
  type PolicyLimits,
  type RoundSample,
  type StopRule,
  type SwitchoverCost,
} from './convergence.js';

export type Phase = 'preflight' | 'precopy' | 'switchover' | 'commit' | 'postcopy' | 'rollback' | 'done';
export type Strategy = 'precopy' | 'stop-and-copy' | 'postcopy';

/** What post-copy risks, said wherever post-copy is offered or reported. */
export const POSTCOPY_RISK =
  'while the destination fetches the memory, the process lives on both machines: losing the source ' +
  'or the link then kills the copy on the destination, and the source continues from the switchover, ' +
  'or is lost with the source';

export interface MigrationEvent {
  /** Milliseconds since the migration started. */
  atMs: number;
  phase: Phase;
  /** Who says it: "controller" or an agent's name. */
  from: string;
  message: string;
  round?: string | undefined;
  pages?: number | undefined;
  bytes?: number | undefined;
}

export interface MigrateOptions {
  /** The process: a PID on the source, or a workload name. */
  pid?: number | undefined;
  workload?: string | undefined;
  from: AgentEndpoint;
  to: AgentEndpoint;
  strategy?: 'auto' | Strategy | undefined;
  /** The convergence policy's limits; unset ones take DEFAULT_LIMITS (300 ms budget, 8 rounds...). */
  limits?: Partial<PolicyLimits> | undefined;
  /** Abort, leaving the source running, rather than go over the downtime budget. */
  strictDowntime?: boolean | undefined;
  /** Send pages unencrypted (the control connections stay mutual TLS). */
  plainPages?: boolean | undefined;
  cost?: SwitchoverCost | undefined;
  /** How long either agent holds its side of the switchover waiting for the next step. */
  holdMs?: number | undefined;
  softwareVersion: string;
  onEvent?: ((event: MigrationEvent) => void) | undefined;
  signal?: AbortSignal | undefined;
}

export interface RoundReport {
  round: string;
  pagesWritten: number;
  pagesSkipped: number;
  bytes: number;
  durationMs: number;
}

export interface MigrationReport {
  migrationId: string;
  from: { agent: string; url: string; pid: number };
  to: { agent: string; url: string; pid: number };
  workload: string | undefined;
  strategy: Strategy;
  strategyReason: string;
  rounds: RoundReport[];
  /** Why the pre-copy rounds stopped (precopy only). */
  roundsStopReason: string | undefined;
  /** The downtime budget, what was predicted before the switchover and which rule ended the rounds. */
  policy: {
    budgetMs: number;
    strict: boolean;
    rule: StopRule | undefined;
    predictedDowntimeMs: number;
    prediction: string;
    meetsBudget: boolean;
  };
  final: RoundReport & {
    /** CRIU's frozen time on the source: from the freeze to the kill, so it includes the held switchover. */
    frozenMs: number;
    imageFiles: number;
    imageBytes: number;
    /** From the freeze until the source held the dump with its images streamed (dump + streaming). */
    heldMs: number;
    /** Streaming the non-page images to the destination. */
    streamMs: number;
    /** The destination's restore, up to the held point. */
    restoreMs: number;
  };
  /** Memory pages plus other images, all rounds. */
  bytesSent: number;
  /** What the destination's page servers wrote, by file size. */
  pageImageBytes: number;
  residentBytes: number;
  phasesMs: { preflight: number; precopy: number; switchover: number; commit: number };
  totalMs: number;
  /** From the source's freeze to the destination's copy running. */
  downtimeMs: number;
  /** Post-copy: the memory fetched after the copy started running. */
  postcopy?: { fetchMs: number; lazyPages: number; lazyBytes: number; risk: string } | undefined;
}

/** A migration that failed with the source process still running where it was. */
export class MigrationFailedError extends FerryError {
  readonly code: string;
  constructor(
    readonly phase: Phase,
    cause: unknown,
    options: FerryErrorOptions & { sourceAgent: string },
  ) {
    const why = cause instanceof Error ? cause.message : String(cause);
    super(`migration failed during ${phase}: ${why}. The process still runs on ${options.sourceAgent}, unchanged.`, {
      hint: options.hint ?? (cause instanceof FerryError ? cause.hint : undefined),
      cause,
    });
    this.code = cause instanceof FerryError ? cause.code : 'MIGRATION_FAILED';
  }
}

/** Something failed after the commit point or while settling it: a person has to look (ferry ps on both agents). */
export class OutcomeUnknownError extends FerryError {
  readonly code = 'OUTCOME_UNKNOWN';
}

/** The destination cannot take the process; found before touching it. */
export class PreflightRefusedError extends InvalidInputError {
  override readonly code = 'PREFLIGHT_REFUSED';
}

const HOLD_MS = 60_000;

/**
 * Post-copy ended without every page on the destination: its copy was
 * killed (its memory had holes), and the source continued from the
 * switchover.
 */
export class PostcopyFailedError extends FerryError {
  readonly code = 'POSTCOPY_FAILED';
}

/** --strict-downtime refused to go over the budget: the process still runs on the source. */
export class DowntimeBudgetError extends FerryError {
  readonly code = 'DOWNTIME_BUDGET';
}

/**
 * The migration state machine: preflight → pre-copy rounds → switchover →
 * commit | rollback → report. Rollback is possible until the commit
 * request reaches the source; after it, the only way is forward (resume on
 * the destination).
 */
export async function migrate(options: MigrateOptions): Promise<MigrationReport> {
  if (options.from.url === options.to.url) {
    throw new InvalidInputError('--from and --to name the same agent', {
      hint: 'a migration needs two different agents',
    });
  }
  if ((options.pid === undefined) === (options.workload === undefined)) {
    throw new InvalidInputError('name the process by PID or by workload name, exactly one');
  }
  const started = performance.now();
  const elapsed = (): number => Math.round(performance.now() - started);
  const emit = (phase: Phase, from: string, message: string, extra: Partial<MigrationEvent> = {}): void =>
    options.onEvent?.({ atMs: elapsed(), phase, from, message, ...extra });
  let phase: Phase = 'preflight';
  const migrationId = `m-${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`;

  emit('preflight', 'controller', `connecting to ${options.from.url} and ${options.to.url}`);
  const onProgress = (p: ProgressMessage): void =>
    emit((p.phase as Phase | undefined) ?? phase, p.source ?? 'agent', p.message ?? '', {
      round: p.round || undefined,
      bytes: p.bytes ?? undefined,
      pages: p.pages ?? undefined,
    });
  const connect = (endpoint: AgentEndpoint) =>
    connectAgent(endpoint, options.softwareVersion, { onProgress, signal: options.signal });
  const connected = await Promise.allSettled([connect(options.from), connect(options.to)]);
  const failed = connected.find((r) => r.status === 'rejected');
  if (failed !== undefined) {
    for (const r of connected) if (r.status === 'fulfilled') r.value.close();
    throw failed.reason;
  }
  const [source, destination] = connected.map((r) => (r as PromiseFulfilledResult<WireConnection>).value) as [
    WireConnection,
    WireConnection,
  ];
  const sourceName = source.peerName || options.from.url;
  const destinationName = destination.peerName || options.to.url;
  let committed = false;
  let prepared = false;
  try {
    // 1. Preflight: facts from both, and every reason to refuse before touching the process.
    const probePostcopy = options.strategy === 'postcopy';
    if (probePostcopy)
      emit('preflight', 'controller', 'probing post-copy on both agents (a small lazy migration on each)');
    const sourceFacts = await source.call(
      'factsQuery',
      { pid: options.pid ?? 0, workload: options.workload ?? '', probePostcopy },
      { timeoutMs: 120_000 },
    );
    const proc = sourceFacts.process;
    if (!proc?.exists) {
      throw new InvalidInputError(`no process with PID ${options.pid} on ${sourceName}`, {
        hint: `check the PID on ${sourceName}, or name a workload (\`ferry ps --on ${sourceName}\` lists them)`,
      });
    }
    const pid = proc.pid ?? 0;
    const destinationFacts = await destination.call('factsQuery', { pid, probePostcopy }, { timeoutMs: 120_000 });
    emit(
      'preflight',
      'controller',
      `${sourceName}: PID ${pid}${proc.workload ? ` (${proc.workload})` : ''}, ${formatBytes(Number(proc.residentBytes ?? 0))} resident; ` +
        `CRIU ${sourceFacts.criuVersion} → ${destinationFacts.criuVersion} on ${destinationName}`,
    );
    refuseIfUnfit(sourceFacts, destinationFacts, destinationName);
    try {
      await destination.call('cpuCheck', { cpuinfo: sourceFacts.cpuinfo });
    } catch (error) {
      throw new PreflightRefusedError(`${destinationName} cannot run this CPU's code: ${(error as Error).message}`, {
        hint: 'migrate between machines with the same CPU features',
      });
    }
    await pauseAt('controller.after-preflight');
    const { strategy, reason } = chooseStrategy(options.strategy ?? 'auto', sourceFacts, destinationFacts, {
      source: sourceName,
      destination: destinationName,
    });
    emit('preflight', 'controller', `strategy ${strategy}: ${reason}`);
    const preflightMs = elapsed();

    const holdMs = options.holdMs ?? HOLD_MS;
    await destination.call('prepareDestination', {
      migrationId,
      sourceUrl: options.from.url,
      holdMs,
      postcopy: strategy === 'postcopy',
      workload: proc.workload
        ? {
            name: proc.workload,
            argv: proc.workloadArgv ?? [],
            logFile: proc.workloadLogFile ?? '',
            startedAtMs: proc.workloadStartedAtMs ?? 0,
            labels: proc.workloadLabels ?? {},
            pinned: proc.workloadPinned === true,
          }
        : null,
    });
    prepared = true;

    // 2. Pre-copy rounds: memory copied while the process runs, for as long as the policy says it pays.
    const limits: PolicyLimits = { ...DEFAULT_LIMITS, ...definedOnly(options.limits ?? {}) };
    const strict = options.strictDowntime === true;
    // What these two nodes have shown before, where they have: a restore rate on the destination,
    // a page transfer rate on the source (used until a round measures this migration's own).
    const restoreRate = destinationFacts.restoreBytesPerMs ?? 0;
    const writeRate = sourceFacts.pageWriteBytesPerMs ?? 0;
    const cost = options.cost ?? {
      ...DEFAULT_COST,
      ...(restoreRate > 0 ? { restoreBytesPerMs: restoreRate } : {}),
      ...(writeRate > 0 ? { defaultBandwidthBytesPerMs: writeRate, bandwidthLearned: true } : {}),
    };
    const residentBytes = Number(proc.residentBytes ?? 0);
    const rounds: RoundReport[] = [];
    const samples: RoundSample[] = [];
    let roundsStopReason: string | undefined;
    let rule: StopRule | undefined;
    // Post-copy's downtime does not include the memory: it arrives after the copy runs.
    const switchedBytes = strategy === 'postcopy' ? 0 : residentBytes;
    let prediction = estimate([], { residentBytes: switchedBytes, cost });
    let parent = '';
    const floor = floorMs({ residentBytes: switchedBytes, cost });
    if (strict && floor > limits.maxDowntimeMs) {
      throw new DowntimeBudgetError(
        `no strategy can keep the downtime within ${limits.maxDowntimeMs} ms: switching over and restoring ` +
          `${formatBytes(residentBytes)} alone takes about ${Math.round(floor)} ms`,
        { hint: `raise --max-downtime above ${Math.ceil(floor / 100) * 100}, or drop --strict-downtime` },
      );
    }
    if (strategy === 'precopy') {
      phase = 'precopy';
      const started = performance.now();
      for (let k = 1; ; k++) {
        const round = String(k);
        const ps = await destination.call('pageServerStart', {
          migrationId,
          round,
          parent,
          plainPages: options.plainPages === true,
        });
        emit('precopy', 'controller', `round ${k}: copying memory while the process runs`, { round });
        const done = await source.call(
          'preDumpRound',
          {
            migrationId,
            round,
            parent,
            pid,
            pageServerAddress: ps.address,
            pageServerPort: ps.port,
            plainPages: options.plainPages === true,
          },
          { timeoutMs: 0, signal: options.signal },
        );
        const report = roundReport(round, done.stats, done.durationMs ?? 0);
        rounds.push(report);
        samples.push({
          pagesWritten: report.pagesWritten,
          pagesSkipped: report.pagesSkipped,
          durationMs: report.durationMs,
          memwriteMs: (done.stats?.memwriteTimeUs ?? 0) / 1000,
        });
        parent = round;
        const decision = decide(samples, {
          residentBytes,
          elapsedMs: performance.now() - started,
          limits,
          cost,
        });
        prediction = decision.estimate;
        const rate = report.durationMs > 0 ? `, ${formatBytes((report.bytes / report.durationMs) * 1000)}/s` : '';
        emit(
          'precopy',
          sourceName,
          `round ${k}: ${report.pagesWritten} pages written, ${report.pagesSkipped} unchanged, ${report.durationMs} ms${rate}; ` +
            `downtime now would be ${explain(decision.estimate)}`,
          { round, pages: report.pagesWritten, bytes: report.bytes },
        );
        if (decision.stop) {
          rule = decision.rule;
          roundsStopReason = decision.reason;
          break;
        }
      }
      emit('precopy', 'controller', `rounds stop (${rule}): ${roundsStopReason}`);
    }
    const meetsBudget = prediction.predictedDowntimeMs <= limits.maxDowntimeMs;
    if (!meetsBudget) {
      const over = `predicted downtime ${explain(prediction)}, over the ${limits.maxDowntimeMs} ms budget`;
      if (strict) {
        throw new DowntimeBudgetError(`${over}; --strict-downtime stops here`, {
          hint:
            strategy === 'precopy'
              ? 'raise --max-downtime, or allow more rounds (--max-rounds, --max-traffic) if the dirty set was still shrinking'
              : 'raise --max-downtime; pre-copy needs a source kernel that tracks dirty memory',
        });
      }
      emit(
        strategy === 'precopy' ? 'precopy' : 'preflight',
        'controller',
        `${over}; going ahead (--strict-downtime would stop here)`,
      );
    }
    const precopyMs = elapsed() - preflightMs;

    // 3. Switchover: final dump held frozen at the source, images to the destination, restore held.
    phase = 'switchover';
    const lazy = strategy === 'postcopy';
    const ps = lazy
      ? { address: '', port: 0 }
      : await destination.call('pageServerStart', {
          migrationId,
          round: 'final',
          parent,
          plainPages: options.plainPages === true,
        });
    emit(
      'switchover',
      'controller',
      lazy ? 'final dump without the memory (post-copy)' : `page server ready on ${ps.address}:${ps.port}; final dump`,
    );
    const held = await source.call(
      'finalDump',
      {
        migrationId,
        round: 'final',
        parent,
        pid,
        pageServerAddress: ps.address,
        pageServerPort: ps.port,
        destinationUrl: options.to.url,
        holdMs,
        plainPages: options.plainPages === true,
        postcopy: lazy,
      },
      { timeoutMs: 0, signal: options.signal },
    );
    const heldAt = performance.now();
    await pauseAt('controller.after-held');
    emit(
      'switchover',
      sourceName,
      lazy
        ? `source frozen; ${held.imageFiles} image files streamed; its memory is served on port ${held.postcopyPort}`
        : `source frozen and held; ${held.imageFiles} image files streamed`,
      { bytes: Number(held.imageBytes ?? 0) },
    );
    const lazyRestore = lazy
      ? {
          postcopyAddress: sourceFacts.address ?? '',
          postcopyPort: held.postcopyPort ?? 0,
          plainPages: options.plainPages === true,
        }
      : {};
    const restored = await destination.call(
      'restore',
      { migrationId, round: 'final', holdMs, ...lazyRestore },
      {
        timeoutMs: 0,
        signal: options.signal,
      },
    );
    emit('switchover', destinationName, `restored as PID ${restored.pid}, held before it runs`);
    await pauseAt('controller.after-restored');
    const switchoverMs = elapsed() - preflightMs - precopyMs;

    // 4. Commit: from here the source never resumes.
    phase = 'commit';
    let finalStats: DumpStatsMessage | null | undefined;
    try {
      committed = true;
      finalStats = (await source.call('commit', { migrationId }, { timeoutMs: holdMs })).stats;
    } catch (error) {
      throw new OutcomeUnknownError(`the commit on ${sourceName} did not complete: ${(error as Error).message}`, {
        hint: `the process may have ended on ${sourceName}, and a copy is held on ${destinationName} for ${Math.round(holdMs / 1000)} s; check both with \`ferry ps\``,
        cause: error,
      });
    }
    emit(
      'commit',
      sourceName,
      lazy
        ? 'committed: the source copy stays frozen, serving memory, until the destination has all of it'
        : 'committed: the source copy has ended',
    );
    await pauseAt('controller.after-commit');
    let resumedPid: number;
    let resumer = destination;
    try {
      // Safe to repeat, over a new connection if the old one broke: resume acts only on a held copy.
      resumedPid =
        (
          await pRetry(
            async () => {
              if (resumer.closed) resumer = await connect(options.to);
              const downtimeBeforeMs = Math.round((held.frozenMs ?? 0) + (performance.now() - heldAt));
              return resumer.call('resume', { migrationId, downtimeBeforeMs }, { timeoutMs: holdMs });
            },
            {
              retries: 3,
              minTimeout: 200,
              shouldRetry: (e) => e instanceof PeerGoneError || e instanceof AgentUnreachableError,
            },
          )
        ).pid ?? 0;
    } catch (error) {
      throw new OutcomeUnknownError(
        `resuming on ${destinationName} failed after the commit: ${(error as Error).message}`,
        {
          hint: `the source copy has ended and the restored copy is held on ${destinationName} for ${Math.round(holdMs / 1000)} s; check it with \`ferry ps --on ${destinationName}\``,
          cause: error,
        },
      );
    } finally {
      if (resumer !== destination) resumer.close();
    }
    const downtimeMs = (held.frozenMs ?? 0) + (performance.now() - heldAt);
    let postcopy: MigrationReport['postcopy'];
    if (lazy) {
      emit('postcopy', destinationName, `running as PID ${resumedPid}; fetching its memory from ${sourceName}`);
      phase = 'postcopy';
      const fetched = await awaitPostcopy(options, connect, destinationName, sourceName, migrationId, emit);
      try {
        finalStats = (await source.call('commit', { migrationId, settled: true }, { timeoutMs: 0 })).stats;
      } catch (error) {
        throw new OutcomeUnknownError(
          `${sourceName} did not confirm the end of its copy: ${(error as Error).message}`,
          {
            hint: `every page arrived on ${destinationName}; check the source with \`ferry status --on ${sourceName}\``,
            cause: error,
          },
        );
      }
      // CRIU 4.1 resets the dump's statistics when its lazy page server starts: the destination counts.
      const lazyPages = fetched.pages;
      postcopy = { fetchMs: fetched.ms, lazyPages, lazyBytes: lazyPages * PAGE_SIZE, risk: POSTCOPY_RISK };
    }
    emit('done', destinationName, `running as PID ${resumedPid}`);
    const commitMs = elapsed() - preflightMs - precopyMs - switchoverMs;

    const final = {
      ...roundReport('final', finalStats, 0),
      frozenMs: (finalStats?.frozenTimeUs ?? 0) / 1000,
      imageFiles: held.imageFiles ?? 0,
      imageBytes: Number(held.imageBytes ?? 0),
      heldMs: held.frozenMs ?? 0,
      streamMs: held.streamMs ?? 0,
      restoreMs: restored.restoreMs ?? 0,
    };
    return {
      migrationId,
      from: { agent: sourceName, url: options.from.url, pid },
      to: { agent: destinationName, url: options.to.url, pid: resumedPid },
      workload: proc.workload || undefined,
      strategy,
      strategyReason: reason,
      rounds,
      roundsStopReason,
      policy: {
        budgetMs: limits.maxDowntimeMs,
        strict,
        rule,
        predictedDowntimeMs: Math.round(prediction.predictedDowntimeMs),
        prediction: explain(prediction),
        meetsBudget,
      },
      final,
      bytesSent:
        rounds.reduce((sum, r) => sum + r.bytes, 0) + final.bytes + final.imageBytes + (postcopy?.lazyBytes ?? 0),
      pageImageBytes: Number(restored.pageImageBytes ?? 0),
      residentBytes: Number(proc.residentBytes ?? 0),
      phasesMs: { preflight: preflightMs, precopy: precopyMs, switchover: switchoverMs, commit: commitMs },
      totalMs: elapsed(),
      downtimeMs: Math.round(downtimeMs),
      postcopy,
    };
  } catch (caught) {
    const error = localized(caught);
    if (committed || error instanceof OutcomeUnknownError || error instanceof PostcopyFailedError) throw error;
    if (!prepared && error instanceof FerryError && error instanceof InvalidInputError) throw error;
    // Rollback: the source resumes (or never stopped), the destination discards its copy and images.
    emit('rollback', 'controller', `rolling back: ${(error as Error).message}`);
    const reason = (error as Error).message.slice(0, 500);
    await Promise.all([
      source.call('abort', { migrationId, reason }, { timeoutMs: 30_000 }).catch(() => undefined),
      destination.call('abort', { migrationId, reason }, { timeoutMs: 30_000 }).catch(() => undefined),
    ]);
    if (error instanceof InvalidInputError) throw error;
    throw new MigrationFailedError(phase, error, { sourceAgent: sourceName });
  } finally {
    source.close();
    destination.close();
  }
}

function refuseIfUnfit(source: Facts, destination: Facts, destinationName: string): void {
  const proc = source.process;
  const [srcMajor = 0, srcMinor = 0] = (source.criuVersion ?? '').split('.').map(Number);
  const [dstMajor = 0, dstMinor = 0] = (destination.criuVersion ?? '').split('.').map(Number);
  if (dstMajor < srcMajor || (dstMajor === srcMajor && dstMinor < srcMinor)) {
    throw new PreflightRefusedError(
      `${destinationName} runs CRIU ${destination.criuVersion}, older than the source's ${source.criuVersion}`,
      { hint: 'upgrade CRIU on the destination (scripts/install-criu)' },
    );
  }
  const needed = Number(proc?.residentBytes ?? 0) * 1.1 + 16 * 1024 * 1024;
  if (Number(destination.imagesFreeBytes ?? 0) < needed) {
    throw new PreflightRefusedError(
      `${destinationName} has ${formatBytes(Number(destination.imagesFreeBytes ?? 0))} free for images, ` +
        `the process needs about ${formatBytes(needed)}`,
      { hint: 'free space in the destination agent’s images directory, or pick another destination' },
    );
  }
  if (!proc?.ownPidNamespace && (destination.takenPids ?? []).includes(proc?.pid ?? 0)) {
    throw new PreflightRefusedError(
      `PID ${proc?.pid} is taken on ${destinationName}, and the process is not in its own PID namespace, so it cannot keep its PID there`,
      { hint: 'start workloads with `ferry run`, which gives each its own PID namespace' },
    );
  }
}

/**
 * Pre-copy needs dirty-memory tracking where the process runs now: the
 * source decides. Post-copy is never chosen for the user (it risks the
 * process on the source's survival) and only where both agents' probes
 * showed a lazy migration working.
 */
function chooseStrategy(
  requested: 'auto' | Strategy,
  source: Facts,
  destination: Facts,
  names: { source: string; destination: string },
): { strategy: Strategy; reason: string } {
  if (requested === 'postcopy') {
    const failed = [
      { name: names.source, support: source.postcopy },
      { name: names.destination, support: destination.postcopy },
    ].filter((a) => a.support?.works !== true);
    if (failed.length > 0) {
      const first = failed[0]!;
      throw new PreflightRefusedError(
        `post-copy does not work on ${failed.map((f) => f.name).join(' and ')}: ` +
          failed.map((f) => f.support?.reason || 'the agent did not probe post-copy').join('; '),
        { hint: `${first.support?.hint || 'upgrade the agent'}; or use --strategy stop-and-copy (or auto)` },
      );
    }
    return {
      strategy: 'postcopy',
      reason: `requested with --strategy; probes on both agents showed lazy migration working. Risk: ${POSTCOPY_RISK}`,
    };
  }
  const tracks = source.memTrack === true;
  if (requested === 'stop-and-copy') return { strategy: 'stop-and-copy', reason: 'requested with --strategy' };
  if (requested === 'precopy' && !tracks) {
    throw new PreflightRefusedError(`the source kernel cannot track dirty memory, so pre-copy is impossible there`, {
      hint: 'use --strategy stop-and-copy (or auto)',
    });
  }
  if (tracks)
    return {
      strategy: 'precopy',
      reason: 'the source kernel tracks dirty memory: memory is copied while the process runs',
    };
  return {
    strategy: 'stop-and-copy',
    reason:
      'the source kernel does not track dirty memory (no CONFIG_MEM_SOFT_DIRTY), so the process stops for the whole copy',
  };
}

/** Drops keys set to undefined, so they do not override the defaults they leave unset. */
function definedOnly<T extends object>(value: T): Partial<T> {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined)) as Partial<T>;
}

function roundReport(round: string, stats: DumpStatsMessage | null | undefined, durationMs: number): RoundReport {
  const pagesWritten = Number(stats?.pagesWritten ?? 0);
  return {
    round,
    pagesWritten,
    pagesSkipped: Number(stats?.pagesSkippedParent ?? 0),
    bytes: pagesWritten * PAGE_SIZE,
    durationMs,
  };
}

/**
 * Waits until the destination has every page (its outcome "committed"),
 * telling the operator how long it has been. A failure there means its copy
 * was killed and the source continued.
 */
async function awaitPostcopy(
  options: MigrateOptions,
  connect: (endpoint: AgentEndpoint) => Promise<WireConnection>,
  destinationName: string,
  sourceName: string,
  migrationId: string,
  emit: (phase: Phase, from: string, message: string) => void,
): Promise<{ ms: number; pages: number }> {
  const started = performance.now();
  let lastSaid = started;
  let peer: WireConnection | undefined;
  try {
    for (;;) {
      try {
        peer ??= await connect(options.to);
        const outcome = await peer.call('outcomeQuery', { migrationId }, { timeoutMs: 30_000 });
        if (outcome.state === 'committed') {
          const ms = outcome.postcopyMs ?? Math.round(performance.now() - started);
          emit('postcopy', destinationName, `every page arrived from ${sourceName} in ${ms} ms`);
          return { ms, pages: Number(outcome.postcopyPages ?? 0) };
        }
        if (outcome.state === 'aborted' || outcome.state === 'unknown') {
          throw new PostcopyFailedError(
            `post-copy failed: ${outcome.detail || 'the destination has no copy'}. The copy on ${destinationName} was killed ` +
              `(its memory was incomplete); the process continues on ${sourceName} from the switchover`,
            {
              hint: `check it with \`ferry ps --on ${sourceName}\`; work it did on ${destinationName} since the switchover is lost`,
            },
          );
        }
      } catch (error) {
        if (!(error instanceof PeerGoneError || error instanceof AgentUnreachableError)) throw error;
        peer?.close();
        peer = undefined;
      }
      if (options.signal?.aborted === true) {
        throw new OutcomeUnknownError(`interrupted while ${destinationName} fetches its memory from ${sourceName}`, {
          hint: `the process runs on ${destinationName}; the source keeps serving until every page arrived (\`ferry status --on ${sourceName}\`)`,
        });
      }
      if (performance.now() - lastSaid > 2_000) {
        lastSaid = performance.now();
        emit('postcopy', 'controller', `fetching memory: ${Math.round((lastSaid - started) / 1000)} s so far`);
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  } finally {
    peer?.close();
  }
}
