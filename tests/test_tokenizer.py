"""`tformer tokenize`: training, exact round trips, chat markers, and every error case."""

from __future__ import annotations

import json

import pytest
from fixtures import write_corpus

from tformer_cli.data.tokenizer import CHAT_MARKERS, load_tokenizer, train_tokenizer
from tformer_cli.errors import TformerError

TRICKY = [
    "",
    "plain words",
    "  leading and trailing spaces  ",
    "tabs\tand\t\ttabs, runs of     spaces",
    "line one\nline two\n\n\nafter blank lines\n",
    "windows\r\nline ends\r\n",
    "Ünïcödé, 日本語のテキスト, Ελληνικά, русский, עברית, العربية",
    "emoji 🤖🎉 and combining e\u0301 and zero\u200bwidth",
    "digits 1234567890 and 3.14159",
    "<|user|>hi<|end|><|assistant|>",
    "a literal \u2581 lower-one-eighth block, \u2581\u2581 twice and at the end \u2581",
]


@pytest.fixture(scope="session")
def shakespeare_tok(tmp_path_factory):
    """A 2,000-token BPE tokenizer trained on the whole fixture corpus through the CLI."""
    from conftest import run_cli

    base = tmp_path_factory.mktemp("tok")
    path = base / "shakespeare.model"
    res = run_cli(
        "tokenize", "train", write_corpus(base / "corpus.txt"), "-o", path, "--vocab-size", "2000"
    )
    assert res.exit_code == 0, res.stderr
    assert "2,000" in res.stdout and "chars per token" in res.stdout
    return path


@pytest.mark.parametrize("text", TRICKY)
def test_any_utf8_text_round_trips_exactly(shakespeare_tok, text):
    tok = load_tokenizer(shakespeare_tok)
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_and_chat_markers(shakespeare_tok):
    tok = load_tokenizer(shakespeare_tok)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (2000, 1, 2, 3)
    assert tok.has_chat_markers
    for marker in CHAT_MARKERS:
        assert tok.encode(marker) == [tok.marker_ids[marker]]
    assert tok.encode("\n") == [tok.piece_to_id("\n")]
    assert tok.piece_to_id("<unk>") == 0
    assert 0 not in tok.encode("never seen: ☃ 𝔘")  # byte fallback, never <unk>


def test_digits_are_split(shakespeare_tok):
    tok = load_tokenizer(shakespeare_tok)
    pieces = [tok.id_to_piece(i) for i in tok.encode("2024")]
    assert len(pieces) == 4


@pytest.mark.parametrize("kind", ["unigram", "char"])
def test_other_model_types_round_trip(kind, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", 50_000)
    summary = train_tokenizer([corpus], tmp_path / "t.model", vocab_size=400, model_type=kind)
    tok = load_tokenizer(summary.path)
    assert summary.chars_per_token > 0.9
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text


def test_directory_and_jsonl_corpora(tmp_path):
    (tmp_path / "a.txt").write_text("the cat sat on the mat\n" * 200)
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"text": f"record {i} about dogs"}) + "\n" for i in range(200))
    )
    summary = train_tokenizer([tmp_path], tmp_path / "t.model", vocab_size=330)
    tok = load_tokenizer(summary.path)
    assert len(tok.encode("the cat sat on the mat")) < 10  # learned from a.txt
    assert len(tok.encode("record about dogs")) < 10  # learned from b.jsonl


def test_encode_ids_then_decode_round_trips_on_the_command_line(shakespeare_tok, cli):
    text = "O Romeo, Romeo!\n  wherefore art thou 🌹\t?"
    res = cli("tokenize", "encode", "-t", shakespeare_tok, "--ids", text)
    assert res.exit_code == 0
    ids = res.stdout.split()
    assert all(i.isdigit() for i in ids)
    back = cli("tokenize", "decode", "-t", shakespeare_tok, *ids)
    assert back.exit_code == 0 and back.stdout == text
    piped = cli("tokenize", "decode", "-t", shakespeare_tok, stdin=res.stdout)
    assert piped.stdout == text


def test_encode_reads_stdin_and_prints_json(shakespeare_tok, cli):
    res = cli("tokenize", "encode", "-t", shakespeare_tok, "--json", stdin="to be")
    data = json.loads(res.stdout)
    tok = load_tokenizer(shakespeare_tok)
    assert data["ids"] == tok.encode("to be") and data["count"] == len(data["ids"])
    assert "".join(data["pieces"]).replace("▁", " ") == "to be"


