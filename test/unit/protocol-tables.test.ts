import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { DESTINATION_TRANSITIONS, SOURCE_TRANSITIONS, type Transition } from '../../src/migration/index.js';
import { projectRoot } from '../../src/paths.js';
import { CONTROL_BODIES, REQUESTS } from '../../src/wire/index.js';
import { BODY_NAMES } from '../../src/wire/messages.js';

describe('the request table', () => {
  it('names every body of the Envelope oneof in ferry.proto, as a request, its reply or a control body', () => {
    const requests = Object.keys(REQUESTS);
    const replies = Object.values(REQUESTS).map((r) => r.reply);
    const declared = new Set<string>([...requests, ...replies, ...CONTROL_BODIES]);
    expect([...declared].sort()).toEqual([...BODY_NAMES].sort());
    // A body is a request or a reply, never both: the table would otherwise answer itself.
    expect(requests.filter((r) => replies.includes(r as never))).toEqual([]);
  });
});

/** The edges of the Mermaid state diagram under `heading` in docs/migration.md: "from --> to". */
function diagram(heading: string): string[] {
  const doc = readFileSync(join(projectRoot(), 'docs', 'migration.md'), 'utf8');
  const section = doc.slice(doc.indexOf(heading));
  const block = /```mermaid\n([\s\S]*?)```/.exec(section)?.[1] ?? '';
  return block
    .split('\n')
    .map((line) => /^\s*(\[\*\]|\w+)\s*-->\s*(\[\*\]|\w+)/.exec(line))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => `${m[1]} --> ${m[2]}`)
    .sort();
}

function edges(initial: string, transitions: readonly Transition[], finals: readonly string[]): string[] {
  const unique = new Set([`[*] --> ${initial}`, ...transitions.map((t) => `${t.from} --> ${t.to}`)]);
  for (const f of finals) unique.add(`${f} --> [*]`);
  return [...unique].sort();
}

describe('docs/migration.md', () => {
  it('draws the source states exactly as the table has them', () => {
    expect(diagram('### The source')).toEqual(edges('dumping', SOURCE_TRANSITIONS, ['committed', 'aborted']));
  });

  it('draws the destination states exactly as the table has them', () => {
    expect(diagram('### The destination')).toEqual(
      edges('prepared', DESTINATION_TRANSITIONS, ['resumed', 'discarded']),
    );
  });
});
