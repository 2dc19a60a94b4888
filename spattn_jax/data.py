"""The input pipeline: documents -> chunks -> Grain shuffle/shard/pack/batch -> ``int32 [B, T]`` batches.

Stages (each a small function below):

1. **Documents.** The embedded default corpus is the Python standard library's own ``.py`` sources of
   the running interpreter (real text on every machine, no download), read as bytes. User data are
   text files, ``.jsonl`` files (one document per line, field :attr:`DataConfig.text_key`),
   pre-tokenized ``.npy`` files (1-D token stream split at :attr:`DataConfig.eos_id`, or 2-D with one
   document per row) or ArrayRecord files (one document per record, raw little-endian ``int32``
   bytes; :func:`write_array_record` writes them).
2. **Split.** A document goes to validation iff the hash of its key (path relative to its root, plus
   ``:line`` or ``#index`` for multi-document files) falls under :attr:`DataConfig.validation_fraction`:
   deterministic, machine independent, and stable when other files are added.
3. **Chunks.** A document of ``n`` tokens gives windows of ``seq_len + 1`` tokens with stride
   ``seq_len``; a window's ``inputs`` are its first ``k - 1`` tokens and ``targets`` its last ``k - 1``,
   so every token but the first of a document is predicted exactly once. Chunks are known up front
   (from file sizes for byte-level text), so the shuffle is global and random access, and the
   iterator state is a few integers.
4. **Grain.** ``MapDataset``: seeded shuffle (reseeded every epoch), infinite repeat, per-process
   slice ``[process_index::process_count]``, lazy chunk reads; ``IterDataset``: threaded reads,
   first-fit packing into rows of ``seq_len`` with segment ids (1, 2, ... per row; 0 = padding) and
   per-document positions, batching, thread prefetch. The iterator's ``get_state()`` is what
   checkpoints store.

A batch is a dict of ``int32 [B_process, seq_len]``: ``inputs``, ``targets``, ``segment_ids``,
``positions``. A target counts in the loss iff its segment id is not 0.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from typing import Iterator, Sequence

import grain
import numpy as np

from spattn_jax import tokenizers

TEXT, JSONL, NPY, ARRAY_RECORD = "text", "jsonl", "npy", "array_record"
_ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
SPLITS = ("train", "validation")


class EmptySplitError(ValueError):
    """A split has no document with at least two tokens (nothing to predict)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from and how they are batched.

    Attributes:
      paths: files, directories (searched recursively) or glob patterns; empty means the embedded
        standard-library corpus.
      validation_paths: if given, validation reads these and every document of ``paths`` trains;
        otherwise both splits come from ``paths`` by key hash.
      validation_fraction: share of documents (by key hash) held out for validation.
      tokenizer: ``"byte"`` (vocab 256), a ``tokenizer.json`` or a sentencepiece ``.model``. Ignored
        for pre-tokenized files.
      text_key: the field of a ``.jsonl`` line that holds the document text.
      eos_id: document separator in 1-D ``.npy`` token streams (kept as the document's last token);
        ``None`` makes the whole stream one document.
      seq_len: tokens per packed row ``T``.
      batch_size: rows per optimizer step over all processes (global batch).
      seed: seeds the shuffle and the packer.
      read_threads: threads reading and tokenizing chunks.
      prefetch_batches: batches prepared ahead of the training step.
    """

    paths: tuple[str, ...] = ()
    validation_paths: tuple[str, ...] = ()
    validation_fraction: float = 0.1
    tokenizer: str = "byte"
    text_key: str = "text"
    eos_id: int | None = None
    seq_len: int = 256
    batch_size: int = 16
    seed: int = 0
    read_threads: int = 2
    prefetch_batches: int = 2

    def __post_init__(self):
        # gin and the command line hand over lists and bare strings; store tuples (hashable).
        for name in ("paths", "validation_paths"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.seq_len < 1:
            raise ValueError(f"data seq_len must be >= 1, got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"data batch_size must be >= 1, got {self.batch_size}")
        if self.read_threads < 1 or self.prefetch_batches < 0:
            raise ValueError(
                f"read_threads must be >= 1 and prefetch_batches >= 0, got {self.read_threads}, {self.prefetch_batches}"
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")


# -- 1. documents -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileRef:
    """A data file and the key prefix that names it independently of where the data lives."""

    path: str
    key: str
    kind: str


def stdlib_root() -> str:
    """The running interpreter's standard-library directory (the embedded corpus)."""
    return sysconfig.get_paths()["stdlib"]


def _kind(path: str) -> str:
    if path.endswith(".jsonl"):
        return JSONL
    if path.endswith(".npy"):
        return NPY
    if path.endswith(_ARRAY_RECORD_SUFFIXES):
        return ARRAY_RECORD
    return TEXT


def _walk(root: str, suffix: str | None = None) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        out += [
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if not f.startswith(".") and (suffix is None or f.endswith(suffix))
        ]
    return out


def stdlib_files() -> list[FileRef]:
    """The ``.py`` files of the standard library (third-party ``site-packages`` excluded)."""
    root = stdlib_root()
    paths = [p for p in _walk(root, ".py") if "site-packages" not in p.split(os.sep)]
    return [FileRef(p, os.path.relpath(p, root).replace(os.sep, "/"), TEXT) for p in paths]


def resolve_paths(patterns: Sequence[str]) -> list[FileRef]:
    """Files named by ``patterns`` (files, directories, globs), sorted, with root-relative keys."""
    refs: list[FileRef] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            root = os.path.dirname(pattern.split("*")[0].split("?")[0].split("[")[0]) or "."
        elif os.path.isdir(pattern):
            matches, root = _walk(pattern), pattern
        elif os.path.isfile(pattern):
            matches, root = [pattern], os.path.dirname(pattern) or "."
        else:
            raise FileNotFoundError(f"data path not found: {pattern}")
        if not matches:
            raise FileNotFoundError(f"no data files match {pattern}")
        refs += [FileRef(p, os.path.relpath(p, root).replace(os.sep, "/"), _kind(p)) for p in matches]
    return refs


class Documents:
    """Random access to the token ids of documents, with their keys and lengths.

    Byte-level text files are read lazily (a chunk reads only its bytes, the length is the file
    size) and ``.npy`` files are memory-mapped; other text is tokenized, and ArrayRecord records are
    read, into memory once when the index is built.
    """

    def __init__(self):
        self.keys: list[str] = []
        self.lengths: list[int] = []
        self._getters: list = []  # per document: (start, stop) -> int32 tokens

    def add(self, key: str, length: int, getter) -> None:
        self.keys.append(key)
        self.lengths.append(int(length))
        self._getters.append(getter)

    def tokens(self, doc: int, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._getters[doc](start, stop), np.int32)

    def subset(self, keep) -> "Documents":
        """The documents ``i`` with ``keep(key_i)`` true, in order."""
        out = Documents()
        for key, length, getter in zip(self.keys, self.lengths, self._getters):
            if keep(key):
                out.add(key, length, getter)
        return out

    def __len__(self) -> int:
        return len(self.keys)


def _byte_file_getter(path: str):
    def get(start: int, stop: int) -> np.ndarray:
        with open(path, "rb") as f:
            f.seek(start)
            return np.frombuffer(f.read(stop - start), np.uint8)

    return get


def _array_getter(array):
    return lambda start, stop: array[start:stop]


def _add_file(docs: Documents, ref: FileRef, cfg: DataConfig, tok) -> None:
    if ref.kind == TEXT:
        if isinstance(tok, tokenizers.ByteTokenizer):
            docs.add(ref.key, os.path.getsize(ref.path), _byte_file_getter(ref.path))
        else:
            with open(ref.path, encoding="utf-8", errors="replace") as f:
                ids = tok.encode(f.read())
            docs.add(ref.key, len(ids), _array_getter(ids))
    elif ref.kind == JSONL:
        with open(ref.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[cfg.text_key]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{ref.path}:{line_no + 1}: not a JSON object with a {cfg.text_key!r} field ({e})"
                    ) from None
                ids = tok.encode(text)
                docs.add(f"{ref.key}:{line_no}", len(ids), _array_getter(ids))
    elif ref.kind == NPY:
        array = np.load(ref.path, mmap_mode="r")
        if array.ndim == 2:
            for row in range(array.shape[0]):
                docs.add(f"{ref.key}#{row}", array.shape[1], _array_getter(array[row]))
        elif array.ndim == 1:
            ends = (
                [len(array)]
                if cfg.eos_id is None
                else list(np.flatnonzero(np.asarray(array) == cfg.eos_id) + 1) + [len(array)]
            )
            start = 0
            for i, end in enumerate(ends):
                if end > start:
                    docs.add(f"{ref.key}#{i}", end - start, _array_getter(array[start:end]))
                start = end
        else:
            raise ValueError(f"{ref.path}: token arrays must be 1-D or 2-D, got shape {array.shape}")
    elif ref.kind == ARRAY_RECORD:
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        source = ArrayRecordDataSource([ref.path])
        for i in range(len(source)):
            ids = np.frombuffer(source[i], "<i4")
            docs.add(f"{ref.key}#{i}", len(ids), _array_getter(ids))


def load_documents(refs: Sequence[FileRef], cfg: DataConfig) -> Documents:
    """Index every document of ``refs`` (tokenizing non-byte text once)."""
    tok = tokenizers.load(cfg.tokenizer)
    docs = Documents()
    for ref in refs:
        _add_file(docs, ref, cfg, tok)
    return docs


# -- 2. split -----------------------------------------------------------------------------------


def in_validation(key: str, fraction: float) -> bool:
    """Whether the document ``key`` is held out: the first 8 bytes of its SHA-256 as a uniform [0, 1)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def split_documents(cfg: DataConfig, split: str) -> Documents:
    """The documents of ``split`` ("train" or "validation")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    want_val = split == "validation"
    if cfg.validation_paths and want_val:
        return load_documents(resolve_paths(cfg.validation_paths), cfg)
    refs = resolve_paths(cfg.paths) if cfg.paths else stdlib_files()
    if cfg.validation_paths:  # and training: every document of paths trains
        return load_documents(refs, cfg)
    if all(r.kind == TEXT for r in refs):
        # One document per file: split on the file key before reading anything.
        refs = [r for r in refs if in_validation(r.key, cfg.validation_fraction) == want_val]
        return load_documents(refs, cfg)
    # Several documents per file: index them all, then split by document key.
    docs = load_documents(refs, cfg)
    return docs.subset(lambda key: in_validation(key, cfg.validation_fraction) == want_val)


# -- 3. chunks ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChunkIndex:
    """Windows over documents: chunk ``c`` is tokens ``[start[c], start[c] + length[c])`` of ``doc[c]``."""

    doc: np.ndarray  # int32 [C]
    start: np.ndarray  # int64 [C]
    length: np.ndarray  # int32 [C], in [2, seq_len + 1]

    def __len__(self) -> int:
        return len(self.doc)

    @property
    def num_targets(self) -> int:
        """Predicted tokens in one pass over the chunks."""
        return int(np.sum(self.length - 1))


def chunk_index(lengths: Sequence[int], seq_len: int) -> ChunkIndex:
    """Windows of ``seq_len + 1`` tokens with stride ``seq_len`` (one token of overlap, so each target once)."""
    docs, starts, lens = [], [], []
    for d, n in enumerate(lengths):
        s = np.arange(0, max(n - 1, 0), seq_len, dtype=np.int64)  # a window needs >= 2 tokens
        docs.append(np.full(len(s), d, np.int32))
        starts.append(s)
        lens.append(np.minimum(seq_len + 1, n - s).astype(np.int32))
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    return ChunkIndex(cat(docs, np.int32), cat(starts, np.int64), cat(lens, np.int32))


# -- 4. grain pipeline --------------------------------------------------------------------------


def per_process_batch(cfg: DataConfig, process_count: int) -> int:
    if cfg.batch_size % process_count:
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by the {process_count} processes; "
            f"use a multiple of {process_count}"
        )
    return cfg.batch_size // process_count


