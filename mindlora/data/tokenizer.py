"""One way to load a tokenizer, whatever its on-disk form, with no network access.

``load_tokenizer(path)`` accepts a Hugging Face tokenizer folder (``tokenizer.json`` etc.), a
sentencepiece ``.model`` file (or a folder holding ``tokenizer.model``), or a tiktoken BPE file
(``*.tiktoken``, or a ``.model`` in tiktoken's text format as Llama 3 ships it). Every kind is
wrapped in the same small interface so preprocessing, training and generation never branch on it.

Text is encoded *without* adding BOS/EOS: chat templates write those explicitly, and special
token strings inside the text (``<|im_start|>``, ``</s>``) become their ids for every kind.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

TOKENIZER_TYPES = ("PretrainedFromHF", "SentencePiece", "Tiktoken", "auto")
"""Megatron / MindSpeed ``--tokenizer-type`` values the CLIs accept; none changes anything, the
kind is detected from the files (:func:`load_tokenizer`)."""

# Files whose bytes decide which ids a text gets; tokenizer_config.json is left out on purpose
# (editing a chat template there must not make old data look like another tokenizer's).
_ID_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt",
             "added_tokens.json", "spiece.model")
# GPT-4 style split pattern, the default for tiktoken files that do not bring their own.
_TIKTOKEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                     r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class Tokenizer:
    """Common interface of every tokenizer kind.

    Attributes:
        path: where it was loaded from.
        kind: ``"hf"``, ``"sentencepiece"`` or ``"tiktoken"``.
        vocab_size: number of ids, added/special tokens included (what the embedding must hold).
        eos_id / bos_id: ids of the end / begin token, or None when the tokenizer has none.
        pad_id: padding id (the pad token, else EOS, else 0).
        eos_token / bos_token: their strings (templates write them into the text).
        hf: the ``transformers`` tokenizer when there is one, else None.
        fingerprint: sha256 over the files that decide ids; equal fingerprints, equal ids.
        supports_offsets: True when ``encode_batch_with_offsets`` is available (fast HF).
    """

    kind = "base"
    supports_offsets = False

    def __init__(self, path: str) -> None:
        self.path = path
        self.hf: Any = None
        self.vocab_size = 0
        self.eos_id: int | None = None
        self.bos_id: int | None = None
        self.eos_token: str | None = None
        self.bos_token: str | None = None
        self._pad_id: int | None = None
        self.fingerprint = ""

    @property
    def pad_id(self) -> int:
        """Padding id: the tokenizer's pad token, else EOS, else 0."""
        for tid in (self._pad_id, self.eos_id):
            if tid is not None:
                return int(tid)
        return 0

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no BOS/EOS added; special-token strings map to their ids)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` for many texts in one call (the fast path)."""
        raise NotImplementedError

    def encode_batch_with_offsets(self, texts: Sequence[str]) -> list[Any]:
        """``tokenizers.Encoding`` objects (``.ids``, ``char_to_token``, ``token_to_chars``).

        Only tokenizers with ``supports_offsets``; used to find which tokens of a whole
        rendered conversation fall in its learned character spans.
        """
        raise NotImplementedError(f"{self.kind} tokenizers do not report offsets")

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens kept)."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        """Id of a single token string, or None when it is not one token."""
        ids = self.encode(token)
        return ids[0] if len(ids) == 1 else None


class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer; fast ones encode through the Rust backend directly."""

    kind = "hf"

    def __init__(self, path: str, hf: Any) -> None:
        super().__init__(path)
        self.hf = hf
        self._backend = getattr(hf, "backend_tokenizer", None) if hf.is_fast else None
        self.supports_offsets = self._backend is not None
        self.vocab_size = len(hf)
        self.eos_id, self.bos_id = hf.eos_token_id, hf.bos_token_id
        self.eos_token, self.bos_token = hf.eos_token, hf.bos_token
        self._pad_id = hf.pad_token_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch_fast(list(texts),
                                                                   add_special_tokens=False)]
        return [self.hf.encode(t, add_special_tokens=False) for t in texts]

    def encode_batch_with_offsets(self, texts):
        if self._backend is None:
            return super().encode_batch_with_offsets(texts)
        return self._backend.encode_batch(list(texts), add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(token)
        return None if tid is None or tid == self.hf.unk_token_id else int(tid)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; control pieces written in text (``<s>``, ``</s>``) become ids."""

    kind = "sentencepiece"

    def __init__(self, path: str, model_file: str) -> None:
        import sentencepiece as spm

        super().__init__(path)
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.sp.get_piece_size()
        # Control pieces (<s>, </s>) are never produced from text by sentencepiece itself;
        # user-defined symbols are, so only the former need splitting out.
        specials = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                    if self.sp.is_control(i)}
        self._specials = {p: i for p, i in specials.items() if p}
        self._split = _special_splitter(self._specials)
        for attr, tid in (("eos", self.sp.eos_id()), ("bos", self.sp.bos_id())):
            if tid >= 0:
                setattr(self, f"{attr}_id", tid)
                setattr(self, f"{attr}_token", self.sp.id_to_piece(tid))
        self._pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return _encode_with_specials(texts, self._split, self._specials,
                                     lambda chunks: self.sp.encode(chunks, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE file; special tokens come from ``tokenizer_config.json`` beside it."""

    kind = "tiktoken"

    def __init__(self, path: str, bpe_file: str) -> None:
        import tiktoken

        super().__init__(path)
        ranks = _read_tiktoken_ranks(bpe_file)
        cfg = _read_json(Path(bpe_file).parent / "tokenizer_config.json")
        specials = {v["content"]: int(k) for k, v in cfg.get("added_tokens_decoder", {}).items()}
        if not specials:
            specials = {"<|endoftext|>": len(ranks)}
        self.enc = tiktoken.Encoding(name=Path(bpe_file).stem,
                                     pat_str=cfg.get("pat_str", _TIKTOKEN_PATTERN),
                                     mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = self.enc.n_vocab
        self._specials = specials
        self.eos_token = cfg.get("eos_token", "<|endoftext|>" if "<|endoftext|>" in specials
                                 else None)
        self.bos_token = cfg.get("bos_token")
        self.eos_id = specials.get(self.eos_token) if self.eos_token else None
        self.bos_id = specials.get(self.bos_token) if self.bos_token else None
        pad = cfg.get("pad_token")
        self._pad_id = specials.get(pad) if pad else None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.enc.encode_batch(list(texts), allowed_special="all", disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        return super().token_to_id(token)


def _special_splitter(specials: dict[str, int]) -> re.Pattern | None:
    if not specials:
        return None
    alts = sorted(specials, key=len, reverse=True)  # longest first: "</s>" before "<s"
    return re.compile("(" + "|".join(re.escape(a) for a in alts) + ")")


def _encode_with_specials(texts, splitter, specials, encode_chunks) -> list[list[int]]:
    """Encode texts whose special-token strings the backend would not recognise itself."""
    if splitter is None:
        return [list(x) for x in encode_chunks(list(texts))]
    pieces = [splitter.split(t) for t in texts]
    plain = [p for parts in pieces for k, p in enumerate(parts) if k % 2 == 0 and p]
    encoded = iter(encode_chunks(plain) if plain else [])
    out = []
    for parts in pieces:
        ids: list[int] = []
        for k, p in enumerate(parts):
            if k % 2:
                ids.append(specials[p])
            elif p:
                ids.extend(next(encoded))
        out.append(ids)
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a tiktoken BPE line ({e})") from None
    return ranks


def _is_tiktoken_file(path: str) -> bool:
    """tiktoken files are text lines ``<base64> <rank>``; sentencepiece models are protobuf."""
    with open(path, "rb") as f:
        first = f.readline(4096).split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
        return True
    except ValueError:
        return False


def tokenizer_fingerprint(path: str) -> str:
    """sha256 over the id-defining files of a tokenizer folder (or over the single file)."""
    h = hashlib.sha256()
    p = Path(path)
    files = [p] if p.is_file() else sorted(
        f for f in p.iterdir() if f.name in _ID_FILES or f.suffix == ".tiktoken")
    for f in files:
        h.update(f.name.encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer at ``path`` (local files only; nothing is downloaded).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: it exists but holds no tokenizer this function can read.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--tokenizer-name-or-path: {path} does not exist "
                                "(pass a local tokenizer folder or file; nothing is downloaded)")
    try:
        tok = _load(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"--tokenizer-name-or-path: cannot load a tokenizer from {path}: "
                         f"{e}") from e
    tok.fingerprint = tokenizer_fingerprint(path)
    return tok


def _load(path: str) -> Tokenizer:
    p = Path(path)
    if p.is_dir():
        names = {f.name for f in p.iterdir()}
        if names & {"tokenizer.json", "vocab.json"}:
            return _load_hf(path)
        # A bare BPE / sentencepiece file may sit beside a tokenizer_config.json that only
        # names its special tokens; the file decides the ids, so it wins.
        models = sorted(p.glob("*.tiktoken")) + sorted(p.glob("*.model"))
        if models:
            return _load_file(path, str(models[0]))
        if "tokenizer_config.json" in names:
            return _load_hf(path)
        raise ValueError("no tokenizer.json, vocab.json, *.model, *.tiktoken or "
                         "tokenizer_config.json in the folder")
    if p.name == "tokenizer.json":
        return _load_hf(str(p.parent))
    return _load_file(path, path)


def _load_file(path: str, file: str) -> Tokenizer:
    if file.endswith(".tiktoken") or _is_tiktoken_file(file):
        return TiktokenTokenizer(path, file)
    try:
        return SentencePieceTokenizer(path, file)
    except RuntimeError as e:  # sentencepiece reports parse errors as RuntimeError
        raise ValueError(f"{file} is neither a sentencepiece model nor a tiktoken file ({e})")


def _load_hf(path: str) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types; callers want one
        raise ValueError(f"transformers could not read it: {type(e).__name__}: {e}") from e
    return HFTokenizer(path, hf)
