"""``bench/train.py --device cuda``: LoRA training on one GPU, mindlora beside HF transformers +
PEFT, in one run: tokens/s, model TFLOP/s, MFU and peak memory.

Qwen3-8B shapes by default (36 layers, hidden 4096, GQA 32/8 heads of 128, ffn 12288, vocab
151936, q/k RMSNorm), random bf16 weights (nothing is downloaded), sequence 4096, LoRA r 16 on
every linear (q/k/v, o, gate/up, down), SDPA (flash) attention on both sides, micro-batch 1,
``--batch`` micro-batches per optimizer step, AdamW over the float32 LoRA factors. The two sides
do not share weight values (speed does not depend on them); they share shapes, samples, batch,
sequence length, rank, targets and optimizer. FLOPs: ``bench/flops.py``, written out in
docs/performance.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from flops import Shapes, peak_tflops, train_flops_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QWEN3_8B = dict(family="qwen3", num_layers=36, hidden_size=4096, ffn_hidden_size=12288,
                num_attention_heads=32, num_query_groups=8, kv_channels=128, vocab_size=151936,
                max_position_embeddings=40960, rotary_base=1000000.0, norm_epsilon=1e-6,
                qk_layernorm=True, tie_word_embeddings=False)
TINY = dict(QWEN3_8B, num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
            num_query_groups=2, kv_channels=64, vocab_size=4096)

WRITE_BASE = r"""
import sys, torch
sys.path.insert(0, ROOT)
from mindlora.checkpoint import megatron_format as fmt
from mindlora.config import ModelConfig
from tests.training.fixtures import full_state
root, cfg = sys.argv[1], ModelConfig(**__import__("json").loads(sys.argv[2]))
sd = {k: v.cpu() for k, v in full_state(cfg, 0, sys.argv[3], torch.bfloat16).items()}
meta = fmt.build_meta("base", cfg, 1, 1, None, {"model": list(range(cfg.num_layers))},
                      cfg.vocab_size, torch.bfloat16)
fmt.write_rank_file(fmt.rank_file_path(root, "release", 0, 0, 1),
                    {"model": sd, "checkpoint_version": fmt.CHECKPOINT_VERSION,
                     "iteration": 1, "mindlora": meta})
fmt.write_tracker(root, "release")
""".replace("ROOT", repr(ROOT))

HF_CHILD = r"""
import json, resource, sys, time, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen3Config
sys.path.insert(0, ROOT)
from mindlora.data.dataset import InstructionDataset, collate
from mindlora.training.batches import SampleOrder
a = json.loads(sys.argv[1])
dev = a["device"]
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
torch.manual_seed(0)
with torch.device(dev):
    model = AutoModelForCausalLM.from_config(Qwen3Config(**a["hf_config"]),
                                             torch_dtype=torch.bfloat16, attn_implementation="sdpa")
model = get_peft_model(model, LoraConfig(r=a["rank"], lora_alpha=2 * a["rank"], lora_dropout=0.0,
                                         target_modules=a["targets"]))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ds = InstructionDataset(a["prefix"], a["seq_length"])
order = SampleOrder(len(ds), 1234)  # the sample order mindlora.train walks (--seed 1234)
times, first = [], None
for step in range(a["steps"]):
    sync()
    t = time.perf_counter()
    total = 0.0
    for m in range(a["batch"]):  # micro-batch 1, as mindlora's --micro-batch-size 1
        b = collate([ds[order[step * a["batch"] + m]]], pad_id=0, seq_length=a["seq_length"])
        out = model(input_ids=b["input_ids"].to(dev, non_blocking=True),
                    labels=b["labels"].to(dev, non_blocking=True))
        (out.loss / a["batch"]).backward()
        total += out.loss.detach() / a["batch"]
    opt.step(); opt.zero_grad(set_to_none=True)
    sync()
    times.append((time.perf_counter() - t) * 1000)
    first = float(total) if first is None else first
