"""`tformer eval`: which tokens count, figures checked by hand and against lm_loss, agreement with
the run card, every kind of run, bounded memory on a large text, one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from fixtures import corpus_text
from helpers_eval import SEQ_LEN, eval_runs
from helpers_run import make_run, shared_tokenizer

from models import Transformer, get_preset
from tformer_cli.data.tokenizer import load_tokenizer
from tformer_cli.evaluation.scoring import Windows, score_documents
from tformer_cli.evaluation.texts import data_text, held_out_text

CPU = torch.device("cpu")


def _one_line_error(res, *parts):
    assert res.exit_code != 0, res.stdout
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    for part in parts:
        assert part in res.stderr, res.stderr


def _eval_json(cli, *args) -> list[dict]:
    res = cli("eval", *args, "--precision", "fp32", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)["results"]


# -- which tokens count ---------------------------------------------------------------------------


@pytest.mark.parametrize("window,stride", [(8, 4), (8, 8), (8, 3), (5, 1), (16, 8)])
@pytest.mark.parametrize("total", [9, 10, 23, 64])
def test_every_token_but_the_first_counts_once_with_enough_context(window, stride, total):
    rng = np.random.default_rng(total)
    cuts = sorted(rng.choice(np.arange(1, total), size=min(5, total - 1), replace=False))
    pieces = np.split(np.arange(total), cuts)  # the stream fed in uneven pieces
    w = Windows(window, stride)
    rows = [row for piece in pieces for row in w.feed(piece)] + list(w.finish())
    if total <= window:  # shorter than one window: nothing to score (the caller says so)
        assert rows == []
        return
    counted = []
    for ids, new in rows:
        assert len(ids) == window + 1 and ids[-1] - ids[0] == window  # a whole window
        for target in ids[-new:]:
            counted.append(target)
            if target > window:  # after the first window: at least window - stride + 1 before it
                assert target - ids[0] >= window - stride + 1
    assert sorted(counted) == list(range(1, total))


def test_a_model_with_uniform_predictions_scores_log_vocab_per_token():
    """All weights zero: every logit is 0, so each token costs ln(V) nats, exactly."""
    tok = load_tokenizer(shared_tokenizer())
    model = Transformer(get_preset("nano", vocab_size=tok.vocab_size, max_seq_len=32))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    text = corpus_text(3000)
    score = score_documents(model, tok, [[(0, text)]], 32, 16, 4, CPU)
    n = len(tok.encode(text)) + 2  # BOS ... EOS
    assert (score.tokens, score.predicted) == (n, n - 1)
    assert score.bytes == len(text.encode("utf-8"))
    assert score.nats_per_token == pytest.approx(math.log(tok.vocab_size), rel=1e-6)
    assert score.perplexity == pytest.approx(tok.vocab_size, rel=1e-5)
    expected_bpb = (n - 1) * math.log2(tok.vocab_size) / len(text.encode("utf-8"))
    assert score.bits_per_byte == pytest.approx(expected_bpb, rel=1e-6)


def _reference_nats(model, ids: list[int], window: int, stride: int) -> float:
    """Each target's loss from the window that counts it, one plain forward pass per window."""
    n, total, by_start = len(ids), 0.0, {}
    for t in range(1, n):
        start = 0 if t <= window else math.ceil((t - window) / stride) * stride
        start = min(start, n - 1 - window)
        by_start.setdefault(start, []).append(t)
    for start, targets in by_start.items():
        x = torch.tensor([ids[start : start + window]])
        logp = F.log_softmax(model(x)[0].float(), dim=-1)
        total -= sum(logp[t - start - 1, ids[t]].item() for t in targets)
    return total


def test_figures_equal_the_loss_of_the_same_windows_however_batched_or_chunked():
    tok = load_tokenizer(shared_tokenizer())
    torch.manual_seed(0)
    model = Transformer(get_preset("nano", vocab_size=tok.vocab_size, max_seq_len=48)).eval()
    text = corpus_text(6000)
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    lines = text.splitlines(keepends=True)
    chunks = [(0, "".join(lines[:40])), (1, "".join(lines[40:]))]  # split at a line break
    for window, stride, batch in [(48, 24, 3), (48, 48, 1), (32, 7, 5)]:
        want = _reference_nats(model, ids, window, stride)
        whole = score_documents(model, tok, [[(0, text)]], window, stride, batch, CPU)
        split = score_documents(model, tok, [chunks], window, stride, 2, CPU)
        assert whole.nats == pytest.approx(want, rel=1e-5)
        assert split.nats == pytest.approx(want, rel=1e-5) and split.tokens == len(ids)


