"""The SQLite files: the outbox, poll cursors, the command store and the audit log."""
