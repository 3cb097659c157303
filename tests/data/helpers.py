"""Plain helpers shared by the data tests (fixtures live in conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mindlora.data.preprocess import PreprocessConfig, Summary, run_preprocess


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """One JSON value per line (strings are written verbatim, to inject broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
                            + "\n" for r in records), encoding="utf-8")
    return path


def alpaca_records(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Give tip {i}.", "input": "" if i % 3 else f"context {i}",
             "output": "Sleep well. " * (1 + i % 4) + f"Tip {i}."} for i in range(start, start + n)]


def preprocess(tmp_path: Path, records_or_file: list | Path, tokenizer: str, *,
               name: str = "out", **kwargs: Any) -> tuple[str, Summary]:
    """Run the preprocessor in-process; returns (output prefix, summary)."""
    src = records_or_file if isinstance(records_or_file, Path) else write_jsonl(
        tmp_path / f"{name}.jsonl", records_or_file)
    kwargs.setdefault("prompt_type", "qwen3")
    kwargs.setdefault("log_interval", 10_000)
    prefix = str(tmp_path / name / name)
    cfg = PreprocessConfig(input=str(src), tokenizer_name_or_path=tokenizer, output_prefix=prefix,
                           **kwargs)
    return prefix, run_preprocess(cfg)
