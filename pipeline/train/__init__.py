"""Stage 2, shards -> a trained network: sources, stages and the loader, augmentation, loss,
metrics, the loop, the run, reports, checkpoints, the runtime."""
