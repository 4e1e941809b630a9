import { chmodSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fileNeeds, fileProblems } from '../../agent/files.js';

const scratch = mkdtempSync(join(tmpdir(), 'ferry-files-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

describe('the files a process needs', () => {
  it('are found for this very process: its executable, its libraries, its working directory', () => {
    const needs = fileNeeds([process.pid], { carried: [], shared: [] });
    const kinds = new Map(needs.map((n) => [n.path, n.kind]));
    expect(kinds.get(process.execPath)).toBe('exe');
    expect(needs.some((n) => n.kind === 'map' && /libc\.so|ld-linux/.test(n.path ?? ''))).toBe(true);
    expect(needs.find((n) => n.kind === 'exe')?.sha256).toMatch(/^[0-9a-f]{64}$/);
    // Nothing under /proc, /sys or /dev but what names the tree by PID.
    expect(needs.every((n) => !/^\/(sys|dev)\//.test(n.path ?? ''))).toBe(true);
  });

  it('are marked carried under the roots the workload carries', () => {
    const needs = fileNeeds([process.pid], { carried: [process.cwd()], shared: [] });
    expect(needs.find((n) => n.kind === 'cwd')?.how).toBe('carried');
  });

  it('differ on a destination that is missing one, or has it with another size, mode, owner or content', () => {
    const file = join(scratch, 'data');
    writeFileSync(file, 'twelve bytes');
    const st = statSync(file);
    const need = {
      path: file,
      kind: 'open',
      size: st.size,
      mode: st.mode,
      uid: st.uid,
      gid: st.gid,
      how: '',
      sha256: '',
    };
    expect(fileProblems([need])).toEqual([]);
    expect(fileProblems([{ ...need, path: join(scratch, 'absent') }])[0]?.problem).toBe('is missing');
    expect(fileProblems([{ ...need, size: 10 }])[0]?.problem).toBe('has 12 bytes, 10 there');
    chmodSync(file, 0o600);
    expect(fileProblems([need])[0]?.problem).toMatch(/^has mode 600, 6\d\d there$/);
    chmodSync(file, st.mode);
    expect(fileProblems([{ ...need, uid: st.uid + 1 }])[0]?.problem).toMatch(/^is owned by \d+:\d+, \d+:\d+ there$/);
    expect(fileProblems([{ ...need, kind: 'exe', sha256: '0'.repeat(64) }])[0]?.problem).toBe(
      'has other content (another build of it)',
    );
    expect(fileProblems([{ ...need, mode: (st.mode & 0o7777) | 0o040000 }])[0]?.problem).toBe(
      'is a file here, a directory there',
    );
    // Carried files and deleted ones are not looked for; a /proc path of the tree always differs.
    expect(fileProblems([{ ...need, path: join(scratch, 'absent'), how: 'carried' }])).toEqual([]);
    expect(fileProblems([{ ...need, path: join(scratch, 'absent'), kind: 'deleted' }])).toEqual([]);
    expect(fileProblems([{ ...need, path: '/proc/1/status', kind: 'proc' }])[0]?.problem).toMatch(/by its PID/);
  });
});
