/**
 * Ferry's protocol over WebSocket: binary protobuf frames (proto/ferry.proto),
 * request/response with ids, progress events, heartbeats, validation on
 * arrival. Knows nothing about CRIU.
 */
export { WireConnection } from './connection.js';
export type { RequestHandler, RequestOptions, WireConnectionOptions } from './connection.js';
export { PeerGoneError, RemoteError, WireProtocolError } from './errors.js';
export {
  bodyName,
  Envelope,
  IMAGE_CHUNK_BYTES,
  MAX_FRAME_BYTES,
  PROTOCOL_VERSION,
  type Body,
  type BodyName,
  type BodyOf,
  type DumpStatsMessage,
  type EnvelopeMessage,
  type Facts,
  type ImageFile,
  type MigrationRecord,
  type NodeFacts,
  type ProcessFacts,
  type SocketFacts,
  type FileNeed,
  type FileProblem,
  type ProgressMessage,
  type WorkloadInfo,
  type WorkloadSpec,
} from './messages.js';
export {
  agentsMaySend,
  CONTROL_BODIES,
  isRequestName,
  replyBody,
  requestBody,
  REQUESTS,
  type ReplyName,
  type ReplyOf,
  type RequestHandlers,
  type RequestName,
} from './requests.js';
export { WireServer } from './server.js';
export type { WireServerOptions } from './server.js';
export {
  DEFAULT_HOLD_MS,
  HOLD_MS,
  IMAGE_NAME,
  LABEL_KEY,
  MAX_IMAGE_FILES,
  MAX_PID,
  MIGRATION_ID,
  PEER_NAME,
  ROUND_NAME,
  validateEnvelope,
  WORKLOAD_NAME,
} from './validate.js';
