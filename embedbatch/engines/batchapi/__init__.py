"""The OpenAI Batch API path: plan → submit → poll → ingest, with state on disk."""
