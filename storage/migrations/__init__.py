"""Alembic migrations for the Speech Pipe schema (run with `speechpipe db upgrade`)."""
