"""tracekit record (placeholder until its issue lands)."""
