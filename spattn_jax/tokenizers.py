"""Tokenizers: text -> ``int32`` token ids, one small interface over three backends.

* ``"byte"`` -- UTF-8 bytes, vocabulary 256, no special tokens: the default, needs no file.
* a ``tokenizer.json`` path -- Hugging Face ``tokenizers`` (for example the OLMo GPT-NeoX dolma tokenizer).
* a ``*.model`` path -- a sentencepiece model.

Document boundaries are carried by packing's segment ids, not by an end-of-text token, so no backend
appends one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """``int32 [n]`` token ids of ``text``."""
        ...

    def decode(self, ids) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens: ids ``0..255``, so a loss in nats/token is nats/byte."""

    name: str = "byte"
    vocab_size: int = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Raw file bytes, with no decoding step (invalid UTF-8 is kept byte for byte)."""
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a local ``tokenizer.json``."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HF  # optional dependency; imported only when used

        self.name = path
        self._tok = _HF.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        # add_special_tokens=False: segment ids mark documents; no BOS/EOS is inserted.
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


class SentencePieceTokenizer:
    """A sentencepiece model file (``*.model``)."""

    def __init__(self, path: str):
        import sentencepiece  # optional dependency; imported only when used

        self.name = path
        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def load(spec: str) -> Tokenizer:
    """The tokenizer named by ``spec``: ``"byte"``, a ``tokenizer.json`` path or a sentencepiece ``.model``."""
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.exists(spec):
        raise FileNotFoundError(f"tokenizer file not found: {spec} (use 'byte', a tokenizer.json or a .model)")
    if spec.endswith(".json"):
        return HFTokenizer(spec)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise ValueError(f"unknown tokenizer file type: {spec} (expected tokenizer.json or a sentencepiece .model)")
