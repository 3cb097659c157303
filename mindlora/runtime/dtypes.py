"""The one table of dtype names: torch dtype <-> the names mindlora's files and flags use.

``name`` is what checkpoint metadata stores (torch's own name, ``"bfloat16"``); ``code`` is the
safetensors header code (``"BF16"``); :data:`SHORT_NAMES` are the flags' ``bf16`` / ``fp16`` /
``fp32``. ``from_flags`` turns Megatron's ``--bf16`` / ``--fp16`` into the parameter dtype.
"""
from __future__ import annotations

import torch

# (torch dtype, metadata name, safetensors code)
TABLE = (
    (torch.float64, "float64", "F64"),
    (torch.float32, "float32", "F32"),
    (torch.float16, "float16", "F16"),
    (torch.bfloat16, "bfloat16", "BF16"),
    (torch.int64, "int64", "I64"),
    (torch.int32, "int32", "I32"),
    (torch.int16, "int16", "I16"),
    (torch.int8, "int8", "I8"),
    (torch.uint8, "uint8", "U8"),
    (torch.bool, "bool", "BOOL"),
)
PARAMS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what a model may be held in
SHORT_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""The parameter dtypes by the short names flags use (convert_ckpt.py's ``--params-dtype``)."""

_BY_NAME = {name: dtype for dtype, name, _ in TABLE}
_NAME = {dtype: name for dtype, name, _ in TABLE}
_BY_CODE = {code: dtype for dtype, _, code in TABLE}
_CODE = {dtype: code for dtype, _, code in TABLE}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (what metadata stores)."""
    if dtype not in _NAME:
        raise ValueError(f"dtype {dtype} has no name in mindlora's table")
    return _NAME[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``, for the dtypes a model's parameters may have."""
    names = sorted(_NAME[d] for d in PARAMS_DTYPES)
    if name not in names:
        raise ValueError(f"unknown params dtype {name!r}; expected one of {names}")
    return _BY_NAME[name]


def safetensors_code(dtype: torch.dtype) -> str | None:
    """``torch.bfloat16`` -> ``"BF16"``; None for a dtype safetensors cannot store here."""
    return _CODE.get(dtype)


def from_safetensors_code(code: str) -> torch.dtype | None:
    """``"BF16"`` -> ``torch.bfloat16``; None for a code mindlora does not read."""
    return _BY_CODE.get(code)


def from_flags(bf16: bool, fp16: bool) -> torch.dtype:
    """Megatron's ``--bf16`` / ``--fp16`` (neither: float32) as the parameter dtype."""
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
