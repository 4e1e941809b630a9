import { existsSync, fstatSync, mkdirSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { checkServerIdentity, type PeerCertificate } from 'node:tls';
import { deferred } from '../../src/deferred.js';
import { InvalidInputError } from '../../src/errors.js';
import { log } from '../../src/log.js';
import { socketHolder } from '../../src/proc.js';
import { DEFAULT_HOLD_MS, type BodyOf, type ReplyOf, type WireConnection } from '../../src/wire/index.js';
import { pageTlsFor, type AgentContext } from '../context.js';
import { MigrationStateError, NotAllowedError, StepFailedError, unchanged } from '../errors.js';
import { giveUp, movingAddress, openAddress, take } from '../address-move.js';
import { AHEAD_ROUND, carriedRoots, placeCarried } from '../carry.js';
import { Hold } from '../hold.js';
import { warmMemory } from '../warm.js';
import { socketDescriptor, type PassedFd } from '../../src/criu/index.js';
import { ImageReceiver } from '../images.js';
import { DestinationPostcopyRole } from './postcopy.js';
import { isDestination, type DestinationMigration } from './migration.js';
import { pageBytes, watchPageFlow } from './page-flow.js';

/** Who sent a request: its certificate, when it has one. */
export type Sender = Pick<WireConnection, 'certificate' | 'progress'>;

/**
 * The destination of a migration: page servers for the rounds, the image
 * stream from the source, the restore held before the copy runs, and the
 * resume or discard of that copy.
 *
 * The invariant's destination half is held here: the copy runs only by
 * the hold's "yes", which a Resume gives (the controller sends it after the
 * source committed) or the source's own word that it committed. A lease
 * that runs out only makes the destination ask; it never runs the copy.
 */
export class DestinationRole {
  readonly postcopy: DestinationPostcopyRole;

  constructor(
    private readonly context: AgentContext,
    private readonly draining: () => boolean,
  ) {
    this.postcopy = new DestinationPostcopyRole(context);
  }

  prepare(p: BodyOf<'prepareDestination'>): ReplyOf<'prepareDestination'> {
    const { journal, migrations } = this.context;
    const id = p.migrationId ?? '';
    if (migrations.has(id)) throw new MigrationStateError(`migration ${id} is already known here`);
    if (this.draining()) {
      throw unchanged(
        new InvalidInputError(`${this.context.node} is draining and takes no workloads`, {
          hint: `pick another destination, or \`ferry undrain ${this.context.node}\` first`,
        }),
      );
    }
    const dir = join(this.context.imagesRoot, id);
    mkdirSync(dir, { mode: 0o700 });
    // Post-copy's final round has no page server to make its directory.
    if (p.postcopy === true) mkdirSync(join(dir, 'final'), { mode: 0o700 });
    const m: DestinationMigration = {
      role: 'destination',
      id,
      dir,
      workload: p.workload ?? undefined,
      address: movingAddress(p.workload ?? undefined),
      receivers: new Map(),
      pageServers: [],
      pageFlows: new Map(),
      pageStreams: [],
      sourceUrl: p.sourceUrl ?? '',
      holdMs: p.holdMs || DEFAULT_HOLD_MS,
      abort: new AbortController(),
      work: new Set(),
      answer: deferred<boolean>(),
    };
    m.onForget = () => {
      this.#endPageServers(m);
      for (const stream of m.pageStreams) stream.close();
    };
    m.hold = this.#hold(m);
    migrations.add(m);
    journal.begin({
      id,
      role: 'destination',
      state: 'prepared',
      postcopy: p.postcopy === true ? true : undefined,
      dir,
      peerUrl: p.sourceUrl ?? '',
      workload: p.workload ?? undefined,
    });
    // A destination that hears nothing more asks the source in the end.
    this.#lease(m);
    log.info('destination prepared', { migration: id, dir });
    return {};
  }

  /**
   * A round's page server. The reply names this agent's page port at once;
   * CRIU's page server starts when the source's connection arrives (before
   * the source's CRIU starts, so that the start is not inside a freeze),
   * reading the plain connection itself or the pair behind this agent's TLS.
   */
  async pageServer(p: BodyOf<'pageServerStart'>, sender: Sender): Promise<ReplyOf<'pageServerStart'>> {
    const { hooks } = this.context;
    const m = this.#migration(p.migrationId ?? '');
    hooks.fault('destination.page-server', { imagesRoot: this.context.imagesRoot });
    const dir = join(m.dir, p.round ?? '');
    mkdirSync(dir, { mode: 0o700 });
    // Before the answer, so the source freezes once the memory the round takes is at hand.
    const warmed = await warmMemory(Number(p.warmBytes ?? 0));
    if (warmed !== undefined) log.info('memory warmed for the round', { migration: m.id, round: p.round, ...warmed });
    const listener = await this.context.pages.listen(
      this.context.advertise,
      pageTlsFor(this.context, p.plainPages),
      sourceHost(m),
    );
    m.pageStreams.push(listener);
    const started = listener.connection.then((socket) => this.#startPageServer(m, p, dir, socket, sender));
    // A page server that does not start fails the source's dump (its connection ends): that is the error it sees.
    started.catch((error: unknown) => {
      log.error('the page server did not start', { migration: m.id, round: p.round, error: (error as Error).message });
      listener.close();
    });
    return {
      address: this.context.advertise,
      port: listener.port,
      warmedBytes: warmed?.bytes ?? 0,
      warmMs: Math.round(warmed?.ms ?? 0),
    };
  }

  async #startPageServer(
    m: DestinationMigration,
    p: BodyOf<'pageServerStart'>,
    dir: string,
    socket: PassedFd,
    sender: Sender,
  ): Promise<void> {
    const { criu, migrations, processes } = this.context;
    // Its inode, read before CRIU has it: the page server is found by it (swrk reports no PID).
    const inode = socketInode(socket);
    const { pid } = await migrations.track(
      m,
      criu.pageServer({
        imagesDir: dir,
        address: this.context.advertise,
        parentImg: p.parent ? `../${p.parent}` : undefined,
        socket,
        signal: m.abort.signal,
      }),
    );
    const server = pid > 0 ? pid : inode === undefined ? undefined : socketHolder(inode);
    const start = server === undefined ? undefined : processes.startTime(server);
    if (server !== undefined) m.pageServers.push({ pid: server, start });
    log.info('page server started', { migration: m.id, round: p.round, pid: server });
    const finish = watchPageFlow({
      dir,
      serverAlive: () => server !== undefined && start !== undefined && processes.startTime(server) === start,
      progress: (message) => sender.progress(message),
      base: {
        migrationId: m.id,
        phase: p.round === 'final' ? 'switchover' : 'precopy',
        round: p.round ?? '',
        source: this.context.node,
      },
      stop: m.abort.signal,
    });
    m.pageFlows.set(p.round ?? '', finish);
  }

  async imageChunk(c: BodyOf<'imageChunk'>, sender: Sender): Promise<ReplyOf<'imageChunk'>> {
    const m = this.#migration(c.migrationId ?? '');
    this.#fromSource(m, sender);
    // The test point is the final dump's stream, the source frozen (not the files carried ahead).
    if (Number(c.offset ?? 0) === 0 && c.round !== AHEAD_ROUND)
      await this.context.hooks.pause('destination.during-images');
    this.#receiver(m, c.round ?? '').write(c.name ?? '', Number(c.offset ?? 0), c.data ?? new Uint8Array());
    return {};
  }

  imagesDone(d: BodyOf<'imagesDone'>, sender: Sender): ReplyOf<'imagesDone'> {
    const m = this.#migration(d.migrationId ?? '');
    this.#fromSource(m, sender);
    const files = (d.files ?? []).map((f) => ({ name: f.name ?? '', size: Number(f.size ?? 0) }));
    this.context.hooks.fault('destination.images-done', { roundDir: join(m.dir, d.round ?? ''), files });
    const received = this.#receiver(m, d.round ?? '').verify(d.files ?? []);
    log.info('images received', { migration: m.id, files: received.files, bytes: received.bytes });
    return {};
  }

  /** Restores and holds at post-restore: the copy exists, stopped, and runs only on resume. */
  async restore(r: BodyOf<'restore'>, sender: Sender): Promise<ReplyOf<'restore'>> {
    const { criu, hooks, journal, metrics, migrations, processes, rates } = this.context;
    const m = this.#migration(r.migrationId ?? '');
    const hold = m.hold!;
    const dir = join(m.dir, r.round ?? '');
    hooks.fault('destination.before-restore', { roundDir: dir });
    if (m.workload !== undefined) {
      try {
        m.placed = placeCarried(dir, carriedRoots(this.context.dataDir, m.workload), m.id, join(m.dir, AHEAD_ROUND));
      } catch (error) {
        await hold.decide('no', 'its files could not be put in place');
        throw new StepFailedError(error, { from: m.dir, to: keptLogs(this.context, m) });
      }
      if (m.placed.files > 0) {
        log.info('carried files placed', { migration: m.id, files: m.placed.files, bytes: m.placed.bytes });
      }
    }
    m.progressTo = sender;
    // The source's dump of this round has ended: its page count is final.
    m.pageFlows.get(r.round ?? '')?.();
    const started = performance.now();
    sender.progress({ migrationId: m.id, phase: 'switchover', message: 'restoring', source: this.context.node });
    if (r.postcopyPort) {
      try {
        await this.postcopy.startFetching(m, dir, r);
      } catch (error) {
        await hold.decide('no', 'the lazy-pages daemon did not start');
        throw new StepFailedError(error, { from: m.dir, to: keptLogs(this.context, m) });
      }
    }
    if (m.address !== undefined) {
      try {
        await take(this.context, m.id, m.address, m.sourceUrl);
      } catch (error) {
        await hold.decide('no', 'the address step failed');
        throw new StepFailedError(error, { from: m.dir, to: keptLogs(this.context, m) });
      }
      sender.progress({
        migrationId: m.id,
        phase: 'switchover',
        message: `address ${m.address.address.cidr} taken and announced; its packets wait for the restore`,
        source: this.context.node,
      });
    }
    const reachedHold = deferred<number>();
    m.restore = migrations.track(
      m,
      criu
        .restore({
          imagesDir: dir,
          lazyPages: m.postcopy !== undefined ? true : undefined,
          // Connections dumped with their state come back with it; datagram peers by their path.
          ...(r.tcpClose === true ? { tcpClose: true } : { tcpEstablished: true }),
          extUnixSk: true,
          fileLocks: true,
          signal: m.abort.signal,
          timeoutMs: 0,
          onNotify: async (event) => {
            if (event.script !== 'post-restore') return true;
            if (hold.answer !== undefined) return false; // rolled back while CRIU restored
            m.restoredPid = event.pid;
            journal.advance(m.id, 'restored', { pid: event.pid, pidStart: processes.startTime(event.pid ?? 0) });
            // The sockets exist now, still in repair mode: the address's packets may reach them. CRIU
            // unlocks its own network lock at the same point, before it turns repair off, so that the
            // peers can answer the window probe repair-off sends (held back, a response waiting for
            // its peer's ACK waited for the 1 s first retransmission instead).
            if (m.address !== undefined) await openAddress(this.context, m.id);
            await hooks.pause('destination.after-restore-held');
            this.#lease(m);
            reachedHold.resolve(event.pid ?? 0);
            return m.answer.promise;
          },
        })
        .catch((error: unknown) => {
          reachedHold.reject(error);
          throw error;
        }),
    );
    m.restore.catch(() => undefined);
    try {
      const pid = await reachedHold.promise;
      const restoreMs = Math.round(performance.now() - started);
      m.restoreMs = restoreMs;
      const bytes = pageImageBytes(m.dir);
      m.restoredBytes = bytes;
      metrics.phaseSeconds.observe({ phase: 'restore' }, restoreMs / 1000);
      rates.learn('restore', bytes, restoreMs);
      return { pid, restoreMs, pageImageBytes: bytes };
    } catch (error) {
      // Before any commit: nothing to keep.
      await hold.decide('no', 'the restore failed');
      throw new StepFailedError(error, { from: m.dir, to: keptLogs(this.context, m) });
    }
  }

  /** Resume: the hold's "yes", which the controller sends only after the source committed. */
  async resume(p: BodyOf<'resume'>): Promise<ReplyOf<'resume'>> {
    const started = performance.now();
    const id = p.migrationId ?? '';
    const m = this.context.migrations.get(id);
    if (!isDestination(m) || m.hold === undefined || m.restoredPid === undefined) {
      const entry = this.context.journal.read(id);
      if (entry?.state === 'resumed') return { pid: entry.pid ?? 0 };
      throw new MigrationStateError(`migration ${id} has no held copy here, nothing to resume`);
    }
    if ((await m.hold.decide('yes', 'resume')) !== 'yes') {
      throw new MigrationStateError(`migration ${id}'s copy was already discarded here`);
    }
    const downtimeBeforeMs = p.downtimeBeforeMs ?? 0;
    if (downtimeBeforeMs > 0) {
      const downtimeMs = downtimeBeforeMs + performance.now() - started;
      this.context.metrics.downtimeSeconds.observe(downtimeMs / 1000);
      // What the switchover from this source cost besides copying pages and restoring them: the
      // prediction's fixed part, learned for this pair (post-copy's downtime has no copy in it).
      if (m.restoreMs !== undefined && m.postcopy === undefined) {
        this.context.rates.learnCost(
          switchoverKey(m.sourceUrl),
          downtimeMs - (p.copyMs ?? 0) - m.restoreMs,
          m.restoredBytes ?? 0,
        );
      }
    }
    return { pid: m.restoredPid };
  }

  /** Discards whatever this agent holds of the migration: a copy that has not run, its images. */
  async abort(m: DestinationMigration, reason: string): Promise<void> {
    await m.hold?.decide('no', `aborted: ${reason}`);
  }

  /** A post-copy destination answers for itself, with how long its fetch took. */
  outcome(m: DestinationMigration): ReplyOf<'outcomeQuery'> | undefined {
    return m.postcopy === undefined ? undefined : this.postcopy.outcome(m);
  }

  /**
   * Yes: journalled as resuming, then CRIU lets the copy run (post-copy:
   * while it fetches its memory). No: journalled as discarded, then the
   * restore is cancelled (CRIU kills a half-made or held copy) and the
   * images go.
   */
  #hold(m: DestinationMigration): Hold {
    const { hooks, journal, migrations, processes, workloads } = this.context;
    return new Hold(
      { migrationId: m.id, role: 'destination', signal: m.abort.signal },
      {
        record: (answer, why) => {
          if (answer === 'yes') journal.advance(m.id, 'resuming');
          else journal.note(m.id, { action: `discarding: ${why}` });
        },
        release: async (answer, why) => {
          if (answer === 'yes') {
            await hooks.pause('destination.before-resume-answer');
            m.answer.resolve(true);
            await m.restore;
            const pid = m.restoredPid ?? 0;
            if (m.workload !== undefined) workloads.adopt(m.workload, pid);
            m.placed?.keep();
            if (m.postcopy !== undefined) {
              this.postcopy.awaitFetch(m, pid);
              return;
            }
            journal.advance(m.id, 'resumed', { pid, pidStart: processes.startTime(pid) });
            await migrations.forget(m);
            log.info('resumed', { migration: m.id, pid });
            return;
          }
          m.answer.resolve(false);
          this.postcopy.discard(m);
          await migrations.cancel(m, new MigrationStateError('the copy here is discarded'));
          m.placed?.undo();
          if (m.address !== undefined) await giveUp(this.context, m.id, m.address);
          await migrations.forget(m, true);
          // Final only once the copy and its images are gone.
          journal.advance(m.id, 'discarded', { action: discardAction(why) });
        },
      },
    );
  }

  /** Waits for resume; when it does not come in time, asks the source what happened. */
  #lease(m: DestinationMigration): void {
    m.hold?.lease(m.holdMs, () => {
      this.#askSource(m).catch((error: unknown) => {
        log.error('asking the source after the lease failed', { migration: m.id, error: (error as Error).message });
        this.#lease(m);
      });
    });
  }

  async #askSource(m: DestinationMigration): Promise<void> {
    const outcome = await this.context.peers.outcome(m.id, m.sourceUrl, 'source');
    log.warn('no resume within the hold time; the source says', { migration: m.id, outcome });
    const hold = m.hold;
    if (hold === undefined || hold.decision !== undefined) return;
    if (outcome === 'committed' && m.restoredPid !== undefined) await hold.decide('yes', 'the source committed');
    else if (outcome === 'aborted' || outcome === 'unknown') await hold.decide('no', 'the source rolled back');
    else this.#lease(m); // undecided or unreachable: keep holding, ask again later
  }

  /**
   * Another agent may stream a migration's images only if it is that
   * migration's source: its certificate names the host of the source URL the
   * controller gave (and checked when it connected there). Without this, any
   * node's agent key could write the images a process is restored from here.
   */
  #fromSource(m: DestinationMigration, sender: Sender): void {
    const peer = sender.certificate;
    if (peer?.role !== 'agent') return;
    const host = sourceHost(m);
    const certificate = { subject: { CN: peer.name }, subjectaltname: peer.subjectAltName } as PeerCertificate;
    if (host === '' || checkServerIdentity(host, certificate) !== undefined) {
      throw new NotAllowedError(`${peer.name} is not the source of migration ${m.id}, whose images it sent`);
    }
  }

  #migration(id: string): DestinationMigration {
    const m = this.context.migrations.get(id);
    if (!isDestination(m)) throw new MigrationStateError(`migration ${id} was not prepared here`);
    return m;
  }

  #receiver(m: DestinationMigration, round: string): ImageReceiver {
    let receiver = m.receivers.get(round);
    if (receiver === undefined) {
      const dir = join(m.dir, round);
      // The files carried ahead of the freeze come without a page server: their round starts with them.
      if (round === AHEAD_ROUND) mkdirSync(dir, { recursive: true, mode: 0o700 });
      if (!existsSync(dir)) throw new MigrationStateError(`round ${round} of ${m.id} has no page server here`);
      receiver = new ImageReceiver(dir);
      m.receivers.set(round, receiver);
    }
    return receiver;
  }

  /** A page server no dump came to would wait for ever; one that served its dump has ended. */
  #endPageServers(m: DestinationMigration): void {
    // The start time tells a page server still there from a process that took its PID since.
    for (const server of m.pageServers) {
      if (server.start === undefined || this.context.processes.startTime(server.pid) !== server.start) continue;
      this.context.processes.signal(server.pid, 'SIGKILL');
    }
  }
}

