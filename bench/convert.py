"""Conversion throughput and peak memory on a generated ~1 GB Llama model, beside a plain copy.

    python bench/convert.py [--work DIR] [--layers 8] [--keep]

Writes a random bf16 model (GQA, untied, ~0.98 GB in 5 safetensors shards), then times, each in
a fresh process: a plain copy of the same shard bytes (the peer), hf -> mg at TP1xPP1 and
TP2xPP2, mg -> mg (TP2xPP2 -> TP1xPP4) and mg -> hf, ``--repeat`` times each (median and range
reported: disk write-back on a shared VM makes single runs noisy). Throughput = model bytes /
wall time.
Peak memory = the process's VmHWM (peak resident set) minus its resident set after imports, so
it counts what the conversion itself holds; compare it with the model size and the largest layer.
Each step starts after ``os.sync()`` with its input in the page cache (warm, for the copy and
the conversions alike); no step fsyncs its output.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def make_model(directory: str, layers: int) -> tuple[int, int]:
    """Random bf16 Llama (hidden 2048, 16 heads / 4 KV groups, ffn 5632, vocab 32000) in HF layout.

    Returns (total bytes, bytes of the largest layer).
    """
    import torch
    from safetensors.torch import save_file

    from mindlora.config import ModelConfig
    from mindlora.models.families import get_family

    cfg = ModelConfig(family="llama", num_layers=layers, hidden_size=2048, ffn_hidden_size=5632,
                      num_attention_heads=16, num_query_groups=4, vocab_size=32000)
    h, f, kv = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_query_groups * cfg.kv_channels
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    groups = [{"model.embed_tokens.weight": rnd(cfg.vocab_size, h)}]
    layer_bytes = 0
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"input_layernorm": (h,), "post_attention_layernorm": (h,),
                  "self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
                  "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
                  "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
        layer = {f"{p}{name}.weight": rnd(*shape) for name, shape in shapes.items()}
        layer_bytes = max(layer_bytes, sum(t.numel() * 2 for t in layer.values()))
        groups.append(layer)
    groups.append({"model.norm.weight": rnd(h), "lm_head.weight": rnd(cfg.vocab_size, h)})
    shards: list[dict] = [{}]
    for group in groups:  # ~2 layers per shard, as HF's 5GB shards hold a few layers of a 7B
        if sum(t.numel() * 2 for t in shards[-1].values()) > 150e6:
            shards.append({})
        shards[-1].update(group)
    os.makedirs(directory)
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * 2 for t in shard.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(get_family("llama").hf_config_from_model(cfg, "bfloat16"), fh)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
        json.dump({"model_max_length": 4096}, fh)
    return total, layer_bytes


def child(step: str, src: str, dst: str, extra: list[str]) -> None:
    """One measured step in this (fresh) process; prints a JSON line."""
    from mindlora.checkpoint.convert import ConvertOptions, convert

    start = time.perf_counter()
    import torch._dynamo  # noqa: F401  (a one-off import torch's meta kernels trigger; see below)

    startup = time.perf_counter() - start
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    if step == "copy":
        os.makedirs(dst)
        for name in sorted(os.listdir(src)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    else:
        load, save = step.split("->")
        kw = json.loads(extra[0]) if extra else {}
        convert(ConvertOptions(load_model_type=load, save_model_type=save, load_dir=src,
                               save_dir=dst, model_type_hf="llama", progress=False, **kw))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "startup": startup,
                      "peak_mib": (_rss_kib("VmHWM") - base) / 1024}))


def measure(step: str, src: str, dst: str, **kw) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", step, src, dst, json.dumps(kw)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--repeat", type=int, default=3, help="runs per step (median reported)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], args.child[3:])
        return
    work = args.work or tempfile.mkdtemp(prefix="mindlora-bench-")
    hf = os.path.join(work, "hf")
    total, layer = make_model(hf, args.layers)
    print(f"model: {total / 1e9:.2f} GB bf16, {args.layers} layers, largest layer "
          f"{layer / 2**20:.0f} MiB, embedding {32000 * 2048 * 2 / 2**20:.0f} MiB")
    steps = [("plain copy of the shards", "copy", hf, "copy", {}),
             ("hf -> mg TP1xPP1", "hf->mg", hf, "mg11", {}),
             ("hf -> mg TP2xPP2", "hf->mg", hf, "mg22", dict(target_tensor_parallel_size=2,
                                                              target_pipeline_parallel_size=2)),
             ("mg TP2xPP2 -> mg TP1xPP4", "mg->mg", "mg22", "mg14",
              dict(target_pipeline_parallel_size=4)),
             ("mg TP2xPP2 -> hf", "mg->hf", "mg22", "hf_back", dict(max_shard_size="200MB"))]
    print(f"{'step':<28} {'seconds':>8} {'GB/s':>7} {'range GB/s':>12} {'peak MiB':>9}")
    startups = []
    for title, step, src, dst, kw in steps:
        src = src if os.path.isabs(src) else os.path.join(work, src)
        runs = []
        for attempt in range(args.repeat):
            if attempt:
                shutil.rmtree(os.path.join(work, dst))
            os.sync()  # start every run with no dirty pages left by the previous one
            runs.append(measure(step, src, os.path.join(work, dst), **kw))
        secs = sorted(r["seconds"] for r in runs)
        median = secs[len(secs) // 2]
        spread = f"{total / 1e9 / secs[-1]:.2f}-{total / 1e9 / secs[0]:.2f}"
        print(f"{title:<28} {median:>8.2f} {total / 1e9 / median:>7.2f} {spread:>12} "
              f"{max(r['peak_mib'] for r in runs):>9.0f}")
        startups += [r["startup"] for r in runs]
    print(f"(not counted above: a one-off {max(startups):.1f} s per process importing "
          f"torch._dynamo, which torch's meta kernels pull in when the output is planned)")
    if not args.keep and not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
