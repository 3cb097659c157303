"""Small random models for the generation tests, converted and with an adapter, plus HF references.

The Llama test model is float32 with a wide initialisation (std 0.1 instead of HF's 0.02): its
next-token logits then differ by far more than float32 rounding between the top two candidates,
so greedy decoding is not decided by a near-tie and token-for-token parity is a sharp test
(a wrong mask, position or shard changes the tokens within a step or two).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from mindlora.checkpoint.hf_format import HFSource
from mindlora.config import LoRAConfig
from tests.checkpoint.conftest import random_adapter, run_convert, write_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 320
MAX_POS = 128
LORA = LoRAConfig(r=4, alpha=8.0, target_modules=("all-linear",))


def build_llama(path: str, vocab: int = VOCAB, seed: int = 0, layers: int = 4) -> str:
    """A random float32 Llama (GQA 4/2 heads) saved as an HF folder; weights N(0, 0.1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=MAX_POS, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@dataclass
class Assets:
    hf: str
    """HF folder of the base model."""
    mg: str
    """Converted base checkpoint (TP1 PP1; tests load it into other layouts)."""
    adapter: str
    """Adapter checkpoint written as training does (TP2 x PP2 layout)."""
    peft: str
    """The adapter exported to HF PEFT."""


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    root = tmp_path_factory.mktemp("gen")
    hf = build_llama(str(root / "hf"))
    mg = run_convert(load_model_type="hf", save_model_type="mg", load_dir=hf,
                     save_dir=str(root / "mg"), model_type_hf="llama")
    cfg = HFSource(hf, "llama").model_config
    adapter = write_adapter(str(root / "adapter"), cfg, LORA, random_adapter(cfg, LORA, seed=5),
                            tp=2, pp=2)
    peft = str(root / "peft")
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=hf, model_type_hf="llama",
                lora_load=adapter, save_lora_to_hf=True, save_dir=peft, lora_r=LORA.r)
    return Assets(hf, mg, adapter, peft)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> str:
    """The toy byte-level BPE (306 ids, ChatML specials; fits the test model's 320)."""
    from mindlora.data.toy import build_toy_tokenizer

    return build_toy_tokenizer(str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=300)


# Chat prompts for the CLI and launcher tests (text: the toy tokenizer's ids).
PROMPTS = [
    {"prompt": "What is 12 + 7?", "id": "a"},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "hello"},
                  {"role": "assistant", "content": "hi there"},
                  {"role": "user", "content": "and 3 + 4?"}]},
    {"prompt": "def add(a, b):"},
]


def prompt_ids(lengths=(5, 11, 3), seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf_dir: str, prompts: list[list[int]], max_new: int,
              peft_dir: str | None = None) -> list[list[int]]:
    """Hugging Face ``generate`` (greedy, one prompt at a time) token ids; with ``peft_dir`` the
    PEFT adapter is merged into the model first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if peft_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, peft_dir).merge_and_unload().eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            res = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new, min_new_tokens=max_new,
                                 pad_token_id=0, eos_token_id=None)
            out.append(res[0, len(p):].tolist())
    return out


def top2_margin(hf_dir: str, prompts: list[list[int]], answers: list[list[int]]) -> float:
    """Smallest gap between the best and second-best logit along the HF greedy paths."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    gaps = []
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            logits = model(torch.tensor([p + a[:-1]])).logits[0, len(p) - 1:]
            top = logits.topk(2, dim=-1).values
            gaps.append(float((top[:, 0] - top[:, 1]).min()))
    return min(gaps)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
