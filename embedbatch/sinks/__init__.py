"""Sinks: Parquet shards with a manifest, and pgvector columns."""
