/**
 * Typed views of CRIU's RPC messages, generated from proto/criu-rpc.proto
 * by protobufjs (scripts/build). Only this module and the client touch the
 * generated code.
 */
import { criu } from '../generated/criu.js';

export const RpcRequest = criu.criu_req;
export const RpcResponse = criu.criu_resp;
export const RequestType = criu.criu_req_type;
export const NetworkLockMethod = criu.criu_network_lock_method;
export const PreDumpMode = criu.criu_pre_dump_mode;
export const StatsEntry = criu.stats_entry;

export type RpcRequestMessage = criu.Icriu_req;
export type RpcResponseMessage = criu.criu_resp;
export type RpcOptions = criu.Icriu_opts;
export type RequestTypeValue = criu.criu_req_type;

/** "DUMP" for RequestType.DUMP; "type 42" for a number CRIU does not define. */
export function requestTypeName(type: number): string {
  return (criu.criu_req_type as unknown as Record<number, string | undefined>)[type] ?? `type ${type}`;
}

/** True when the decoded message actually carried the field (proto2 presence). */
export function has<T extends object>(message: T, field: keyof T): boolean {
  return Object.prototype.hasOwnProperty.call(message, field);
}
