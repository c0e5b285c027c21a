-- Build the vector index after loading: every row written into an indexed column is a graph
-- insert (~100 rows/s measured here, against ~26k rows/s without the index).
CREATE INDEX IF NOT EXISTS knowledge_chunks_embedding_hnsw
    ON knowledge_chunks USING hnsw (embedding vector_cosine_ops);
