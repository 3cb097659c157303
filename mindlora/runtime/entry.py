"""The start-up shared by ``mindlora.train`` and ``mindlora.generate`` (and their console
scripts): parse, run, tear the process group down, and turn bad input into one line on stderr.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional, Sequence


def run_main(name: str, parse: Callable[[Sequence[str]], Any], run: Callable[[Any], Any],
             argv: Optional[Sequence[str]] = None,
             errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> int:
    """The shared start-up of ``mindlora.train`` / ``mindlora.generate``: parse, run, tear the
    process group down; bad input (or a failed save) is one line on stderr and exit code 2."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    try:
        cfg = parse(argv)
    except errors as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    from mindlora.runtime import destroy_parallel

    try:
        run(cfg)
    except errors as e:  # one line, no traceback
        print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy_parallel()
    return 0


def rank0_log(stream: Any = None) -> Callable[[str], None]:
    """A log function that prints on global rank 0 only (or before the process group exists)."""
    def log(msg: str) -> None:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(msg, file=stream or sys.stdout, flush=True)
    return log