tail = sorted(times[a["warmup"]:])
peak = (torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps({"ms": tail[len(tail) // 2], "peak_mb": peak, "loss0": first}))
""".replace("ROOT", repr(ROOT))


def hf_config(shapes: dict) -> dict:
    """The same architecture as a transformers ``Qwen3Config``."""
    return dict(hidden_size=shapes["hidden_size"], intermediate_size=shapes["ffn_hidden_size"],
                num_hidden_layers=shapes["num_layers"],
                num_attention_heads=shapes["num_attention_heads"],
                num_key_value_heads=shapes["num_query_groups"], head_dim=shapes["kv_channels"],
                vocab_size=shapes["vocab_size"],
                max_position_embeddings=shapes["max_position_embeddings"],
                rope_theta=shapes["rotary_base"], rms_norm_eps=shapes["norm_epsilon"],
                tie_word_embeddings=shapes["tie_word_embeddings"])


def flops_per_token(shapes: dict, rank: int, seq_length: int) -> dict:
    s = Shapes(**{k: shapes[k] for k in Shapes.__dataclass_fields__})
    return train_flops_per_token(s, rank, seq_length)


def main_cuda(args, run_mindlora, write_sft_data, hf_targets, device: str = "cuda") -> dict:
    """Set up the model and data, run HF+PEFT and mindlora in turn, print the table.

    ``device="cpu"`` runs the same steps on the CPU (tests/bench smoke-test this script there,
    at ``--tiny`` size, since no GPU is at hand when it is written). Returns the figures.
    """
    import tempfile
    import time

    import torch

    shapes = TINY if args.tiny else QWEN3_8B
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", MINDLORA_DEVICE="cpu")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = args.peak_tflops or peak_tflops(name)
    flops = flops_per_token(shapes, args.rank, args.seq_length)
    work = tempfile.mkdtemp(prefix="mindlora-bench-", dir=args.workdir)
    t = time.time()
    subprocess.run([sys.executable, "-c", WRITE_BASE, os.path.join(work, "mg"),
                    json.dumps(shapes), device], check=True, env=env)
    prefix = os.path.join(work, "data", "sft")
    write_sft_data(prefix, shapes["vocab_size"], args)
    print(f"{name}: {'tiny' if args.tiny else 'Qwen3-8B shapes'}, bf16, {args.batch} x "
          f"{args.seq_length} tokens per step (micro-batch 1), r={args.rank} all linear, SDPA "
          f"(set-up {time.time() - t:.1f} s)", flush=True)
    print(f"FLOPs per token: frozen 4N {flops['frozen']:.4g} + LoRA 6N {flops['lora']:.4g} + "
          f"attention {flops['attention']:.4g} = {flops['total']:.4g}", flush=True)
    payload = json.dumps({"hf_config": hf_config(shapes), "prefix": prefix, "rank": args.rank,
                          "targets": hf_targets, "steps": args.steps, "batch": args.batch,
                          "seq_length": args.seq_length, "warmup": args.warmup,
                          "device": device})
    out = subprocess.run([sys.executable, "-c", HF_CHILD, payload], check=True, env=env,
                         capture_output=True, text=True).stdout
    hf = json.loads(out.strip().splitlines()[-1])
    print(f"HF+PEFT {hf['ms']:.1f} ms/step", flush=True)
    ml = run_mindlora(work, None, prefix, args, env, convert=False)
    print(f"mindlora {ml['ms']:.1f} ms/step", flush=True)
    tokens = args.batch * args.seq_length
    print(f"{'':22s}{'ms/step':>10s}{'tokens/s':>11s}{'TFLOP/s':>9s}{'MFU':>8s}{'peak GB':>9s}")
    figures = {}
    for label, r in (("HF transformers+PEFT", hf), ("mindlora", ml)):
        tps = 1000 * tokens / r["ms"]
        tflops = tps * flops["total"] / 1e12
        mfu = 100 * tflops / peak if peak else None
        figures[label] = {"tokens_per_s": tps, "tflops": tflops, "mfu": mfu, **r}
        mfu_s = f"{mfu:7.1f}%" if mfu is not None else "     n/a"
        print(f"{label:22s}{r['ms']:10.1f}{tps:11.1f}{tflops:9.2f}{mfu_s}"
              f"{r['peak_mb'] / 1024:9.1f}")
    print(f"speed-up mindlora / HF+PEFT: {hf['ms'] / ml['ms']:.2f}x (MFU against {peak} TFLOP/s "
          f"bf16 dense, the datasheet peak of {name})")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return figures
