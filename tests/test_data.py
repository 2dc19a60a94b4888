"""The Grain input pipeline: split, chunks, packing, shuffling, sharding, iterator state, file formats."""

from __future__ import annotations

import itertools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spattn_jax import data, tokenizers
from spattn_jax.config import get_preset
from spattn_jax.kernels.reference import allowed
from spattn_jax.model import Transformer

SMALL = data.DataConfig(seq_len=64, batch_size=4, seed=3, read_threads=1)


def take(pipeline_or_iter, n: int) -> list[dict]:
    it = iter(pipeline_or_iter)
    out = list(itertools.islice(it, n))
    it.close()
    return out


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# -- embedded corpus and split --------------------------------------------------------------------


def test_stdlib_split_is_deterministic_disjoint_and_about_ten_percent():
    refs = data.stdlib_files()
    assert len(refs) > 100 and all(r.path.endswith(".py") for r in refs)
    val = {r.key for r in refs if data.in_validation(r.key, 0.1)}
    train = {r.key for r in refs} - val
    assert val and train and not val & train
    assert 0.05 < len(val) / len(refs) < 0.15
    # The split depends on the key only: it is the same on any machine and for any file order.
    assert {r.key for r in reversed(refs) if data.in_validation(r.key, 0.1)} == val
    docs = data.split_documents(SMALL, "validation")
    assert set(docs.keys) == val


def test_chunks_predict_every_token_but_the_first_exactly_once():
    lengths = [0, 1, 2, 64, 65, 66, 200]
    index = data.chunk_index(lengths, seq_len=64)
    assert index.num_targets == sum(max(n - 1, 0) for n in lengths)
    assert np.all((index.length >= 2) & (index.length <= 65))
    for d, n in enumerate(lengths):
        sel = index.doc == d
        starts, lens = index.start[sel], index.length[sel]
        # Consecutive windows overlap by one token: the last input of one is the first of the next.
        assert np.all(starts[1:] == starts[:-1] + 64)
        if n >= 2:
            assert starts[-1] + lens[-1] == n


# -- batches, packing, positions ------------------------------------------------------------------


