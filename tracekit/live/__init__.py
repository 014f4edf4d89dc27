"""tracekit live: a GPU executor that runs the replay controller's decisions with real copies and real FFNs.

Modules: store (pinned expert store), slots (GPU slot pool), copier (copy stream, events, chunks),
ffn (expert math on the [F, 3, H] layout), executor (trace-driven loop), backend (model-driven
ExpertsInterface backend), models (tiny / Mixtral-shaped models), calibrate (hardware profile),
tracecut (truncate a trace to N decode tokens / L layers).
"""
