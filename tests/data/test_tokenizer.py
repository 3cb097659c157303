"""load_tokenizer reads HF folders, sentencepiece models and tiktoken files, offline."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from mindlora.data.dataset import InstructionDataset
from mindlora.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from tests.data.helpers import alpaca_records, preprocess


def test_hf_folder(hf_tok):
    assert hf_tok.kind == "hf" and hf_tok.hf is not None and hf_tok.supports_offsets
    assert hf_tok.vocab_size == len(hf_tok.hf)  # added tokens included
    assert hf_tok.eos_id == hf_tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert hf_tok.pad_id == hf_tok.hf.convert_tokens_to_ids("<|endoftext|>")
    ids = hf_tok.encode("<|im_start|>user\nhello<think>")
    assert ids[0] == hf_tok.token_to_id("<|im_start|>")
    assert ids[-1] == hf_tok.token_to_id("<think>")
    assert hf_tok.decode(ids) == "<|im_start|>user\nhello<think>"
    assert hf_tok.encode_batch(["a b", "c"]) == [hf_tok.encode("a b"), hf_tok.encode("c")]


def test_fingerprint_follows_the_ids_not_the_config(hf_dir, tmp_path):
    copy = shutil.copytree(hf_dir, tmp_path / "copy")
    assert tokenizer_fingerprint(str(copy)) == tokenizer_fingerprint(hf_dir)
    cfg = copy / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("}", ', "note": 1}', 1))
    assert tokenizer_fingerprint(str(copy)) == tokenizer_fingerprint(hf_dir)
    tj = copy / "tokenizer.json"
    tj.write_text(tj.read_text().replace('"<think>"', '"<thonk>"'))
    assert tokenizer_fingerprint(str(copy)) != tokenizer_fingerprint(hf_dir)


def test_sentencepiece_model(sp_model, tmp_path):
    tok = load_tokenizer(sp_model)
    assert tok.kind == "sentencepiece" and tok.hf is None
    assert (tok.bos_id, tok.eos_id, tok.eos_token) == (1, 2, "</s>")
    ids = tok.encode("<s>Hello world</s>")
    assert ids[0] == 1 and ids[-1] == 2 and 2 not in ids[1:-1]
    assert tok.decode(ids) == "Hello world"
    prefix, summary = preprocess(tmp_path, alpaca_records(5), sp_model, prompt_type="llama2")
    sample = InstructionDataset(prefix, 512)[1]
    ids, labels = sample["input_ids"].numpy(), sample["labels"].numpy()
    assert summary.written == 5 and ids[0] == 1 and ids[-1] == 2 and labels[-1] == 2
    learned = ids[labels != -100].tolist()
    assert learned == tok.encode(" " + alpaca_records(2)[1]["output"] + " ") + [2]


def test_tiktoken_file(tiktoken_dir, tmp_path):
    tok = load_tokenizer(tiktoken_dir)
    assert tok.kind == "tiktoken" and tok.eos_token == "<|im_end|>"
    text = "<|im_start|>the hello<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text and tok.pad_id == tok.token_to_id("<|endoftext|>")
    prefix, summary = preprocess(tmp_path, alpaca_records(4), tiktoken_dir, prompt_type="chatml")
    sample = InstructionDataset(prefix, 512)[0]
    ids, labels = sample["input_ids"].numpy(), sample["labels"].numpy()
    assert tok.decode(ids[labels != -100].tolist()) == alpaca_records(1)[0]["output"] + \
        "<|im_end|>\n"
    np.testing.assert_array_equal(labels[labels != -100], ids[labels != -100])


def test_unreadable_tokenizers(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--tokenizer-name-or-path: .*nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01not a model at all")
    with pytest.raises(ValueError, match=r"cannot load a tokenizer from .*junk\.model"):
        load_tokenizer(junk)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"empty_dir.*no tokenizer\.json"):
        load_tokenizer(tmp_path / "empty_dir")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"cannot load a tokenizer from .*broken"):
        load_tokenizer(broken)