def test_batches_are_packed_next_token_pairs():
    pipeline = data.make_pipeline(SMALL, "train", process_index=0, process_count=1)
    for batch in take(pipeline, 3):
        assert set(batch) == {"inputs", "targets", "segment_ids", "positions"}
        for v in batch.values():
            assert v.shape == (4, 64) and v.dtype == np.int32
        seg, pos, x, y = batch["segment_ids"], batch["positions"], batch["inputs"], batch["targets"]
        same_next = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        # Within a document the target of t is the input of t + 1 and positions count up by one.
        assert np.all(y[:, :-1][same_next] == x[:, 1:][same_next])
        assert np.all(pos[:, 1:][same_next] == pos[:, :-1][same_next] + 1)
        starts = np.concatenate([np.ones((4, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1) & (seg > 0)
        assert np.all(pos[starts] == 0)  # positions restart at every document
        assert np.all(x[seg == 0] == 0)  # padding


def _packed_batch_with_many_documents(tmp_path) -> dict:
    """A batch of short documents (lines of a stdlib module), so that rows hold several."""
    lines = [ln for ln in open(os.path.join(data.stdlib_root(), "json", "decoder.py")) if len(ln.strip()) > 3]
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps({"text": ln}) + "\n" for ln in lines))
    cfg = data.DataConfig(paths=(str(tmp_path / "lines.jsonl"),), seq_len=64, batch_size=4, read_threads=1)
    batch = take(data.make_pipeline(cfg, "train", process_index=0, process_count=1), 1)[0]
    assert batch["segment_ids"].max() >= 3
    return batch


def test_packing_never_lets_a_token_attend_across_documents(tmp_path):
    batch = _packed_batch_with_many_documents(tmp_path)
    seg, pos = jnp.asarray(batch["segment_ids"]), batch["positions"]
    mask = get_preset("tiny").mask()
    ok = np.asarray(allowed(mask, 64, 64, seg, seg))  # [B, H, T, T]
    b, _, q, k = np.nonzero(ok)
    assert np.all(batch["segment_ids"][b, q] == batch["segment_ids"][b, k])
    # Band distances are in-document distances: i - j equals the difference of positions.
    real = batch["segment_ids"][b, q] > 0  # padding (segment 0, position 0) only sees padding
    assert np.all((pos[b, q] - pos[b, k])[real] == (q - k)[real])


def test_model_output_of_a_document_ignores_other_documents_in_the_row(tmp_path):
    batch = _packed_batch_with_many_documents(tmp_path)
    row = int(np.argmax(batch["segment_ids"].max(axis=1)))
    x, seg, pos = (batch[k][row : row + 1] for k in ("inputs", "segment_ids", "positions"))
    model = Transformer(get_preset("tiny"), rngs=nnx.Rngs(0))
    logits, _ = model(jnp.asarray(x), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
    other = seg != 2
    x2 = np.where(other, (x + 17) % 256, x)  # change every token outside document 2
    logits2, _ = model(jnp.asarray(x2), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
    doc2 = seg[0] == 2
    np.testing.assert_array_equal(np.asarray(logits)[0, doc2], np.asarray(logits2)[0, doc2])
    assert not np.allclose(np.asarray(logits)[0, ~doc2], np.asarray(logits2)[0, ~doc2])


# -- determinism, state, sharding -----------------------------------------------------------------


def test_shuffling_is_seed_deterministic():
    a = take(data.make_pipeline(SMALL, "train", process_index=0, process_count=1), 3)
    b = take(data.make_pipeline(SMALL, "train", process_index=0, process_count=1), 3)
    assert_batches_equal(a, b)
    other = data.DataConfig(**{**SMALL.__dict__, "seed": 4})
    c = take(data.make_pipeline(other, "train", process_index=0, process_count=1), 3)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def test_iterator_state_round_trips_through_json():
    pipeline = data.make_pipeline(SMALL, "train", process_index=0, process_count=1)
    it = iter(pipeline)
    take_n = lambda n: [next(it) for _ in range(n)]  # noqa: E731
    take_n(5)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = take_n(4)
    it.close()
    fresh = iter(data.make_pipeline(SMALL, "train", process_index=0, process_count=1))
    fresh.set_state(state)
    assert_batches_equal([next(fresh) for _ in range(4)], expected)
    fresh.close()


def test_processes_read_disjoint_chunks():
    cfg = data.DataConfig(seq_len=64, batch_size=4, seed=0, read_threads=1, paths=())
    p0 = data.make_pipeline(cfg, "validation", process_index=0, process_count=2)
    p1 = data.make_pipeline(cfg, "validation", process_index=1, process_count=2)
    assert p0.batch_rows == p1.batch_rows == 2
    rows = lambda p: {r.tobytes() for b in take(p, 10) for r in b["inputs"] if r.any()}  # noqa: E731
    assert not rows(p0) & rows(p1)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data.make_pipeline(cfg, "train", process_index=0, process_count=3)


def test_validation_is_one_fixed_pass_with_a_padded_last_batch(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 300)
    (tmp_path / "b.txt").write_text("hello world")
    cfg = data.DataConfig(validation_paths=(str(tmp_path),), seq_len=64, batch_size=4, read_threads=1)
    batches = take(data.make_pipeline(cfg, "validation", process_index=0, process_count=1), 100)
    assert all(b["inputs"].shape == (4, 64) for b in batches)
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == 299 + 10
    again = take(data.make_pipeline(cfg, "validation", process_index=0, process_count=1), 100)
    assert_batches_equal(batches, again)


# -- user data ------------------------------------------------------------------------------------


def _targets(cfg: data.DataConfig) -> list[int]:
    """Every target token of one validation pass, sorted (packing reorders documents)."""
    out = []
    for b in take(data.make_pipeline(cfg, "validation", process_index=0, process_count=1), 1000):
        out += b["targets"][b["segment_ids"] > 0].tolist()
    return sorted(out)


DOCS = ["the quick brown fox jumps over the lazy dog. " * 3, "pack my box with five dozen liquor jugs", "sphinx of black quartz"]


def test_jsonl_with_a_local_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DOCS * 5, trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in DOCS) + "\n")
    cfg = data.DataConfig(
        validation_paths=(str(tmp_path / "d.jsonl"),), tokenizer=str(tmp_path / "tokenizer.json"),
        text_key="body", seq_len=16, batch_size=2, read_threads=1,
    )
    hf = tokenizers.load(cfg.tokenizer)
    assert isinstance(hf, tokenizers.HFTokenizer) and hf.vocab_size <= 80
    expected = sorted(t for d in DOCS for t in hf.encode(d)[1:].tolist())
    assert _targets(cfg) == expected


def test_text_with_a_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    (tmp_path / "corpus.txt").write_text("\n".join(DOCS * 20))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=40,
        model_type="bpe", minloglevel=2,
    )
    (tmp_path / "data").mkdir()
    for i, d in enumerate(DOCS):
        (tmp_path / "data" / f"{i}.txt").write_text(d)
    cfg = data.DataConfig(
        validation_paths=(str(tmp_path / "data"),), tokenizer=str(tmp_path / "sp.model"),
        seq_len=16, batch_size=2, read_threads=1,
    )
    sp = tokenizers.load(cfg.tokenizer)
    assert isinstance(sp, tokenizers.SentencePieceTokenizer)
    assert _targets(cfg) == sorted(t for d in DOCS for t in sp.encode(d)[1:].tolist())


