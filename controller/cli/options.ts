import { Option } from 'commander';

/** Options several commands share, made anew for each (commander keeps state in an Option). */
export const insecureOption = () =>
  new Option('--insecure', 'allow plaintext ws:// agents (started with --insecure): no encryption, no authentication');

export const criuOption = () =>
  new Option('--criu <path>', 'the CRIU binary to use (default: the project prefix, then the system)').env(
    'FERRY_CRIU',
  );

/** Wraps help text at 95 columns, as the hand-wrapped paragraphs around it. */
export function wrap(text: string): string {
  return text.replace(/(.{1,95})(?:\s+|$)/g, '$1\n').trimEnd();
}
