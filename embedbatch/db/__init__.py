"""The one boundary to external databases (asyncpg for PostgreSQL)."""