/** The host of the migration's source URL ('' when it has none): what the source's certificate must name. */
function sourceHost(m: DestinationMigration): string {
  return URL.canParse(m.sourceUrl) ? new URL(m.sourceUrl).hostname.replace(/^\[|\]$/g, '') : '';
}

/** The inode of a descriptor, or of a Node socket's; undefined when it cannot be read. */
function socketInode(socket: PassedFd): number | undefined {
  try {
    return fstatSync(typeof socket === 'number' ? socket : socketDescriptor(socket)).ino;
  } catch {
    return undefined;
  }
}

/** What a switchover from a source is learned under: its host. */
export function switchoverKey(sourceUrl: string): string {
  return `switchover:${URL.canParse(sourceUrl) ? new URL(sourceUrl).host : sourceUrl}`;
}

function discardAction(why: string): string {
  if (why === 'the restore failed' || why === 'the lazy-pages daemon did not start') return why;
  return 'the restored copy was discarded';
}

/** Where forget() kept the CRIU logs of a failed step, if it kept any. */
function keptLogs(context: AgentContext, m: DestinationMigration): string | undefined {
  const kept = join(context.dataDir, 'failed', m.id);
  return existsSync(kept) ? kept : undefined;
}

/** The page data of every round of the migration, as its page servers wrote it. */
function pageImageBytes(dir: string): number {
  let total = 0;
  for (const round of readdirSync(dir)) {
    const roundDir = join(dir, round);
    if (statSync(roundDir).isDirectory()) total += pageBytes(roundDir);
  }
  return total;
}