def test_pretokenized_npy_and_array_record(tmp_path):
    docs = [np.arange(1, 30), np.arange(100, 105), np.arange(7, 90)]
    eos = 0
    np.save(tmp_path / "stream.npy", np.concatenate([np.append(d, eos) for d in docs]).astype(np.int32))
    np.save(tmp_path / "rows.npy", np.stack([np.arange(10) + 10 * i for i in range(3)]).astype(np.int32))
    data.write_array_record(str(tmp_path / "docs.array_record"), docs)

    def cfg(name, **kw):
        return data.DataConfig(validation_paths=(str(tmp_path / name),), seq_len=16, batch_size=2, read_threads=1, **kw)

    # 1-D stream split at eos; each document keeps its eos as its last token.
    assert _targets(cfg("stream.npy", eos_id=eos)) == sorted(t for d in docs for t in list(d[1:]) + [eos])
    assert _targets(cfg("rows.npy")) == sorted(t for i in range(3) for t in (np.arange(10) + 10 * i)[1:])
    assert _targets(cfg("docs.array_record")) == sorted(t for d in docs for t in d[1:].tolist())


def test_byte_tokenizer_round_trips_utf8():
    tok = tokenizers.load("byte")
    ids = tok.encode("naïve — ok")
    assert ids.dtype == np.int32 and ids.max() < 256 and tok.decode(ids) == "naïve — ok"


def test_bad_paths_and_empty_corpora_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data path not found"):
        data.make_pipeline(data.DataConfig(paths=(str(tmp_path / "nope"),)), process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="no data files match"):
        data.make_pipeline(data.DataConfig(paths=(str(tmp_path / "*.txt"),)), process_index=0, process_count=1)
    (tmp_path / "one.txt").write_text("x")  # one byte: nothing to predict
    with pytest.raises(data.EmptySplitError, match="empty corpus"):
        data.make_pipeline(data.DataConfig(validation_paths=(str(tmp_path),)), "validation", process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        tokenizers.load(str(tmp_path / "missing.json"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        data.split_documents(data.DataConfig(paths=(str(tmp_path / "bad.jsonl"),)), "train")
