"""The conversion pipeline behind tools/convert_ckpt.py: source -> (merge) -> sink, layer by layer.

A *source* yields full (TP=1, vocab unpadded) megatron-core tensors one layer at a time: an HF
folder (hf_format.HFSource), a mindlora checkpoint of any layout (reshard.MegatronReader) or a PEFT
adapter (peft_format.PEFTSource). A *sink* writes them: a Megatron layout (reshard.MegatronWriter),
an HF folder (hf_format.HFWriter) or a PEFT adapter (peft_format.PEFTWriter). Every run first
plans the whole output from ``meta`` tensors (so shape errors surface before a byte is written and
sinks can lay out their files), then streams the data. Output goes to a temporary sibling of
``--save-dir`` that is renamed into place only when complete.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from mindlora.checkpoint.hf_format import HFSource, HFWriter, copy_assets, read_hf_config
from mindlora.checkpoint.megatron_lm import KEY_STYLES
from mindlora.checkpoint.peft_format import PEFTSource, PEFTWriter
from mindlora.checkpoint.reshard import HF_ASSETS, MegatronReader, MegatronWriter
from mindlora.checkpoint.safetensors_io import parse_size
from mindlora.config import LoRAConfig, ModelConfig, ParallelConfig, fail_if
from mindlora.lora.factors import merged_weight
from mindlora.models.families import family_names, get_family
from mindlora.models.families.base import target_module_paths, target_shape
from mindlora.runtime.cli import comma_ints, option
from mindlora.runtime.dtypes import SHORT_NAMES

_SHAPE_FIELDS = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "kv_channels", "num_moe_experts", "moe_ffn_hidden_size")


@dataclass
class ConvertOptions:
    """One conversion, as tools/convert_ckpt.py's flags describe it (MindSpeed-LLM spelling).

    The fields are the flags (``load_dir`` -> ``--load-dir``): mindlora.checkpoint.cli builds
    the parser from them.
    """

    load_model_type: str = option(choices=("hf", "mg"))
    """Format of --load-dir: hf (a Hugging Face folder) or mg (a Megatron checkpoint)."""
    save_model_type: str = option(choices=("hf", "mg"))
    """Format to write into --save-dir: hf or mg."""
    save_dir: str = option()
    """Output folder (must not exist or be empty)."""
    load_dir: Optional[str] = None
    """HF model folder, or a mindlora / Megatron-LM / MindSpeed-LLM checkpoint to read."""
    model_type_hf: Optional[str] = option(None, choices=family_names)
    """Model family (required for --load-model-type hf)."""
    target_tensor_parallel_size: int = 1
    """Tensor-parallel size of the mg output."""
    target_pipeline_parallel_size: int = 1
    """Pipeline-parallel size of the mg output."""
    target_expert_parallel_size: int = 1
    """Mixture-of-experts models: split the routed experts over this many ranks."""
    num_layer_list: Optional[list[int]] = option(None, type=comma_ints)
    """Uneven pipeline split, layers per stage, e.g. 10,12,8."""
    lora_load: Optional[str] = None
    """Adapter checkpoint (mindlora or MindSpeed-LLM LoRA) to merge or export."""
    lora_r: Optional[int] = None
    """Checked against the adapter's own r."""
    lora_alpha: Optional[float] = None
    """Checked against the adapter's own alpha."""
    lora_target_modules: Optional[list[str]] = None
    """Checked against the adapter's own targets (names, all-linear or a regex)."""
    save_lora_to_hf: bool = False
    """Write --lora-load as an HF PEFT adapter into --save-dir."""
    load_lora_from_hf: Optional[str] = option(None, metavar="DIR")
    """Import an HF PEFT adapter as a mindlora adapter checkpoint."""
    params_dtype: Optional[str] = option(None, choices=tuple(SHORT_NAMES))
    """Cast floating tensors to bf16, fp16 or fp32 (default: keep the source dtype)."""
    max_shard_size: str = "5GB"
    """HF output shard size (e.g. 2GB)."""
    progress: bool = option(True, flag="--no-progress", help="no progress bar")
    """Show a progress bar (``--no-progress`` turns it off)."""
    hf_cfg_dir: Optional[str] = option(None, metavar="DIR")
    """HF model folder whose config.json completes a Megatron-LM / MindSpeed-LLM checkpoint's
    args (rope scaling, true vocab size); its tokenizer files are copied on mg -> hf."""
    lora_key_style: str = option("mindlora", choices=KEY_STYLES)
    """Adapter keys on mg output: mindlora (lora_A.weight) or MindSpeed's lora_A.default.weight."""
    base_model_name_or_path: Optional[str] = None
    """adapter_config.json's base_model_name_or_path on --save-lora-to-hf (default: config.json's
    _name_or_path, else the --load-dir folder name)."""

    def validate(self) -> None:
        """Collect every flag problem and raise once."""
        errors = []
        for flag, value in (("--load-model-type", self.load_model_type),
                            ("--save-model-type", self.save_model_type)):
            if value not in ("hf", "mg"):
                errors.append(f"{flag} ({value}) must be hf or mg")
        if self.lora_key_style not in KEY_STYLES:
            errors.append(f"--lora-key-style ({self.lora_key_style}) must be one of "
                          f"{list(KEY_STYLES)}")
        if self.hf_cfg_dir and not os.path.isfile(os.path.join(self.hf_cfg_dir, "config.json")):
            errors.append(f"--hf-cfg-dir {self.hf_cfg_dir} has no config.json")
        if self.params_dtype is not None and self.params_dtype not in SHORT_NAMES:
            errors.append(f"--params-dtype ({self.params_dtype}) must be one of "
                          f"{list(SHORT_NAMES)}")
        if not self.load_dir and not (self.save_lora_to_hf and self.lora_load):
            errors.append("--load-dir is required")
        if self.load_model_type == "hf" and self.load_dir and not self.model_type_hf:
            errors.append("--model-type-hf is required with --load-model-type hf")
        if self.save_lora_to_hf and not self.lora_load:
            errors.append("--save-lora-to-hf needs --lora-load (the adapter to export)")
        if self.load_lora_from_hf and (self.lora_load or self.save_lora_to_hf):
            errors.append("--load-lora-from-hf cannot be combined with --lora-load or "
                          "--save-lora-to-hf")
        if self.load_lora_from_hf and self.save_model_type != "mg":
            errors.append("--load-lora-from-hf writes a mindlora adapter: use --save-model-type mg")
        save = os.path.abspath(self.save_dir)
        for flag, d in (("--load-dir", self.load_dir), ("--lora-load", self.lora_load),
                        ("--load-lora-from-hf", self.load_lora_from_hf)):
            if d and os.path.abspath(d) == save:
                errors.append(f"--save-dir must differ from {flag} ({d})")
        if os.path.exists(save) and (not os.path.isdir(save) or os.listdir(save)):
            errors.append(f"--save-dir {self.save_dir} exists and is not empty; remove it or "
                          f"choose another (conversion never overwrites)")
        try:
            parse_size(self.max_shard_size)
        except ValueError as e:
            errors.append(str(e))
        fail_if(errors, "convert_ckpt flags")


