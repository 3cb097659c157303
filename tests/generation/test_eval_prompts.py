"""``--eval-prompts``: a short training run writes greedy samples every ``--eval-interval``.

The run starts from a random adapter (``--lora-load --finetune``) so that LoRA visibly changes
the answers. The samples written at the last iteration must equal what ``mindlora.generation``
produces offline (KV cache, no sequence parallelism) from the adapter saved at that iteration,
and differ from the base model's. The training-time samples come from the live model (TP2 +
sequence parallel: no cache, padded to the TP size; PP2: activations passed between stages;
interleaved PP2 x 2 virtual stages: activations wrap from the last stage back to the first).
TensorBoard text goes to a stand-in writer (the tensorboard package is not installed here).
"""
from __future__ import annotations

import json
import os

import pytest

from mindlora.config import LoRAConfig
from tests.checkpoint.conftest import random_adapter, write_adapter
from tests.distributed.harness import spawn
from tests.training.fixtures import preprocess_alpaca, tiny_model, write_base_checkpoint


def _train_with_samples(rank, world, base, adapter, data, prompts, save, layout):
    from mindlora.config import ParallelConfig
    from mindlora.data.tokenizer import load_tokenizer
    from mindlora.generation import ChatFormat, Generator, SamplingConfig, read_prompt_file
    from mindlora.generation.loading import load_for_generation
    from mindlora.training.args import parse_args
    from mindlora.training.loop import train

    lines: list[str] = []
    flags = ["--load", base, "--data-path", data, "--micro-batch-size", "2",
             "--global-batch-size", "4", "--seq-length", "64", "--train-iters", "4",
             "--lr", "2e-2", "--lora-r", "4", "--lora-alpha", "8", "--save", save,
             "--save-interval", "4", "--eval-interval", "2", "--eval-prompts", prompts,
             "--eval-max-new-tokens", "6", "--lora-load", adapter, "--finetune", *layout]
    train(parse_args(flags), log=lines.append)
    path = os.path.join(save, "samples.jsonl")
    if rank == 0:
        assert sum("sample answers at iteration" in ln for ln in lines) == 2
    rows = [json.loads(x) for x in open(path).read().splitlines()]
    assert [r["iteration"] for r in rows] == [2, 2, 4, 4]
    assert [r["prompt"] for r in rows[:2]] == ["What is 3 + 4?", "Add 10 and 20."]
    assert all(1 <= len(r["token_ids"]) <= 6 and isinstance(r["answer"], str) for r in rows)

    meta = json.load(open(f"{data}_meta.json"))
    chat = ChatFormat(load_tokenizer(meta["tokenizer_path"]), meta["prompt_type"])
    tp = int(layout[layout.index("--tensor-model-parallel-size") + 1])
    pp = int(layout[layout.index("--pipeline-model-parallel-size") + 1])
    loaded = load_for_generation(base, save, ParallelConfig(tensor_model_parallel_size=tp,
                                                            pipeline_model_parallel_size=pp))
    gen = Generator(loaded.chunks, loaded.model.vocab_size,
                    loaded.model.max_position_embeddings, chat.stop_sequences(), chat.tok.pad_id)
    records = read_prompt_file(prompts)
    offline = gen.generate(chat.encode(records), SamplingConfig(max_new_tokens=6))
    assert [g.token_ids for g in offline] == [r["token_ids"] for r in rows[2:]]
    # TensorBoard text (through a stand-in writer: tensorboard is not installed here).
    from mindlora.training.samples import SampleAnswers

    class Writer:
        calls: list = []

        def add_text(self, tag, text, step):
            self.calls.append((tag, text, step))

    writer = Writer()
    run = parse_args(flags[:flags.index("--save")] + flags[flags.index("--save") + 2:])
    again = SampleAnswers(run, loaded.chunks, loaded.model, lambda m: None, writer).write(9)
    if rank == 0:
        assert [r["token_ids"] for r in again] == [r["token_ids"] for r in rows[2:]]
        assert writer.calls and writer.calls[0][0] == "sample answers"
        assert writer.calls[0][2] == 9 and "What is 3 + 4?" in writer.calls[0][1]
    # ... and the adapter matters: the base model alone answers otherwise.
    alone = load_for_generation(base, None, ParallelConfig(tensor_model_parallel_size=tp,
                                                           pipeline_model_parallel_size=pp))
    gen = Generator(alone.chunks, alone.model.vocab_size, alone.model.max_position_embeddings,
                    chat.stop_sequences(), chat.tok.pad_id)
    assert [g.token_ids for g in gen.generate(chat.encode(records), SamplingConfig(
        max_new_tokens=6))] != [r["token_ids"] for r in rows[2:]]


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1",
     "--sequence-parallel"],
    ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"],
    ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
     "--num-layers-per-virtual-pipeline-stage", "1"],
], ids=["tp2-sp", "pp2", "pp2-vpp2"])
def test_eval_prompts_write_samples(tmp_path, layout):
    data, vocab = preprocess_alpaca(str(tmp_path / "alpaca"), n=48)
    model = tiny_model(vocab_size=vocab)
    base = write_base_checkpoint(str(tmp_path / "base"), model)
    # Start from a random adapter (non-zero B) so that the LoRA path visibly changes the answers.
    lora = LoRAConfig(r=4, alpha=8.0)
    adapter = write_adapter(str(tmp_path / "start"), model, lora, random_adapter(model, lora),
                            tp=1, pp=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 3 + 4?\n\nAdd 10 and 20.\n")
    spawn(_train_with_samples, 2, base, adapter, data, str(prompts), str(tmp_path / "lora"), layout)


def test_eval_prompts_flags_are_checked():
    from mindlora.training.args import parse_args

    with pytest.raises(ValueError, match="--eval-prompts \\(p.txt\\) needs --eval-interval"):
        parse_args(["--load", "b", "--data-path", "d", "--eval-prompts", "p.txt"])
