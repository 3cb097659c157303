"""LoRA training speed on CPU: mindlora beside Hugging Face transformers + PEFT, in one run.

Same model (SmolLM2-135M shapes by default: Llama, 30 layers, hidden 576, GQA 9/3 heads, tied
49152-token vocabulary; random weights, nothing is downloaded), same samples, batch, sequence
length, rank, alpha and targets (all attention and MLP projections), float32, AdamW. Samples are
SFT-shaped: the first ``--prompt-fraction`` of each sequence is a prompt whose labels are -100.

Each side runs in its own process with the same thread count; the first ``--warmup`` steps are
excluded and the median step is kept. The two sides alternate for ``--rounds`` rounds and each
keeps its best round, so a noisy neighbour on a shared machine penalises neither. Prints
tokens/s, ms/step, peak RSS and the ratio mindlora / HF+PEFT.

    python bench/train.py                      # SmolLM2-135M shapes, 4 x 256 tokens
    python bench/train.py --tiny --steps 4     # a few seconds, for a smoke run
    python bench/train.py --model qwen3-moe-tiny   # Qwen3-MoE: 4 layers, 8 experts, top-2
    python bench/train.py --model qwen3-moe-small  # hidden 512, 16 experts of width 256, top-4
    python bench/train.py --device cuda        # one GPU: Qwen3-8B shapes, bf16, 4 x 4096 tokens,
                                               # r 16, with TFLOP/s and MFU (bench/gpu_train.py)

For the MoE model mindlora puts LoRA on attention and on every expert's fc1/fc2; HF PEFT 0.21
targets the same projections, which it maps onto transformers 5's fused expert parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                    tie_word_embeddings=True)
TINY = dict(SMOLLM2_135M, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=4096)
QWEN3_MOE_TINY = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, vocab_size=4096, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, max_position_embeddings=2048,
                      tie_word_embeddings=False)
QWEN3_MOE_SMALL = dict(QWEN3_MOE_TINY, hidden_size=512, moe_intermediate_size=256,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                       vocab_size=8192, num_experts=16, num_experts_per_tok=4)
MODELS = {"smollm2-135m": ("llama", SMOLLM2_135M), "tiny": ("llama", TINY),
          "qwen3-moe-tiny": ("qwen3-moe", QWEN3_MOE_TINY),
          "qwen3-moe-small": ("qwen3-moe", QWEN3_MOE_SMALL)}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_model_and_data(work: str, shapes: dict, args) -> tuple[str, str]:
    """Random HF Llama model folder + an indexed SFT dataset of ``steps * batch`` samples."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    torch.manual_seed(0)
    hf_dir = os.path.join(work, "hf")
    config = (Qwen3MoeConfig if args.family == "qwen3-moe" else LlamaConfig)(**shapes)
    AutoModelForCausalLM.from_config(config).save_pretrained(hf_dir, safe_serialization=True)
    prefix = os.path.join(work, "data", "sft")
    write_sft_data(prefix, shapes["vocab_size"], args)
    return hf_dir, prefix


def write_sft_data(prefix: str, vocab_size: int, args) -> None:
    """``steps * batch`` random SFT samples of ``seq_length`` tokens, the first
    ``prompt_fraction`` of each masked (-100 labels)."""
    import numpy as np

    from mindlora.data.indexed import IndexedDatasetWriter

    os.makedirs(os.path.dirname(prefix))
    rng = np.random.default_rng(0)
    writers = {k: IndexedDatasetWriter(f"{prefix}_packed_{k}_document")
               for k in ("input_ids", "attention_mask", "labels")}
    prompt = int(args.seq_length * args.prompt_fraction)
    for _ in range(args.steps * args.batch):
        ids = rng.integers(0, vocab_size, args.seq_length)
        labels = ids.copy()
        labels[:prompt] = -100
        writers["input_ids"].add_document(ids)
        writers["attention_mask"].add_document(np.ones_like(ids))
        writers["labels"].add_document(labels)
    for w in writers.values():
        w.finalize()
        w.commit()


