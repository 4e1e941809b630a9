import { AbortedError } from '../../src/errors.js';
import type { SshTarget } from './ssh.js';

/** One node's work as a list of tasks, each saying whether it changed something. */

/** done: changed something; unchanged: already right; verified: checked, nothing to change; failed. */
export type TaskState = 'done' | 'unchanged' | 'verified' | 'failed';

export interface NodeResult {
  node: string;
  target: string;
  ok: boolean;
  tasks: { task: string; state: TaskState; detail: string }[];
  error?: { code: string; message: string; hint?: string | undefined } | undefined;
  url?: string | undefined;
  ms: number;
}

export type Step = (task: string, state: TaskState, detail: string) => void;

/**
 * Runs one node's work with its task list; a failure ends that node's work
 * only, recorded with its code and hint, so the other nodes go on.
 */
export async function onNode(
  target: SshTarget,
  onStep: ((node: string, step: string) => void) | undefined,
  verb: 'install' | 'uninstall',
  work: (step: Step) => Promise<string | undefined>,
  signal: AbortSignal | undefined,
): Promise<NodeResult> {
  const started = performance.now();
  const tasks: NodeResult['tasks'] = [];
  const step: Step = (task, state, detail) => {
    tasks.push({ task, state, detail });
    onStep?.(target.name, `${{ done: '+', unchanged: '=', verified: '✓', failed: '!' }[state]} ${task}: ${detail}`);
  };
  try {
    if (signal?.aborted === true)
      throw new AbortedError(`${verb} on ${target.name}`, { hint: 'it had not begun there: nothing changed' });
    const url = await work(step);
    return { node: target.name, target: target.text, ok: true, tasks, url, ms: performance.now() - started };
  } catch (error) {
    const e = error as Error & { code?: unknown; hint?: string };
    step(verb, 'failed', e.message);
    const code = typeof e.code === 'string' ? e.code : `${verb.toUpperCase()}_FAILED`;
    return {
      node: target.name,
      target: target.text,
      ok: false,
      tasks,
      error: { code, message: e.message, hint: e.hint },
      ms: performance.now() - started,
    };
  }
}
