"""Search over stored vectors: exact streaming search over shards, and pgvector queries."""