def run_mindlora(work: str, hf_dir: str, prefix: str, args, env: dict, convert: bool) -> dict:
    mg_dir = os.path.join(work, "mg")
    if convert:
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_ckpt.py"),
                        "--load-model-type", "hf", "--save-model-type", "mg", "--no-progress",
                        "--load-dir", hf_dir, "--save-dir", mg_dir,
                        "--model-type-hf", args.family,
                        "--target-tensor-parallel-size", "1",
                        "--target-pipeline-parallel-size", "1"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    cmd = [sys.executable, "-m", "mindlora.train", "--load", mg_dir, "--data-path", prefix,
           "--micro-batch-size", str(getattr(args, "micro_batch", args.batch)),
           "--global-batch-size", str(args.batch),
           "--seq-length", str(args.seq_length), "--train-iters", str(args.steps),
           "--lr", "1e-4", "--lr-decay-style", "constant", "--lora-r", str(args.rank),
           "--lora-alpha", str(2 * args.rank), "--log-interval", "1", "--split", "100,0,0",
           "--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    cmd += args.mindlora_flags.split() if args.mindlora_flags else []
    out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, cwd=ROOT).stdout
    ms = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([\d.]+)", out)]
    peak = [float(x) for x in re.findall(r"peak memory \(MB\): ([\d.]+)", out)]
    loss = [float(x) for x in re.findall(r"lm loss: ([\d.E+-]+)", out)]
    step_ms = sorted(ms[args.warmup:])[len(ms[args.warmup:]) // 2]
    return {"ms": step_ms, "peak_mb": max(peak), "loss0": loss[0]}


HF_CHILD = r"""
import json, resource, sys, time, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
sys.path.insert(0, ROOT)
from mindlora.data.dataset import InstructionDataset, collate
from mindlora.training.batches import SampleOrder
a = json.loads(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(a["hf_dir"], torch_dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=a["rank"], lora_alpha=2 * a["rank"], lora_dropout=0.0,
                                         target_modules=a["targets"]))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ds = InstructionDataset(a["prefix"], a["seq_length"])
order = SampleOrder(len(ds), 1234)  # the sample order mindlora.train walks (--seed 1234)
times, first = [], None
for step in range(a["steps"]):
    b = collate([ds[order[step * a["batch"] + i]] for i in range(a["batch"])], pad_id=0,
                seq_length=a["seq_length"])
    t = time.perf_counter()
    out = model(input_ids=b["input_ids"], labels=b["labels"])
    out.loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append((time.perf_counter() - t) * 1000)
    first = out.loss.item() if first is None else first
tail = sorted(times[a["warmup"]:])
print(json.dumps({"ms": tail[len(tail) // 2],
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "loss0": first}))
""".replace("ROOT", repr(ROOT))


def run_hf(hf_dir: str, prefix: str, args, env: dict) -> dict:
    payload = json.dumps({"hf_dir": hf_dir, "prefix": prefix, "rank": args.rank,
                          "targets": HF_TARGETS, "steps": args.steps, "batch": args.batch,
                          "seq_length": args.seq_length, "warmup": args.warmup})
    out = subprocess.run([sys.executable, "-c", HF_CHILD, payload], check=True, env=env,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: one GPU, Qwen3-8B shapes, bf16, with TFLOP/s and MFU")
    p.add_argument("--tiny", action="store_true", help="a 4-layer model, for smoke runs")
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="cpu model shapes (default smollm2-135m; --tiny = tiny)")
    p.add_argument("--steps", type=int, default=None, help="8 (cpu) / 6 (cuda)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="samples per optimizer step")
    p.add_argument("--seq-length", type=int, default=None, help="256 (cpu) / 4096 (cuda)")
    p.add_argument("--rank", type=int, default=None, help="8 (cpu) / 16 (cuda)")
    p.add_argument("--prompt-fraction", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; best kept (cpu)")
    p.add_argument("--mindlora-flags", default="", help="extra flags for mindlora.train")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="cuda: bf16 peak for MFU when the GPU is not in bench/flops.py's table")
    p.add_argument("--workdir", default=None, help="cuda: where the base checkpoint is written")
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.steps = args.steps or (6 if cuda else 8)
    args.seq_length = args.seq_length or (4096 if cuda else 256)
    args.rank = args.rank or (16 if cuda else 8)
    if cuda:
        if args.tiny or args.model:
            p.error("--device cuda benchmarks Qwen3-8B shapes; --tiny / --model are for cpu")
        from gpu_train import main_cuda

        args.micro_batch = 1
        args.mindlora_flags = f"--bf16 {args.mindlora_flags}".strip()
        main_cuda(args, run_mindlora, write_sft_data, HF_TARGETS)
        return
    if args.tiny and args.model not in (None, "tiny"):
        p.error(f"--tiny contradicts --model {args.model}")
    args.model = args.model or ("tiny" if args.tiny else "smollm2-135m")
    args.family, shapes = MODELS[args.model]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as work:
        t = time.time()
        hf_dir, prefix = make_model_and_data(work, shapes, args)
        print(f"model {args.model}, batch {args.batch} x "
              f"{args.seq_length} tokens, r={args.rank}, {args.threads} threads, "
              f"prompt fraction {args.prompt_fraction} (set-up {time.time() - t:.1f} s)")
        hf_runs, ml_runs = [], []
        for r in range(args.rounds):
            hf_runs.append(run_hf(hf_dir, prefix, args, env))
            ml_runs.append(run_mindlora(work, hf_dir, prefix, args, env, convert=r == 0))
            print(f"round {r + 1}: HF+PEFT {hf_runs[-1]['ms']:.1f} ms/step, mindlora "
                  f"{ml_runs[-1]['ms']:.1f} ms/step", flush=True)
        hf = min(hf_runs, key=lambda x: x["ms"])
        ml = min(ml_runs, key=lambda x: x["ms"])
    tokens = args.batch * args.seq_length
    print(f"{'':18s}{'ms/step':>10s}{'tokens/s':>12s}{'peak RSS MB':>14s}{'first loss':>12s}")
    for name, r in (("HF transformers+PEFT", hf), ("mindlora", ml)):
        print(f"{name:18s}{r['ms']:10.1f}{1000 * tokens / r['ms']:12.1f}{r['peak_mb']:14.1f}"
              f"{r['loss0']:12.4f}")
    print(f"speed-up mindlora / HF+PEFT: {hf['ms'] / ml['ms']:.2f}x")


if __name__ == "__main__":
    main()