@contextlib.contextmanager
def staged_dir(save_dir: str) -> Iterator[str]:
    """A temporary sibling of ``save_dir`` that becomes ``save_dir`` only if the block succeeds."""
    save_dir = os.path.abspath(save_dir)
    parent = os.path.dirname(save_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(save_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if os.path.isdir(save_dir):
            os.rmdir(save_dir)  # validated empty
        os.rename(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge_lora(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor],
               lora_config: LoRAConfig, where: str, dtype: Optional[torch.dtype] = None
               ) -> dict[str, torch.Tensor]:
    """``W + scaling * B @ A`` for every target (every expert's), in float32, cast once to
    ``dtype`` (default: W's dtype), so a bf16 base merged for fp32 output is not rounded to bf16
    on the way. ``lora`` holds one layer's factors; the model config decides the module paths."""
    out = dict(base)
    paths = sorted(k[: -len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight"))
    for path in paths:
        target = path.rsplit(".", 1)[-1]
        w = base[f"{path}.weight"]
        a, b = lora[f"{path}.lora_A.weight"], lora[f"{path}.lora_B.weight"]
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: {target} A {tuple(a.shape)} / B {tuple(b.shape)} do not "
                             f"fit the base weight {tuple(w.shape)}")
        out[f"{path}.weight"] = merged_weight(w, a, b, lora_config.scaling_of(target), dtype)
    return out


def check_adapter(adapter: Any, base: Optional[ModelConfig], opts: ConvertOptions,
                  flag: str, where: str) -> None:
    """The adapter fits the base model and agrees with any --lora-* flags given."""
    if adapter.kind != "adapter":
        raise ValueError(f"{flag} {where} holds base weights, not an adapter")
    errors = []
    cfg, lora = adapter.model_config, adapter.lora_config
    if base is not None:
        for name in _SHAPE_FIELDS:
            if getattr(cfg, name) != getattr(base, name):
                errors.append(f"adapter {name}={getattr(cfg, name)} but the base model has "
                              f"{getattr(base, name)}")
    if opts.lora_r is not None and opts.lora_r != lora.r:
        errors.append(f"--lora-r {opts.lora_r} but the adapter has r={lora.r}")
    if opts.lora_alpha is not None and float(opts.lora_alpha) != lora.alpha:
        errors.append(f"--lora-alpha {opts.lora_alpha} but the adapter has alpha={lora.alpha}")
    if opts.lora_target_modules:
        wanted = LoRAConfig(target_modules=tuple(opts.lora_target_modules)).target_modules
        if wanted != lora.target_modules:
            errors.append(f"--lora-target-modules {' '.join(wanted)} but the adapter targets "
                          f"{' '.join(lora.target_modules)}")
    layer0 = adapter.full_layer(0, meta=True)
    for target in lora.target_modules:
        out_f, in_f = target_shape(cfg, target)
        path = target_module_paths(cfg, target)[-1]
        a, b = layer0.get(f"{path}.lora_A.weight"), layer0.get(f"{path}.lora_B.weight")
        if a is None or b is None:
            errors.append(f"layer 0 has no {target} factors although the adapter targets it")
        elif tuple(a.shape) != (lora.rank_of(target), in_f) or tuple(b.shape) != (
                out_f, lora.rank_of(target)):
            r = lora.rank_of(target)
            errors.append(f"layer 0 {target}: A {tuple(a.shape)}, B {tuple(b.shape)}; rank {r} "
                          f"expects A ({r}, {in_f}), B ({out_f}, {r})")
    fail_if(errors, f"adapter {flag} {where}")


def _cast(tensors: dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> dict:
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def transfer(source: Any, sink: Any, merge: Optional[Any] = None,
             dtype: Optional[torch.dtype] = None, progress: bool = True,
             where: str = "--lora-load") -> None:
    """Plan ``sink`` from meta tensors, then stream every global tensor and layer into it."""
    from tqdm import tqdm

    def produce(i: int, meta: bool) -> dict[str, torch.Tensor]:
        full = source.full_layer(i, meta=meta)
        if merge is not None:
            full = merge_lora(full, merge.full_layer(i, meta=meta), merge.lora_config, where,
                              dtype)
        return _cast(full, dtype)

    num_layers = source.model_config.num_layers
    keys = source.global_keys()
    sink.plan({i: produce(i, True) for i in range(num_layers)},
              _cast({k: source.full_global(k, meta=True) for k in keys}, dtype))
    for key in keys:
        sink.write_global(key, _cast({key: source.full_global(key)}, dtype)[key])
    for i in tqdm(range(num_layers), desc="converting layers", unit="layer",
                  disable=not progress):
        sink.write_layer(i, produce(i, False))
    sink.finish()


def open_base(opts: ConvertOptions) -> Any:
    """The source --load-dir names (HF folder or mindlora checkpoint), family checked."""
    if opts.load_model_type == "hf":
        return HFSource(opts.load_dir, opts.model_type_hf)
    reader = MegatronReader(opts.load_dir, hf_config_dir=opts.hf_cfg_dir)
    family = reader.model_config.family
    if opts.model_type_hf and opts.model_type_hf != family:
        raise ValueError(f"--model-type-hf {opts.model_type_hf} does not match --load-dir "
                         f"{opts.load_dir}, a {family} checkpoint")
    return reader


def _target_layout(opts: ConvertOptions, cfg: ModelConfig) -> None:
    try:
        ParallelConfig(tensor_model_parallel_size=opts.target_tensor_parallel_size,
                       pipeline_model_parallel_size=opts.target_pipeline_parallel_size,
                       num_layer_list=opts.num_layer_list,
                       expert_model_parallel_size=opts.target_expert_parallel_size
                       ).check_model(cfg)
    except ValueError as e:
        raise ValueError(str(e).replace("--tensor-model-parallel-size",
                                        "--target-tensor-parallel-size")
                         .replace("--pipeline-model-parallel-size",
                                  "--target-pipeline-parallel-size")
                         .replace("--expert-model-parallel-size",
                                  "--target-expert-parallel-size")) from None


def _mg_writer(root: str, kind: str, cfg: ModelConfig, opts: ConvertOptions,
               dtype: torch.dtype, lora: Optional[LoRAConfig]) -> MegatronWriter:
    return MegatronWriter(root, kind, cfg, opts.target_tensor_parallel_size,
                          opts.target_pipeline_parallel_size, opts.num_layer_list, dtype, lora,
                          ep=opts.target_expert_parallel_size,
                          key_style=opts.lora_key_style if kind == "adapter" else "mindlora")


def _hf_assets(base: Any) -> tuple[Optional[dict], Optional[str]]:
    assets = base.hf_assets_dir()
    config = read_hf_config(assets) if assets and os.path.isfile(
        os.path.join(assets, "config.json")) else None
    return config, assets


def base_model_name(opts: ConvertOptions, base: Any) -> Optional[str]:
    """adapter_config's ``base_model_name_or_path``: the flag, else config.json's
    ``_name_or_path`` (unless a local absolute path), else the base folder's name."""
    if opts.base_model_name_or_path:
        return opts.base_model_name_or_path
    assets = base.hf_assets_dir() if base is not None else None
    config = read_hf_config(assets) if assets and os.path.isfile(
        os.path.join(assets, "config.json")) else {}
    name = config.get("_name_or_path")
    if name and not os.path.isabs(name):
        return name
    if opts.load_dir:
        return os.path.basename(os.path.normpath(opts.load_dir))
    return None


def convert(opts: ConvertOptions) -> str:
    """Run one conversion; return the save directory. See the module docstring for the flow."""
    opts.validate()
    dtype = SHORT_NAMES[opts.params_dtype] if opts.params_dtype else None
    base = open_base(opts) if opts.load_dir else None
    base_cfg = base.model_config if base is not None else None
    merge, source = None, base
    if opts.save_lora_to_hf:
        source = MegatronReader(opts.lora_load, hf_config_dir=opts.hf_cfg_dir)
        check_adapter(source, base_cfg, opts, "--lora-load", opts.lora_load)
    elif opts.load_lora_from_hf:
        family = get_family(base_cfg.family)
        source = PEFTSource(opts.load_lora_from_hf, family, base_cfg)
        check_adapter(source, base_cfg, opts, "--load-lora-from-hf", opts.load_lora_from_hf)
    elif opts.lora_load:
        merge = MegatronReader(opts.lora_load, hf_config_dir=opts.hf_cfg_dir)
        check_adapter(merge, base_cfg, opts, "--lora-load", opts.lora_load)
    if source.kind == "adapter" and opts.save_model_type == "hf" and not opts.save_lora_to_hf:
        raise ValueError(f"{opts.load_dir} is an adapter: export it with --save-lora-to-hf, or "
                         f"merge it with --lora-load into a base model")
    cfg = source.model_config
    out_dtype = dtype or source.params_dtype
    family = get_family(cfg.family)
    if opts.save_model_type == "mg" and not opts.save_lora_to_hf:
        _target_layout(opts, cfg)  # fail before creating the staging directory
    with staged_dir(opts.save_dir) as tmp:
        if opts.save_lora_to_hf:
            sink = PEFTWriter(tmp, family, cfg, source.lora_config, dtype,
                              base_model_name(opts, base))
        elif opts.save_model_type == "mg":
            sink = _mg_writer(tmp, source.kind, cfg, opts, out_dtype, source.lora_config)
        else:
            config, assets = _hf_assets(base)
            sink = HFWriter(tmp, family, cfg, parse_size(opts.max_shard_size), out_dtype,
                            config, assets)
        transfer(source, sink, merge, dtype, opts.progress)
        if isinstance(sink, MegatronWriter) and source.kind == "base":
            assets = source.hf_assets_dir()
            if assets:
                os.makedirs(os.path.join(tmp, HF_ASSETS))
                copy_assets(assets, os.path.join(tmp, HF_ASSETS))
    return os.path.abspath(opts.save_dir)
