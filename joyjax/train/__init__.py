"""Training: state, the pure step function, the loop, checkpoints, metrics, sampling."""
