import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { authorize } from '../../agent/routing.js';
import { IllegalTransitionError } from '../../src/migration/index.js';
import { REQUESTS, type RequestName } from '../../src/wire/index.js';
import { waitFor } from '../helpers/wait.js';
import { FakeController, fakeAgent, type FakeAgent } from '../helpers/fake-agent.js';

const PID = 100;
const SOURCE_URL = 'wss://10.0.0.1:7070';
const DESTINATION_URL = 'wss://10.0.0.2:7070';
let agents: FakeAgent[] = [];

function agent(): FakeAgent {
  const a = fakeAgent();
  agents.push(a);
  a.processes.states.set(PID, 'running');
  return a;
}

afterEach(() => {
  for (const a of agents) {
    for (const m of a.context.migrations.all()) m.abort.abort(new Error('test over'));
    a.cleanup();
  }
  agents = [];
});

/** A source frozen at post-dump with its images streamed: where Commit or Abort decides. */
async function heldSource(a: FakeAgent, options: { holdMs?: number; postcopy?: boolean } = {}) {
  const controller = new FakeController();
  const held = await a.source.finalDump(
    {
      migrationId: 'm-1',
      round: 'final',
      pid: PID,
      pageServerAddress: '10.0.0.2',
      pageServerPort: 40_000,
      destinationUrl: DESTINATION_URL,
      holdMs: options.holdMs ?? 60_000,
      postcopy: options.postcopy,
    },
    controller,
  );
  return { controller, held };
}

/** A destination holding a restored copy at post-restore: where Resume or the source's word decides. */
async function heldDestination(a: FakeAgent, options: { holdMs?: number } = {}) {
  a.destination.prepare({ migrationId: 'm-1', sourceUrl: SOURCE_URL, holdMs: options.holdMs ?? 60_000 });
  await a.destination.pageServer({ migrationId: 'm-1', round: 'final' }, new FakeController());
  return a.destination.restore({ migrationId: 'm-1', round: 'final' }, new FakeController());
}

const postDump = (a: FakeAgent) => a.criu.heard.filter((h) => h.script === 'post-dump');
const postRestore = (a: FakeAgent) => a.criu.heard.filter((h) => h.script === 'post-restore');
const state = (a: FakeAgent) => a.journal.read('m-1')?.state;

