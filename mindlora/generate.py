"""``torchrun ... -m mindlora.generate [flags]`` (or ``mindlora-generate``): answers from a base
model (+ a LoRA adapter).

Thin on purpose: parse flags, run ``mindlora.generation.cli.run``, tear the process group down
(mindlora.runtime.entry.run_main, shared with mindlora.train).
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from mindlora.generation.args import parse_args
    from mindlora.runtime.entry import rank0_log, run_main

    def run(cfg) -> None:
        from mindlora.generation.cli import run as generate

        generate(cfg, rank0_log(sys.stderr))

    return run_main("mindlora.generate", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
