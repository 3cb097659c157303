"""The user's path end to end: the tiny launchers, torchrun (2 CPU processes, TP=2), the log
line people's tooling parses, and an adapter checkpoint on disk."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "examples", "mcore", "tiny")
LINE = re.compile(
    r"^ iteration +(\d+)/ +(\d+) \| consumed samples: (\d+) \| elapsed time per iteration "
    r"\(ms\): [\d.]+ \| learning rate: \d\.\d{6}E[+-]\d\d \| global batch size: +(\d+) \| "
    r"lm loss: \d\.\d{6}E[+-]\d\d \| loss scale: 1\.0 \| grad norm: [\d.]+ \| number of "
    r"skipped iterations: +0 \| number of nan iterations: +0 \| tokens/s: [\d.]+ \| "
    r"peak memory \(MB\): [\d.]+ \|$")


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_tiny_launchers_with_torchrun(tmp_path):
    out = str(tmp_path)
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ["PATH"], PYTHON=sys.executable,
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MASTER_PORT=_free_port(),
               CUDA_VISIBLE_DEVICES="",  # a CPU test, also on a GPU host
               LOAD_DIR=f"{out}/qwen3_tiny_hf", SAVE_DIR=f"{out}/mcore",
               INPUT=f"{out}/alpaca_add.json", TOKENIZER_PATH=f"{out}/qwen3_tiny_hf",
               OUTPUT_PREFIX=f"{out}/data/alpaca_add", CKPT_LOAD_DIR=f"{out}/mcore",
               CKPT_SAVE_DIR=f"{out}/lora", DATA_PATH=f"{out}/data/alpaca_add",
               TRAIN_ITERS="4")

    def run(*cmd):
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    run(sys.executable, os.path.join(ROOT, "examples", "quickstart", "make_assets.py"), out)
    # the launchers call tools/ relative to the repository root, as in MindSpeed-LLM
    os.symlink(os.path.join(ROOT, "tools"), tmp_path / "tools")
    run("bash", os.path.join(TINY, "ckpt_convert_tiny_hf2mcore.sh"), "--no-progress")
    run("bash", os.path.join(TINY, "data_convert_tiny_instruction.sh"))
    log = run("bash", os.path.join(TINY, "tune_tiny_lora_ptd.sh"), "--log-interval", "1",
              "--save-interval", "2", "--eval-interval", "2")
    lines = [ln for ln in log.splitlines() if ln.startswith(" iteration")]
    assert len(lines) == 4, log[-3000:]
    for k, ln in enumerate(lines, start=1):
        m = LINE.match(ln)
        assert m, ln
        assert (int(m[1]), int(m[2]), int(m[3]), int(m[4])) == (k, 4, 16 * k, 16)
    assert "validation loss at iteration 2" in log
    assert open(f"{out}/lora/latest_checkpointed_iteration.txt").read().strip() == "4"
    for tp in (0, 1):
        assert os.path.isfile(f"{out}/lora/iter_0000004/mp_rank_{tp:02d}/model_optim_rng.pt")
    assert os.path.isfile(tmp_path / "logs" / "tune_tiny_lora_ptd.log")
