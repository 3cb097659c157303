"""Suite-wide settings: quiet megatron-core's 'no Transformer Engine' warnings, fixed threads.

The test process itself is a CPU run, also on a GPU host (``MINDLORA_DEVICE=cpu``; spawned ranks
also hide CUDA, see tests/distributed/harness.py). tests/gpu starts its GPU runs in fresh
processes without it.
"""
import os
import warnings

os.environ.setdefault("MINDLORA_DEVICE", "cpu")

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
