"""End-to-end preprocessing: input formats, handlers, packing, workers, output names, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from mindlora.data.dataset import InstructionDataset, PairwiseDataset
from mindlora.data.indexed import IndexedDataset
from mindlora.data.meta import read_dataset_meta
from tests.data.helpers import alpaca_records, preprocess, write_jsonl

REPO = Path(__file__).resolve().parents[2]
INSTRUCTION_FILES = ["_packed_input_ids_document", "_packed_attention_mask_document",
                     "_packed_labels_document"]


def _files(prefix: str) -> dict[str, bytes]:
    folder = Path(prefix).parent
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.suffix != ".json"}


def test_alpaca_outputs_names_labels_and_meta(tmp_path, hf_tok, hf_dir):
    recs = alpaca_records(12)
    prefix, summary = preprocess(tmp_path, recs, hf_dir)
    assert sorted(_files(prefix)) == sorted(f"out{s}{e}" for s in INSTRUCTION_FILES
                                            for e in (".bin", ".idx"))
    assert (summary.samples, summary.written, summary.documents) == (12, 12, 12)
    ds = InstructionDataset(prefix, 4096)
    for rec, sample in zip(recs, ds):
        ids, labels = sample["input_ids"].numpy(), sample["labels"].numpy()
        learned = hf_tok.decode(ids[labels != -100].tolist())
        assert learned == rec["output"] + "<|im_end|>\n"  # the added empty <think>: prompt
        prompt = hf_tok.decode(ids[labels == -100].tolist())
        assert rec["instruction"] in prompt and rec["output"] not in prompt
        np.testing.assert_array_equal(labels[labels != -100], ids[labels != -100])  # unshifted
    mask = IndexedDataset(prefix + "_packed_attention_mask_document")
    assert all((mask[i] == 1).all() for i in range(len(mask)))
    meta = read_dataset_meta(prefix)
    assert meta["vocab_size"] == hf_tok.vocab_size
    assert meta["tokenizer_fingerprint"] == hf_tok.fingerprint
    assert meta["summary"]["tokens"] == summary.tokens == sum(len(s["input_ids"]) for s in ds)


def test_json_jsonl_parquet_and_folder_give_the_same_bytes(tmp_path, hf_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = alpaca_records(9)
    (tmp_path / "list.json").write_text(json.dumps(recs, indent=2))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "data.parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", recs[:4])
    write_jsonl(folder / "b.jsonl", recs[4:])
    outs = [_files(preprocess(tmp_path, recs, hf_dir, name="jsonl")[0])]
    for name, src in (("json", tmp_path / "list.json"), ("pq", tmp_path / "data.parquet"),
                      ("dir", folder)):
        prefix, _ = preprocess(tmp_path, src, hf_dir, name=name)
        outs.append({k.replace(name, "jsonl", 1): v for k, v in _files(prefix).items()})
    assert all(o == outs[0] for o in outs[1:])


def test_sharegpt_and_openai_messages_agree(tmp_path, hf_dir, hf_tok):
    turns = [("Hi", "Hello!"), ("How are you?", "Fine, thanks.")]
    share = [{"system": "Be kind.", "conversations": [
        x for q, a in turns for x in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]}]
    openai = [{"messages": [{"role": "system", "content": "Be kind."}] + [
        x for q, a in turns for x in ({"role": "user", "content": q},
                                      {"role": "assistant", "content": a})]}]
    kw = dict(handler_name="SharegptStyleInstructionHandler", prompt_type="chatml")
    p1, _ = preprocess(tmp_path, share, hf_dir, name="share", **kw)
    p2, _ = preprocess(tmp_path, openai, hf_dir, name="openai", **kw)
    a, b = InstructionDataset(p1, 512)[0], InstructionDataset(p2, 512)[0]
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    assert a["labels"].tolist() == b["labels"].tolist()
    learned = hf_tok.decode(a["input_ids"][a["labels"] != -100].tolist())
    assert learned == "Hello!<|im_end|>\nFine, thanks.<|im_end|>\n"
    assert hf_tok.decode(a["input_ids"].tolist()).startswith("<|im_start|>system\nBe kind.")


def test_pairwise_handlers(tmp_path, hf_dir, hf_tok):
    alpaca = [{"instruction": "Pick one", "input": "", "chosen": "Good answer.",
               "rejected": "Bad answer."}]
    share = [{"conversations": [{"from": "human", "value": "Pick one"}],
              "chosen": {"from": "gpt", "value": "Good answer."},
              "rejected": {"from": "gpt", "value": "Bad answer."}}]
    results = []
    for name, recs in (("AlpacaStylePairwiseHandler", alpaca),
                       ("SharegptStylePairwiseHandler", share)):
        prefix, _ = preprocess(tmp_path, recs, hf_dir, name=name[:6], handler_name=name,
                               prompt_type="qwen")
        names = sorted(_files(prefix))
        for side in ("chosen", "rejected"):
            for key in ("input_ids", "attention_mask", "labels"):
                assert f"{name[:6]}_packed_{side}_{key}_document.bin" in names
        results.append(PairwiseDataset(prefix, 512)[0])
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])
    s = results[0]
    for side, text in (("chosen", "Good answer."), ("rejected", "Bad answer.")):
        ids, labels = s[f"{side}_input_ids"], s[f"{side}_labels"]
        assert hf_tok.decode(ids[labels != -100].tolist()) == text + "<|im_end|>\n"
    n_prompt = int((s["chosen_labels"] == -100).sum())
    assert s["chosen_input_ids"][:n_prompt].tolist() == s["rejected_input_ids"][:n_prompt].tolist()


def test_pretrain_text_document_with_eod(tmp_path, hf_dir, hf_tok):
    recs = [{"text": "Plain text one."}, {"text": "Plain text two, longer."}]
    for eod in (False, True):
        prefix, _ = preprocess(tmp_path, recs, hf_dir, name=f"pt{int(eod)}",
                               handler_name="GeneralPretrainHandler", append_eod=eod)
        assert sorted(_files(prefix)) == [f"pt{int(eod)}_text_document.bin",
                                          f"pt{int(eod)}_text_document.idx"]
        ds = IndexedDataset(prefix + "_text_document")
        for rec, i in zip(recs, range(len(ds))):
            assert ds[i].tolist() == hf_tok.encode(rec["text"]) + [hf_tok.eos_id] * eod


def test_one_and_two_workers_write_identical_bytes(tmp_path, hf_dir):
    recs = alpaca_records(150)
    kw = dict(chunk_size=16, seq_length=40, overlong="truncate")
    p1, s1 = preprocess(tmp_path, recs, hf_dir, name="w1", workers=1, **kw)
    p2, s2 = preprocess(tmp_path, recs, hf_dir, name="w2", workers=2, **kw)
    rename = lambda files: {k.replace("w2", "w1", 1): v for k, v in files.items()}
    assert _files(p1) == rename(_files(p2)) and s1.truncated == s2.truncated > 0


def test_packing(tmp_path, hf_dir):
    recs = alpaca_records(40)
    plain, _ = preprocess(tmp_path, recs, hf_dir, name="plain", prompt_type="empty")
    packed, summary = preprocess(tmp_path, recs, hf_dir, name="packed", prompt_type="empty",
                                 pack=True, seq_length=128)
    singles = InstructionDataset(plain, 10_000)
    rows = InstructionDataset(packed, 10_000)
    seg = IndexedDataset(packed + "_packed_attention_mask_document")
    assert summary.documents == len(rows) < len(singles) // 2
    seen = []
    for r in range(len(rows)):
        ids, labels, segs = rows[r]["input_ids"], rows[r]["labels"].numpy(), seg.document(r)
        assert len(ids) <= 128 and len(segs) == len(ids)
        starts = np.flatnonzero(np.diff(segs, prepend=0))
        assert (labels[starts] == -100).all()  # no sample learns its neighbour's first token
        for lo, hi in zip(starts, list(starts[1:]) + [len(ids)]):
            seen.append(tuple(ids[lo:hi].tolist()))
    assert sorted(seen) == sorted(tuple(s["input_ids"].tolist()) for s in singles)


def test_overlong_drop_or_truncate(tmp_path, hf_dir):
    recs = alpaca_records(6) + [{"instruction": "long", "output": "word " * 200}]
    _, dropped = preprocess(tmp_path, recs, hf_dir, name="drop", seq_length=60)
    assert (dropped.dropped, dropped.truncated, dropped.written) == (1, 0, 6)
    prefix, cut = preprocess(tmp_path, recs, hf_dir, name="cut", seq_length=60,
                             overlong="truncate")
    assert (cut.dropped, cut.truncated, cut.written) == (0, 1, 7)
    assert len(InstructionDataset(prefix, 1000)[6]["input_ids"]) == 60


def test_map_keys_and_train_on_inputs(tmp_path, hf_dir):
    recs = [{"question": r["instruction"], "ctx": r["input"], "answer": r["output"]}
            for r in alpaca_records(5)]
    keys = {"prompt": "question", "query": "ctx", "response": "answer"}
    mapped, _ = preprocess(tmp_path, recs, hf_dir, name="mapped", map_keys=keys)
    plain, _ = preprocess(tmp_path, alpaca_records(5), hf_dir, name="plain")
    assert _files(mapped)["mapped_packed_labels_document.bin"] == \
        _files(plain)["plain_packed_labels_document.bin"]
    all_in, _ = preprocess(tmp_path, alpaca_records(5), hf_dir, name="all", train_on_inputs=True)
    s = InstructionDataset(all_in, 512)[0]
    assert s["labels"].tolist() == s["input_ids"].tolist()


def test_cli(tmp_path, hf_dir):
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_records(5))
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(src),
           "--tokenizer-name-or-path", hf_dir, "--output-prefix", str(tmp_path / "o" / "alpaca"),
           "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "qwen3",
           "--tokenizer-type", "PretrainedFromHF", "--enable-thinking", "false",
           "--workers", "1", "--log-interval", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "processed 4 samples" in run.stderr and "5 samples read, 5 written" in run.stderr
    assert (tmp_path / "o" / "alpaca_packed_labels_document.idx").is_file()
    bad = subprocess.run(cmd[:-4] + ["--prompt-type", "nope"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 1 and "unknown template 'nope'" in bad.stderr
