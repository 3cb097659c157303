"""mindlora.lora."""
