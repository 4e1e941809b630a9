/**
 * Points where a test may step in, given to the parts that have them (the
 * agent, the controller's migration, the scheduler) by whoever starts them.
 * Production passes NO_TEST_HOOKS: nothing in the shipped program reads a
 * switch that pauses it, corrupts images or fills a disk. Tests start the
 * same program through test/harness/, which passes hooks that do.
 */

/** Where a party may be paused while a test strikes (kills a party, cuts a link). */
export type PausePoint =
  | 'controller.after-preflight'
  | 'controller.after-held'
  | 'controller.after-restored'
  | 'controller.after-commit'
  | 'source.after-hold'
  | 'source.before-commit-answer'
  | 'source.after-commit'
  | 'destination.during-images'
  | 'destination.after-restore-held'
  | 'destination.before-resume-answer'
  | 'schedule.run';

/** Where an agent may be made to fail from inside, with what the fault needs to act there. */
export interface FaultContexts {
  /** Before the destination starts a round's page server: the images file system. */
  'destination.page-server': { imagesRoot: string };
  /** A round's images arrived, before their checksums are checked. */
  'destination.images-done': { roundDir: string; files: readonly { name: string; size: number }[] };
  /** Before the restore reads the final round's images. */
  'destination.before-restore': { roundDir: string };
  /** The source is frozen inside CRIU's dump: the service whose worker dumps. */
  'source.frozen': { criuServicePid: number | undefined; imagesDir: string };
}
export type FaultPoint = keyof FaultContexts;

export interface TestHooks {
  pause(point: PausePoint): Promise<void>;
  fault<P extends FaultPoint>(point: P, context: FaultContexts[P]): void;
}

export const NO_TEST_HOOKS: TestHooks = {
  pause: () => Promise.resolve(),
  fault: () => undefined,
};