# -- real runs -----------------------------------------------------------------------------------


def test_non_overlapping_windows_on_the_held_out_text_agree_with_the_run_card(cli):
    runs = eval_runs()
    card_bpb = runs.card["final_val_bpb"]
    text = held_out_text(runs.pretrain)
    assert text.files == [runs.corpus] and text.val_fraction == 0.1
    (row,) = _eval_json(cli, "-m", runs.pretrain, "--stride", SEQ_LEN)
    assert row["window"] == SEQ_LEN and row["stride"] == SEQ_LEN
    assert row["text"] == text.label and row["kind"] == "pretrain" and row["best"]
    assert abs(row["bits_per_byte"] / card_bpb - 1) < 0.03, (row["bits_per_byte"], card_bpb)
    (overlapping,) = _eval_json(cli, "-m", runs.pretrain)  # default stride: more context
    assert overlapping["stride"] == SEQ_LEN // 2
    assert overlapping["bits_per_byte"] < row["bits_per_byte"] * 1.01


def test_lora_and_int8_runs_evaluate_and_a_lora_run_scores_on_its_base_held_out_text(cli):
    runs = eval_runs()
    data = runs.root / "data" / "sample.txt"
    data.write_text(corpus_text(20_000)[-8000:], encoding="utf-8")
    rows = _eval_json(cli, "-m", runs.pretrain, "-m", runs.lora, "--quantize", "none,int8",
                      "--data", data)  # fmt: skip
    got = {(r["model"], r["quantize"]): r for r in rows}
    assert set(got) == {(str(m), q) for m in (runs.pretrain, runs.lora) for q in ("none", "int8")}
    assert got[(str(runs.lora), "none")]["kind"] == "LoRA"
    assert [r["best"] for r in rows].count(True) == 1  # one text, one best
    assert [r["bits_per_byte"] for r in rows] == sorted(r["bits_per_byte"] for r in rows)
    for model in (runs.pretrain, runs.lora):
        fp32, int8 = got[(str(model), "none")], got[(str(model), "int8")]
        assert fp32["tokens"] == int8["tokens"] and fp32["bytes"] == data.stat().st_size
        assert abs(int8["bits_per_byte"] / fp32["bits_per_byte"] - 1) < 0.05
    own = _eval_json(cli, "-m", runs.lora, "-m", runs.pretrain)
    assert own[0]["text"] == own[1]["text"] == held_out_text(runs.pretrain).label


def test_an_exported_then_imported_run_scores_the_same(cli):
    runs = eval_runs()
    data = runs.root / "data" / "exported.txt"
    data.write_text(corpus_text(12_000), encoding="utf-8")
    rows = _eval_json(cli, "-m", runs.pretrain, "-m", runs.hf, "-m", runs.imported, "--data", data)
    assert {r["kind"] for r in rows if r["model"] != str(runs.pretrain)} == {"imported"}
    figures = {r["bits_per_byte"] for r in rows}
    assert max(figures) - min(figures) < 1e-9 * max(figures), rows


