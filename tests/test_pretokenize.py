"""Pre-tokenising: token files, the train/val split, byte counts, the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures import write_corpus

from tformer_cli.data.pretokenize import pretokenize, pretokenize_cached
from tformer_cli.data.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    base = tmp_path_factory.mktemp("pretok")
    corpus = write_corpus(base / "c.txt", 80_000)
    return load_tokenizer(train_tokenizer([corpus], base / "t.model", vocab_size=500).path)


def _split_text(tok, tokens):
    """Decode a split back into its documents (each BOS ... EOS)."""
    docs, cur = [], None
    for t in tokens.tolist():
        if t == tok.bos_id:
            assert cur is None
            cur = []
        elif t == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = None
        else:
            cur.append(t)
    assert cur is None  # every document ends with EOS
    return docs


def test_token_files_reproduce_the_corpus(tok, tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(300))
    (tmp_path / "a.txt").write_text(text)
    data = pretokenize([tmp_path / "a.txt"], tok, tmp_path / "out", val_fraction=0.1)
    train, val = data.load("train"), data.load("val")
    assert train.dtype == np.uint16 and data.dtype == "uint16"
    (head,), (tail,) = _split_text(tok, train), _split_text(tok, val)
    assert head + tail == text
    assert tail.startswith("line ") and abs(len(tail) - 0.1 * len(text)) < 40  # cut at a line break
    assert (data.train_bytes, data.val_bytes) == (len(head.encode()), len(tail.encode()))
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (
        meta["train_tokens"] == len(train) == (tmp_path / "out" / "train.bin").stat().st_size // 2
    )
    assert meta["val_tokens"] == len(val) and meta["tokenizer_sha256"] == tok.sha256


def test_jsonl_records_are_documents_and_go_whole_to_one_split(tok, tmp_path):
    records = [f"record number {i} ✓" for i in range(50)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    data = pretokenize([tmp_path / "r.jsonl"], tok, tmp_path / "out", val_fraction=0.2)
    train, val = _split_text(tok, data.load("train")), _split_text(tok, data.load("val"))
    assert train + val == records
    assert 5 <= len(val) <= 15


def test_multi_file_corpus_streams_in_small_chunks(tok, tmp_path, monkeypatch):
    import tformer_cli.data.corpus as corpus

    monkeypatch.setattr(corpus, "CHUNK_BYTES", 64)  # force many chunks
    texts = ["first file\n" * 40, "second file\n" * 60]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    data = pretokenize(
        [tmp_path / "0.txt", tmp_path / "1.txt"], tok, tmp_path / "out", val_fraction=0.25
    )
    train, val = _split_text(tok, data.load("train")), _split_text(tok, data.load("val"))
    assert [a + b for a, b in zip(train, val, strict=True)] == texts


def test_cache_hit_on_the_second_call_and_miss_on_change(tok, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text to tokenise\n" * 100)
    first, hit1 = pretokenize_cached([corpus], tok, tmp_path / "cache")
    second, hit2 = pretokenize_cached([corpus], tok, tmp_path / "cache")
    assert (hit1, hit2) == (False, True) and first == second
    corpus.write_text("different text now\n" * 100)
    third, hit3 = pretokenize_cached([corpus], tok, tmp_path / "cache")
    assert not hit3 and third.directory != first.directory


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-2])


def _bad_meta(path):
    path.with_name("meta.json").write_text("{not json")


def _foreign_ids(path):
    path.write_bytes(np.full(path.stat().st_size // 2, 65000, dtype=np.uint16).tobytes())


@pytest.mark.parametrize("damage", [_truncate, _bad_meta, _foreign_ids])
def test_a_damaged_cache_is_rebuilt_with_a_notice(damage, tok, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text to tokenise\n" * 100)
    first, _ = pretokenize_cached([corpus], tok, tmp_path / "cache")
    good = first.train_path.read_bytes()
    damage(first.train_path)
    notices = []
    again, hit = pretokenize_cached([corpus], tok, tmp_path / "cache", notice=notices.append)
    assert not hit and again == first and again.train_path.read_bytes() == good
    assert len(notices) == 1 and str(first.directory) in notices[0], notices


def test_two_processes_tokenising_one_corpus_at_once_both_succeed(tok, tmp_path):
    import threading

    corpus = tmp_path / "c.txt"
    corpus.write_text("the same corpus for both\n" * 3000)
    results, errors = [], []

    def work():
        try:
            results.append(pretokenize([corpus], tok, tmp_path / "tokens"))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == [
        "meta.json",
        "train.bin",
        "val.bin",
    ]


def test_uint32_for_large_vocabularies():
    from tformer_cli.data.pretokenize import token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_corpus_command(tok, tmp_path, cli):
    (tmp_path / "a.txt").write_text("to be or not to be\n" * 50)
    res = cli("tokenize", "corpus", tmp_path / "a.txt", "-t", tok.path, "-o", tmp_path / "tokens")
    assert res.exit_code == 0, res.stderr
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["train_tokens"] > 0 and meta["val_tokens"] > 0
    assert f"{meta['train_tokens']:,} tokens" in res.stdout