def test_encode_shows_pieces_and_ids(shakespeare_tok, cli):
    res = cli("tokenize", "encode", "-t", shakespeare_tok, "hello world")
    tok = load_tokenizer(shakespeare_tok)
    assert " ".join(map(str, tok.encode("hello world"))) in res.stdout
    assert f"{len(tok.encode('hello world'))} tokens" in res.stdout


def test_bare_group_shows_help(cli):
    res = cli("tokenize")
    assert "train" in res.stdout + res.stderr and "encode" in res.stdout + res.stderr


# -- errors: one line, non-zero exit ----------------------------------------------------------


def _one_line_error(res, *needles):
    assert res.exit_code != 0
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


def test_missing_corpus(cli, tmp_path):
    _one_line_error(
        cli("tokenize", "train", tmp_path / "nope.txt", "-o", tmp_path / "t.model"),
        "nope.txt",
        "no such file",
    )


def test_empty_corpus(cli, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    _one_line_error(
        cli("tokenize", "train", tmp_path / "empty.txt", "-o", tmp_path / "t.model"), "empty"
    )


def test_non_utf8_corpus_names_file_and_offset(cli, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"hello there\ncaf\xe9 au lait\n")
    _one_line_error(
        cli("tokenize", "train", bad, "-o", tmp_path / "t.model"), "latin1.txt", "offset 15", "0xe9"
    )


def test_vocab_too_large_says_the_largest_that_works(cli, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("a tiny corpus with few words\n" * 20)
    res = cli("tokenize", "train", small, "-o", tmp_path / "t.model", "--vocab-size", "5000")
    _one_line_error(res, "--vocab-size 5000", "largest that works is")
    largest = int(res.stderr.rsplit(" ", 1)[1])
    assert (
        cli(
            "tokenize", "train", small, "-o", tmp_path / "t.model", "--vocab-size", str(largest)
        ).exit_code
        == 0
    )


def test_missing_and_corrupt_tokenizer(cli, tmp_path):
    _one_line_error(
        cli("tokenize", "encode", "-t", tmp_path / "none.model", "hi"), "none.model", "not found"
    )
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01 definitely not a protobuf")
    _one_line_error(
        cli("tokenize", "encode", "-t", junk, "hi"), "junk.model", "not a sentencepiece model"
    )


def test_decode_out_of_range_and_non_numeric_ids(shakespeare_tok, cli):
    _one_line_error(
        cli("tokenize", "decode", "-t", shakespeare_tok, "5", "2000"), "2000", "0..1999"
    )
    _one_line_error(cli("tokenize", "decode", "-t", shakespeare_tok, "5", "x"), "'x'")


def test_decode_rejects_a_negative_id(shakespeare_tok, cli):
    _one_line_error(cli("tokenize", "decode", "-t", shakespeare_tok, "5", "-1"), "-1", "0..1999")


def test_a_run_directory_names_its_tokenizer(shakespeare_tok, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(shakespeare_tok.read_bytes())
    assert load_tokenizer(tmp_path).sha256 == load_tokenizer(shakespeare_tok).sha256
    with pytest.raises(TformerError, match="without tokenizer.model"):
        load_tokenizer(tmp_path / "..")


def test_a_file_without_line_breaks_is_read_in_bounded_chunks(tmp_path):
    from tformer_cli.data.corpus import iter_text_chunks

    text = "héllo wörld " * 5000  # no newline at all, with 2-byte characters to split around
    path = tmp_path / "one_line.txt"
    path.write_text(text, encoding="utf-8")
    chunks = list(iter_text_chunks(path, chunk_bytes=256))
    assert "".join(t for _, t in chunks) == text
    assert len(chunks) > 1 and max(len(t.encode()) for _, t in chunks) <= 16 * 256 + 256


def test_load_tokenizer_error_type(tmp_path):
    with pytest.raises(TformerError):
        load_tokenizer(tmp_path / "missing.model")


def test_vocab_too_small_says_the_minimum(cli, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ\n" * 50)
    _one_line_error(
        cli("tokenize", "train", corpus, "-o", tmp_path / "t.model", "--vocab-size", "100"),
        "--vocab-size 100 is too small",
        "needs at least",
    )
