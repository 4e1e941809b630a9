/** The destination of a migration: page servers, the image stream, the held restore, its resume or discard. */
export { DestinationRole, switchoverKey, type Sender } from './destination.js';
export { isDestination, type DestinationMigration } from './migration.js';
