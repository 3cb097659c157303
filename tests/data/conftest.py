"""Shared fixtures for the data tests: tiny tokenizers of every kind and a preprocess helper.

Nothing is downloaded: the HF tokenizer is trained on the fly (mindlora.data.toy), the
sentencepiece model is trained from a few sentences, the tiktoken file is written by hand.
"""
from __future__ import annotations

import base64
import io
import json

import pytest

from mindlora.data.toy import build_toy_tokenizer

SP_CORPUS = ["Hello world, this is a tiny corpus.", "The quick brown fox jumps over the dog.",
             "Give three tips for staying healthy.", "[INST] question [/INST] answer"] * 30


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> str:
    """A trained byte-level BPE folder with Qwen specials and the Qwen3-style Jinja template."""
    return build_toy_tokenizer(tmp_path_factory.mktemp("toy_hf"), chat_template="qwen3")


@pytest.fixture(scope="session")
def hf_tok(hf_dir):
    from mindlora.data.tokenizer import load_tokenizer

    return load_tokenizer(hf_dir)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """A sentencepiece BPE model file with <s>=1, </s>=2."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS), model_writer=buf, vocab_size=90, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.fixture(scope="session")
def tiktoken_dir(tmp_path_factory) -> str:
    """A tiktoken BPE file (all bytes + a few merges) with ChatML specials in tokenizer_config."""
    d = tmp_path_factory.mktemp("tiktoken")
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"th", b"he", b"the", b"in", b" t", b" the", b"ll", b"llo", b"an", b" an"):
        ranks[merge] = len(ranks)
    (d / "toy.tiktoken").write_text(
        "".join(f"{base64.b64encode(k).decode()} {v}\n" for k, v in ranks.items()))
    n = len(ranks)
    specials = {str(n + k): {"content": s}
                for k, s in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": specials, "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>"}))
    return str(d)
