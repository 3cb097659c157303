"""Multi-node launch as users do it: two torchrun "nodes" on the loopback address.

``examples/mcore/tiny/tune_tiny_lora_ptd.sh`` runs twice, once per node, with the variables its
header documents (``NNODES=2``, ``NODE_RANK=0/1``, ``NPUS_PER_NODE=1``, ``MASTER_ADDR``,
``MASTER_PORT``): torchrun's static rendezvous on node 0's address. World size 2, TP=2 across the
two nodes, gloo, a shared checkpoint directory (as a shared volume would be). Every logged
iteration equals the same launcher on one node with two processes, and both runs write the same
adapter checkpoint layout.
"""
import os
import re
import subprocess
import sys

from tests.training.test_launcher import ROOT, TINY, _free_port

ITERS = 3
LOSS = re.compile(r"^ iteration +(\d+)/ +\d+ \|.* lm loss: (\S+) \|.* grad norm: (\S+) \|")


def _env(out: str, **extra) -> dict:
    bindir = os.path.dirname(sys.executable)
    return dict(os.environ, PATH=bindir + os.pathsep + os.environ["PATH"], PYTHON=sys.executable,
                PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                LOAD_DIR=f"{out}/qwen3_tiny_hf", SAVE_DIR=f"{out}/mcore",
                INPUT=f"{out}/alpaca_add.json", TOKENIZER_PATH=f"{out}/qwen3_tiny_hf",
                OUTPUT_PREFIX=f"{out}/data/alpaca_add", CKPT_LOAD_DIR=f"{out}/mcore",
                DATA_PATH=f"{out}/data/alpaca_add", TRAIN_ITERS=str(ITERS),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(), **extra)


def _tune(cwd, env) -> subprocess.Popen:
    os.makedirs(cwd, exist_ok=True)
    return subprocess.Popen(["bash", os.path.join(TINY, "tune_tiny_lora_ptd.sh"),
                             "--log-interval", "1", "--eval-interval", "100"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError("launcher timed out:\n" + out[-3000:])
    assert proc.returncode == 0, out[-4000:]
    return out


def _curve(log: str) -> list[tuple[str, str, str]]:
    return [m.groups() for m in map(LOSS.match, log.splitlines()) if m]


def test_two_nodes_equal_one_node(tmp_path):
    out = str(tmp_path)
    setup = _env(out)
    for cmd in ([sys.executable, os.path.join(ROOT, "examples", "quickstart", "make_assets.py"),
                 out],
                ["bash", os.path.join(TINY, "ckpt_convert_tiny_hf2mcore.sh"), "--no-progress"],
                ["bash", os.path.join(TINY, "data_convert_tiny_instruction.sh")]):
        if not os.path.exists(tmp_path / "tools"):
            os.symlink(os.path.join(ROOT, "tools"), tmp_path / "tools")
        done = subprocess.run(cmd, cwd=tmp_path, env=setup, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    one = _finish(_tune(f"{out}/one", _env(out, NPUS_PER_NODE="2", NNODES="1", NODE_RANK="0",
                                           CKPT_SAVE_DIR=f"{out}/lora_one")))
    two = _env(out, NPUS_PER_NODE="1", NNODES="2", CKPT_SAVE_DIR=f"{out}/lora_two")
    nodes = [_tune(f"{out}/node{k}", dict(two, NODE_RANK=str(k))) for k in (0, 1)]
    logs = [_finish(p) for p in nodes]

    expected = _curve(one)
    assert [int(i) for i, _, _ in expected] == list(range(1, ITERS + 1)), one[-3000:]
    assert _curve(logs[0]) == expected, (logs[0][-3000:], expected)
    assert _curve(logs[1]) == [], "only global rank 0 (on node 0) logs iterations"
    for tp in (0, 1):  # TP rank 1 lives on node 1 and wrote into the shared directory
        assert os.path.isfile(f"{out}/lora_two/iter_{ITERS:07d}/mp_rank_{tp:02d}/"
                              f"model_optim_rng.pt")
    assert open(f"{out}/lora_two/latest_checkpointed_iteration.txt").read().strip() == str(ITERS)
