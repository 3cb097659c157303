"""Small typed configs: the model's shape, LoRA, and the parallel layout.

Each config validates itself in ``__post_init__`` and reports *every* problem at once, naming the
flag and value, so a user fixes a launcher in one edit instead of one per run. Training and data
options live beside the code that uses them (``mindlora.training.args``, ``mindlora.data``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
COLUMN_TARGETS = ("linear_qkv", "linear_fc1")
ROW_TARGETS = ("linear_proj", "linear_fc2")


def fail_if(errors: list[str], what: str) -> None:
    """Raise one ValueError listing every collected problem (no-op when there are none)."""
    if errors:
        raise ValueError(f"invalid {what}:\n  - " + "\n  - ".join(errors))


@dataclass
class ModelConfig:
    """Architecture of a decoder-only model (Llama / Qwen2 / Qwen3 style).

    Filled from a Hugging Face ``config.json`` by a family file, stored inside mindlora
    checkpoints, so that training never asks the user for shape flags they could get wrong.
    """

    family: str
    """Model family key: ``llama``, ``qwen2`` or ``qwen3`` (see mindlora.models.families)."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (grouped-query attention); equals num_attention_heads for MHA."""
    vocab_size: int
    """The tokenizer's vocabulary as the HF model has it (unpadded)."""
    kv_channels: Optional[int] = None
    """Per-head dimension; defaults to hidden_size // num_attention_heads."""
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    rope_scaling: Optional[dict] = None
    """HF ``rope_scaling`` dict (only ``rope_type: llama3`` is supported)."""
    norm_epsilon: float = 1e-6
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    num_moe_experts: Optional[int] = None
    """Routed experts per layer (mixture of experts); None = dense MLP."""
    moe_ffn_hidden_size: Optional[int] = None
    """Hidden size of one expert's MLP (HF ``moe_intermediate_size``)."""
    moe_router_topk: int = 2
    """Experts each token is routed to (HF ``num_experts_per_tok``)."""
    moe_router_pre_softmax: bool = False
    """Softmax over all experts before top-k, weights not renormalised (HF ``norm_topk_prob``
    false); False = softmax over the top-k logits, i.e. renormalised weights."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing loss weight (HF ``router_aux_loss_coef``)."""

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    def __post_init__(self) -> None:
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        errors = []
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "kv_channels"):
            if getattr(self, name) <= 0:
                errors.append(f"{name} ({getattr(self, name)}) must be positive")
        if self.num_query_groups > 0 and self.num_attention_heads % self.num_query_groups:
            errors.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                          f"of num_query_groups ({self.num_query_groups})")
        if self.num_moe_experts is not None:
            if self.num_moe_experts < 1 or not self.moe_ffn_hidden_size:
                errors.append(f"num_moe_experts ({self.num_moe_experts}) and moe_ffn_hidden_size "
                              f"({self.moe_ffn_hidden_size}) must be positive")
            elif not 1 <= self.moe_router_topk <= self.num_moe_experts:
                errors.append(f"moe_router_topk ({self.moe_router_topk}) must be in 1.."
                              f"{self.num_moe_experts}")
        if self.rope_scaling and self.rope_scaling.get("rope_type",
                                                       self.rope_scaling.get("type")) != "llama3":
            errors.append(f"rope_scaling ({self.rope_scaling}) is not supported; only llama3")
        fail_if(errors, "model config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        return cls(**d)


TARGET_PATHS = {"linear_qkv": "self_attention.linear_qkv",
                "linear_proj": "self_attention.linear_proj",
                "linear_fc1": "mlp.linear_fc1", "linear_fc2": "mlp.linear_fc2"}
"""Each LoRA target's module path inside ``decoder.layers.N`` of megatron-core's GPTModel."""
EXPERT_PATHS = {"linear_fc1": "mlp.experts.local_experts.{}.linear_fc1",
                "linear_fc2": "mlp.experts.local_experts.{}.linear_fc2"}
"""Module path of expert ``e``'s MLP targets in a mixture-of-experts layer (``.format(e)``)."""
ROUTER_REFUSED = ("LoRA on the MoE router ('router', decoder.layers.N.mlp.router) is not "
                  "implemented: the router stays frozen (docs/moe.md)")


def resolve_targets(specs, errors: list[str]) -> tuple[str, ...]:
    """``--lora-target-modules`` entries -> targets in canonical order (problems go to ``errors``).

    An entry is a target name, ``all-linear``, or a regular expression (MindFormers' pet_config
    style, ``.*linear_qkv|.*linear_fc2``) that must match a whole module path
    ``decoder.layers.N.self_attention.linear_qkv`` (in a MoE layer also every expert's
    ``decoder.layers.N.mlp.experts.local_experts.E.linear_fc1``) or a bare name ``linear_qkv``.
    LoRA goes on the same modules in every layer and expert, so a regex that selects some layers
    or experts only is refused; so is one naming the MoE router (``router``).
    """
    chosen: set[str] = set()
    for spec in specs:
        if spec in LORA_TARGETS:
            chosen.add(spec)
        elif spec in ("router", "gate"):
            errors.append(f"--lora-target-modules {spec}: {ROUTER_REFUSED}")
        elif spec == "all-linear":
            chosen.update(LORA_TARGETS)
        else:
            chosen.update(_regex_targets(spec, errors))
    if not chosen and not errors:
        errors.append("--lora-target-modules must name at least one target")
    return tuple(t for t in LORA_TARGETS if t in chosen)


def _regex_targets(spec: str, errors: list[str]) -> set[str]:
    import re

    try:
        pattern = re.compile(spec)
    except re.error as e:
        errors.append(f"--lora-target-modules: unknown target {spec!r}: not one of "
                      f"{list(LORA_TARGETS)} or all-linear, nor a valid regex ({e})")
        return set()
    if ("router" in spec or "gate" in spec) and (
            pattern.fullmatch("decoder.layers.0.mlp.router") or pattern.fullmatch("router")):
        # a regex naming the router; catch-alls such as ``.*`` keep selecting the linear targets
        errors.append(f"--lora-target-modules: regex {spec!r} matches the router: "
                      f"{ROUTER_REFUSED}")
        return set()
    found, partial, some_experts = set(), [], []
    for target, sub in TARGET_PATHS.items():
        hits = {bool(pattern.fullmatch(f"decoder.layers.{i}.{sub}")) for i in range(1000)}
        if len(hits) == 1 and target in EXPERT_PATHS:  # every expert of a MoE layer
            per_layer = [{bool(pattern.fullmatch(f"decoder.layers.{i}.{EXPERT_PATHS[target]}"
                                                 .format(e))) for e in range(160)}
                         for i in range(64)]
            if any(len(x) > 1 for x in per_layer):
                some_experts.append(target)
                continue
            layers = {x.pop() for x in per_layer}
            if len(layers) > 1:
                partial.append(target)
                continue
            if layers.pop():
                found.add(target)
                continue
        if len(hits) > 1:
            partial.append(target)
        elif hits.pop() or pattern.fullmatch(target):
            found.add(target)
    if partial:
        errors.append(f"--lora-target-modules: regex {spec!r} selects {partial} in some layers "
                      f"only; LoRA goes on the same modules in every layer")
    elif some_experts:
        errors.append(f"--lora-target-modules: regex {spec!r} selects {some_experts} in some "
                      f"experts only; LoRA goes on every expert of a MoE layer")
    elif not found and not some_experts:
        errors.append(f"--lora-target-modules: unknown target(s) [{spec!r}]: not one of "
                      f"{list(LORA_TARGETS)} or all-linear, and as a regex it matches no module "
                      f"(paths are decoder.layers.N.{TARGET_PATHS['linear_qkv']} ...)")
    return found


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters: ``y = base(x) + scaling * B(A(dropout(x)))``."""

    r: int = 8
    """Rank (``--lora-r``)."""
    alpha: float = 16.0
    """Scale numerator (``--lora-alpha``)."""
    dropout: float = 0.0
    """Dropout on the LoRA input only (``--lora-dropout``)."""
    target_modules: tuple[str, ...] = LORA_TARGETS
    """Which megatron-core linears get LoRA, resolved from ``--lora-target-modules`` (names,
    ``all-linear`` or a regex; see :func:`resolve_targets`). Stored resolved in adapter metadata."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)`` (``--lora-use-rslora``)."""
    init_a: str = "kaiming"
    """Init of A: ``kaiming`` (uniform, as HF PEFT) or ``gaussian`` (N(0, 1/r))."""
    fold_collectives: bool = False
    """CCLoRA (``--lora-fusion``): under TP > 1, fold LoRA's collectives into the base layer's
    own (mindlora.lora.fused). Decides nothing at TP = 1, where there is no collective and a
    frozen, unmerged layer always takes the single fused function; routed experts ignore it
    (the token dispatcher owns their communication)."""
    seed: int = 1234
    """Seed of the generator that draws the full (unsharded) A matrices."""
    ranks: dict[str, list[int]] = field(default_factory=dict)
    """Rank-stacked targets (imported PEFT adapters): target -> the ranks of its HF modules in
    order (q, k, v / gate, up / o / down). A is ``[A_q; A_k; A_v]`` and B block-structured: each
    module's output rows use only its own column block (see docs/checkpoint.md). Targets not
    listed have rank ``r`` and one shared A."""
    scalings: dict[str, float] = field(default_factory=dict)
    """Per-target scaling overriding ``alpha / r`` (PEFT ``rank_pattern`` / ``alpha_pattern``)."""
    fixed_scaling: Optional[float] = None
    """The scaling of a per-target config made by :meth:`for_target` (what a layer uses)."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        self.target_modules = resolve_targets(self.target_modules, errors)
        if self.r <= 0:
            errors.append(f"--lora-r ({self.r}) must be > 0")
        if self.alpha <= 0:
            errors.append(f"--lora-alpha ({self.alpha}) must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"--lora-dropout ({self.dropout}) must be in [0, 1)")
        if self.init_a not in ("kaiming", "gaussian"):
            errors.append(f"--lora-init-a ({self.init_a}) must be kaiming or gaussian")
        modules = {"linear_qkv": 3, "linear_fc1": 2, "linear_proj": 1, "linear_fc2": 1}
        for target, ranks in self.ranks.items():
            if target not in self.target_modules or len(ranks) != modules[target] or min(
                    ranks) < 0 or sum(ranks) < 1:
                errors.append(f"ranks[{target!r}] ({ranks}) must give {modules.get(target)} "
                              f"ranks >= 0 (one > 0) of a target in {list(self.target_modules)}")
        fail_if(errors, "LoRA config")

    @property
    def scaling(self) -> float:
        if self.fixed_scaling is not None:
            return self.fixed_scaling
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_of(self, target: str) -> int:
        """Rows of ``target``'s A (the stacked rank for a rank-stacked target)."""
        return sum(self.ranks[target]) if target in self.ranks else self.r

    def scaling_of(self, target: str) -> float:
        return self.scalings.get(target, self.scaling)

    def for_target(self, target: str) -> "LoRAConfig":
        """The config one LoRA layer of ``target`` is built with: its rank and its scaling."""
        return dataclasses.replace(self, r=self.rank_of(target), ranks={}, scalings={},
                                   fixed_scaling=self.scaling_of(target))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["ranks"] = {k: [int(x) for x in v] for k, v in self.ranks.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoRAConfig":
        d = dict(d)
        if "fusion" in d:  # adapter metadata written before the field was renamed
            d["fold_collectives"] = d.pop("fusion")
        d["target_modules"] = tuple(d.get("target_modules", LORA_TARGETS))
        return cls(**d)


@dataclass
class ParallelConfig:
    """The parallel layout: tensor x pipeline (x virtual pipeline) x data parallel."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank (interleaved 1F1B); None = plain 1F1B."""
    sequence_parallel: bool = False
    num_layer_list: Optional[list[int]] = field(default=None)
    """Uneven pipeline split: layers per pipeline stage (``--num-layer-list 10,12,8``)."""
    expert_model_parallel_size: int = 1
    """Expert parallelism (``--expert-model-parallel-size``): the routed experts of every MoE
    layer are split across this many ranks; experts are tensor-parallel like the dense MLP
    (megatron-core's default ``expert_tensor_parallel_size`` = TP)."""
    expert_tensor_parallel_size: Optional[int] = None
    """``--expert-tensor-parallel-size``: only None or TP (expert TP = attention TP). Another
    value is refused: megatron-core 0.16.1 runs it, but mindlora's expert sharding, checkpoints
    and expert LoRA layers split experts by TP (docs/moe.md)."""

    def __post_init__(self) -> None:
        errors = []
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1:
            errors.append(f"--tensor-model-parallel-size ({tp}) must be >= 1")
        if pp < 1:
            errors.append(f"--pipeline-model-parallel-size ({pp}) must be >= 1")
        if self.expert_model_parallel_size < 1:
            errors.append(f"--expert-model-parallel-size ({self.expert_model_parallel_size}) "
                          f"must be >= 1")
        etp = self.expert_tensor_parallel_size
        if etp is not None and etp != tp:
            errors.append(f"--expert-tensor-parallel-size ({etp}) must equal "
                          f"--tensor-model-parallel-size ({tp}): mindlora splits experts over "
                          f"the attention TP group (a separate expert TP size is not "
                          f"implemented; see docs/moe.md)")
        if self.sequence_parallel and tp == 1:
            self.sequence_parallel = False  # Megatron does the same: SP needs TP > 1.
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or pp == 1):
            errors.append(f"virtual pipeline size ({vpp}) needs --pipeline-model-parallel-size "
                          f"> 1 and must be >= 1")
        if self.num_layer_list is not None:
            if len(self.num_layer_list) != pp:
                errors.append(f"--num-layer-list ({','.join(map(str, self.num_layer_list))}) "
                              f"must have --pipeline-model-parallel-size ({pp}) entries")
            if any(n < 1 for n in self.num_layer_list):
                errors.append(f"--num-layer-list ({self.num_layer_list}) entries must be >= 1")
            if vpp is not None:
                errors.append("--num-layer-list cannot be combined with a virtual pipeline")
        fail_if(errors, "parallel config")

    def check_model(self, model: ModelConfig) -> None:
        """Check that this layout can split ``model``; raise one ValueError naming every clash."""
        errors = []
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if model.num_attention_heads % tp:
            errors.append(f"num_attention_heads ({model.num_attention_heads}) must be a multiple "
                          f"of --tensor-model-parallel-size ({tp})")
        if model.num_query_groups % tp:
            errors.append(f"num_query_groups ({model.num_query_groups}) must be a multiple of "
                          f"--tensor-model-parallel-size ({tp})")
        ep = self.expert_model_parallel_size
        if ep > 1 and not model.is_moe:
            errors.append(f"--expert-model-parallel-size ({ep}) needs a mixture-of-experts "
                          f"model; {model.family} is dense")
        if model.is_moe and model.num_moe_experts % ep:
            errors.append(f"num_moe_experts ({model.num_moe_experts}) must be a multiple of "
                          f"--expert-model-parallel-size ({ep})")
        if model.is_moe and model.moe_ffn_hidden_size % tp:
            errors.append(f"moe_ffn_hidden_size ({model.moe_ffn_hidden_size}) must be a multiple "
                          f"of --tensor-model-parallel-size ({tp})")
        if model.ffn_hidden_size % tp and not model.is_moe:
            errors.append(f"ffn_hidden_size ({model.ffn_hidden_size}) must be a multiple of "
                          f"--tensor-model-parallel-size ({tp})")
        if self.num_layer_list is not None:
            if sum(self.num_layer_list) != model.num_layers:
                errors.append(f"--num-layer-list sums to {sum(self.num_layer_list)} but the model "
                              f"has {model.num_layers} layers")
        else:
            chunks = pp * (self.virtual_pipeline_model_parallel_size or 1)
            if model.num_layers % chunks:
                errors.append(f"num_layers ({model.num_layers}) must be a multiple of pipeline "
                              f"stages x virtual stages ({chunks}); or pass --num-layer-list")
        fail_if(errors, "parallel layout for this model")
