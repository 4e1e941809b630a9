import { afterEach, describe, expect, it, vi } from 'vitest';
import type { AgentEndpoint, AgentLink } from '../../controller/agents/index.js';
import { ExitCode, reportError } from '../../controller/cli/index.js';
import {
  migrate,
  MigrationFailedError,
  OutcomeUnknownError,
  PostcopyFailedError,
  PreflightRefusedError,
  type MigrateOptions,
  type MigrationReport,
} from '../../controller/migration/index.js';
import type { TestHooks } from '../../src/hooks.js';
import { PeerGoneError, RemoteError, type BodyOf, type ReplyOf, type RequestName } from '../../src/wire/index.js';

/**
 * The controller's side of the migration protocol, against two fake agents
 * with scripted answers: no root, no CRIU, no sockets. Each test is a rule
 * of the switchover the controller must keep whatever the agents answer.
 */

const MiB = 1024 * 1024;
const SOURCE: AgentEndpoint = { url: 'wss://10.0.0.1:7070', tls: undefined };
const DESTINATION: AgentEndpoint = { url: 'wss://10.0.0.2:7070', tls: undefined };
const PID = 4242;

type Answers = { [K in RequestName]?: (params: BodyOf<K>) => ReplyOf<K> | Promise<ReplyOf<K>> };

/** What the fakes saw, both agents in one order: "src ← commit" (asked), "src → commit" (answered). */
let wire: string[] = [];

/** An agent with scripted answers; every connection to it is a link that records what it is asked. */
class FakeAgent {
  readonly calls: { name: RequestName; params: unknown }[] = [];
  connections = 0;
  /** Set: new connections fail with this (the agent went away). */
  unreachable: Error | undefined;

  constructor(
    readonly name: string,
    readonly answers: Answers,
  ) {}

  connect(): Promise<AgentLink> {
    if (this.unreachable !== undefined) return Promise.reject(this.unreachable);
    this.connections++;
    return Promise.resolve(linkTo(this));
  }

  asked(name: RequestName): boolean {
    return this.calls.some((c) => c.name === name);
  }

  paramsOf<K extends RequestName>(name: K): BodyOf<K>[] {
    return this.calls.filter((c) => c.name === name).map((c) => c.params as BodyOf<K>);
  }
}

/** One connection to a fake agent: every call recorded, answered from the agent's script. */
function linkTo(agent: FakeAgent): AgentLink {
  let closed = false;
  return {
    peerName: agent.name,
    get closed() {
      return closed;
    },
    close: () => {
      closed = true;
    },
    async call<K extends RequestName>(name: K, params: BodyOf<K>): Promise<ReplyOf<K>> {
      agent.calls.push({ name, params });
      wire.push(`${agent.name} ← ${name}`);
      if (closed) throw new PeerGoneError(agent.name, 'connection closed');
      const answer = agent.answers[name];
      if (answer === undefined) throw new Error(`${agent.name} has no answer to ${name} in this script`);
      try {
        const reply = await answer(params);
        wire.push(`${agent.name} → ${name}`);
        return reply;
      } catch (error) {
        if (error instanceof PeerGoneError) closed = true;
        throw error;
      }
    },
  };
}

/** A source that runs PID 4242 (workload "counter", 64 MiB) and dumps it without trouble. */
function source(answers: Answers = {}, facts: Partial<BodyOf<'facts'>> = {}): FakeAgent {
  return new FakeAgent('src', {
    factsQuery: () => ({
      agentName: 'src',
      criuVersion: '4.1',
      memTrack: false,
      cpuinfo: new Uint8Array([1, 2, 3]),
      address: '10.0.0.1',
      process: { pid: PID, exists: true, ownPidNamespace: true, residentBytes: 64 * MiB, workload: 'counter' },
      postcopy: { works: true },
      ...facts,
    }),
    preDumpRound: () => ({ stats: { pagesWritten: 100, memwriteTimeUs: 1_000 }, durationMs: 10 }),
    carryAhead: () => ({ files: 1, bytes: 4096, durationMs: 2 }),
    finalDump: (p) => ({
      imageFiles: 12,
      imageBytes: 300_000,
      frozenMs: 40,
      streamMs: 10,
      postcopyPort: p.postcopy ? 31_000 : 0,
    }),
    commit: () => ({ stats: { pagesWritten: 80, frozenTimeUs: 60_000 } }),
    abort: () => ({}),
    ...answers,
  });
}

