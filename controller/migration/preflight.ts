import { CRIU_FLOOR, meetsCriuFloor } from '../../src/criu/index.js';
import { InvalidInputError } from '../../src/errors.js';
import { formatBytes } from '../../src/units.js';
import type { Facts, FileNeed, FileProblem, ProcessFacts, SocketFacts } from '../../src/wire/index.js';
import type { MigrationContext, Strategy } from './context.js';
import { PreflightRefusedError } from './errors.js';
import { POSTCOPY_RISK } from './postcopy.js';

/** What preflight found: the process, both agents' facts, and the strategy chosen with its reason. */
export interface Preflight {
  pid: number;
  process: ProcessFacts;
  sourceFacts: Facts;
  destinationFacts: Facts;
  strategy: Strategy;
  strategyReason: string;
}

/**
 * Facts from both agents, and every reason to refuse before touching the
 * process: a missing process, an older CRIU, no room for the images, a PID
 * taken outside its own PID namespace, another CPU, a strategy that cannot
 * work. Nothing here changes anything on either agent.
 */
export async function preflight(m: MigrationContext): Promise<Preflight> {
  const { options, source, destination, sourceName, destinationName } = m;
  const probePostcopy = options.strategy === 'postcopy';
  if (probePostcopy)
    m.emit('preflight', 'controller', 'probing post-copy on both agents (a small lazy migration on each)');
  const sourceFacts = await source.call(
    'factsQuery',
    { pid: options.pid ?? 0, workload: options.workload ?? '', probePostcopy },
    { timeoutMs: 120_000 },
  );
  const proc = sourceFacts.process;
  if (!proc?.exists && options.workload !== undefined) {
    throw new InvalidInputError(
      `workload ${options.workload} no longer runs on ${sourceName}: its process has exited`,
      {
        hint: `its output is in its log on ${sourceName} (\`ferry ps --on ${sourceName}\` shows where)`,
      },
    );
  }
  if (!proc?.exists) {
    throw new InvalidInputError(`no process with PID ${options.pid} on ${sourceName}`, {
      hint: `check the PID on ${sourceName}, or name a workload (\`ferry ps --on ${sourceName}\` lists them)`,
    });
  }
  const pid = proc.pid ?? 0;
  const destinationFacts = await destination.call(
    'factsQuery',
    {
      pid,
      probePostcopy,
      address: proc.workloadAddress ?? '',
      addressHook: proc.workloadAddressHook ?? '',
      peerUrl: options.from.url,
      residentBytes: proc.residentBytes ?? 0,
      files: (proc.files ?? []).filter((f) => f.how !== 'carried'),
    },
    { timeoutMs: 120_000 },
  );
  m.emit(
    'preflight',
    'controller',
    `${sourceName}: PID ${pid}${proc.workload ? ` (${proc.workload})` : ''}, ${formatBytes(Number(proc.residentBytes ?? 0))} resident; ` +
      `CRIU ${sourceFacts.criuVersion} → ${destinationFacts.criuVersion} on ${destinationName}`,
  );
  refuseIfUnfit(sourceFacts, destinationFacts, destinationName, m.options.tcpClose === true);
  refuseIfAddressCannotMove(proc, destinationFacts, destinationName);
  if (proc.workloadAddress)
    m.emit(
      'preflight',
      'controller',
      `address ${proc.workloadAddress} moves with ${proc.workload}: withdrawn from ${sourceName} once frozen, ` +
        `added and announced on ${destinationName} before the restore` +
        (proc.workloadAddressHook ? `, with the hook ${proc.workloadAddressHook}` : ''),
    );
  for (const line of socketLines(proc.sockets ?? [], m.options.tcpClose === true))
    m.emit('preflight', 'controller', line);
  refuseIfUnmovable([...(proc.unmovable ?? []), ...bigGhosts(proc.files ?? [])], sourceName);
  m.emit('preflight', 'controller', filesLine(proc.files ?? [], destinationName));
  refuseIfFilesDiffer(destinationFacts.fileProblems ?? [], sourceName, destinationName);
  try {
    await destination.call('cpuCheck', { cpuinfo: sourceFacts.cpuinfo });
  } catch (error) {
    throw new PreflightRefusedError(`${destinationName} cannot run this CPU's code: ${(error as Error).message}`, {
      hint: 'migrate between machines with the same CPU features',
    });
  }
  await m.hooks.pause('controller.after-preflight');
  const { strategy, reason } = chooseStrategy(options.strategy ?? 'auto', sourceFacts, destinationFacts, {
    source: sourceName,
    destination: destinationName,
  });
  m.emit('preflight', 'controller', `strategy ${strategy}: ${reason}`);
  return { pid, process: proc, sourceFacts, destinationFacts, strategy, strategyReason: reason };
}

