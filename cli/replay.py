"""tracekit replay (placeholder until its issue lands)."""