/** A destination with room, CRIU 4.1 and the PID free, that restores and resumes without trouble. */
function destination(answers: Answers = {}, facts: Partial<BodyOf<'facts'>> = {}): FakeAgent {
  return new FakeAgent('dst', {
    factsQuery: () => ({
      agentName: 'dst',
      criuVersion: '4.1',
      imagesFreeBytes: 8192 * MiB,
      takenPids: [],
      postcopy: { works: true },
      ...facts,
    }),
    cpuCheck: () => ({}),
    prepareDestination: () => ({}),
    pageServerStart: () => ({ address: '10.0.0.2', port: 27_000 }),
    restore: () => ({ pid: PID, restoreMs: 25, pageImageBytes: 64 * MiB }),
    resume: () => ({ pid: PID }),
    outcomeQuery: () => ({ state: 'committed', postcopyMs: 120, postcopyPages: 16_384 }),
    abort: () => ({}),
    ...answers,
  });
}

function run(src: FakeAgent, dst: FakeAgent, options: Partial<MigrateOptions> = {}): Promise<MigrationReport> {
  return migrate({
    workload: 'counter',
    from: SOURCE,
    to: DESTINATION,
    softwareVersion: 'test',
    connect: (endpoint) => (endpoint.url === SOURCE.url ? src : dst).connect(),
    ...options,
  });
}

/** The exit code `ferry migrate` would end with on this error (its message silenced). */
function exitCodeOf(error: unknown): number {
  const quiet = vi.spyOn(process.stderr, 'write').mockImplementation(() => true);
  try {
    return reportError(error, false);
  } finally {
    quiet.mockRestore();
  }
}

async function failure(migration: Promise<unknown>): Promise<Error> {
  const error = await migration.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error, 'the migration should have failed').toBeInstanceOf(Error);
  return error as Error;
}

const delay = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const remoteFailure = (peer: string, what: string): RemoteError =>
  new RemoteError(peer, 'CRIU_FAILED', what, undefined, false);
const gone = (peer: string): PeerGoneError => new PeerGoneError(peer, 'connection closed (1006)');

/** Everything that changes something on an agent: preflight must ask none of it. */
const CHANGING: readonly RequestName[] = [
  'prepareDestination',
  'pageServerStart',
  'preDumpRound',
  'finalDump',
  'restore',
  'commit',
  'resume',
  'abort',
];

afterEach(() => {
  wire = [];
});

