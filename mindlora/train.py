"""``torchrun ... -m mindlora.train [flags]``: LoRA fine-tuning on megatron-core.

Thin on purpose: parse flags into configs, run the trainer, tear the process group down.
"""
from __future__ import annotations

import sys
import warnings


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    from mindlora.training.args import parse_args

    try:
        run = parse_args(argv)
    except (ValueError, OSError) as e:
        print(f"mindlora.train: error: {e}", file=sys.stderr)
        return 2
    from mindlora.runtime import destroy_parallel
    from mindlora.training.loop import train

    import torch.distributed as dist

    def log(msg: str) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(msg, flush=True)

    try:
        train(run, log)
    except (ValueError, OSError) as e:  # bad input or a failed save: one line, no traceback
        print(f"mindlora.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
