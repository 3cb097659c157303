"""Load the exported adapter with Hugging Face PEFT and show that it learned the task.

Computes the SFT loss (prompt tokens masked) of a few quickstart samples with the HF base model
alone and with the PEFT adapter mindlora exported; the adapter must lower it.
"""
from __future__ import annotations

import os
import sys

import torch


def main(out: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mindlora.data.dataset import InstructionDataset, collate

    base = AutoModelForCausalLM.from_pretrained(os.path.join(out, "qwen3_tiny_hf"),
                                                torch_dtype=torch.float32).eval()
    data = InstructionDataset(os.path.join(out, "finetune_dataset", "alpaca_add"), 128)
    batch = collate([data[i] for i in range(len(data) - 16, len(data))], pad_id=0)
    with torch.no_grad():
        before = base(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
        tuned = PeftModel.from_pretrained(base, os.path.join(out, "peft_adapter")).eval()
        after = tuned(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    print(f"HF base loss {before:.4f} -> HF + PEFT adapter from mindlora {after:.4f}")
    if not after < before:
        sys.exit("the exported adapter did not lower the loss")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "quickstart_out")
