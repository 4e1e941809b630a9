/**
 * The CRIU client: a supervised `criu service`, one typed method per RPC
 * request, NOTIFY callbacks, typed errors and the statistics reader. Knows
 * CRIU, not migration.
 */
export {
  resolveCriuBinary,
  criuBinaryVersion,
  parseCriuVersion,
  CRIU_BINARY_ENV,
  CRIU_FLOOR,
  meetsCriuFloor,
} from './binary.js';
export type { CriuBinary, CriuSource, CriuVersionInfo } from './binary.js';
export {
  CriuClient,
  CriuSocketEndpoint,
  socketDescriptor,
  SwrkEndpoint,
  SWRK_FIRST_FD,
  type PassedFd,
} from './client.js';
export type {
  CallOptions,
  CriuEndpoint,
  CriuFeatures,
  CriuVersion,
  DumpOptions,
  DumpResult,
  ImageOptions,
  NotifyEvent,
  NotifyHandler,
  PageServerOptions,
  PageServerResult,
  PageServerTarget,
  PageTls,
  PreDumpOptions,
  ProcessTreeOptions,
  RestoreOptions,
  RestoreResult,
} from './client.js';
export {
  CriuDisconnectedError,
  CriuNotFoundError,
  CriuOperationError,
  CriuProtocolError,
  CriuServiceUnavailableError,
  CriuUnsupportedError,
  ImagesDirError,
  logReason,
  mainReason,
  ProcessNotFoundError,
} from './errors.js';
export {
  LAZY_PAGES_SOCKET,
  LAZY_PIPE_BYTES,
  lazyPagesCopied,
  lazyPipeLimits,
  lazyPortFromLog,
  startLazyPagesDaemon,
} from './lazy.js';
export type { LazyPagesDaemon, LazyPagesDaemonOptions, LazyPipeLimits } from './lazy.js';
export { readLogExcerpt } from './log.js';
export { CriuService } from './service.js';
export type { CriuServiceEvent, CriuServiceOptions, CriuServiceState } from './service.js';
export { decodeStats, readDumpRunId, readDumpStats, readRestoreStats } from './stats.js';
export type { DumpStats, RestoreStats } from './stats.js';
export { SeqpacketConnection, SeqpacketListener } from './transport.js';
export type { Packet, PacketConnection } from './transport.js';
export { seqpacketAddon } from './native.js';
