"""Bad LoRA / parallel settings fail early with one ValueError naming each flag and its value."""
from __future__ import annotations

import math

import pytest

from mindlora.config import LORA_TARGETS, LoRAConfig, ModelConfig, ParallelConfig
from mindlora.models.builder import transformer_config


def _model(**kw) -> ModelConfig:
    base = dict(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96,
                num_attention_heads=8, num_query_groups=4, vocab_size=64)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("r", [0, -2])
def test_rank_must_be_positive(r: int) -> None:
    with pytest.raises(ValueError, match=rf"--lora-r \({r}\) must be > 0"):
        LoRAConfig(r=r)


def test_unknown_target_is_named() -> None:
    with pytest.raises(ValueError, match=r"--lora-target-modules: unknown target\(s\) "
                                         r"\['linear_qk'\]"):
        LoRAConfig(target_modules=("linear_qkv", "linear_qk"))


def test_every_problem_reported_at_once() -> None:
    with pytest.raises(ValueError) as err:
        LoRAConfig(r=0, alpha=-1.0, dropout=1.5, init_a="xavier", target_modules=("fc",))
    text = str(err.value)
    for piece in ("--lora-r (0)", "--lora-alpha (-1.0)", "--lora-dropout (1.5)",
                  "--lora-init-a (xavier)", "['fc']"):
        assert piece in text, (piece, text)


def test_all_linear_expands_in_canonical_order() -> None:
    assert LoRAConfig(target_modules=("all-linear",)).target_modules == LORA_TARGETS
    mixed = LoRAConfig(target_modules=("linear_fc2", "all-linear", "linear_qkv"))
    assert mixed.target_modules == LORA_TARGETS
    assert LoRAConfig(target_modules=("linear_fc2", "linear_qkv")).target_modules == (
        "linear_qkv", "linear_fc2")


def test_scaling_plain_and_rslora() -> None:
    assert LoRAConfig(r=16, alpha=32.0).scaling == 2.0
    assert LoRAConfig(r=16, alpha=32.0, use_rslora=True).scaling == 32.0 / math.sqrt(16)


def test_heads_groups_ffn_must_divide_by_tp() -> None:
    model = _model(num_attention_heads=9, num_query_groups=3, ffn_hidden_size=90, hidden_size=72)
    with pytest.raises(ValueError) as err:
        ParallelConfig(tensor_model_parallel_size=4).check_model(model)
    text = str(err.value)
    for piece in ("num_attention_heads (9) must be a multiple of --tensor-model-parallel-size (4)",
                  "num_query_groups (3) must be a multiple of --tensor-model-parallel-size (4)",
                  "ffn_hidden_size (90) must be a multiple of --tensor-model-parallel-size (4)"):
        assert piece in text, (piece, text)


def test_query_groups_alone_not_divisible() -> None:
    # 8 heads split over TP=4, but 2 key/value groups cannot be: GQA needs groups % tp == 0.
    with pytest.raises(ValueError, match=r"num_query_groups \(2\) must be a multiple of "
                                         r"--tensor-model-parallel-size \(4\)"):
        ParallelConfig(tensor_model_parallel_size=4).check_model(_model(num_query_groups=2))


def test_model_build_checks_layout_first() -> None:
    """transformer_config (the first step of build_model) refuses a layout before building."""
    with pytest.raises(ValueError, match=r"num_query_groups \(4\)"):
        transformer_config(_model(), ParallelConfig(tensor_model_parallel_size=8))


def test_bad_parallel_sizes() -> None:
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size \(0\) must be >= 1"):
        ParallelConfig(tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match=r"--pipeline-model-parallel-size \(0\) must be >= 1"):
        ParallelConfig(pipeline_model_parallel_size=0)


def test_target_regex_resolves_to_names() -> None:
    """MindFormers' pet_config style: a regex over module paths (or bare names)."""
    assert LoRAConfig(target_modules=(".*linear_qkv|.*linear_fc2",)).target_modules == (
        "linear_qkv", "linear_fc2")
    assert LoRAConfig(target_modules=(r"decoder\.layers\.\d+\.mlp\..*",)).target_modules == (
        "linear_fc1", "linear_fc2")
    assert LoRAConfig(target_modules=("linear_fc.", "linear_qkv")).target_modules == (
        "linear_qkv", "linear_fc1", "linear_fc2")
    # resolved names survive the metadata round trip unchanged
    cfg = LoRAConfig(target_modules=(".*self_attention.*",))
    assert LoRAConfig.from_dict(cfg.to_dict()).target_modules == ("linear_qkv", "linear_proj")


def test_target_regex_errors_are_named() -> None:
    with pytest.raises(ValueError, match=r"regex 'decoder\\\\.layers\\\\.0\\\\..\*' selects "
                                         r"\['linear_qkv', 'linear_proj', 'linear_fc1', "
                                         r"'linear_fc2'\] in some layers only"):
        LoRAConfig(target_modules=(r"decoder\.layers\.0\..*",))
    with pytest.raises(ValueError, match=r"unknown target '\(': .* nor a valid regex"):
        LoRAConfig(target_modules=("(",))
    with pytest.raises(ValueError, match=r"unknown target\(s\) \['.\*q_proj'\]: .* matches no "
                                         r"module"):
        LoRAConfig(target_modules=(".*q_proj",))
