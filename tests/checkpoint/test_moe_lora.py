"""Expert LoRA adapters through conversion: merge into the base, refusals.

A random adapter (attention targets and every expert's fc1/fc2, non-zero B) is written as a
TP2 x EP2 mindlora adapter and merged (``--lora-load``) into the HF model; the merged HF model's
logits must equal mindlora's model running base + adapter at EP2 and TP2+SP (1e-4), and must
differ from the base's (the adapter does something). An adapter of another expert count is
refused by name. HF PEFT export/import: tests/checkpoint/test_moe_peft.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mindlora.checkpoint.hf_format import HFSource
from mindlora.checkpoint.loading import load_model_shard
from mindlora.checkpoint.reshard import MegatronWriter
from mindlora.config import LoRAConfig, ModelConfig, ParallelConfig
from mindlora.models.families.base import target_module_paths, target_shape
from tests.checkpoint.conftest import hf_logits, run_convert
from tests.checkpoint.test_moe import IDS, moe_models  # noqa: F401  (module fixture)
from tests.distributed.harness import spawn

LORA = LoRAConfig(r=4, alpha=8.0, target_modules=("all-linear",))


def write_moe_adapter(root: str, cfg: ModelConfig, lora: LoRAConfig, tp: int, ep: int,
                      seed: int = 3) -> str:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i in range(cfg.num_layers):
        layer = {}
        for target in lora.target_modules:
            out_f, in_f = target_shape(cfg, target)
            for path in target_module_paths(cfg, target):
                layer[f"{path}.lora_A.weight"] = torch.randn(lora.r, in_f, generator=g) * 0.2
                layer[f"{path}.lora_B.weight"] = torch.randn(out_f, lora.r, generator=g) * 0.2
        layers[i] = layer
    writer = MegatronWriter(root, "adapter", cfg, tp, 1, None, torch.float32, lora, ep=ep)
    writer.plan({i: {k: v.to("meta") for k, v in layer.items()} for i, layer in layers.items()},
                {})
    for i, layer in layers.items():
        writer.write_layer(i, layer)
    writer.finish()
    return root


def _body(rank, world, cfg, base, adapter, expected, layouts):
    from megatron.core import parallel_state as ps

    from mindlora.models.builder import build_model
    from mindlora.parallel.layout import pad_vocab
    from mindlora.runtime import init_parallel

    for tp, ep, sp in layouts:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                  sequence_parallel=sp)
        init_parallel(parallel)
        (model,) = build_model(cfg, parallel, LORA)
        model.eval()
        args = (tp, ps.get_tensor_model_parallel_rank(), list(range(cfg.num_layers)), True, True,
                False, pad_vocab(cfg.vocab_size, tp))
        kw = dict(ep_size=ep, ep_rank=ps.get_expert_model_parallel_rank())
        state = load_model_shard(base, *args, **kw)
        state.update(load_model_shard(adapter, *args, **kw))
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
        with torch.no_grad():
            out = model(IDS, torch.arange(IDS.shape[1]).expand(IDS.shape[0], -1), None)
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)[..., : cfg.vocab_size]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0,
                                   msg=lambda m: f"TP{tp} EP{ep}: {m}")


def test_merged_expert_adapter_matches_mindlora_with_adapter(moe_models, tmp_path):  # noqa: F811
    src = moe_models["qwen3_moe"]
    cfg = HFSource(src, "qwen3-moe").model_config
    base, merged = str(tmp_path / "base"), str(tmp_path / "merged")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=base,
                model_type_hf="qwen3-moe")
    adapter = write_moe_adapter(str(tmp_path / "adapter"), cfg, LORA, tp=2, ep=2)
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=base, lora_load=adapter,
                save_dir=merged)
    expected = hf_logits(merged, IDS)
    assert (expected - hf_logits(src, IDS)).abs().max() > 1e-2, "the adapter changes nothing"
    spawn(_body, 2, cfg, base, adapter, expected, [(1, 2, False), (2, 1, True)])


def test_moe_adapter_refusals(moe_models, tmp_path):  # noqa: F811
    src8, src4 = moe_models["qwen3_moe"], moe_models["qwen3_moe_nonorm"]
    cfg4 = HFSource(src4, "qwen3-moe").model_config
    adapter4 = write_moe_adapter(str(tmp_path / "a4"), cfg4, LORA, tp=1, ep=1)
    with pytest.raises(ValueError, match="adapter num_moe_experts=4 but the base model has 8"):
        run_convert(load_model_type="hf", save_model_type="hf", load_dir=src8,
                    model_type_hf="qwen3-moe", lora_load=adapter4, save_dir=str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()
