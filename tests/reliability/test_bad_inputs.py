"""Damaged or mismatched inputs: one clear error line naming the file, exit status 2, no
traceback, nothing written. Each case runs the real entry point (``mindlora.train.main``)."""
import os
import shutil

import numpy as np
import pytest
import torch

from tests.distributed.harness import spawn
from tests.reliability.helpers import flags, full_disk_on, one_error_line, run_main, train
from tests.training.fixtures import tiny_model, write_base_checkpoint, write_instruction_data

from mindlora.checkpoint import describe

REGEX = ".*linear_qkv|.*linear_fc2"
TARGETS = ("--lora-target-modules", REGEX)


def _pp2_adapter_body(rank, world, base, data, out):
    train(base, data, 1, *TARGETS, "--pipeline-model-parallel-size", "2", "--save", out)


def _flip_byte_in_a_tensor(path):
    """Corrupt one byte inside a tensor's data (the zip and pickle stay readable)."""
    reader = torch._C.PyTorchFileReader(path)
    record = sorted(n for n in reader.get_all_records() if "/data/" in f"/{n}")[0]
    offset = reader.get_record_offset(record)
    with open(path, "r+b") as f:
        f.seek(offset + 2)
        byte = f.read(1)
        f.seek(offset + 2)
        f.write(bytes([byte[0] ^ 0x5A]))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from mindlora.checkpoint import megatron_format as fmt

    root = str(tmp_path_factory.mktemp("bad"))
    base = write_base_checkpoint(f"{root}/base", tiny_model())
    data = write_instruction_data(f"{root}/data/sft", n=16)
    rc, out, err = run_main(flags(base, data, 1, *TARGETS, "--save", f"{root}/adapter"),
                            f"{root}/logs")
    assert rc == 0, err
    spawn(_pp2_adapter_body, 2, base, data, f"{root}/pp2")
    return {"root": root, "base": base, "data": data, "adapter": f"{root}/adapter",
            "pp2": f"{root}/pp2", "stdout": out, "fmt": fmt}


def test_regex_targets_are_printed_stored_and_read_by_conversion(inputs):
    from mindlora.checkpoint.convert import ConvertOptions, check_adapter
    from mindlora.checkpoint.reshard import MegatronReader

    fmt = inputs["fmt"]
    assert "> LoRA target modules: linear_qkv linear_fc2" in inputs["stdout"]
    _, meta = describe.read_checkpoint_meta(inputs["adapter"])
    assert meta["lora_config"]["target_modules"] == ["linear_qkv", "linear_fc2"]
    reader = MegatronReader(inputs["adapter"])
    assert reader.lora_config.target_modules == ("linear_qkv", "linear_fc2")
    opts = ConvertOptions(load_model_type="mg", save_model_type="hf", save_dir="unused",
                          lora_target_modules=[REGEX])
    check_adapter(reader, reader.model_config, opts, "--lora-load", inputs["adapter"])
    opts.lora_target_modules = ["all-linear"]
    with pytest.raises(ValueError, match="--lora-target-modules linear_qkv linear_proj "
                                         "linear_fc1 linear_fc2 but the adapter targets "
                                         "linear_qkv linear_fc2"):
        check_adapter(reader, reader.model_config, opts, "--lora-load", inputs["adapter"])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _case(inputs, name):
    """(base, data, adapter) copies a case may damage, and where its run would save."""
    root = f"{inputs['root']}/{name}"
    os.makedirs(root)
    return root, f"{root}/save"


