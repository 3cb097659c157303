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


def test_yaml_values_go_through_the_parser_types_and_choices(tmp_path):
    cfg = tmp_path / "run.yaml"
    # PyYAML reads 1e-4 as a string; the flag's type makes it a float
    cfg.write_text("lr: 1e-4\nmin-lr: 1e-5\nseq-length: 64\nlr-decay-style: linear\n"
                   "no-pad-to-seq-lengths: true\ndata-path: a b\n")
    run = parse_args(["--load", "x", "--config", str(cfg)])
    assert run.train.lr == 1e-4 and isinstance(run.train.lr, float) and run.train.min_lr == 1e-5
    assert run.train.seq_length == 64 and run.train.lr_decay_style == "linear"
    assert not run.data.pad_to_seq_lengths and run.data.data_path == ["a", "b"]
    for text, match in (("lr: fast\n", r"run.yaml: argument --lr: invalid float value: 'fast'"),
                        ("lr-decay-style: cubic\n",
                         r"run.yaml: argument --lr-decay-style: invalid choice: 'cubic'"),
                        ("bf16: 1\n", r"run.yaml: bf16: expected true or false, not 1"),
                        ("config: other.yaml\n", r"run.yaml: unknown key\(s\) \['config'\]"),
                        ("use-fused-rmsnorm: true\n",
                         "--use-fused-rmsnorm is not implemented by mindlora")):
        cfg.write_text(text)
        with pytest.raises(ValueError, match=match):
            parse_args(BASE + ["--config", str(cfg)])


def test_megatron_flags_are_honoured_or_refused_by_name():
    # no-ops by construction are accepted (values only where true by construction)
    run = parse_args(BASE + ["--use-mcore-models", "--use-flash-attn", "--transformer-impl",
                             "local", "--attention-dropout", "0.0", "--swiglu",
                             "--make-vocab-size-divisible-by", "1", "--normalization", "RMSNorm",
                             "--no-masked-softmax-fusion", "--context-parallel-size", "1"])
    assert run.train.lr == 1e-4
    # features mindlora lacks are refused, every one named in one error
    with pytest.raises(ValueError) as info:
        parse_args(BASE + ["--use-fused-rmsnorm", "--use-distributed-optimizer",
                           "--transformer-impl", "transformer_engine", "--hidden-dropout", "0.1",
                           "--context-parallel-size", "2"])
    text = str(info.value)
    for part in ("--use-fused-rmsnorm is not implemented", "--use-distributed-optimizer is not "
                 "implemented", "--transformer-impl transformer_engine is not supported",
                 "--hidden-dropout 0.1 is not supported", "--context-parallel-size 2 is not"):
        assert part in text, (part, text)
    # the resume switches and architecture checks land in the configs
    run = parse_args(BASE + ["--no-load-optim", "--no-load-rng", "--rotary-base", "1e6",
                             "--untie-embeddings-and-output-weights", "--padded-vocab-size",
                             "256", "--save-total-limit", "2", "--exit-signal-handler"])
    assert run.train.no_load_optim and run.train.no_load_rng and run.train.exit_signal_handler
    assert run.train.save_total_limit == 2
    assert run.arch_overrides == {"rotary_base": 1e6, "tie_word_embeddings": False,
                                  "padded_vocab_size": 256}
    with pytest.raises(ValueError, match=r"--save-total-limit \(0\) must be >= 1"):
        parse_args(BASE + ["--save-total-limit", "0"])


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
    # architecture / vocabulary / template / backend flags are checked, not ignored
    _expect(["--rotary-base", "5e5", "--add-qkv-bias"], ValueError,
            r"--rotary-base 500000.0 \(checkpoint: 10000.0\)", base, data)
    _expect(["--qk-layernorm"], ValueError, r"--qk-layernorm \(checkpoint: qk_layernorm=False\)",
            base, data)
    _expect(["--padded-vocab-size", "320"], ValueError,
            r"--padded-vocab-size 320 \(checkpoint: vocab_size 256, padded for TP=1 to 256\)",
            base, data)
    _expect(["--prompt-type", "llama3"], ValueError,
            "--prompt-type llama3 but --data-path .* was preprocessed with --prompt-type qwen",
            base, data)
    _expect(["--prompt-type", "no-such-template"], ValueError,
            "--prompt-type: unknown template 'no-such-template'", base, data)
    _expect(["--distributed-backend", "nccl"], ValueError,
            "--distributed-backend nccl, but this cpu run uses gloo", base, data)


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
    write_meta(data, {"vocab_size": 256, "prompt_type": "qwen"})
    big = write_instruction_data(str(tmp_path / "data" / "big"), n=8)
    write_meta(big, {"vocab_size": 1000, "tokenizer_path": "/elsewhere/tok"})
    spawn(_adapter_body, 1, base, data, str(tmp_path / "adapter"))
    spawn(_errors_body, 2, base, data, big, str(tmp_path / "adapter"))


def test_every_parsed_flag_reaches_the_configs():
    """A flag the parser accepts but the configs never read would be swallowed: record which
    parsed values ``_to_configs`` reads; the only unread ones say "no effect" in their help or
    allow only the value that is true by construction."""
    import argparse

    from mindlora.training import args as args_mod

    parser = args_mod.build_parser()
    ns = parser.parse_args(BASE)

    class Recording(argparse.Namespace):
        def __getattribute__(self, name):
            if not name.startswith("_"):
                object.__getattribute__(self, "_read").add(name)
            return object.__getattribute__(self, name)

    rec = Recording(**vars(ns))
    object.__setattr__(rec, "_read", set())
    args_mod._to_configs(rec)
    unread = {a.dest for a in parser._actions} - object.__getattribute__(rec, "_read")
    assert unread == {"help", "config", "tokenizer_type", "is_instruction_dataset", "stage"}, unread
    by_dest = {a.dest: a for a in parser._actions}
    assert by_dest["tokenizer_type"].help.startswith("no effect")
    assert by_dest["is_instruction_dataset"].help.startswith("no effect")
    assert by_dest["stage"].choices == ["sft"]