/** One line on what the tree's files need: how many travel, how many must be (and are) on the destination. */
function filesLine(files: readonly FileNeed[], destination: string): string {
  const carried = files.filter((f) => f.how === 'carried');
  const shared = files.filter((f) => f.how === 'shared').length;
  const deleted = files.filter((f) => f.kind === 'deleted').length;
  const checked = files.length - carried.length - shared - deleted;
  const bytes = carried.reduce((sum, f) => sum + Number(f.size ?? 0), 0);
  return (
    `files: ${files.length} needed; ${carried.length} carried (${formatBytes(bytes)}), ` +
    `${checked} checked on ${destination}` +
    (shared > 0 ? `, ${shared} on shared storage` : '') +
    (deleted > 0 ? `, ${deleted} deleted but open (CRIU copies them)` : '')
  );
}

/** CRIU copies a file deleted but still open into its images only up to its ghost limit (1 MiB by default). */
const GHOST_LIMIT_BYTES = 1024 * 1024;

function bigGhosts(files: readonly FileNeed[]): string[] {
  return files
    .filter((f) => f.kind === 'deleted' && Number(f.size ?? 0) > GHOST_LIMIT_BYTES)
    .map(
      (f) =>
        `${f.path} is deleted but still open and holds ${formatBytes(Number(f.size ?? 0))}: ` +
        `CRIU carries such a file in its images only up to ${formatBytes(GHOST_LIMIT_BYTES)}`,
    );
}

/** What CRIU cannot move, found before the freeze: listed, with the reason for each. */
function refuseIfUnmovable(reasons: readonly string[], source: string): void {
  if (reasons.length === 0) return;
  throw new PreflightRefusedError(
    `the process holds what CRIU cannot move from ${source}:\n${reasons.map((r) => `  ${r}`).join('\n')}`,
    { hint: 'end or change what is listed (docs/files.md, "What cannot move"); nothing was touched' },
  );
}

/** Every file the restore would not find as it is on the source: listed, with what to do. */
function refuseIfFilesDiffer(problems: readonly FileProblem[], source: string, destination: string): void {
  if (problems.length === 0) return;
  const shown = problems.slice(0, 20).map((p) => `  ${p.kind} ${p.path} ${p.problem} on ${destination}`);
  if (problems.length > shown.length) shown.push(`  and ${problems.length - shown.length} more`);
  throw new PreflightRefusedError(
    `${destination} does not have the files the process needs as ${source} has them:\n${shown.join('\n')}`,
    {
      hint:
        `carry them with the workload (\`ferry run --carry PATH\`), declare storage both see ` +
        `(\`ferry run --shared PATH\`), or install the same files on ${destination}`,
    },
  );
}

/**
 * The first step that changes anything: the destination expects this
 * migration (and the workload's record, if it is one). From here on a
 * failure is rolled back on both agents.
 */
export async function prepareDestination(m: MigrationContext, p: Preflight): Promise<void> {
  const proc = p.process;
  await m.destination.call('prepareDestination', {
    migrationId: m.id,
    sourceUrl: m.options.from.url,
    holdMs: m.holdMs,
    postcopy: p.strategy === 'postcopy',
    workload: proc.workload
      ? {
          name: proc.workload,
          argv: proc.workloadArgv ?? [],
          logFile: proc.workloadLogFile ?? '',
          startedAtMs: proc.workloadStartedAtMs ?? 0,
          labels: proc.workloadLabels ?? {},
          pinned: proc.workloadPinned === true,
          address: proc.workloadAddress ?? '',
          addressHook: proc.workloadAddressHook ?? '',
          carry: proc.workloadCarry ?? [],
          shared: proc.workloadShared ?? [],
        }
      : null,
  });
}

