"""Offline replay of routing traces against cache/prefetch policies. Never imports torch."""
