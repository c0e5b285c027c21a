-- Example schema: text chunks with a pgvector column filled by embedbatch.
-- text-embedding-3-small gives 1536 dims; for 3072-d models use halfvec(3072), since HNSW on
-- `vector` stops at 2,000 dims (pgvector README, 2026).
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS knowledge_chunks (
    id         bigint PRIMARY KEY,
    family_id  text NOT NULL,
    content    text NOT NULL,
    embedding  vector(1536)
);

CREATE INDEX IF NOT EXISTS knowledge_chunks_family_idx ON knowledge_chunks (family_id);
