"""``mindlora.runtime.files.atomic_path`` and the one dtype table (``mindlora.runtime.dtypes``)."""
from __future__ import annotations

import os

import pytest
import torch

from mindlora.runtime import dtypes
from mindlora.runtime.files import AtomicPath, atomic_path


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path) -> None:
    target = tmp_path / "sub" / "file.txt"
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and not target.exists()
        with open(tmp, "w") as f:
            f.write("one")
    assert target.read_text() == "one"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it

    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk gone")
    assert target.read_text() == "one"  # the old content stays
    assert os.listdir(target.parent) == ["file.txt"]  # and no temporary file is left


def test_held_atomic_path_commits_or_aborts(tmp_path) -> None:
    staged = AtomicPath(tmp_path / "a.bin")
    with open(staged.tmp, "wb") as f:
        f.write(b"xy")
    assert staged.commit() == str(tmp_path / "a.bin")
    with pytest.raises(RuntimeError, match="already committed"):
        staged.commit()
    staged.abort()  # after a commit: nothing to drop, the file stays
    assert (tmp_path / "a.bin").read_bytes() == b"xy"
    dropped = AtomicPath(tmp_path / "b.bin")
    dropped.abort()
    dropped.abort()
    assert sorted(os.listdir(tmp_path)) == ["a.bin"]


def test_one_dtype_table() -> None:
    assert dtypes.dtype_name(torch.bfloat16) == "bfloat16"
    assert dtypes.dtype_from_name("float16") is torch.float16
    with pytest.raises(ValueError, match=r"unknown params dtype 'int8'; expected one of "
                                         r"\['bfloat16', 'float16', 'float32'\]"):
        dtypes.dtype_from_name("int8")
    assert dtypes.safetensors_code(torch.bfloat16) == "BF16"
    assert dtypes.from_safetensors_code("I64") is torch.int64
    assert dtypes.safetensors_code(torch.complex64) is None
    assert dtypes.from_safetensors_code("F8_E4M3") is None
    assert [dtypes.from_flags(b, f) for b, f in ((True, False), (False, True), (False, False))] \
        == [torch.bfloat16, torch.float16, torch.float32]
    for dtype, name, code in dtypes.TABLE:  # the names are torch's own, each row round-trips
        assert str(dtype) == f"torch.{name}"
        assert dtypes.from_safetensors_code(code) is dtype