describe('the switchover', () => {
  it('resumes the destination only after the source answered the commit', async () => {
    const src = source({
      // A slow answer: a controller that did not wait for it would resume meanwhile.
      commit: async () => {
        await delay(20);
        return { stats: { pagesWritten: 80, frozenTimeUs: 60_000 } };
      },
    });
    const dst = destination();
    const report = await run(src, dst);
    expect(report.to).toEqual({ agent: 'dst', url: DESTINATION.url, pid: PID });
    expect(wire.indexOf('dst ← resume')).toBeGreaterThan(wire.indexOf('src → commit'));
    expect(wire.filter((w) => w.endsWith('← resume'))).toEqual(['dst ← resume']);
    // In order: held on the source, restored and held on the destination, then commit, then resume.
    expect(wire.filter((w) => w.includes('←')).slice(-4)).toEqual([
      'src ← finalDump',
      'dst ← restore',
      'src ← commit',
      'dst ← resume',
    ]);
    expect(src.asked('abort') || dst.asked('abort')).toBe(false);
  });

  it.each<{ what: string; src?: Answers; dst?: Answers; strategy?: 'postcopy'; unreachable?: boolean }>([
    { what: 'the answer to the commit is lost', src: { commit: () => Promise.reject(gone('src')) } },
    {
      what: 'the source answers the commit with a failure',
      src: { commit: () => Promise.reject(remoteFailure('src', 'CRIU did not answer')) },
    },
    { what: 'the destination fails to resume', dst: { resume: () => Promise.reject(remoteFailure('dst', 'no copy')) } },
    {
      what: 'the resume connection breaks and the destination cannot be reached again',
      dst: { resume: () => Promise.reject(gone('dst')) },
      unreachable: true,
    },
    {
      what: 'the source does not confirm the end of its post-copy',
      strategy: 'postcopy',
      src: {
        commit: (p) =>
          p.settled === true ? Promise.reject(gone('src')) : { stats: { pagesWritten: 0, frozenTimeUs: 1_000 } },
      },
    },
  ])('never rolls back once the commit was sent: $what → outcome unknown, exit code 3', async (c) => {
    const src = source(c.src);
    const dst = destination(c.dst);
    if (c.unreachable === true) {
      // The first connection works; the one the resume would retry over is refused.
      const connect = dst.connect.bind(dst);
      dst.connect = async () => {
        const link = await connect();
        dst.unreachable = new RemoteError('dst', 'NOT_ALLOWED', 'refused', undefined, true);
        return link;
      };
    }
    const error = await failure(run(src, dst, { strategy: c.strategy }));
    expect(error).toBeInstanceOf(OutcomeUnknownError);
    expect(exitCodeOf(error)).toBe(ExitCode.unknown);
    expect(src.asked('abort')).toBe(false);
    expect(dst.asked('abort')).toBe(false);
    expect(src.asked('commit')).toBe(true);
  });

  it('repeats a resume whose connection broke, over a new connection: resume acts only on a held copy', async () => {
    let resumes = 0;
    const dst = destination({
      resume: () => (++resumes === 1 ? Promise.reject(gone('dst')) : { pid: PID }),
    });
    const report = await run(source(), dst);
    expect(report.to.pid).toBe(PID);
    expect(resumes).toBe(2);
    expect(dst.connections).toBe(2);
    expect(dst.asked('abort')).toBe(false);
  });

  it('never resumes the destination when the commit did not complete', async () => {
    const dst = destination();
    const error = await failure(run(source({ commit: () => Promise.reject(gone('src')) }), dst));
    expect(error).toBeInstanceOf(OutcomeUnknownError);
    expect(dst.asked('resume')).toBe(false);
  });

  it('a destination that lost its post-copy copy is reported as such, and nothing is rolled back', async () => {
    const src = source();
    const dst = destination({ outcomeQuery: () => ({ state: 'aborted', detail: 'the lazy-pages daemon died' }) });
    const error = await failure(run(src, dst, { strategy: 'postcopy' }));
    expect(error).toBeInstanceOf(PostcopyFailedError);
    expect(error.message).toMatch(/the process continues on src from the switchover/);
    expect(src.asked('abort') || dst.asked('abort')).toBe(false);
    // The source was not told to end its copy: it serves, then runs on by its own lease.
    expect(src.paramsOf('commit').filter((p) => p.settled === true)).toEqual([]);
  });
});

describe('before the commit', () => {
  it.each<{ what: string; phase: string; src?: Answers; dst?: Answers; memTrack?: boolean }>([
    {
      what: 'the source goes away during preflight',
      phase: 'preflight',
      src: { factsQuery: () => Promise.reject(gone('src')) },
    },
    {
      what: 'the destination cannot prepare',
      phase: 'preflight',
      dst: { prepareDestination: () => Promise.reject(remoteFailure('dst', 'journal full')) },
    },
    {
      what: 'a pre-copy round fails',
      phase: 'precopy',
      memTrack: true,
      src: { preDumpRound: () => Promise.reject(remoteFailure('src', 'pre-dump failed')) },
    },
    {
      what: 'the final page server does not start',
      phase: 'switchover',
      dst: { pageServerStart: () => Promise.reject(remoteFailure('dst', 'no port')) },
    },
    {
      what: 'the final dump fails',
      phase: 'switchover',
      src: { finalDump: () => Promise.reject(remoteFailure('src', 'dump failed')) },
    },
    {
      what: 'the restore fails',
      phase: 'switchover',
      dst: { restore: () => Promise.reject(remoteFailure('dst', 'restore failed')) },
    },
    {
      what: 'the destination goes away after the restore',
      phase: 'switchover',
      dst: { restore: () => Promise.reject(gone('dst')) },
    },
  ])(
    'any failure aborts on both agents and says the process still runs on the source: $what',
    async ({ phase, src: srcAnswers, dst: dstAnswers, memTrack }) => {
      const src = source(srcAnswers, { memTrack: memTrack === true });
      const dst = destination(dstAnswers);
      const error = await failure(run(src, dst));
      expect(error).toBeInstanceOf(MigrationFailedError);
      expect((error as MigrationFailedError).phase).toBe(phase);
      expect(error.message).toMatch(/The process still runs on src, unchanged\.$/);
      expect(exitCodeOf(error)).toBe(ExitCode.failed);
      const [abortSrc] = src.paramsOf('abort');
      const [abortDst] = dst.paramsOf('abort');
      expect(abortSrc?.migrationId).toMatch(/^m-/);
      expect(abortDst?.migrationId).toBe(abortSrc?.migrationId);
      expect(src.asked('commit')).toBe(false);
      expect(dst.asked('resume')).toBe(false);
    },
  );
});

