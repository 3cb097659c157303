"""Bad flags and bad inputs fail at once, naming the flag, file or value, before any training."""
import pytest

from mindlora.training.args import parse_args
from tests.distributed.harness import spawn
from tests.training.fixtures import tiny_model, write_base_checkpoint, write_instruction_data

BASE = ["--load", "/nonexistent/base", "--data-path", "/nonexistent/data"]


def test_unknown_and_conflicting_flags():
    with pytest.raises(ValueError, match="unknown flag.*--lora-rank"):
        parse_args(BASE + ["--lora-rank", "8"])
    with pytest.raises(ValueError, match="--bf16 and --fp16"):
        parse_args(BASE + ["--bf16", "--fp16"])
    with pytest.raises(ValueError, match="--lr-warmup-fraction and --lr-warmup-iters"):
        parse_args(BASE + ["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"])
    with pytest.raises(ValueError, match=r"--lora-r \(0\)"):
        parse_args(BASE + ["--lora-r", "0"])
    with pytest.raises(ValueError, match="--data-path is required"):
        parse_args(["--load", "x"])
    with pytest.raises(ValueError, match="unknown target"):
        parse_args(BASE + ["--lora-target-modules", "q_proj"])


def test_yaml_config_fills_flags_and_cli_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("micro-batch-size: 2\nglobal_batch_size: 16\nlora-r: 16\n"
                   "lora-target-modules: linear_qkv linear_proj\nbf16: true\n")
    run = parse_args(BASE + ["--config", str(cfg), "--lora-r", "32"])
    assert run.train.micro_batch_size == 2 and run.train.global_batch_size == 16
    assert run.lora.r == 32 and run.lora.target_modules == ("linear_qkv", "linear_proj")
    assert run.train.bf16
    cfg.write_text("micro-batch-size: 2\nlearning-rate: 0.1\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown key\(s\) \['learning-rate'\]"):
        parse_args(BASE + ["--config", str(cfg)])


def _expect(extra, error, match, base, data):
    from mindlora.training.args import parse_args as parse
    from mindlora.training.loop import Trainer

    flags = ["--load", base, "--data-path", data, "--micro-batch-size", "1",
             "--global-batch-size", "4", "--seq-length", "32", "--train-iters", "2", *extra]
    with pytest.raises(error, match=match):
        Trainer(parse(flags), log=lambda *_: None)


def _errors_body(rank, world, base, data, bigvocab, adapter):
    _expect([], FileNotFoundError, r"missing_packed_input_ids_document\.bin", base,
            data.replace("sft", "missing"))
    _expect([], ValueError, "larger than the model's 256", base, bigvocab)
    _expect(["--global-batch-size", "3"], ValueError,
            r"--global-batch-size \(3\) must be a multiple of --micro-batch-size \(1\) x "
            r"data-parallel size \(2\)", base, data)
    _expect(["--num-layers", "6"], ValueError, r"--num-layers 6 \(checkpoint: 4\)", base, data)
    _expect(["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
            ValueError, r"world size \(2\) must be a multiple", base, data)
    _expect(["--pipeline-model-parallel-size", "2", "--num-layer-list", "1,2"], ValueError,
            "--num-layer-list sums to 3 but the model has 4 layers", base, data)
    _expect(["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
             "3"], ValueError, "must divide num_layers", base, data)
    _expect(["--lora-load", adapter, "--lora-r", "16"], ValueError,
            "--lora-r is 16 but the adapter was saved with 4", base, data)
    _expect(["--load", data], FileNotFoundError, "latest_checkpointed_iteration.txt", base, data)


def _adapter_body(rank, world, base, data, out):
    from mindlora.training.args import parse_args as parse
    from mindlora.training.loop import train

    train(parse(["--load", base, "--data-path", data, "--micro-batch-size", "1",
                 "--global-batch-size", "2", "--seq-length", "32", "--train-iters", "1",
                 "--lora-r", "4", "--save", out]), log=lambda *_: None)


def test_bad_inputs_fail_before_training(tmp_path):
    from mindlora.data.meta import write_meta

    base = write_base_checkpoint(str(tmp_path / "base"), tiny_model())
    data = write_instruction_data(str(tmp_path / "data" / "sft"), n=8)
    big = write_instruction_data(str(tmp_path / "data" / "big"), n=8)
    write_meta(big, {"vocab_size": 1000, "tokenizer_path": "/elsewhere/tok"})
    spawn(_adapter_body, 1, base, data, str(tmp_path / "adapter"))
    spawn(_errors_body, 2, base, data, big, str(tmp_path / "adapter"))
