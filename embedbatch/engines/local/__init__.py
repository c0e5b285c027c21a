"""The local path: SentenceTransformer models on the user's own CPU or GPU."""