describe('preflight refusals touch nothing', () => {
  it.each<{
    what: string;
    message: RegExp;
    src?: Partial<BodyOf<'facts'>>;
    dst?: Partial<BodyOf<'facts'>>;
    options?: Partial<MigrateOptions>;
    dstAnswers?: Answers;
  }>([
    {
      what: 'the destination runs an older CRIU',
      message: /dst runs CRIU 3\.19, older than the source's 4\.1/,
      dst: { criuVersion: '3.19' },
    },
    {
      what: 'the PID is taken on the destination and the process is not in its own PID namespace',
      message: /PID 4242 is taken on dst, and the process is not in its own PID namespace/,
      src: { process: { pid: PID, exists: true, ownPidNamespace: false, residentBytes: 64 * MiB } },
      dst: { takenPids: [1, PID] },
    },
    {
      what: 'the destination has no room for the images',
      message: /dst has .* free for images, the process needs about/,
      dst: { imagesFreeBytes: 32 * MiB },
    },
    {
      what: "the destination cannot run the source's CPU code",
      message: /dst cannot run this CPU's code/,
      dstAnswers: {
        cpuCheck: () => Promise.reject(new RemoteError('dst', 'INVALID_INPUT', 'avx512', undefined, true)),
      },
    },
    {
      what: "post-copy is asked for where the destination's probe failed",
      message: /post-copy does not work on dst: no non-cooperative userfaultfd/,
      dst: { postcopy: { works: false, reason: 'no non-cooperative userfaultfd', hint: 'a newer kernel' } },
      options: { strategy: 'postcopy' },
    },
    {
      what: 'pre-copy is asked for where the source kernel does not track dirty memory',
      message: /pre-copy is impossible there/,
      options: { strategy: 'precopy' },
    },
  ])('$what', async (c) => {
    const src = source({}, c.src);
    const dst = destination(c.dstAnswers, c.dst);
    const error = await failure(run(src, dst, c.options));
    expect(error).toBeInstanceOf(PreflightRefusedError);
    expect(error.message).toMatch(c.message);
    expect(exitCodeOf(error)).toBe(ExitCode.badInput);
    for (const agent of [src, dst]) {
      expect(agent.calls.map((call) => call.name).filter((name) => CHANGING.includes(name))).toEqual([]);
    }
  });

  it('a process that is not there is bad input, and nothing is asked of the destination but its facts', async () => {
    const src = source({}, { process: { exists: false } });
    const dst = destination();
    const error = await failure(run(src, dst, { workload: undefined, pid: 999 }));
    expect(error.message).toMatch(/no process with PID 999 on src/);
    expect(exitCodeOf(error)).toBe(ExitCode.badInput);
    expect(dst.calls).toEqual([]);
  });
});

describe('post-copy', () => {
  it('asks the source to end its copy only after the destination reported every page', async () => {
    let queries = 0;
    let everyPage = false;
    const settledTooEarly: number[] = [];
    const src = source({
      commit: (p) => {
        if (p.settled === true && !everyPage) settledTooEarly.push(queries);
        return { stats: { pagesWritten: 0, frozenTimeUs: 1_000 } };
      },
    });
    const dst = destination({
      outcomeQuery: () => {
        queries++;
        if (queries < 3) return { state: 'pending' };
        everyPage = true;
        return { state: 'committed', postcopyMs: 250, postcopyPages: 16_384 };
      },
    });
    const report = await run(src, dst, { strategy: 'postcopy' });
    expect(settledTooEarly).toEqual([]);
    expect(queries).toBe(3);
    expect(src.paramsOf('commit').map((p) => p.settled === true)).toEqual([false, true]);
    // The held commit, the resume, the fetch, and only then the settled commit.
    const asked = wire.filter((w) => w.includes('←') && !w.includes('outcomeQuery'));
    expect(asked.slice(-3)).toEqual(['src ← commit', 'dst ← resume', 'src ← commit']);
    expect(wire.lastIndexOf('src ← commit')).toBeGreaterThan(wire.lastIndexOf('dst → outcomeQuery'));
    // The destination fetches from where the source serves: its address and the port of its lazy page server.
    expect(dst.paramsOf('restore')[0]).toMatchObject({ postcopyAddress: '10.0.0.1', postcopyPort: 31_000 });
    expect(dst.asked('pageServerStart')).toBe(false);
    expect(report.postcopy).toMatchObject({ fetchMs: 250, lazyPages: 16_384, lazyBytes: 16_384 * 4096 });
  });
});