function refuseIfUnfit(source: Facts, destination: Facts, destinationName: string, tcpClose: boolean): void {
  const proc = source.process;
  const [srcMajor = 0, srcMinor = 0] = (source.criuVersion ?? '').split('.').map(Number);
  const [dstMajor = 0, dstMinor = 0] = (destination.criuVersion ?? '').split('.').map(Number);
  if (dstMajor < srcMajor || (dstMajor === srcMajor && dstMinor < srcMinor)) {
    throw new PreflightRefusedError(
      `${destinationName} runs CRIU ${destination.criuVersion}, older than the source's ${source.criuVersion}`,
      { hint: 'upgrade CRIU on the destination (scripts/install-criu)' },
    );
  }
  const sockets = proc?.inetSockets ?? 0;
  if (sockets > 0) {
    const behind = [
      { side: 'the source', facts: source },
      { side: destinationName, facts: destination },
    ].filter((s) => !meetsCriuFloor(s.facts.criuVersion) && kernelAtLeast(s.facts.kernel, 6, 16));
    if (behind.length > 0) {
      throw new PreflightRefusedError(
        `the process holds ${sockets} TCP or UDP socket(s), which CRIU before ${CRIU_FLOOR.text} cannot dump or ` +
          `restore on Linux 6.16 and later: ${behind.map((b) => `${b.side} runs CRIU ${b.facts.criuVersion} on Linux ${b.facts.kernel}`).join('; ')}`,
        { hint: `install CRIU ${CRIU_FLOOR.text} or newer there (scripts/install-criu), then restart its agent` },
      );
    }
  }
  refuseUnmovableSockets(proc, tcpClose);
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

/** The workload's address must be free on the destination, with an interface there that routes to it, and its hook runnable. */
function refuseIfAddressCannotMove(proc: ProcessFacts, destination: Facts, destinationName: string): void {
  if (!proc.workloadAddress) return;
  if (destination.addressProblem) {
    throw new PreflightRefusedError(
      `the workload's address ${proc.workloadAddress} cannot move to ${destinationName}: ${destination.addressProblem}`,
      {
        hint: `remove it from ${destinationName} first (another host or workload has it), or pick a destination on the address's subnet`,
      },
    );
  }
  if (destination.addressHookProblem) {
    throw new PreflightRefusedError(
      `the address hook cannot run on ${destinationName}: ${destination.addressHookProblem}`,
      { hint: `install the hook at the same path on ${destinationName}` },
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

/** Whether a kernel release ("6.18.3-cloud") is at least major.minor. */
function kernelAtLeast(release: string | null | undefined, major: number, minor: number): boolean {
  const [a = 0, b = 0] = (release ?? '').split(/[.-]/).map(Number);
  return a > major || (a === major && b >= minor);
}

/** One line per socket the process holds: what it is and what the migration does with it. */
export function socketLines(sockets: readonly SocketFacts[], tcpClose: boolean): string[] {
  return sockets.map((s) => {
    const ends = s.peer ? `${s.local || '(unnamed)'} ↔ ${s.peer}` : s.local || '(unnamed)';
    const fate = s.moves ? 'moves' : tcpClose && s.kind === 'tcp-established' ? 'closed (--tcp-close)' : 'cannot move';
    return `socket ${s.kind} ${ends} ${s.state}: ${fate}, ${s.why}`;
  });
}

/**
 * Refuses, before anything is touched, a process holding a socket that
 * cannot move: with the list, and what to do. --tcp-close turns established
 * TCP connections that cannot move into resets instead (CRIU's tcp_close);
 * nothing turns a unix connection or a socket bound to the source's own
 * address into one that moves.
 */
function refuseUnmovableSockets(proc: ProcessFacts | null | undefined, tcpClose: boolean): void {
  const stuck = (proc?.sockets ?? []).filter((s) => !s.moves && !(tcpClose && s.kind === 'tcp-established'));
  if (stuck.length === 0) return;
  const closable = stuck.every((s) => s.kind === 'tcp-established');
  throw new PreflightRefusedError(
    `the process holds ${stuck.length} socket(s) that cannot move:\n` +
      socketLines(stuck, tcpClose)
        .map((line) => `  ${line}`)
        .join('\n'),
    {
      hint: closable
        ? 'add --tcp-close to close those connections (their clients see a reset), or let them end first; ' +
          'connections to an address of the workload’s own move (`ferry run --address`, docs/network.md)'
        : 'close those sockets in the process, or run it with an address of its own (`ferry run --address`) ' +
          'or on a wildcard address, with its unix peers in its tree',
    },
  );
}
