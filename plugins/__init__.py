"""metriclab built-in plugins: encoders, losses, miners, datasets and optimizers."""