describe('pre-copy', () => {
  /** A source that tracks memory and writes these pages in its rounds, 100 ms each (50 ms writing). */
  function rounds(pages: readonly number[]): FakeAgent {
    let k = 0;
    return source(
      {
        preDumpRound: () => {
          const written = pages[k++];
          if (written === undefined) throw new Error('a round past the end of the script');
          return { stats: { pagesWritten: written, memwriteTimeUs: 50_000 }, durationMs: 100 };
        },
      },
      { memTrack: true },
    );
  }

  it.each<{ rule: string; pages: number[]; limits?: MigrateOptions['limits']; stopsAfter: number }>([
    // 64 MiB resident: after round 2 the prediction (150 + 42 + 20 ms) fits 300 ms.
    { rule: 'budget', pages: [16_384, 4_000, 1_000, 500], stopsAfter: 2 },
    { rule: 'few-pages', pages: [16_384, 4_000, 1_000, 40, 20], limits: { maxDowntimeMs: 100 }, stopsAfter: 4 },
    { rule: 'not-converging', pages: [16_384, 9_000, 9_500, 100], limits: { maxDowntimeMs: 100 }, stopsAfter: 3 },
    {
      rule: 'max-rounds',
      pages: [16_384, 12_000, 9_000, 7_000, 5_000],
      limits: { maxDowntimeMs: 100, maxRounds: 3 },
      stopsAfter: 3,
    },
  ])('the rounds stop on the convergence rule: $rule after round $stopsAfter', async (c) => {
    const src = rounds(c.pages);
    const dst = destination();
    const report = await run(src, dst, { limits: c.limits });
    expect(report.strategy).toBe('precopy');
    expect(report.policy.rule).toBe(c.rule);
    expect(src.paramsOf('preDumpRound').map((p) => p.round)).toEqual(
      Array.from({ length: c.stopsAfter }, (_, i) => String(i + 1)),
    );
    // Each round builds on the one before; the final dump on the last round.
    expect(src.paramsOf('preDumpRound').map((p) => p.parent)).toEqual(
      Array.from({ length: c.stopsAfter }, (_, i) => (i === 0 ? '' : String(i))),
    );
    expect(src.paramsOf('finalDump')[0]?.parent).toBe(String(c.stopsAfter));
    // A page server for every round and one for the final dump.
    expect(dst.paramsOf('pageServerStart').map((p) => p.round)).toEqual([
      ...Array.from({ length: c.stopsAfter }, (_, i) => String(i + 1)),
      'final',
    ]);
  });

  it('with --strict-downtime, a prediction over the budget stops before the switchover and rolls back', async () => {
    const src = rounds([16_384, 16_000]);
    const dst = destination();
    const error = await failure(run(src, dst, { limits: { maxDowntimeMs: 200 }, strictDowntime: true }));
    expect(error).toBeInstanceOf(MigrationFailedError);
    expect(error.message).toMatch(/--strict-downtime stops here/);
    expect(src.asked('finalDump')).toBe(false);
    expect(src.asked('abort') && dst.asked('abort')).toBe(true);
  });
});

describe('test hooks', () => {
  it('pause the controller at its four points, each right after the step it is named after', async () => {
    const points: string[] = [];
    const hooks: TestHooks = {
      pause: (point) => {
        points.push(`${point}, after ${wire.at(-1)}`);
        return Promise.resolve();
      },
      fault: () => undefined,
    };
    await run(source(), destination(), { hooks });
    expect(points).toEqual([
      'controller.after-preflight, after dst → cpuCheck',
      'controller.after-held, after src → finalDump',
      'controller.after-restored, after dst → restore',
      'controller.after-commit, after src → commit',
    ]);
  });
});
