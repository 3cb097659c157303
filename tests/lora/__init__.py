"""LoRA layers, sharding, init/merge and whole-model parity tests."""