describe('the source', () => {
  it('says yes only on commit, from held to committing, journalled before CRIU hears it', async () => {
    const a = agent();
    await heldSource(a);
    expect(state(a)).toBe('held');
    expect(postDump(a)).toEqual([]); // frozen, CRIU still waiting
    expect(a.processes.states.get(PID)).toBe('frozen');
    await a.source.commit({ migrationId: 'm-1' });
    expect(postDump(a)).toEqual([{ script: 'post-dump', answer: true, journal: 'committing' }]);
    expect(state(a)).toBe('committed');
    expect(a.processes.states.get(PID)).toBe('killed');
  });

  it('decides once: a commit and an abort at the same time give one answer, and the loser is told', async () => {
    const a = agent();
    await heldSource(a);
    const m = a.context.migrations.get('m-1')!;
    const [commit, abort] = await Promise.allSettled([
      a.source.commit({ migrationId: 'm-1' }),
      a.source.abort(m as never, 'test'),
    ]);
    expect(commit.status).toBe('fulfilled');
    expect(abort.status === 'rejected' && (abort.reason as Error).message).toMatch(/already committed/);
    expect(postDump(a)).toHaveLength(1);
  });

  it('after an abort, a commit is refused and the process runs where it was', async () => {
    const a = agent();
    await heldSource(a);
    await a.source.abort(a.context.migrations.get('m-1') as never, 'the destination failed');
    await expect(a.source.commit({ migrationId: 'm-1' })).rejects.toThrow(/not held here|rolled back/);
    expect(postDump(a)).toEqual([{ script: 'post-dump', answer: false, journal: 'held' }]);
    expect(a.processes.states.get(PID)).toBe('running');
  });

  it('resumes the process when no commit comes within the hold time', async () => {
    const a = agent();
    await heldSource(a, { holdMs: 30 });
    await waitFor(() => postDump(a).length > 0, { what: 'the lease to end', timeoutMs: 2_000 });
    expect(postDump(a)[0]).toEqual({ script: 'post-dump', answer: false, journal: 'held' });
    await waitFor(() => a.processes.states.get(PID) === 'running', { what: 'the process to run', timeoutMs: 2_000 });
  });

  it('resumes the process when the controller goes away before the commit', async () => {
    const a = agent();
    const { controller } = await heldSource(a);
    controller.close();
    await waitFor(() => postDump(a).length > 0, { what: 'CRIU to hear the answer', timeoutMs: 2_000 });
    expect(postDump(a)[0]?.answer).toBe(false);
    await waitFor(() => a.processes.states.get(PID) === 'running', { what: 'the process to run', timeoutMs: 2_000 });
  });

  it('a lost controller after the commit changes nothing: the source never resumes', async () => {
    const a = agent();
    const { controller } = await heldSource(a);
    await a.source.commit({ migrationId: 'm-1' });
    controller.close();
    await sleep(20);
    expect(postDump(a)).toHaveLength(1);
    expect(a.processes.states.get(PID)).toBe('killed');
  });

  it('a dump that fails before its hold answers unchanged, journalled aborted, the process running', async () => {
    const a = agent();
    a.criu.failDump = 'sockets: cannot dump';
    await expect(heldSource(a)).rejects.toMatchObject({ unchanged: true });
    expect(state(a)).toBe('aborted');
    expect(a.processes.states.get(PID)).toBe('running');
    expect(existsSync(join(a.context.imagesRoot, 'm-1'))).toBe(false);
  });

  it('an abort during a pre-dump cancels it, and removes the images only once it has ended', async () => {
    const a = agent();
    const round = a.source.preDump(
      { migrationId: 'm-1', round: '1', pid: PID, pageServerAddress: '10.0.0.2', pageServerPort: 40_000 },
      new FakeController(),
    );
    const m = a.context.migrations.get('m-1')!;
    const aborted = a.source.abort(m as never, 'interrupted');
    await expect(round).rejects.toThrow(/cancelled/);
    await aborted;
    expect(m.work.size).toBe(0);
    expect(existsSync(m.dir)).toBe(false);
    expect(a.processes.states.get(PID)).toBe('running');
  });

  it('every way back leaves the process running and never signals it', async () => {
    const ways: Record<string, (a: FakeAgent) => Promise<unknown>> = {
      abort: async (a) => {
        await heldSource(a);
        await a.source.abort(a.context.migrations.get('m-1') as never, 'abort');
      },
      lease: async (a) => {
        await heldSource(a, { holdMs: 10 });
        await waitFor(() => postDump(a).length > 0, { what: 'the lease', timeoutMs: 2_000 });
      },
      'lost controller': async (a) => {
        (await heldSource(a)).controller.close();
        await waitFor(() => postDump(a).length > 0, { what: 'the lost controller', timeoutMs: 2_000 });
      },
      'failed dump': async (a) => {
        a.criu.failDump = 'broken';
        await heldSource(a).catch(() => undefined);
      },
      'agent stopping': async (a) => {
        await heldSource(a);
        a.context.migrations.get('m-1')!.abort.abort(new Error('stopping'));
        await sleep(10);
      },
    };
    for (const [way, run] of Object.entries(ways)) {
      const a = agent();
      await run(a);
      await waitFor(() => a.processes.states.get(PID) === 'running', {
        what: `running after ${way}`,
        timeoutMs: 2_000,
      });
      expect(a.processes.signals, way).toEqual([]);
      expect(
        postDump(a).some((h) => h.answer),
        way,
      ).toBe(false);
    }
  });
});

