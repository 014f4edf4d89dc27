"""tracekit inspect_cmd (placeholder until its issue lands)."""
