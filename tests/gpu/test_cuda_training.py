"""The tiny model trained on a CUDA GPU (NCCL, world size 1) against the CPU fp32 run.

Each run is a fresh process (``tests/gpu/worker.py``): the CPU suite adapts megatron-core for the
CPU process-wide, so GPU runs never share an interpreter with it. Skipped, with the reason, on a
host without a CUDA device; ``tests/gpu/run_on_device.sh`` runs them on a lent GPU machine.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.training.fixtures import tiny_model, write_base_checkpoint, write_instruction_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _has_cuda() -> bool:
    """Asked in a child process, so this (CPU) test process never initialises CUDA."""
    if shutil.which("nvidia-smi") is None:
        return False
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, timeout=120)
    return probe.returncode == 0 and probe.stdout.strip() not in ("", "0")


pytestmark = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU (nvidia-smi and "
                                "torch.cuda); run tests/gpu/run_on_device.sh on a GPU host")

ITERS = 10
# fp32: CUDA and CPU kernels sum in different orders (~1e-7 per op); ten optimizer steps at
# lr 1e-2 amplify that to ~1e-5, so 1e-4 relative still catches any real divergence (a wrong
# mask, a missed gradient or a lost all-reduce changes the loss in the 2nd or 3rd digit).
FP32_RTOL = 1e-4
# bf16 base weights and activations. The same run in bf16 on the CPU stays within 4.7e-4 of the
# fp32 losses (measured 2026-12-02); GPU kernels round differently, so ~8x headroom. That is still
# below the smallest iteration-to-iteration change of the reference curve (5.3e-3), so a run that
# sees another batch, or skips an update, fails.
BF16_RTOL = 4e-3


def _flags(base: str, data: str, iters: int = ITERS, extra=()) -> list[str]:
    return ["--load", base, "--data-path", data, "--micro-batch-size", "2",
            "--global-batch-size", "4", "--seq-length", "32", "--train-iters", str(iters),
            "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8", "--log-interval", "100",
            *extra]


def _env(cpu: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    env.pop("MINDLORA_DEVICE", None)
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", MINDLORA_DEVICE="cpu")
    return env


def _run(tmp, name: str, flags: list[str], cpu: bool = False, deterministic: bool = False):
    out = os.path.join(tmp, f"{name}.json")
    env = _env(cpu)
    cmd = [sys.executable, "-m", "tests.gpu.worker", out]
    cmd += ["--deterministic"] if deterministic else []
    done = subprocess.run(cmd + ["--"] + flags, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gpu"))
    base = write_base_checkpoint(f"{root}/base", tiny_model())
    data = write_instruction_data(f"{root}/data/sft", n=64)
    return root, base, data


def _on_gpu(report: dict) -> None:
    assert (report["device"], report["backend"]) == ("cuda", "nccl")
    assert report["param_devices"] == ["cuda:0"], report["param_devices"]
    assert report["batch_devices"] == ["cuda:0"], report["batch_devices"]
    assert report["peak_bytes"] > 0


def test_tp1_fp32_and_bf16_match_the_cpu_run(assets):
    root, base, data = assets
    cpu = _run(root, "cpu_fp32", _flags(base, data), cpu=True)
    assert cpu["device"] == "cpu" and len(cpu["losses"]) == ITERS
    fp32 = _run(root, "cuda_fp32", _flags(base, data))
    bf16 = _run(root, "cuda_bf16", _flags(base, data, extra=["--bf16"]))
    for report in (fp32, bf16):
        _on_gpu(report)
    ref = torch.tensor(cpu["losses"])
    steps = (ref[1:] - ref[:-1]).abs() / ref[1:]
    assert steps.min() > BF16_RTOL, "the tolerances must be tighter than one step's change"
    torch.testing.assert_close(torch.tensor(fp32["losses"]), ref, rtol=FP32_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(bf16["losses"]), ref, rtol=BF16_RTOL, atol=0)


def test_resume_is_exact_on_cuda(assets):
    """Stop at 3 and resume to 6 with LoRA dropout: the CUDA RNG state (every device) and the
    tracker's per-TP streams come back, so the resumed losses equal the uninterrupted ones."""
    root, base, data = assets
    drop = ["--lora-dropout", "0.2", "--save-interval", "3"]
    full = _run(root, "full", _flags(base, data, 6, drop + ["--save", f"{root}/full"]),
                deterministic=True)
    stopped = _run(root, "stopped", _flags(base, data, 6, drop + [
        "--save", f"{root}/stopped", "--exit-interval", "3"]), deterministic=True)
    resumed = _run(root, "resumed", _flags(base, data, 6, drop + [
        "--save", f"{root}/stopped", "--lora-load", f"{root}/stopped"]), deterministic=True)
    _on_gpu(resumed)
    assert len(stopped["losses"]) == 3
    assert stopped["losses"] == full["losses"][:3]
    assert resumed["losses"] == full["losses"][3:], (resumed["losses"], full["losses"])


def test_fused_lora_layers_on_cuda():
    """The fused LoRA kernels (lora/fused.py; TP1 always takes them, so the runs above use
    them too) against ``x W^T + b + s (x A^T) B^T`` on the GPU, every target."""
    report = _run_layers()
    assert (report["device"], report["backend"]) == ("cuda", "nccl")
    assert report["checked"] == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _run_layers(cpu: bool = False) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "layers.json")
        done = subprocess.run([sys.executable, "-m", "tests.gpu.worker", out, "--layers"],
                              cwd=ROOT, env=_env(cpu), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        with open(out) as f:
            return json.load(f)
