"""``mindlora.runtime.npu_compat`` against a stand-in ``torch_npu`` (no NPU here).

The module must import Ascend's CUDA adapter (``torch_npu.contrib.transfer_to_npu``) and point
megatron-core's RNG helpers at the NPU generator. The patches are process-wide, so the check runs
in a fresh interpreter whose ``sys.path`` holds a fake ``torch_npu`` package.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAKE_INIT = """
import types, torch
state = {"rng": torch.full((4,), 5, dtype=torch.uint8), "set": []}
npu = types.ModuleType("torch.npu")
npu.get_rng_state = lambda device="npu": state["rng"]
npu.set_rng_state = lambda s, device="npu": state["set"].append(int(s[0]))
torch.npu = npu
"""
FAKE_TRANSFER = "import torch\ntorch._transfer_to_npu_applied = True\n"

PROBE = textwrap.dedent("""
    import torch, torch_npu
    from megatron.core.tensor_parallel import random as mp_random
    from mindlora.runtime.npu_compat import apply_npu_compat
    assert not hasattr(torch, "_transfer_to_npu_applied")
    apply_npu_compat()
    apply_npu_compat()  # idempotent
    assert torch._transfer_to_npu_applied
    assert int(mp_random._get_cuda_rng_state(graph_safe=False)[0]) == 5
    mp_random._set_cuda_rng_state(torch.full((4,), 7, dtype=torch.uint8), graph_safe=False)
    assert torch_npu.state["set"] == [7]
    from mindlora.runtime.npu_compat import undo_npu_compat
    undo_npu_compat()
    assert mp_random._get_cuda_rng_state.__module__ == "megatron.core.tensor_parallel.random"
    print("ok")
""")


def _run(code: str, extra_path: str = "") -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (extra_path, ROOT) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


def test_adapts_megatron_with_transfer_to_npu_and_npu_rng(tmp_path) -> None:
    pkg = tmp_path / "torch_npu"
    (pkg / "contrib").mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_INIT)
    (pkg / "contrib" / "__init__.py").write_text("")
    (pkg / "contrib" / "transfer_to_npu.py").write_text(FAKE_TRANSFER)
    done = _run(PROBE, str(tmp_path))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None,
                    reason="torch_npu is installed here")
def test_refuses_without_torch_npu() -> None:
    code = ("from mindlora.runtime.npu_compat import apply_npu_compat\n"
            "try:\n    apply_npu_compat()\nexcept RuntimeError as e:\n    print(e)\n")
    done = _run(code)
    assert "torch_npu is not installed" in done.stdout, done.stdout + done.stderr[-2000:]
