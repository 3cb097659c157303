"""mindlora: LoRA fine-tuning on megatron-core under any TP x PP x DP layout."""

__version__ = "0.1.0"