describe('the destination', () => {
  it('runs its copy on resume only, journalled resuming before CRIU hears yes', async () => {
    const a = agent();
    const restored = await heldDestination(a);
    expect(restored.pid).toBe(4242);
    expect(state(a)).toBe('restored');
    expect(postRestore(a)).toEqual([]);
    await a.destination.resume({ migrationId: 'm-1' });
    expect(postRestore(a)).toEqual([{ script: 'post-restore', answer: true, journal: 'resuming' }]);
    expect(state(a)).toBe('resumed');
  });

  it('never runs its copy because a lease ran out: it asks the source, and holds while undecided', async () => {
    const a = agent();
    a.peers.outcomeAnswer = 'pending';
    await heldDestination(a, { holdMs: 10 });
    await waitFor(() => a.peers.asked.length >= 3, { what: 'the source to be asked again', timeoutMs: 2_000 });
    expect(postRestore(a)).toEqual([]);
    expect(state(a)).toBe('restored');
    a.peers.outcomeAnswer = 'committed';
    await waitFor(() => postRestore(a).length > 0, { what: 'the copy to run', timeoutMs: 2_000 });
    expect(postRestore(a)[0]).toEqual({ script: 'post-restore', answer: true, journal: 'resuming' });
  });

  it('discards its copy when the source says it rolled back', async () => {
    const a = agent();
    a.peers.outcomeAnswer = 'aborted';
    await heldDestination(a, { holdMs: 10 });
    await waitFor(() => state(a) === 'discarded', { what: 'the discard', timeoutMs: 2_000 });
    expect(postRestore(a).some((h) => h.answer)).toBe(false);
    expect(a.processes.states.get(4242)).toBe('killed');
  });

  it('records a rollback as final only once the images are gone, on either side', async () => {
    const destination = agent();
    await heldDestination(destination);
    await destination.destination.abort(destination.context.migrations.get('m-1') as never, 'rollback');
    const source = agent();
    await heldSource(source);
    await source.source.abort(source.context.migrations.get('m-1') as never, 'rollback');
    expect([...destination.finals, ...source.finals]).toEqual([
      { id: 'm-1', state: 'discarded', imagesLeft: false },
      { id: 'm-1', state: 'aborted', imagesLeft: false },
    ]);
  });

  it('a copy discarded by abort cannot be resumed after', async () => {
    const a = agent();
    await heldDestination(a);
    await a.destination.abort(a.context.migrations.get('m-1') as never, 'rollback');
    await expect(a.destination.resume({ migrationId: 'm-1' })).rejects.toThrow(/no held copy/);
    expect(state(a)).toBe('discarded');
  });

  it('takes images only from the migration’s source host', async () => {
    const a = agent();
    a.destination.prepare({ migrationId: 'm-1', sourceUrl: SOURCE_URL, holdMs: 60_000 });
    await a.destination.pageServer({ migrationId: 'm-1', round: 'final' }, new FakeController());
    const from = (name: string, address: string) => ({
      certificate: { role: 'agent' as const, name, subjectAltName: `IP Address:${address}`, fingerprint: '' },
      progress: () => undefined,
    });
    const chunk = { migrationId: 'm-1', round: 'final', name: 'core-1.img', offset: 0, data: new Uint8Array([1]) };
    await expect(a.destination.imageChunk(chunk, from('c', '10.0.0.3') as never)).rejects.toThrow(
      /is not the source of migration m-1/,
    );
    await expect(a.destination.imageChunk(chunk, from('a', '10.0.0.1') as never)).resolves.toEqual({});
  });
});

