"""Device discipline, checked without a GPU: no tensor factory on the train/generate paths may
leave its device to chance.

A tensor built without ``device=`` lands on the CPU. On the CPU suite that is invisible; on a GPU
it fails the first embedding lookup or the first NCCL collective (the bugs issue 9 found). This
test walks the packages that run per step (``training``, ``generation``, ``runtime``,
``models``, ``lora``) with ``ast`` and fails on ``torch.tensor/zeros/ones/empty/full/arange``
without ``device=``. A deliberate host tensor (a batch built on the host before its pinned copy,
a CPU-generator draw) says so with a ``# host-tensor: <reason>`` comment on the call's lines or
the line above. ``*_like`` and ``Tensor.new_*`` factories inherit their device and are fine.
"""
from __future__ import annotations

import ast
import os
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("training", "generation", "runtime", "models", "lora")
FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange"}
MARK = "# host-tensor:"


def violations(source: str, filename: str = "<src>") -> list[str]:
    """``file:line: torch.<factory>(...)`` for each factory call without ``device=``/a mark."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in FACTORIES and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"):
            continue
        if any(k.arg == "device" for k in node.keywords):
            continue
        span = lines[max(node.lineno - 2, 0):node.end_lineno]
        marked = [ln for ln in span if MARK in ln and ln.split(MARK, 1)[1].strip()]
        if not marked:
            found.append(f"{filename}:{node.lineno}: torch.{node.func.attr}(...) without device=")
    return found


def _sources():
    for pkg in PACKAGES:
        top = os.path.join(ROOT, "mindlora", pkg)
        for dirpath, _, files in os.walk(top):
            for name in sorted(files):
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)


def test_no_tensor_factory_without_device() -> None:
    files = list(_sources())
    assert len(files) > 15, files  # the walk really covers the packages
    bad = []
    for path in files:
        with open(path) as f:
            bad += violations(f.read(), os.path.relpath(path, ROOT))
    assert not bad, ("tensor factories without device= (pass the runtime device, or mark a "
                     "deliberate host tensor with '# host-tensor: <reason>'):\n" + "\n".join(bad))


def test_the_check_can_fail() -> None:
    src = textwrap.dedent("""
        import torch
        a = torch.zeros(2)
        b = torch.tensor([1],
                         dtype=torch.int64)
        c = torch.arange(4, device=x.device)
        d = torch.zeros_like(a)
        # host-tensor: built on the host, pinned and copied by to_device
        e = torch.ones(3)
        f = torch.full((2,), 1.0)  # host-tensor:
        g = torch.empty(1)  # host-tensor: RNG states are host byte tensors
        h = x.new_zeros(2)
    """)
    assert violations(src) == ["<src>:3: torch.zeros(...) without device=",
                               "<src>:4: torch.tensor(...) without device=",
                               "<src>:10: torch.full(...) without device="]