def _finalize(batch: dict) -> dict:
    """Grain's packed feature names -> the model's; everything ``int32``."""
    return {
        "inputs": batch["inputs"].astype(np.int32),
        "targets": batch["targets"].astype(np.int32),
        "segment_ids": batch["inputs_segment_ids"].astype(np.int32),
        "positions": batch["inputs_positions"].astype(np.int32),
    }


def _pad_batch(batch: dict, rows: int) -> dict:
    """Zero rows (segment id 0: no loss) so the last validation batch has the static shape."""
    have = batch["inputs"].shape[0]
    if have == rows:
        return batch
    return {k: np.concatenate([v, np.zeros((rows - have,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A split's Grain dataset plus what the train loop reports about it."""

    dataset: grain.IterDataset
    num_documents: int
    num_chunks: int
    num_targets: int  # predicted tokens in one epoch
    batch_rows: int  # rows per batch on this process

    def __iter__(self) -> Iterator[dict]:
        return iter(self.dataset)


def make_pipeline(
    cfg: DataConfig,
    split: str = "train",
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Pipeline:
    """The Grain pipeline of ``split``: an iterable of ``int32 [B_process, seq_len]`` batch dicts.

    ``train`` is infinite, shuffled anew each epoch from ``cfg.seed``. ``validation`` is one pass in a
    fixed order (shuffled with seed 0, independent of ``cfg.seed``, so that every run and ``eval.py``
    score the same first batches), with a zero-padded last batch.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    rows = per_process_batch(cfg, process_count)
    docs = split_documents(cfg, split)
    index = chunk_index(docs.lengths, cfg.seq_len)
    if len(index) == 0:
        where = ", ".join(cfg.paths) if cfg.paths else f"the standard library at {stdlib_root()}"
        raise EmptySplitError(
            f"empty corpus: the {split} split of {where} has no document with at least 2 tokens"
        )

    def load(c: int) -> dict:
        s, n = int(index.start[c]), int(index.length[c])
        ids = docs.tokens(int(index.doc[c]), s, s + n)
        return {"inputs": ids[:-1], "targets": ids[1:]}

    train = split == "train"
    ds = grain.MapDataset.range(len(index))
    ds = ds.seed(cfg.seed).shuffle().repeat(None) if train else ds.shuffle(seed=0)
    ds = ds[process_index::process_count].map(load)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * rows))
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={"inputs": cfg.seq_len, "targets": cfg.seq_len},
        num_packing_bins=rows,
        seed=cfg.seed,
        shuffle_bins=train,
    )
    it = it.batch(rows, drop_remainder=train).map(_finalize)
    if not train:
        it = it.map(lambda b: _pad_batch(b, rows))
    if cfg.prefetch_batches:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=cfg.prefetch_batches)
    return Pipeline(it, len(docs), len(index), index.num_targets, rows)


def write_array_record(path: str, documents: Sequence[Sequence[int]]) -> None:
    """Write token documents as an ArrayRecord file this pipeline reads (one ``int32`` record each)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")
    for doc in documents:
        writer.write(np.asarray(doc, "<i4").tobytes())
    writer.close()
