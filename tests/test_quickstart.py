"""The four command lines users quote, run as written in a folder that holds only corpus.txt.

    tformer train corpus.txt            (plus --max-steps, so it ends quickly)
    tformer chat --model ckpt           (a run directory, or the checkpoint file inside it)
    tformer profile --seq-len 2048      (plus --json -, to read the figures)
    tformer tokenize

and the help that leads there: the quickstart on a bare `tformer`, examples under every --help.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import typer.main
from conftest import run_cli
from fixtures import write_corpus

from models import get_preset
from tformer_cli.app import app
from tformer_cli.commands.help import QUICKSTART, epilog_commands
from tformer_cli.data.chat_template import PLAIN_STOPS, plain_transcript
from tformer_cli.runs.rundir import check_run_dir
from tformer_cli.training.config import DEFAULT_PRESET

CORPUS_CHARS = 120_000  # enough for the default 2048-token tokenizer and a validation split
TRAIN = ("train", "corpus.txt", "--max-steps", "1")  # the line as users write it, plus a limit
RUN_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.model",
    "metrics.jsonl",
    "run_card.json",
    "train_state/state.json",
    "best/model.safetensors",
    "best/tokenizer.model",
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An empty folder holding only corpus.txt, as the working directory of these tests."""
    root = tmp_path_factory.mktemp("quickstart")
    write_corpus(root / "corpus.txt", CORPUS_CHARS)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("TFORMER_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield root


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def first_run(folder):
    res = run_cli(*TRAIN)
    assert res.exit_code == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def second_run(folder, first_run):
    """The same command again: (its result, runs/corpus's files before it, and after it)."""
    before = _snapshot(folder / "runs" / "corpus")
    res = run_cli(*TRAIN)
    assert res.exit_code == 0, res.stderr
    return res, before, _snapshot(folder / "runs" / "corpus")


def _complete_run(path: Path) -> None:
    check_run_dir(path)
    for name in RUN_FILES:
        assert (path / name).is_file(), name
    assert not (path / ".lock").exists()  # the lock goes with the command


def test_train_without_o_writes_runs_corpus(folder, first_run):
    _complete_run(folder / "runs" / "corpus")
    assert sorted(p.name for p in folder.iterdir()) == ["corpus.txt", "runs"]
    assert first_run.stderr.splitlines()[0].startswith(
        "training into runs/corpus (named after corpus.txt"
    )
    card = json.loads((folder / "runs" / "corpus" / "run_card.json").read_text())
    assert card["run_dir"] == "runs/corpus" and card["preset"] == DEFAULT_PRESET
    assert "run card: runs/corpus" in first_run.stdout


def test_training_twice_keeps_the_first_run_and_takes_the_next_name(folder, second_run):
    res, before, after = second_run
    assert after == before  # byte for byte, every file of the first run
    _complete_run(folder / "runs" / "corpus-2")
    first_line = res.stderr.splitlines()[0]
    assert first_line.startswith("training into runs/corpus-2: runs/corpus holds an earlier run")
    assert (
        json.loads((folder / "runs" / "corpus-2" / "run_card.json").read_text())["run_dir"]
        == "runs/corpus-2"
    )


def test_profile_without_a_model_profiles_the_default_preset(folder):
    res = run_cli("profile", "--seq-len", "2048", "--json", "-")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    params = get_preset(DEFAULT_PRESET).num_params()
    assert (data["preset"], data["params"], data["default_preset"]) == ("micro", params, True)
    assert params == 1_730_176 and data["seq_len"] == 2048
    assert res.stderr.splitlines()[0] == (
        "profiling the default preset of `tformer train`: micro (1,730,176 parameters); "
        "choose another with -m, --preset or --config"
    )


def _chat(model: str, *flags: str) -> str:
    res = run_cli("chat", "--model", model, *flags, stdin="hello\n")
    assert res.exit_code == 0, res.stderr
    return res.stdout


def test_chat_through_the_run_or_its_checkpoint_file_equals_greedy_generate(folder, second_run):
    greedy = ("--temperature", "0", "--repetition-penalty", "1", "-n", "24")
    by_dir = _chat("runs/corpus", *greedy)
    assert _chat("runs/corpus/model.safetensors", *greedy) == by_dir
    # what chat sends a base model, and where it stops the reply
    prompt = plain_transcript([{"role": "user", "content": "hello"}])
    stops = [a for s in PLAIN_STOPS for a in ("--stop", s)]
    gen = ("generate", "--model", "runs/corpus", "-p", prompt, "--temperature", "0", "-n", "24")
    res = run_cli(*gen, *stops, "--json")
    assert res.exit_code == 0, res.stderr
    text = json.loads(res.stdout)["text"]
    assert by_dir == text.strip().replace("\n", "\\n") + "\n"  # chat prints a reply per line

    sampled = ("--temperature", "0.9", "--seed", "3", "-n", "24")  # a reply with more to compare
    assert _chat("runs/corpus/best/model.safetensors", *sampled) == _chat(
        "runs/corpus/best", *sampled
    )


def test_chat_and_generate_without_a_model_use_the_newest_run(folder, second_run):
    res = run_cli("generate", "-p", "x", "-n", "4", "--temperature", "0")
    assert res.exit_code == 0, res.stderr
    assert res.stderr.splitlines()[0] == (
        "using runs/corpus-2 (the most recently trained run; choose another with -m)"
    )
    res = run_cli("chat", "-n", "4", stdin="hi\n")
    assert res.exit_code == 0 and res.stderr.startswith("using runs/corpus-2 "), res.stderr


def test_a_bare_tformer_shows_the_quickstart():
    res = run_cli()
    assert res.exit_code == 0, res.stderr
    for line in QUICKSTART:
        assert line in res.stdout


def _commands(group, path=()):
    """(command path, click command) for every command and group of the app."""
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def test_every_help_ends_with_examples_that_parse():
    root = typer.main.get_command(app)
    checked = 0
    for path, command in [((), root), *_commands(root)]:
        lines = epilog_commands(command.epilog)
        assert len(lines) >= 2, f"tformer {' '.join(path)}: its --help shows no examples"
        for line in lines:
            args = shlex.split(line)[1:]
            res = run_cli(*args, "--help")
            assert res.exit_code == 0, f"{line}: {res.stderr}"
            assert "Usage: tformer" in res.stdout, line
            checked += 1
    assert checked >= 25


def test_help_shows_no_type_placeholders():
    for args in ((), ("train",), ("chat",), ("tokenize", "train"), ("export",)):
        res = run_cli(*args, "--help")
        assert res.exit_code == 0
        assert (
            "<bool>" not in res.stdout and "<int>" not in res.stdout and "list[" not in res.stdout
        )
    train_help = run_cli("train", "--help").stdout
    assert "CORPUS..." in train_help and "RUN_DIR" in train_help and "INTEGER" in train_help


def test_tokenize_prints_an_example_that_runs(folder):
    res = run_cli("tokenize")
    assert res.exit_code == 0, res.stderr
    examples = [
        line.strip()
        for line in res.stdout.splitlines()
        if line.strip().startswith("tformer tokenize train ")
    ]
    assert examples, res.stdout
    res = run_cli(*shlex.split(examples[0])[1:])
    assert res.exit_code == 0, res.stderr
    assert (folder / "tok.model").is_file()