def test_the_table_ranks_and_marks_the_best(cli):
    runs = eval_runs()
    data = runs.root / "data" / "table.txt"
    data.write_text(corpus_text(8000), encoding="utf-8")
    res = cli("eval", "-m", runs.pretrain, "-m", runs.lora, "--data", data, "--quiet")
    assert res.exit_code == 0, res.stderr
    assert "★" in res.stdout and "bits/byte" in res.stdout and "tokens of context" in res.stdout


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from tformer_cli.evaluation.scoring import score_documents
    from tformer_cli.evaluation.texts import data_text
    from tformer_cli.profiling.memory import PeakMemory
    from tformer_cli.runs.rundir import load_run

    torch.set_num_threads(1)  # a tiny model: one thread is faster, and steadier on a busy machine

    def hwm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    run, text = load_run(sys.argv[1]), data_text(sys.argv[2])
    cpu, quarter, marks = torch.device("cpu"), text.size // 4, {}

    def progress(done):
        if done >= quarter and "quarter" not in marks:
            marks["quarter"] = hwm()

    score_documents(run.model, run.tokenizer, [[(0, "warm " * 200)]], 64, 64, 64, cpu)
    with PeakMemory(cpu) as peak:
        score = score_documents(
            run.model, run.tokenizer, text.documents(), 64, 64, 64, cpu, progress
        )
    marks["end"] = hwm()
    print(json.dumps({"peak": peak.peak, "method": peak.method, "tokens": score.tokens, **marks}))
    """
)


def test_peak_memory_stays_bounded_on_a_text_far_larger_than_a_batch(tmp_path):
    run = make_run(tmp_path / "run", dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_seq_len=64)
    large = tmp_path / "large.txt"
    with open(large, "w", encoding="utf-8") as f:
        for _ in range(16):  # 7.4 MB of text: 4M tokens against batches of 64 x 65
            f.write(corpus_text())
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    out = subprocess.run(
        [sys.executable, script, run, large], capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout)
    if got["method"] != "rss_hwm" or got["end"] is None:
        pytest.skip(f"no exact peak-RSS measurement here ({got['method']})")
    assert got["tokens"] > 3_000_000
    # Past the first quarter the peak hardly moves: holding the other three quarters' tokens
    # would add over 22 MB as int64 (and several times that as a Python list); the allocator's
    # own drift over a long run was up to 7 MB.
    assert got["end"] - got["quarter"] < 12 << 20, got
    assert got["peak"] < 64 << 20, got  # the batch's logits and the allocator's slack


# -- errors --------------------------------------------------------------------------------------


def test_bad_text_is_one_line(cli, tmp_path):
    runs = eval_runs()
    empty, binary, short = tmp_path / "empty.txt", tmp_path / "data.bin", tmp_path / "short.txt"
    empty.write_text("")
    binary.write_bytes(b"\x7fELF\x02\x01\x01\0\0\0" * 100)
    short.write_text("To be, or not to be.\n")
    base = ("eval", "-m", runs.pretrain, "--data")
    _one_line_error(cli(*base, empty), "empty")
    _one_line_error(cli(*base, binary), "binary", "NUL byte")
    _one_line_error(cli(*base, tmp_path / "nope.txt"), "no such file")
    res = cli(*base, short)
    n = len(load_tokenizer(runs.pretrain).encode(short.read_text())) + 2
    _one_line_error(res, f"{n} tokens", f"needs {SEQ_LEN + 1}", "--seq-len")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1") * 50)
    _one_line_error(cli(*base, latin1), "UTF-8")


def test_bad_options_and_missing_held_out_text_are_one_line(cli):
    runs = eval_runs()
    m = ("eval", "-m", runs.pretrain)
    _one_line_error(cli(*m, "--quantize", "int4"), "--quantize", "int8")
    _one_line_error(cli(*m, "--seq-len", str(SEQ_LEN * 2)), "--seq-len", "context of 64")
    _one_line_error(cli(*m, "--stride", str(SEQ_LEN + 1)), "--stride", "at most the window")
    _one_line_error(cli(*m, "--stride", "0"), "--stride", "at least 1")
    _one_line_error(cli("eval", "-m", runs.imported), "imported", "--data")


def test_a_tokenizer_that_cannot_encode_the_text_is_one_line(cli, tmp_path):
    ascii_text = tmp_path / "ascii.txt"
    ascii_text.write_text(corpus_text(40_000).encode("ascii", "ignore").decode())
    spm.SentencePieceTrainer.train(
        input=str(ascii_text),
        model_prefix=str(tmp_path / "plain"),
        vocab_size=200,
        byte_fallback=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    run = make_run(tmp_path / "run", tokenizer=tmp_path / "plain.model", max_seq_len=32)
    text = tmp_path / "japanese.txt"
    text.write_text(corpus_text(2000) + "日本語のテキスト\n", encoding="utf-8")
    _one_line_error(cli("eval", "-m", run, "--data", text), "cannot encode", "'日'", "<unk>")


def test_data_text_reads_a_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    text = data_text(tmp_path)
    docs = [list(d) for d in text.documents()]
    assert [[t for _, t in d] for d in docs] == [["first file\n"], ["one"], ["two"]]
