import { afterEach, describe, expect, it } from 'vitest';
import { FakeController, fakeAgent, type FakeAgent } from '../helpers/fake-agent.js';
import { waitFor } from '../helpers/wait.js';

/**
 * The address step of a switchover, each side's half, against fakes (the
 * real address move is test/e2e/address.test.ts): when the address leaves
 * the source and comes back, when the destination holds its packets, takes
 * it and gives it up, and what recovery does with it.
 */
const PID = 100;
const ADDRESS = '10.0.0.50/24';
const SOURCE_URL = 'wss://10.0.0.1:7070';
const DESTINATION_URL = 'wss://10.0.0.2:7070';
const SPEC = { name: 'web', argv: ['web'], address: ADDRESS, addressHook: '/usr/local/bin/move-address' };
let agents: FakeAgent[] = [];

function agent(): FakeAgent {
  const a = fakeAgent();
  agents.push(a);
  return a;
}

afterEach(() => {
  for (const a of agents) {
    for (const m of a.context.migrations.all()) m.abort.abort(new Error('test over'));
    a.cleanup();
  }
  agents = [];
});

/** A source whose workload owns the address, frozen and held. */
async function heldSource(a: FakeAgent) {
  a.processes.states.set(PID, 'running');
  a.context.workloads.adopt(SPEC, PID);
  a.addresses.present.set('10.0.0.50', 'eth0');
  a.processes.connections = 1;
  // What the process was doing each time the address came or went.
  const seen: string[] = [];
  const add = a.addresses.add.bind(a.addresses);
  const remove = a.addresses.remove.bind(a.addresses);
  a.addresses.add = (...args) => (seen.push(`add while ${a.processes.states.get(PID)}`), add(...args));
  a.addresses.remove = (...args) => (seen.push(`remove while ${a.processes.states.get(PID)}`), remove(...args));
  await a.source.finalDump(
    {
      migrationId: 'm-1',
      round: 'final',
      pid: PID,
      pageServerAddress: '10.0.0.2',
      pageServerPort: 40_000,
      destinationUrl: DESTINATION_URL,
      holdMs: 60_000,
    },
    new FakeController(),
  );
  return seen;
}

async function preparedDestination(a: FakeAgent) {
  a.destination.prepare({ migrationId: 'm-1', sourceUrl: SOURCE_URL, holdMs: 60_000, workload: SPEC });
  await a.destination.pageServer({ migrationId: 'm-1', round: 'final' }, new FakeController());
}

describe('the source', () => {
  it('withdraws the address while frozen, and after a commit removes CRIU’s lock table', async () => {
    const a = agent();
    const seen = await heldSource(a);
    expect(seen).toEqual(['remove while frozen']);
    expect(a.addresses.present.has('10.0.0.50')).toBe(false);
    expect(a.journal.read('m-1')?.addressDevice).toBe('eth0');
    await a.source.commit({ migrationId: 'm-1' });
    expect(a.addresses.log).toEqual(['remove 10.0.0.50/24', 'drop CRIU-00000000-fake-run']);
  });

  it('on a rollback puts the address back and announces it before the process resumes, and tells the hook', async () => {
    const a = agent();
    const seen = await heldSource(a);
    await a.source.abort(a.context.migrations.get('m-1') as never, 'the destination failed');
    expect(seen).toEqual(['remove while frozen', 'add while frozen']);
    expect(a.processes.states.get(PID)).toBe('running');
    expect(a.addresses.present.get('10.0.0.50')).toBe('eth0');
    expect(a.addresses.log).toEqual(['remove 10.0.0.50/24', 'add 10.0.0.50/24', 'announce 10.0.0.50', 'hook return']);
  });

  it('puts the address back when the lease ends without a commit', async () => {
    const a = agent();
    await heldSource(a);
    a.addresses.log.length = 0;
    const m = a.context.migrations.get('m-1')!;
    await m.hold!.decide('no', 'no commit within the hold time');
    expect(a.addresses.log.slice(0, 2)).toEqual(['add 10.0.0.50/24', 'announce 10.0.0.50']);
  });

  it('recovery gives the address back to a process that resumed after a crash', async () => {
    const a = agent();
    a.processes.states.set(PID, 'running');
    a.context.workloads.adopt(SPEC, PID);
    a.journal.begin({
      id: 'm-1',
      role: 'source',
      state: 'dumping',
      pid: PID,
      pidStart: a.processes.startTime(PID),
      dir: a.context.imagesRoot + '/m-1',
      peerUrl: DESTINATION_URL,
      workload: { name: 'web' },
    });
    a.journal.advance('m-1', 'held', { addressDevice: 'eth0' });
    await a.recovery.recover();
    expect(a.journal.read('m-1')?.state).toBe('aborted');
    expect(a.addresses.present.get('10.0.0.50')).toBe('eth0');
  });
});

describe('the destination', () => {
  it('holds the address’s packets, takes and announces it before the restore, and opens it once the sockets exist', async () => {
    const a = agent();
    await preparedDestination(a);
    const order: string[] = [];
    const restore = a.criu.restore.bind(a.criu);
    a.criu.restore = (o) => (order.push(`restore after ${a.addresses.log.join(', ')}`), restore(o));
    await a.destination.restore({ migrationId: 'm-1', round: 'final' }, new FakeController());
    expect(order).toEqual(['restore after block 10.0.0.50, add 10.0.0.50/24, announce 10.0.0.50, hook take']);
    // Held at post-restore: the sockets exist (in repair mode), as when CRIU opens its own lock.
    expect(a.addresses.blocked.size).toBe(0);
    expect(a.addresses.log.at(-1)).toBe('release');
    await a.destination.resume({ migrationId: 'm-1' });
    expect(a.addresses.present.get('10.0.0.50')).toBe('eth0');
  });

  it('gives the address up when its copy is discarded', async () => {
    const a = agent();
    await preparedDestination(a);
    await a.destination.restore({ migrationId: 'm-1', round: 'final' }, new FakeController());
    await a.destination.abort(a.context.migrations.get('m-1') as never, 'the commit failed');
    expect(a.addresses.present.has('10.0.0.50')).toBe(false);
    expect(a.addresses.blocked.size).toBe(0);
    expect(a.journal.read('m-1')?.state).toBe('discarded');
  });

  it('a hook that fails fails the restore before CRIU is asked, and leaves the address as it found it', async () => {
    const a = agent();
    await preparedDestination(a);
    a.addresses.hookFails = true;
    await expect(a.destination.restore({ migrationId: 'm-1', round: 'final' }, new FakeController())).rejects.toThrow(
      /the hook failed/,
    );
    expect(a.criu.calls).not.toContain('restore');
    expect(a.addresses.present.has('10.0.0.50')).toBe(false);
    expect(a.addresses.blocked.size).toBe(0);
    await waitFor(() => a.journal.read('m-1')?.state === 'discarded', { what: 'the discard', timeoutMs: 2_000 });
  });

  it('refuses to take an address it already has', async () => {
    const a = agent();
    await preparedDestination(a);
    a.addresses.present.set('10.0.0.50', 'eth1');
    await expect(a.destination.restore({ migrationId: 'm-1', round: 'final' }, new FakeController())).rejects.toThrow(
      /already on eth0 here|already on/,
    );
    expect(a.addresses.present.get('10.0.0.50')).toBe('eth1');
    expect(a.criu.calls).not.toContain('restore');
  });
});