describe('post-copy', () => {
  it('the source ends its stopped copy only when the destination has every page', async () => {
    const a = agent();
    const { held } = await heldSource(a, { postcopy: true });
    expect(held.postcopyPort).toBe(41_000);
    await a.source.commit({ migrationId: 'm-1', settled: false });
    expect(state(a)).toBe('committing');
    a.peers.outcomeAnswer = 'pending';
    a.criu.transfer?.end();
    await waitFor(() => a.peers.asked.length >= 1, { what: 'the destination to be asked', timeoutMs: 3_000 });
    expect(a.processes.states.get(PID)).toBe('stopped');
    expect(a.processes.signals).toEqual([]);
    a.peers.outcomeAnswer = 'committed';
    await a.source.commit({ migrationId: 'm-1', settled: true });
    expect(a.processes.signals).toEqual([{ pid: PID, signal: 'SIGKILL' }]);
    expect(state(a)).toBe('committed');
  });

  it('the source continues its process when the destination lost its copy after the commit', async () => {
    const a = agent();
    await heldSource(a, { postcopy: true });
    await a.source.commit({ migrationId: 'm-1', settled: false });
    a.peers.outcomeAnswer = 'aborted';
    a.criu.transfer?.end();
    await expect(a.source.commit({ migrationId: 'm-1', settled: true })).rejects.toThrow(/did not complete/);
    expect(a.processes.signals).toEqual([{ pid: PID, signal: 'SIGCONT' }]);
    expect(a.processes.states.get(PID)).toBe('running');
    expect(state(a)).toBe('aborted');
  });

  it('before the commit, a lease that ends rolls the source back; after it, only the destination decides', async () => {
    const a = agent();
    await heldSource(a, { postcopy: true, holdMs: 10 });
    await waitFor(() => a.journal.read('m-1')?.action?.startsWith('rolling back') === true, {
      what: 'the lease to roll back',
      timeoutMs: 2_000,
    });
    a.criu.transfer?.fail('the connection that stops serving ended the transfer'); // what CRIU does then
    await waitFor(() => state(a) === 'aborted', { what: 'the rollback to end', timeoutMs: 2_000 });
    expect(a.processes.states.get(PID)).toBe('running');
    const b = agent();
    await heldSource(b, { postcopy: true, holdMs: 10 });
    await b.source.commit({ migrationId: 'm-1', settled: false });
    await sleep(50);
    expect(state(b)).toBe('committing');
  });

  it('the destination kills a running copy whose memory fetch was lost', async () => {
    const a = agent();
    a.destination.prepare({ migrationId: 'm-1', sourceUrl: SOURCE_URL, holdMs: 60_000, postcopy: true });
    await a.destination.restore(
      { migrationId: 'm-1', round: 'final', postcopyAddress: '10.0.0.1', postcopyPort: 41_000 },
      new FakeController(),
    );
    await a.destination.resume({ migrationId: 'm-1' });
    expect(a.destination.outcome(a.context.migrations.get('m-1') as never)).toEqual({ state: 'pending' });
    a.criu.fetch?.lost();
    await waitFor(() => state(a) === 'discarded', { what: 'the copy to be discarded', timeoutMs: 2_000 });
    expect(a.processes.states.get(4242)).toBe('killed');
  });
});

describe('who may ask what', () => {
  it('an agent certificate may only stream images and ask an outcome', () => {
    const agentPeer = { certificate: { role: 'agent' as const, name: 'b', subjectAltName: '', fingerprint: '' } };
    const controller = { certificate: { role: 'controller' as const, name: 'c', subjectAltName: '', fingerprint: '' } };
    const allowed: RequestName[] = [];
    for (const name of Object.keys(REQUESTS) as RequestName[]) {
      expect(() => authorize(name, controller as never)).not.toThrow();
      try {
        authorize(name, agentPeer);
        allowed.push(name);
      } catch (error) {
        expect((error as Error).message).toMatch(/holds an agent certificate/);
      }
    }
    expect(allowed.sort()).toEqual(['imageChunk', 'imagesDone', 'outcomeQuery']);
  });
});

describe('the journal', () => {
  it('refuses a move the state table does not have, before writing it', () => {
    const a = agent();
    a.journal.begin({ id: 'm-9', role: 'source', state: 'dumping', dir: '/nowhere', peerUrl: '' });
    expect(() => a.journal.advance('m-9', 'committing')).toThrow(IllegalTransitionError);
    a.journal.advance('m-9', 'held');
    a.journal.advance('m-9', 'committing');
    expect(() => a.journal.advance('m-9', 'aborted')).toThrow(/cannot move from committing to aborted/);
    a.journal.advance('m-9', 'committed');
    expect(() => a.journal.advance('m-9', 'aborted', {}, ['recovery'])).toThrow(IllegalTransitionError);
    expect(a.journal.read('m-9')?.state).toBe('committed');
  });
});