def test_damaged_inputs_fail_with_one_line_naming_the_file(inputs):
    fmt = inputs["fmt"]
    base, data = inputs["base"], inputs["data"]
    cases = []
    # 1. a truncated adapter file
    root, save = _case(inputs, "truncated")
    adapter = _copy(inputs["adapter"], f"{root}/adapter")
    path = fmt.rank_file_path(adapter, 1, 0, 0, 1)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    cases.append((flags(base, data, 2, *TARGETS, "--lora-load", adapter, "--save", save),
                  rf"{path} is not a readable torch checkpoint \(truncated or corrupt\?\)", save))
    # 2. a corrupted adapter file (one byte of a tensor flipped; torch does not notice)
    root, save = _case(inputs, "corrupt")
    adapter = _copy(inputs["adapter"], f"{root}/adapter")
    path = fmt.rank_file_path(adapter, 1, 0, 0, 1)
    _flip_byte_in_a_tensor(path)
    cases.append((flags(base, data, 2, *TARGETS, "--lora-load", adapter, "--save", save),
                  rf"{path} is corrupt: its content does not match the checksum", save))
    # 3. a missing rank file (the second pipeline stage of a PP2 adapter)
    root, save = _case(inputs, "missing")
    adapter = _copy(inputs["pp2"], f"{root}/adapter")
    path = fmt.rank_file_path(adapter, 1, 0, 1, 2)
    os.unlink(path)
    cases.append((flags(base, data, 2, *TARGETS, "--lora-load", adapter, "--finetune",
                        "--save", save), rf"missing checkpoint file {path}", save))
    # 4. an adapter trained on another base model
    root, save = _case(inputs, "other")
    other = write_base_checkpoint(f"{root}/base", tiny_model(num_layers=2))
    cases.append((flags(other, data, 2, *TARGETS, "--lora-load", inputs["adapter"],
                        "--save", save),
                  rf"--lora-load {inputs['adapter']}: it was trained on another base model "
                  rf"\(qwen2, 4 layers, hidden 64\) than --load \(qwen2, 2 layers", save))
    # 5. a data file truncated mid-record
    root, save = _case(inputs, "short_data")
    prefix = f"{root}/sft"
    for suffix in ("input_ids", "attention_mask", "labels"):
        for ext in ("bin", "idx"):
            shutil.copy(f"{data}_packed_{suffix}_document.{ext}",
                        f"{prefix}_packed_{suffix}_document.{ext}")
    bin_file = f"{prefix}_packed_labels_document.bin"
    with open(bin_file, "r+b") as f:
        f.truncate(os.path.getsize(bin_file) - 6)  # mid-record: not a whole token
    cases.append((flags(base, prefix, 2, "--save", save), rf"{bin_file}: truncated data", save))
    # 6. a NaN in the base weights
    root, save = _case(inputs, "nan")
    nan_base = _copy(base, f"{root}/base")
    path = fmt.rank_file_path(nan_base, "release", 0, 0, 1)
    payload = fmt.load_rank_file(path, mmap=False)
    payload["model"]["decoder.layers.2.mlp.linear_fc1.weight"][3, 5] = float("nan")
    fmt.write_rank_file(path, payload)
    cases.append((flags(nan_base, data, 2, "--save", save),
                  rf"--load {nan_base}/release: decoder.layers.2.mlp.linear_fc1.weight holds "
                  rf"NaN/Inf values", save))
    for i, (argv, match, save) in enumerate(cases, 1):
        rc, out, err = run_main(argv, f"{os.path.dirname(save)}/logs")
        line = one_error_line(rc, err)
        assert __import__("re").search(match, line), (i, match, line)
        assert not os.path.exists(save), (i, os.listdir(save))


def test_full_disk_through_the_entry_point(inputs):
    fmt = inputs["fmt"]
    save = f"{inputs['root']}/enospc"
    rc, out, err = run_main(flags(inputs["base"], inputs["data"], 3, "--save", save,
                                  "--save-interval", "1"), f"{save}-logs",
                            setup=lambda: full_disk_on(".iter_0000002.tmp"))
    line = one_error_line(rc, err)
    assert (f"saving checkpoint iteration 2 to {save} failed: {save}/.iter_0000002.tmp/mp_rank_00/"
            f"model_optim_rng.pt: No space left on device; the previous checkpoint (iteration 1) "
            f"is untouched") in line, line
    assert sorted(os.listdir(save)) == ["iter_0000001", fmt.TRACKER]
    assert fmt.read_tracker(save) == 1
    assert np.isfinite(fmt.load_rank_file(fmt.rank_file_path(save, 1, 0, 0, 1))
                       ["train_state"]["iteration"])
