"""The FLOP count behind bench/train.py --device cuda's TFLOP/s and MFU, against a hand count."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from flops import Shapes, peak_tflops, train_flops_per_token  # noqa: E402


def test_tiny_config_by_hand():
    # 2 layers, hidden 8, ffn 12, 4 heads of 2 in 2 KV groups, vocab 10, r 2, s 16
    m = Shapes(num_layers=2, hidden_size=8, ffn_hidden_size=12, num_attention_heads=4,
               num_query_groups=2, kv_channels=2, vocab_size=10)
    # per layer: qkv 8 x (8 + 2*4) = 128, proj 8 x 8 = 64, fc1 8 x 24 = 192, fc2 12 x 8 = 96
    per_layer = 128 + 64 + 192 + 96                      # 480
    frozen = 2 * per_layer + 10 * 8                      # 1040 (head 80, embedding not counted)
    lora = 2 * 2 * ((8 + 16) + (8 + 8) + (8 + 24) + (12 + 8))   # 2 layers x r 2 x 92 = 368
    attention = 6 * 2 * 16 * (4 * 2)                     # 1536
    got = train_flops_per_token(m, r=2, seq_length=16)
    assert got == {"frozen": 4 * frozen, "lora": 6 * lora, "attention": attention,
                   "total": 4 * 1040 + 6 * 368 + 1536}
    only_qkv = train_flops_per_token(m, r=2, seq_length=16, targets=("linear_qkv",))
    assert only_qkv["lora"] == 6 * 2 * 2 * (8 + 16)


def test_qwen3_8b_shapes():
    """Qwen3-8B: 6.95 B frozen layer weights + 0.62 B head; 36.6 M LoRA weights at r 16."""
    m = Shapes(num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32,
               num_query_groups=8, kv_channels=128, vocab_size=151936)
    got = train_flops_per_token(m, r=16, seq_length=4096)
    # qkv 4096 x 6144 + proj 4096 x 4096 + fc1 4096 x 24576 + fc2 12288 x 4096 per layer
    per_layer = 25_165_824 + 16_777_216 + 100_663_296 + 50_331_648
    assert per_layer == 192_937_984
    assert got["frozen"] == 4 * (36 * per_layer + 151936 * 4096)
    assert got["lora"] == 6 * 36 * 1_015_808
    assert got["attention"] == 6 * 36 * 4096 * 4096


def test_peak_lookup():
    assert peak_tflops("NVIDIA H200") == 989.5
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.5
    assert peak_tflops("Some other card") is None


def test_gpu_bench_steps_run_on_cpu_at_tiny_size(capsys):
    """bench/train.py --device cuda's code path (base checkpoint, data, HF+PEFT child,
    mindlora.train --bf16 with micro-batch 1, the table), on the CPU at tiny size."""
    import argparse

    import train as bench_train
    from gpu_train import main_cuda

    args = argparse.Namespace(tiny=True, steps=2, warmup=1, batch=2, seq_length=64, rank=4,
                              prompt_fraction=0.5, mindlora_flags="--bf16", micro_batch=1,
                              peak_tflops=1.0, workdir=None)
    figures = main_cuda(args, bench_train.run_mindlora, bench_train.write_sft_data,
                        bench_train.HF_TARGETS, device="cpu")
    out = capsys.readouterr().out
    assert "speed-up mindlora / HF+PEFT" in out and "FLOPs per token" in out
    for side in ("HF transformers+PEFT", "mindlora"):
        f = figures[side]
        assert f["ms"] > 0 and f["tokens_per_s"] > 0 and f["peak_mb"] > 0
        assert abs(f["mfu"] - 100 * f["tflops"]) < 1e-9  # peak 1 TFLOP/s
