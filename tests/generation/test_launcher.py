"""The tiny generation launcher under torchrun (2 CPU processes, TP=2) equals HF + PEFT greedy."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.generation.conftest import PROMPTS, ROOT, hf_greedy


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_tiny_generate_launcher_tp2_equals_hf(assets, tokenizer, tmp_path):
    from mindlora.data.tokenizer import load_tokenizer
    from mindlora.generation.prompts import ChatFormat, PromptRecord

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "answers.jsonl"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=ROOT, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", MASTER_PORT=_free_port(),
               CKPT_LOAD_DIR=assets.mg, LORA_LOAD_DIR=assets.adapter, TOKENIZER_PATH=tokenizer,
               PROMPTS=str(prompts), OUTPUT=str(out), MAX_NEW_TOKENS="8")
    launcher = os.path.join(ROOT, "examples", "mcore", "tiny", "generate_tiny_lora_ptd.sh")
    done = subprocess.run(["bash", launcher], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    chat = ChatFormat(load_tokenizer(tokenizer), "qwen3")
    ids = chat.encode([PromptRecord(p, "x") for p in PROMPTS])
    eos = chat.stop_sequences()[0][0]
    refs = hf_greedy(assets.hf, ids, 8, peft_dir=assets.peft)
    assert [r["token_ids"] for r in rows] == [ref[:ref.index(eos) + 1] if eos in ref else ref
                                              for ref in refs]
