"""Sinks: write committed shards into databases (pgvector), resumable by chunk."""
