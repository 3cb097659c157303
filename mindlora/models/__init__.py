"""mindlora.models."""
