"""``python -m mindlora.generate`` end to end, and bad input named by file, line or flag."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mindlora.config import LoRAConfig
from tests.checkpoint.conftest import random_adapter, write_adapter
from tests.distributed.harness import spawn
from tests.generation.conftest import MAX_POS, PROMPTS, ROOT, hf_greedy
from tests.training.fixtures import tiny_model


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mindlora.generate", *args], input=stdin,
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)


def test_cli_jsonl_in_and_out_equals_hf(assets, tokenizer, tmp_path):
    from mindlora.data.tokenizer import load_tokenizer
    from mindlora.generation.prompts import ChatFormat, PromptRecord

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:2]) + "\n"
                   + json.dumps(PROMPTS[2]) + "\n")  # a blank line is skipped
    out = tmp_path / "out" / "answers.jsonl"
    res = _cli("--load", assets.mg, "--lora-load", assets.adapter, "--tokenizer-name-or-path",
               tokenizer, "--prompt-type", "qwen3", "--max-new-tokens", "10", "--prompts",
               str(src), "--output", str(out), "--micro-batch-size", "2")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in ("answer", "token_ids", "tokens_per_s")}
            for r in rows] == PROMPTS
    chat = ChatFormat(load_tokenizer(tokenizer), "qwen3")
    ids = chat.encode([PromptRecord(p, "x") for p in PROMPTS])
    eos = chat.stop_sequences()[0][0]
    for r, ref in zip(rows, hf_greedy(assets.hf, ids, 10, peft_dir=assets.peft)):
        expect = ref[:ref.index(eos) + 1] if eos in ref else ref
        assert r["token_ids"] == expect
        assert r["answer"] == chat.answer_text(expect) and "<|im_end|>" not in r["answer"]
        assert r["tokens_per_s"] > 0
    assert "adapter" in res.stderr and not res.stdout


def test_cli_interactive_streams_and_keeps_the_conversation(assets, tokenizer):
    res = _cli("--load", assets.mg, "--tokenizer-name-or-path", tokenizer, "--prompt-type",
               "qwen", "--max-new-tokens", "6", "--interactive",
               stdin="hello\n\n/clear\nwhat is 2 + 2?\n" + "1 2 3 4 " * 40 + "\nexit\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(">>> ") == 6 and res.stdout.count("tokens/s]") == 2
    assert "interactive: the prompt has" in res.stdout  # too long: said, and the chat goes on
    assert "base model, no adapter" in res.stderr


def test_cli_flag_errors(assets, tokenizer):
    res = _cli("--load", assets.mg, "--tokenizer-name-or-path", tokenizer, "--prompt-type",
               "qwen", "--max-new-tokens", "0", "--top-p", "0", "--prompts", "x.jsonl")
    assert res.returncode == 2
    assert "--max-new-tokens (0) must be >= 1" in res.stderr
    assert "--top-p (0.0) must be in (0, 1]" in res.stderr
    res = _cli("--load", assets.mg, "--tokenizer-name-or-path", tokenizer, "--prompt-type",
               "qwen", "--lora-fusion", "--interactive", "--output", "a.jsonl")
    assert res.returncode == 2
    assert "--lora-fusion needs --lora-load" in res.stderr
    assert "--output goes with --prompts" in res.stderr


def _data_parallel(rank, world, assets, tokenizer, prompts, out, expect):
    from mindlora.generation.args import parse_args
    from mindlora.generation.cli import run

    rows = run(parse_args(["--load", assets.mg, "--lora-load", assets.adapter,
                           "--tokenizer-name-or-path", tokenizer, "--prompt-type", "qwen3",
                           "--max-new-tokens", "10", "--prompts", prompts, "--output", out,
                           "--micro-batch-size", "1"]), log=lambda m: None)
    if rank == 0:
        assert [r["token_ids"] for r in rows] == expect
        assert [r.get("id") for r in rows] == [p.get("id") for p in PROMPTS]
    else:
        assert rows is None


def test_data_parallel_replicas_share_the_prompts(assets, tokenizer, tmp_path):
    """Two processes at TP1 x PP1: two replicas, each answers every other prompt; rank 0 writes
    all of them, in input order, equal to HF + PEFT."""
    from mindlora.data.tokenizer import load_tokenizer
    from mindlora.generation.prompts import ChatFormat, PromptRecord

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    chat = ChatFormat(load_tokenizer(tokenizer), "qwen3")
    ids = chat.encode([PromptRecord(p, "x") for p in PROMPTS])
    eos = chat.stop_sequences()[0][0]
    expect = [ref[:ref.index(eos) + 1] if eos in ref else ref
              for ref in hf_greedy(assets.hf, ids, 10, peft_dir=assets.peft)]
    out = str(tmp_path / "answers.jsonl")
    spawn(_data_parallel, 2, assets, tokenizer, str(src), out, expect)
    assert len(open(out).read().splitlines()) == len(PROMPTS)


def _bad_inputs(rank, world, assets, tokenizer, other_adapter, prompts_file):
    from mindlora.config import ParallelConfig
    from mindlora.generation.args import parse_args
    from mindlora.generation.cli import run
    from mindlora.generation.loading import load_for_generation

    one = ParallelConfig()
    with pytest.raises(FileNotFoundError, match="--lora-load /no/such: no such adapter"):
        load_for_generation(assets.mg, "/no/such", one)
    with pytest.raises(ValueError, match="holds a base checkpoint, not an adapter"):
        load_for_generation(assets.mg, assets.mg, one)
    with pytest.raises(ValueError, match="it was trained on another base model"):
        load_for_generation(assets.mg, other_adapter, one)
    args = ["--load", assets.mg, "--tokenizer-name-or-path", tokenizer, "--max-new-tokens", "4",
            "--prompts", prompts_file]
    with pytest.raises(ValueError, match="--prompt-type: unknown template 'nope'"):
        run(parse_args(args + ["--prompt-type", "nope"]), log=lambda m: None)
    with pytest.raises(ValueError, match=f"{prompts_file}:2: the prompt has \\d+ tokens, but the "
                                         f"model has only {MAX_POS} positions"):
        run(parse_args(args + ["--prompt-type", "qwen"]), log=lambda m: None)


def test_bad_inputs_are_named(assets, tokenizer, tmp_path):
    other = tiny_model(family="llama", add_qkv_bias=False, num_layers=2)
    lora = LoRAConfig(r=4, alpha=8.0, target_modules=("all-linear",))
    other_adapter = write_adapter(str(tmp_path / "other"), other, lora,
                                  random_adapter(other, lora), tp=1, pp=1)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n"
                       + json.dumps({"prompt": "1 2 3 4 5 6 7 8 9 " * 20}) + "\n")
    spawn(_bad_inputs, 1, assets, tokenizer, other_adapter, str(prompts))


@pytest.mark.parametrize("line,message", [
    ("{not json", "p.jsonl:2: invalid JSON"),
    ('["a"]', "p.jsonl:2: expected a JSON object"),
    ('{"text": "a"}', 'p.jsonl:2: give exactly one of "prompt"'),
    ('{"prompt": ""}', 'p.jsonl:2: "prompt" must be a non-empty string'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
     "p.jsonl:2: messages\\[1\\] has role 'user' but a turn of assistant/function"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "p.jsonl:2: the conversation must end with a user turn"),
    ('{"messages": [{"role": "user"}]}', "p.jsonl:2: messages\\[0\\] must be"),
])
def test_bad_prompt_lines_name_file_and_line(tmp_path, line, message):
    from mindlora.generation.prompts import read_prompt_file

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_prompt_file(str(path))
