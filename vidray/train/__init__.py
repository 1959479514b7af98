"""Stage 3, training on Ray Train: the one worker loop (loop: lifecycle; epoch: the step loop;
epoch_report: report + checkpoint) and its fine-tuning task (finetune), the driver that starts a
fine-tuning run (driver), the data path into a worker (ingest; where a jpeg store decodes, host threads or the GPU: decoding), augmentation, optimiser and schedule, step telemetry,
metrics, the run lifecycle (runs: new, interrupted, finished, restart) and what a driver prints and logs of
each epoch (follow).
"""
