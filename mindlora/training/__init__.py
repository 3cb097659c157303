"""mindlora.training."""
