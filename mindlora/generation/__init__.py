"""mindlora.generation."""
