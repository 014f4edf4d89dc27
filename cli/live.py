"""tracekit live (placeholder until its issue lands)."""
