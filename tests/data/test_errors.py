"""Bad input fails with the file and line (or is skipped and counted), never half-written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mindlora.data.cli import config_from_args
from mindlora.data.preprocess import PreprocessConfig
from tests.data.helpers import alpaca_records, preprocess, write_jsonl

GOOD = alpaca_records(4)
BAD_CASES = {  # record, expected message (after "<file>:<line>: ")
    "malformed": ('{"instruction": "x", "output": ', r"malformed JSON"),
    "missing": ({"instruction": "x"}, r"missing field 'output'"),
    "wrong type": ({"instruction": "x", "output": 42}, r"field 'output' must be a string, got int"),
    "empty response": ({"instruction": "x", "output": "  "}, r"field 'output' is empty"),
    "not an object": ([1, 2], r"expected a JSON object, got list"),
}


def _leftovers(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_names_file_and_line_and_leaves_nothing(tmp_path, hf_dir, case):
    record, message = BAD_CASES[case]
    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:2] + [record] + GOOD[2:])
    with pytest.raises(ValueError, match=rf"in\.jsonl:3: {message}.*--skip-invalid"):
        preprocess(tmp_path, src, hf_dir, chunk_size=2)
    assert _leftovers(tmp_path / "out") == []


def test_skip_invalid_counts_and_keeps_the_rest(tmp_path, hf_dir):
    bad = [BAD_CASES[c][0] for c in sorted(BAD_CASES)]
    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:2] + bad + GOOD[2:])
    _, summary = preprocess(tmp_path, src, hf_dir, skip_invalid=True)
    assert (summary.samples, summary.invalid, summary.written) == (9, 5, 4)


def test_sharegpt_structure_errors(tmp_path, hf_dir):
    cases = [
        ({"conversations": [{"from": "human", "value": "hi"}]}, r"must end with an assistant"),
        ({"conversations": [{"from": "gpt", "value": "hi"}]}, r"conversations\[0\]: role 'gpt' "
                                                                r"out of order"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
         r"unknown role 'robot'"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
         r"conversations\[1\]: empty response"),
        ({"dialog": []}, r"missing field 'conversations'"),
        ({"conversations": "text"}, r"must be a non-empty list"),
    ]
    for n, (rec, message) in enumerate(cases):
        src = write_jsonl(tmp_path / f"s{n}.jsonl", [rec])
        with pytest.raises(ValueError, match=rf"s{n}\.jsonl:1: .*{message}"):
            preprocess(tmp_path, src, hf_dir, name=f"s{n}",
                       handler_name="SharegptStyleInstructionHandler")


def test_json_list_and_parquet_locations(tmp_path, hf_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = GOOD[:2] + [{"instruction": "x", "output": ""}]
    (tmp_path / "list.json").write_text(json.dumps(recs, indent=1))
    starts = [n for n, t in enumerate(json.dumps(recs, indent=1).splitlines(), 1) if t == " {"]
    line = starts[2]  # the third element's opening line
    with pytest.raises(ValueError, match=rf"list\.json:{line}: field 'output' is empty"):
        preprocess(tmp_path, tmp_path / "list.json", hf_dir, name="j")
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet:row 3: field 'output' is empty"):
        preprocess(tmp_path, tmp_path / "t.parquet", hf_dir, name="p")
    (tmp_path / "broken.json").write_text('[\n{"instruction": "a", "output": "b"},\n{"oops"\n]')
    with pytest.raises(ValueError, match=r"broken\.json:3: malformed JSON"):
        preprocess(tmp_path, tmp_path / "broken.json", hf_dir, name="b")


def test_failed_run_keeps_the_previous_dataset(tmp_path, hf_dir):
    prefix, _ = preprocess(tmp_path, GOOD, hf_dir)
    before = {f: (tmp_path / "out" / f).read_bytes() for f in _leftovers(tmp_path / "out")}
    src = write_jsonl(tmp_path / "bad.jsonl", alpaca_records(50) + ['{"broken'])
    with pytest.raises(ValueError, match=r"bad\.jsonl:51"):
        preprocess(tmp_path, src, hf_dir, chunk_size=8)
    after = {f: (tmp_path / "out" / f).read_bytes() for f in _leftovers(tmp_path / "out")}
    assert after == before  # no temp files left, old files untouched


def test_worker_failure_also_cleans_up(tmp_path, hf_dir):
    src = write_jsonl(tmp_path / "in.jsonl", alpaca_records(40) + [{"instruction": "x"}])
    with pytest.raises(ValueError, match=r"in\.jsonl:41: missing field 'output'"):
        preprocess(tmp_path, src, hf_dir, workers=2, chunk_size=8)
    assert _leftovers(tmp_path / "out") == []


def test_config_errors_are_collected_and_name_flags(tmp_path, hf_dir):
    with pytest.raises(ValueError) as err:
        PreprocessConfig(input="x", tokenizer_name_or_path=hf_dir, output_prefix="o",
                         prompt_type="chatml", enable_thinking="true", pack=True, workers=0)
    text = str(err.value)
    for piece in ("--pack needs --seq-length", "--workers must be >= 1",
                  "--enable-thinking true: template 'chatml' has no thought_words"):
        assert piece in text
    with pytest.raises(ValueError, match="--prompt-type is required"):
        PreprocessConfig(input="x", tokenizer_name_or_path=hf_dir, output_prefix="o")
    with pytest.raises(ValueError, match=r"--map-keys: not valid JSON"):
        config_from_args(["--input", "x", "--tokenizer-name-or-path", hf_dir, "--output-prefix",
                          "o", "--prompt-type", "qwen3", "--map-keys", "{bad"])
    with pytest.raises(ValueError, match=r"--map-keys: unknown key\(s\) \['promt'\]"):
        preprocess(tmp_path, GOOD, hf_dir, map_keys={"promt": "q"})
    with pytest.raises(FileNotFoundError, match=r"--input: .*missing\.jsonl does not exist"):
        preprocess(tmp_path, tmp_path / "missing.jsonl", hf_dir)
    with pytest.raises(ValueError, match=r"--tokenizer-name-or-path: cannot load"):
        (tmp_path / "tok").mkdir()
        preprocess(tmp_path, GOOD, str(tmp_path / "tok"))
    assert _leftovers(tmp_path / "out") == []
