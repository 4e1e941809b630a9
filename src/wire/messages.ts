/**
 * Ferry's wire messages (proto/ferry.proto), as typed by protobufjs. Only
 * src/wire touches the generated module; everything else uses these names.
 */
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
export type DumpStatsMessage = ferry.IDumpStats;
export type ProgressMessage = ferry.IProgress;
export type WorkloadInfo = ferry.IWorkloadInfo;
export type WorkloadSpec = ferry.IWorkloadSpec;
export type ImageFile = ferry.IImageFile;
export type MigrationRecord = ferry.IMigrationRecord;
export type NodeFacts = ferry.INodeFacts;

export const BODY_NAMES: readonly BodyName[] = [
  'hello',
  'welcome',
  'failure',
  'ack',
  'factsQuery',
  'facts',
  'cpuCheck',
  'prepareDestination',
  'pageServerStart',
  'pageServerStarted',
  'preDumpRound',
  'roundDone',
  'finalDump',
  'dumpHeld',
  'imageChunk',
  'imagesDone',
  'restore',
  'restored',
  'commit',
  'committed',
  'resume',
  'resumed',
  'abort',
  'runWorkload',
  'workload',
  'listWorkloads',
  'workloadList',
  'progress',
  'outcomeQuery',
  'outcome',
  'recover',
  'migrationList',
  'statusQuery',
  'nodeQuery',
  'nodeFacts',
  'setDraining',
];

/** The one body an envelope carries. */
export function bodyName(envelope: EnvelopeMessage): BodyName | undefined {
  const present = BODY_NAMES.filter((name) => envelope[name] !== undefined && envelope[name] !== null);
  return present.length === 1 ? present[0] : undefined;
}
