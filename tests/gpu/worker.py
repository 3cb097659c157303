"""One run in a fresh process, for the GPU tests: ``python -m tests.gpu.worker OUT.json
[--deterministic] -- <mindlora.train flags>`` trains; ``python -m tests.gpu.worker OUT.json
--layers`` checks the fused LoRA layers against their formula on this process's device.

The runtime device is whatever this process detects (the caller hides CUDA for the CPU
reference). World size 1 without torchrun: on CUDA the backend is NCCL, which refuses any CPU
tensor handed to a collective, so a run that finishes has kept every collective on the GPU.
Writes the losses, grad norms and where the run's tensors lived to OUT.json.
"""
from __future__ import annotations

import json
import os
import sys


def _deterministic() -> None:
    """Bit-reproducible CUDA runs (the resume check): deterministic cuBLAS and the math SDPA
    kernel (the flash / memory-efficient backward kernels accumulate with atomics)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


def layer_check() -> dict:
    """Each LoRA target's fused layer (TP1 always takes lora/fused.py) on the runtime device:
    output and the input, A and B gradients equal ``x W^T + b + s (x A^T) B^T`` computed by
    autograd from the same tensors on the same device, to 1e-5 relative in float32."""
    import torch

    from mindlora.config import LoRAConfig, ParallelConfig
    from mindlora.runtime import current, init_distributed, init_parallel
    from tests.lora.test_fused import fused_calls
    from tests.lora.test_layers import RANK, SHAPES, _full_tensors, build_layer

    init_distributed()
    init_parallel(ParallelConfig())
    dev = current().torch_device()
    lora = LoRAConfig(r=RANK, alpha=8.0)
    checked = []
    for i, target in enumerate(SHAPES):
        full = {k: v.to(dev) for k, v in _full_tensors(target, seed=i).items()}
        layer = build_layer(target, 1, False, lora)
        with torch.no_grad():
            for key in ("weight", "bias", "lora_A.weight", "lora_B.weight"):
                layer.get_parameter(key).copy_(full[key])
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
        x = full["x"].clone().requires_grad_(True)
        with fused_calls() as calls:
            output, bias = layer(x)
        assert sum(calls.values()) == 1, f"{target}: the fused path did not run"
        (output * full["grad_out"]).sum().backward()
        a = full["lora_A.weight"].clone().requires_grad_(True)
        b = full["lora_B.weight"].clone().requires_grad_(True)
        xr = full["x"].clone().requires_grad_(True)
        skip = SHAPES[target][2]
        ref = xr @ full["weight"].t() + lora.scaling * (xr @ a.t()) @ b.t()
        ref = ref if skip else ref + full["bias"]
        (ref * full["grad_out"]).sum().backward()
        pairs = [("output", output, ref), ("input grad", x.grad, xr.grad),
                 ("A grad", layer.lora_A.weight.grad, a.grad),
                 ("B grad", layer.lora_B.weight.grad, b.grad)]
        for what, actual, expected in pairs:
            assert actual.device == dev, f"{target} {what} on {actual.device}"
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{target} {what}: {m}")
        if skip:
            torch.testing.assert_close(bias, full["bias"])
        checked.append(target)
    return {"device": current().kind, "backend": torch.distributed.get_backend(),
            "checked": checked}


def main(argv: list[str]) -> int:
    out, rest = argv[0], argv[1:]
    if rest == ["--layers"]:
        from mindlora.runtime import destroy_parallel

        try:
            report = layer_check()
        finally:
            destroy_parallel()
        with open(out, "w") as f:
            json.dump(report, f)
        return 0
    if rest and rest[0] == "--deterministic":
        _deterministic()
        rest = rest[1:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    import torch

    from mindlora.runtime import current, destroy_parallel
    from mindlora.training.args import parse_args
    from mindlora.training.loop import Trainer

    run = parse_args(rest)
    try:
        trainer = Trainer(run, log=lambda *_: None)
        first = trainer._batches(trainer.data.train, trainer.order, 0)[0]
        result = trainer.fit()
        report = {
            "device": current().kind,
            "backend": torch.distributed.get_backend(),
            "losses": result.losses,
            "grad_norms": result.grad_norms,
            "param_devices": sorted({str(p.device) for c in trainer.chunks
                                     for p in c.parameters()}),
            "batch_devices": sorted({str(t.device) for t in first.values()}),
            "peak_bytes": current().max_memory_allocated(),
        }
    finally:
        destroy_parallel()
    with open(out, "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
