"""Data-parallel training on Ray Train: `paddle_backend` (Paddle collectives for Ray Train) and
`driver` (the trainer, its Ray Data feed, train-all). Builds on stfpm.training."""
