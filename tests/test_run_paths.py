"""Where runs go and how they are found: the run lock, auto-named runs, --model, corpus scans."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from fixtures import write_corpus

from models import Transformer, get_preset, save_model
from tformer_cli.data.corpus import resolve_corpus
from tformer_cli.data.tokenizer import train_tokenizer
from tformer_cli.errors import TformerError
from tformer_cli.interop.hf_export import export_hf
from tformer_cli.runs.locate import list_runs, newest_run, resolve_model_path
from tformer_cli.runs.lock import RunLock, RunLocked
from tformer_cli.runs.target import claim_auto, prepare_run_dir, run_name

NANO = [
    "--preset",
    "nano",
    "--batch-size",
    "4",
    "--seq-len",
    "64",
    "--eval-batches",
    "2",
    "--quiet",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small complete run (random nano weights) with a best/ copy of itself."""
    root = tmp_path_factory.mktemp("model")
    corpus = write_corpus(root / "c.txt", 40_000)
    tok = train_tokenizer([corpus], root / "tok.model", vocab_size=400)
    directory = root / "run"
    save_model(Transformer(get_preset("nano", vocab_size=tok.vocab_size)).eval(), directory)
    shutil.copyfile(tok.path, directory / "tokenizer.model")
    shutil.copytree(directory, root / "best")
    shutil.move(root / "best", directory / "best")
    return directory


def _one_line_error(res, *parts):
    assert res.exit_code == 1, res.stdout
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    for part in parts:
        assert part in res.stderr, res.stderr


