/** The source of a migration: pre-copy rounds, the held final dump, its commit or rollback; post-copy's serving source. */
export { SourceRole, statsMessage, type ControllerLink } from './source.js';
export { isSource, type SourceMigration } from './migration.js';
