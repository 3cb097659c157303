"""``torchrun ... -m mindlora.train [flags]`` (or ``mindlora-train``): LoRA fine-tuning on
megatron-core.

Thin on purpose: parse flags into configs, run the trainer, tear the process group down
(mindlora.runtime.entry.run_main, shared with mindlora.generate).
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from mindlora.runtime.entry import rank0_log, run_main
    from mindlora.training.args import parse_args

    def run(cfg) -> None:
        from mindlora.training.loop import train

        train(cfg, rank0_log())

    return run_main("mindlora.train", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