# -- the run lock --------------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    with RunLock(tmp_path / "r"):
        assert (tmp_path / "r" / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(RunLocked, match=f"PID {os.getpid()}"):
            RunLock(tmp_path / "r").acquire()
        assert not RunLock(tmp_path / "r").try_acquire()
    assert not (tmp_path / "r" / ".lock").exists()  # released: nothing left behind
    with RunLock(tmp_path / "r"):
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = (
        "import sys, time; from tformer_cli.runs.lock import RunLock; "
        "RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "r")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"PID {proc.pid}"):
            RunLock(tmp_path / "r").acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stdout.close()
    assert (tmp_path / "r" / ".lock").exists()  # the file stays, but no process holds its lock
    with RunLock(tmp_path / "r"):
        assert (tmp_path / "r" / ".lock").read_text().strip() == str(os.getpid())


# -- auto-named runs -----------------------------------------------------------------------------


def test_run_names_come_from_the_first_corpus(tmp_path, monkeypatch):
    (tmp_path / "books").mkdir()
    monkeypatch.chdir(tmp_path / "books")
    assert run_name(["corpus.txt", "other.txt"]) == "corpus"
    assert run_name([tmp_path / "books"]) == "books"
    assert run_name(["."]) == "books"
    assert run_name([".hidden.jsonl"]) == "hidden"
    assert run_name(["my notes.txt"]) == "my-notes"


def _checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors").write_bytes(b"weights")
    return directory


def test_auto_names_skip_runs_and_locked_names_and_take_over_unfinished_starts(tmp_path):
    root = tmp_path / "runs"
    _checkpoint(root / "corpus")
    first = claim_auto("corpus", root, resume=False, overwrite=False)
    assert (first.path, first.how, first.previous) == (root / "corpus-2", "next", root / "corpus")
    # a second command starting meanwhile gets another name: corpus-2 is locked
    second = claim_auto("corpus", root, resume=False, overwrite=False)
    assert second.path == root / "corpus-3"
    first.release()
    second.release()
    # a start that failed before its first checkpoint left only a tokenizer: taken over
    (root / "corpus-2" / "tokenizer.model").write_bytes(b"half")
    third = claim_auto("corpus", root, resume=False, overwrite=False)
    assert (third.path, third.how) == (root / "corpus-2", "unfinished")
    third.release()
    # best/ weights alone count as a checkpoint; so do files tformer never writes (left alone)
    _checkpoint(root / "corpus-2" / "best")
    (root / "corpus-3").mkdir(exist_ok=True)
    (root / "corpus-3" / "notes.txt").write_text("mine")
    fourth = claim_auto("corpus", root, resume=False, overwrite=False)
    assert fourth.path == root / "corpus-4"
    fourth.release(failed=True)
    assert not (root / "corpus-4").exists()  # a failed start that wrote nothing leaves no trace


def test_concurrent_starts_get_different_names(tmp_path):
    # Each process claims a name and holds it until told to let go, so both hold one at once.
    code = (
        "import sys; from pathlib import Path; from tformer_cli.runs.target import claim_auto; "
        "t = claim_auto('corpus', Path(sys.argv[1]), False, False); print(t.path, flush=True); "
        "sys.stdin.readline(); t.release()"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "runs")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    try:
        paths = [p.stdout.readline().strip() for p in procs]
    finally:
        for p in procs:
            p.communicate("go\n", timeout=60)
    assert all(p.returncode == 0 for p in procs)
    assert sorted(paths) == [str(tmp_path / "runs" / "corpus"), str(tmp_path / "runs" / "corpus-2")]


def test_an_explicit_run_dir_is_taken_over_only_when_it_holds_no_run(tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "tokenizer.model").write_bytes(b"half")
    (unfinished / ".tokenizer.model.abc.tmp").write_bytes(b"")
    prepare_run_dir(unfinished, resume=False, overwrite=False)
    assert list(unfinished.iterdir()) == []
    with pytest.raises(TformerError, match="already holds a run; pass --resume"):
        prepare_run_dir(_checkpoint(tmp_path / "done"), resume=False, overwrite=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(TformerError, match=r"not a tformer run \(notes.txt\)"):
        prepare_run_dir(mine, resume=False, overwrite=False)
    prepare_run_dir(mine, resume=False, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"


def test_train_resume_and_overwrite_without_o(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus.txt", 60_000)
    train = ("train", "corpus.txt", *NANO, "--vocab-size", "400")
    res = run_cli(*train, "--max-steps", "2")
    assert res.exit_code == 0, res.stderr
    res = run_cli(*train, "--max-steps", "4", "--resume")
    assert res.exit_code == 0, res.stderr
    assert res.stderr.startswith("continuing the run in runs/corpus (the latest run of this corpus")
    assert json.loads((tmp_path / "runs/corpus/config.json").read_text())["step"] == 4
    res = run_cli(*train, "--max-steps", "1", "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert json.loads((tmp_path / "runs/corpus/config.json").read_text())["step"] == 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["corpus"]
    # a corpus directory scan leaves the runs out, so `tformer train .` trains on corpus.txt only
    res = run_cli("train", ".", *NANO, "--vocab-size", "400", "--max-steps", "1", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["run_dir"] == f"runs/{tmp_path.name}"
    _one_line_error(run_cli("train", "missing.txt", "--max-steps", "1"), "missing.txt")
    assert not (tmp_path / "runs" / "missing").exists()


def test_resume_without_o_needs_a_run_to_continue(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus.txt", 20_000)
    _one_line_error(run_cli("train", "corpus.txt", "--resume"), "nothing to resume", "runs/")


# -- the corpus scan -----------------------------------------------------------------------------


def test_a_directory_scan_skips_runs_caches_and_hidden_folders(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_corpus(data / "a.txt", 1000)
    (data / "sub").mkdir()
    (data / "sub" / "b.jsonl").write_text('{"text": "hi"}\n')
    run = data / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"format": "tformer", "model": {}}))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    started = data / "started"  # a start without its first checkpoint yet
    started.mkdir()
    (started / "tokenizer.model").write_bytes(b"x")
    (started / "metrics.jsonl").write_text('{"step": 1}\n')
    tokens = data / "tokens"
    tokens.mkdir()
    (tokens / "meta.json").write_text(json.dumps({"format_version": 2, "tokenizer_sha256": "0"}))
    (tokens / "notes.txt").write_text("token dir")
    write_corpus(data / ".hidden" / "c.txt", 100)
    write_corpus(data / "cache" / "d.txt", 100)
    monkeypatch.setenv("TFORMER_CACHE", str(data / "cache"))
    assert resolve_corpus([data]) == [data / "a.txt", data / "sub" / "b.jsonl"]
    assert resolve_corpus([data], exclude=[data / "sub"]) == [data / "a.txt"]
    with pytest.raises(TformerError, match="is a tformer run or token directory"):
        resolve_corpus([run])


# -- what --model accepts ------------------------------------------------------------------------


def test_model_paths_resolve_to_their_directory(run, tmp_path):
    assert resolve_model_path(run) == run
    assert resolve_model_path(run / "model.safetensors") == run
    assert resolve_model_path(run / "best") == run / "best"
    assert resolve_model_path(run / "best" / "model.safetensors") == run / "best"
    lora = tmp_path / "lora"
    lora.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copyfile(run / name, lora / name)
    (lora / "adapter.safetensors").write_bytes(b"")
    assert resolve_model_path(lora / "adapter.safetensors") == lora


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, run: d / "nope", "no such run directory"),
        (lambda d, run: _touch(d / "model.gguf"), "GGUF file is an export format"),
        (lambda d, run: run / "config.json", "not a checkpoint file; use its directory"),
        (
            lambda d, run: _touch(d / "notes.txt"),
            "not a model; --model takes a run directory, its best/",
        ),
        (
            lambda d, run: _folder_of_runs(d, run),
            "not a run directory (no config.json) but holds runs",
        ),
    ],
)
def test_anything_else_gets_one_line_saying_what_model_expects(run, tmp_path, make, message):
    path = make(tmp_path, run)
    _one_line_error(run_cli("generate", "-m", path, "-p", "x", "-n", "2"), message)


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _folder_of_runs(directory: Path, run: Path) -> Path:
    shutil.copytree(run, directory / "runs" / "one")
    return directory / "runs"


def test_newest_run_is_the_last_trained(run, tmp_path):
    root = tmp_path / "runs"
    with pytest.raises(TformerError, match="pass -m RUN_DIR, or train one first"):
        newest_run(root)
    for name, age in (("old", 100), ("new", 10), ("mid", 50)):
        shutil.copytree(run, root / name)
        then = time.time() - age
        os.utime(root / name / "model.safetensors", (then, then))
    (root / "empty").mkdir()
    assert list_runs(root) == [root / "new", root / "mid", root / "old"]
    assert newest_run(root) == root / "new"


def test_commands_take_a_checkpoint_file(run, tmp_path):
    res = run_cli(
        "profile", "-m", run / "best" / "model.safetensors", "--no-measure", "--json", "-"
    )
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["model"]["label"] == str(run / "best")
    res = run_cli("export", run / "model.safetensors", "--format", "hf", "-o", tmp_path / "hf")
    assert res.exit_code == 0, res.stderr


def test_a_hugging_face_llama_directory_loads_in_place(run, tmp_path):
    hf = tmp_path / "hf"
    export_hf(run, hf)
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    assert resolve_model_path(hf) == hf
    greedy = ("-p", "def ", "-n", "12", "--temperature", "0", "--json")
    ours = run_cli("generate", "-m", run, *greedy)
    theirs = run_cli("generate", "-m", hf, *greedy)
    assert ours.exit_code == 0 and theirs.exit_code == 0, theirs.stderr
    assert json.loads(theirs.stdout)["text"] == json.loads(ours.stdout)["text"]
    res = run_cli("profile", "-m", hf / "model.safetensors", "--no-measure", "--json", "-")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["params"] == get_preset("nano", vocab_size=400).num_params()
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before  # read-only: nothing written


def test_a_non_llama_hugging_face_directory_is_refused_in_one_line(tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    _one_line_error(run_cli("chat", "-m", gpt2), "unsupported architecture 'gpt2'", "llama")
