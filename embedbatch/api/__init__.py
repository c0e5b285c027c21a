"""The one boundary to provider APIs: the official OpenAI SDK (files, batches, embeddings)."""
