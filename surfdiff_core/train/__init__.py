"""Training: datasets from the store, the denoiser + MLFF training loop, checkpoints."""
