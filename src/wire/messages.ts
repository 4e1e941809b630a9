/**
 * Ferry's wire messages (proto/ferry.proto), as typed by protobufjs. Only
 * src/wire touches the generated module; everything else uses these names.
 */
import { readFileSync } from 'node:fs';
import { ferry } from '../generated/ferry.js';

export const Envelope = ferry.Envelope;
export const PeerRole = ferry.PeerRole;

/** Bumped on any change that an older peer would misread. */
export const PROTOCOL_VERSION = 1;

/** Largest frame either end accepts. Image chunks are at most IMAGE_CHUNK_BYTES. */
export const MAX_FRAME_BYTES = 2 * 1024 * 1024;
export const IMAGE_CHUNK_BYTES = 1024 * 1024;

export type EnvelopeMessage = ferry.IEnvelope;
export type Body = Omit<ferry.IEnvelope, 'id' | 'replyTo'>;
export type BodyName = Exclude<keyof ferry.IEnvelope, 'id' | 'replyTo'>;
export type BodyOf<K extends BodyName> = NonNullable<ferry.IEnvelope[K]>;

export type Facts = ferry.IFacts;
export type ProcessFacts = ferry.IProcessFacts;
export type SocketFacts = ferry.ISocketFacts;
export type FileNeed = ferry.IFileNeed;
export type FileProblem = ferry.IFileProblem;
export type DumpStatsMessage = ferry.IDumpStats;
export type ProgressMessage = ferry.IProgress;
export type WorkloadInfo = ferry.IWorkloadInfo;
export type WorkloadSpec = ferry.IWorkloadSpec;
export type ImageFile = ferry.IImageFile;
export type MigrationRecord = ferry.IMigrationRecord;
export type NodeFacts = ferry.INodeFacts;

/**
 * The bodies an envelope can carry: the members of ferry.proto's Envelope
 * oneof, read from the schema the build writes next to the generated
 * module (the static module keeps that list to itself).
 */
export const BODY_NAMES: readonly BodyName[] = envelopeOneof();

function envelopeOneof(): BodyName[] {
  const schema = JSON.parse(readFileSync(new URL('../generated/ferry.json', import.meta.url), 'utf8')) as {
    nested: { ferry: { nested: { Envelope: { oneofs: { body: { oneof: string[] } } } } } };
  };
  return schema.nested.ferry.nested.Envelope.oneofs.body.oneof as BodyName[];
}

/** The one body an envelope carries. */
export function bodyName(envelope: EnvelopeMessage): BodyName | undefined {
  const present = BODY_NAMES.filter((name) => envelope[name] !== undefined && envelope[name] !== null);
  return present.length === 1 ? present[0] : undefined;
}
