"""Converted checkpoints drive mindlora's GPTModel to the Hugging Face model's logits.

Each family (GQA untied, tied, qkv bias, q/k norm) is converted HF -> Megatron for TP1, TP2 and
PP2 and loaded with ``load_model_shard`` (also across layouts, TP2 x PP2 -> TP1); adapters are
checked both ways against HF PEFT: a mindlora adapter exported with ``--save-lora-to-hf``, and a
PEFT-made adapter imported with ``--load-lora-from-hf``. All checks run in one spawned group of
two gloo ranks.

Tolerance 1e-4 absolute on float32 logits of magnitude ~1: the two implementations order their
float32 sums differently (fused qkv vs separate projections, TP partial sums), which moves logits
by ~1e-6; a misplaced head, a wrong norm or a mis-scaled adapter moves them by >1e-2.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.distributed as dist

from mindlora.checkpoint import describe
from mindlora.checkpoint.loading import load_model_shard
from mindlora.checkpoint.hf_format import HFSource
from mindlora.config import LoRAConfig, ModelConfig, ParallelConfig
from tests.checkpoint.conftest import (SPECS, hf_logits, random_adapter, run_convert,
                                       write_adapter)
from tests.checkpoint.test_lora import _peft_adapter
from tests.distributed.harness import spawn

ATOL = 1e-4
LAYOUTS = {"TP1": (1, 1), "TP2": (2, 1), "PP2": (1, 2)}
IDS = torch.randint(0, 255, (2, 8), generator=torch.Generator().manual_seed(11))


@dataclass
class Case:
    """One model load + forward to compare with ``expected`` logits."""

    name: str
    cfg: ModelConfig
    base: str
    tp: int
    pp: int
    expected: torch.Tensor
    lora: Optional[LoRAConfig] = None
    adapter: Optional[str] = None
    perturb: bool = False


def _forward(case: Case, rank: int) -> Optional[torch.Tensor]:
    """Build, load and run the model; the full unpadded logits on the last stage, else None."""
    from megatron.core import parallel_state as ps

    from mindlora.models.builder import build_model
    from mindlora.parallel.layout import chunk_layer_ids, pad_vocab
    from mindlora.runtime import init_parallel

    parallel = ParallelConfig(tensor_model_parallel_size=case.tp,
                              pipeline_model_parallel_size=case.pp)
    init_parallel(parallel)
    (model,) = build_model(case.cfg, parallel, case.lora)
    model.eval()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    first, last = pp_rank == 0, pp_rank == case.pp - 1
    ids = chunk_layer_ids(case.cfg, parallel, pp_rank, 0)
    vocab = pad_vocab(case.cfg.vocab_size, case.tp)
    state = load_model_shard(case.base, case.tp, tp_rank, ids, first, last,
                                case.cfg.tie_word_embeddings, vocab)
    if case.adapter:
        state.update(load_model_shard(case.adapter, case.tp, tp_rank, ids, first, last,
                                         case.cfg.tie_word_embeddings, vocab))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (
        case.name, unexpected, [k for k in missing if not k.endswith("_extra_state")])
    if case.perturb and last:
        with torch.no_grad():
            model.decoder.layers[0].self_attention.linear_qkv.weight[5, 3] += 0.05
    pos = torch.arange(IDS.shape[1]).expand(IDS.shape[0], -1)
    with torch.no_grad():
        if case.pp > 1 and not first:
            hidden = torch.empty(IDS.shape[1], IDS.shape[0], case.cfg.hidden_size)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(IDS, pos, attention_mask=None)
        if not last:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(case.tp)]
    dist.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., : case.cfg.vocab_size]


def _compare(case: Case, logits: torch.Tensor) -> None:
    """The parity check; its AssertionError starts with ``<case name>: Tensor-likes``."""
    torch.testing.assert_close(logits, case.expected, atol=ATOL, rtol=0,
                               msg=lambda m: f"{case.name}: {m}")


def _body(rank: int, world: int, cases: list[Case]) -> None:
    for case in cases:
        logits = _forward(case, rank)  # outside any pytest.raises: a crash is a failure
        if logits is None:  # not the last pipeline stage
            continue
        if case.perturb:  # the comparison can fail: a 0.05 nudge to one weight is caught
            with pytest.raises(AssertionError,
                               match=rf"^{re.escape(case.name)}: Tensor-likes are not close!"):
                _compare(case, logits)
        else:
            _compare(case, logits)


def _convert(src: str, family: str, out: str, tp: int, pp: int) -> str:
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=out,
                model_type_hf=family, target_tensor_parallel_size=tp,
                target_pipeline_parallel_size=pp)
    return out


@pytest.fixture(scope="module")
def all_cases(hf_models, tmp_path_factory) -> list[Case]:
    """Every case, converted once for both tests (conversions and HF forwards take seconds)."""
    tmp_path = tmp_path_factory.mktemp("parity")
    cases = []
    for name in SPECS:
        src, family = hf_models[name], SPECS[name]["family"]
        cfg = HFSource(src, family).model_config
        expected = hf_logits(src, IDS)
        for layout, (tp, pp) in LAYOUTS.items():
            base = _convert(src, family, str(tmp_path / f"{name}_{layout}"), tp, pp)
            cases.append(Case(f"{name} {layout}", cfg, base, tp, pp, expected))
        tp2pp2 = _convert(src, family, str(tmp_path / f"{name}_tp2pp2"), 2, 2)
        cases.append(Case(f"{name} TP2xPP2 checkpoint loaded at TP1", cfg, tp2pp2, 1, 1,
                          expected))

    # mindlora adapter (saved TP2 x PP2) -> PEFT: PEFT logits == mindlora model with the adapter.
    for name in ("qwen2", "qwen3"):
        src, family = hf_models[name], SPECS[name]["family"]
        cfg = HFSource(src, family).model_config
        lora = LoRAConfig(r=4, alpha=8.0, target_modules=("all-linear",),
                          use_rslora=name == "qwen3")
        adapter = write_adapter(str(tmp_path / f"{name}_adapter"), cfg, lora,
                                random_adapter(cfg, lora, seed=2), tp=2, pp=2)
        peft_dir = str(tmp_path / f"{name}_peft")
        run_convert(load_model_type="hf", save_model_type="hf", load_dir=src,
                    model_type_hf=family, lora_load=adapter, save_lora_to_hf=True,
                    save_dir=peft_dir)
        expected = hf_logits(src, IDS, adapter=peft_dir)
        for layout in ("TP2", "PP2"):
            tp, pp = LAYOUTS[layout]
            cases.append(Case(f"{name} adapter -> PEFT, {layout}", cfg,
                              str(tmp_path / f"{name}_{layout}"), tp, pp, expected, lora,
                              adapter))

    # PEFT-made adapter -> mindlora adapter (TP2): mindlora model == PEFT logits.
    src = hf_models["llama"]
    cfg = HFSource(src, "llama").model_config
    peft_dir, imported = str(tmp_path / "made_by_peft"), str(tmp_path / "imported")
    _peft_adapter(src, peft_dir, share_a=True)
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, model_type_hf="llama",
                load_lora_from_hf=peft_dir, save_dir=imported, target_tensor_parallel_size=2)
    lora = LoRAConfig.from_dict(describe.read_checkpoint_meta(imported)[1]["lora_config"])
    expected = hf_logits(src, IDS, adapter=peft_dir)
    for layout in ("TP2", "PP2"):
        tp, pp = LAYOUTS[layout]
        cases.append(Case(f"PEFT -> mindlora adapter, {layout}", cfg,
                          str(tmp_path / f"llama_{layout}"), tp, pp, expected, lora, imported))
    cases.append(Case("perturbed llama TP2", cfg, str(tmp_path / "llama_TP2"), 2, 1,
                      hf_logits(src, IDS), perturb=True))
    return cases


def _tied_pp(case: Case) -> bool:
    return case.cfg.tie_word_embeddings and case.pp > 1


def test_converted_models_match_hf_and_peft(all_cases):
    cases = [c for c in all_cases if not _tied_pp(c)]
    assert len(cases) >= 15 and os.path.isdir(cases[0].base)
    spawn(_body, 2, cases)


def test_tied_embeddings_under_pipeline_parallel(all_cases):
    cases = [c for c in all_cases if _tied_pp(c)]
    assert len(cases) == 3
    spawn(_body, 2, cases)
