import { createHash } from 'node:crypto';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { IMAGE_STREAM_LIMITS, ImageReceiver, ImageTransferError } from '../../agent/images.js';

const scratch = mkdtempSync(join(tmpdir(), 'ferry-images-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

/** A migration's directory with its round inside, and a file beside the migration that nothing may touch. */
let migrationDir: string;
let roundDir: string;
let outside: string;
beforeEach(() => {
  const base = mkdtempSync(join(scratch, 'case-'));
  migrationDir = join(base, 'm-1');
  roundDir = join(migrationDir, 'final');
  mkdirSync(roundDir, { recursive: true });
  outside = join(base, 'outside');
  writeFileSync(outside, 'untouched');
});

const sha256 = (data: Uint8Array): string => createHash('sha256').update(data).digest('hex');

function refused(write: () => unknown, message: RegExp): void {
  expect(write).toThrow(ImageTransferError);
  expect(write).toThrow(message);
}

describe('the destination agent writing a streamed image', () => {
  it('refuses an image name that climbs out of the migration directory', () => {
    const receiver = new ImageReceiver(roundDir);
    for (const name of ['../outside', '../../outside', '..', '.', 'a/../../outside', `${outside}`, '/etc/passwd']) {
      refused(() => receiver.write(name, 0, Buffer.from('owned')), /refused image name/);
    }
    refused(() => receiver.write('core.img\0../x', 0, Buffer.from('owned')), /refused image name/);
    expect(readFileSync(outside, 'utf8')).toBe('untouched');
    expect(readdirSync(roundDir)).toEqual([]);
  });

  it('does not follow a symlink planted in the round directory, at the first chunk or a later one', () => {
    symlinkSync(outside, join(roundDir, 'parent'));
    const receiver = new ImageReceiver(roundDir);
    refused(() => receiver.write('parent', 0, Buffer.from('owned')), /already exists/);

    receiver.write('core-1.img', 0, Buffer.from('first'));
    rmSync(join(roundDir, 'core-1.img'));
    symlinkSync(outside, join(roundDir, 'core-1.img'));
    refused(() => receiver.write('core-1.img', 5, Buffer.from('owned')), /already exists/);
    expect(readFileSync(outside, 'utf8')).toBe('untouched');
  });

  it('never overwrites a file already there, such as the page server’s pages', () => {
    writeFileSync(join(roundDir, 'pages-1.img'), 'pages');
    const receiver = new ImageReceiver(roundDir);
    refused(() => receiver.write('pages-1.img', 0, Buffer.from('owned')), /already exists/);
    expect(readFileSync(join(roundDir, 'pages-1.img'), 'utf8')).toBe('pages');
  });

  it('takes chunks only in order, without gaps or repeats', () => {
    const receiver = new ImageReceiver(roundDir);
    refused(() => receiver.write('core-1.img', 4096, Buffer.from('late')), /offset 4096, expected 0/);
    receiver.write('core-1.img', 0, Buffer.from('abc'));
    refused(() => receiver.write('core-1.img', 0, Buffer.from('abc')), /offset 0, expected 3/);
    refused(() => receiver.write('core-1.img', 2 ** 50, Buffer.from('x')), /expected 3/);
    receiver.write('core-1.img', 3, Buffer.from('def'));
    expect(readFileSync(join(roundDir, 'core-1.img'), 'utf8')).toBe('abcdef');
  });

  it('stops a stream that goes past its size bound', () => {
    const receiver = new ImageReceiver(roundDir, { ...IMAGE_STREAM_LIMITS, maxBytes: 10 });
    receiver.write('a.img', 0, Buffer.alloc(6));
    refused(() => receiver.write('b.img', 0, Buffer.alloc(5)), /exceeds 10 B/);
    expect(existsSync(join(roundDir, 'b.img'))).toBe(false);
  });

  it('stops a stream of more files than a manifest may list', () => {
    const receiver = new ImageReceiver(roundDir, { ...IMAGE_STREAM_LIMITS, maxFiles: 3 });
    for (const name of ['a', 'b', 'c']) receiver.write(name, 0, Buffer.from(name));
    refused(() => receiver.write('d', 0, Buffer.from('d')), /more than 3 image files/);
    // Announcing an empty file it never received counts too.
    refused(() => receiver.verify([{ name: 'e', size: 0, sha256: sha256(Buffer.alloc(0)) }]), /more than 3/);
  });

  it('refuses a chunk that would leave the images file system without its reserve', () => {
    const receiver = new ImageReceiver(roundDir, { ...IMAGE_STREAM_LIMITS, reserveBytes: Number.MAX_SAFE_INTEGER });
    refused(() => receiver.write('core-1.img', 0, Buffer.alloc(1)), /less than .* free/);
  });

  it('checks sizes and checksums of the manifest, reading large files in pieces', () => {
    const receiver = new ImageReceiver(roundDir);
    const big = Buffer.alloc(3 * 1024 * 1024 + 17, 7);
    for (let offset = 0; offset < big.length; offset += 1024 * 1024) {
      receiver.write('pagemap-1.img', offset, big.subarray(offset, offset + 1024 * 1024));
    }
    expect(receiver.verify([{ name: 'pagemap-1.img', size: big.length, sha256: sha256(big) }])).toEqual({
      files: 1,
      bytes: big.length,
    });
    refused(
      () => receiver.verify([{ name: 'pagemap-1.img', size: big.length, sha256: 'f'.repeat(64) }]),
      /checksum mismatch/,
    );
    refused(() => receiver.verify([{ name: 'pagemap-1.img', size: 5, sha256: sha256(big) }]), /received .* expected 5/);
    refused(() => receiver.verify([{ name: 'never-sent.img', size: 5, sha256: sha256(big) }]), /received -1 bytes/);
  });
});
