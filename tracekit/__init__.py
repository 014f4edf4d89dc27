"""tracekit: record, replay and live-test expert caching policies for offloaded MoE LLMs."""

__version__ = "0.1.0"
