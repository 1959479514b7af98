"""Stage 3, training on Ray Train: the worker loop (worker), the driver that starts it (driver),
the data path into a worker (ingest), augmentation, optimiser and schedule, step telemetry,
metrics, and the run lifecycle (runs: new, interrupted, finished, restart).
"""
