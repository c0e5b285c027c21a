"""The realtime engine: ``/v1/embeddings`` at the account's rate limit (see :mod:`.pipeline`)."""
