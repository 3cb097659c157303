"""``torchrun ... -m mindlora.generate [flags]``: answers from a base model (+ a LoRA adapter).

Thin on purpose: parse flags, run ``mindlora.generation.cli.run``, tear the process group down.
"""
from __future__ import annotations

import sys
import warnings


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    from mindlora.generation.args import parse_args

    try:
        cfg = parse_args(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"mindlora.generate: error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from mindlora.generation.cli import run
    from mindlora.runtime import destroy_parallel

    def log(msg: str) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(msg, file=sys.stderr, flush=True)

    try:
        run(cfg, log)
    except (ValueError, FileNotFoundError) as e:
        print(f"mindlora.generate: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
