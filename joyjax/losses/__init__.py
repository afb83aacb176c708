"""Pure loss functions: each returns (scalar loss, metrics dict) and knows nothing of the optimizer."""
