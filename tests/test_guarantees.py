"""What tformer guarantees: bad input is one line and touches nothing, one writer per run, failed
starts do not block a retry, saved state heals, work is bounded, and Ctrl-C exits 130 anywhere."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from fixtures import write_corpus, write_instructions
from helpers_run import make_run

from tformer_cli.runs.lock import RunLock

NANO = [
    "--preset",
    "nano",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--eval-batches",
    "1",
    "--quiet",
    "--sample-every",
    "0",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, a tokenizer, an existing run, a base run and instruction data."""
    base = tmp_path_factory.mktemp("guarantees")
    corpus = write_corpus(base / "corpus.txt", 40_000)
    run = make_run(base / "runs" / "existing", chat=True)
    latin1 = base / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    data = write_instructions(base / "ins.jsonl", 40)
    return {
        "base": base,
        "corpus": corpus,
        "run": run,
        "latin1": latin1,
        "data": data,
        "tok": run / "tokenizer.model",
    }


def train_args(world: dict, out: Path, *extra) -> list:
    """`tformer train` of the world's corpus into out: nano-sized, with the world's tokenizer."""
    return ["train", world["corpus"], "-o", out, "--tokenizer", world["tok"], *NANO, *extra]


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the paths: what "byte for byte unchanged" compares."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_line_error(res, code: int, *parts: str) -> None:
    assert res.exit_code == code, (res.exit_code, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr and "run with --debug" not in res.stderr, res.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


def _toml(tmp: Path, text: str | bytes) -> Path:
    path = tmp / "settings.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# Each row: the arguments ({corpus}, {run}, {new}, {tok}, {base}, {data}, {latin1}, {toml:...} are
# filled in), the exit code, and what the one line must name.
BAD_INPUTS = [
    ("train", "{tmp}/typo.txt", "-o", "{run}", "--overwrite", 1, "typo.txt"),
    ("train", "{latin1}", "-o", "{run}", "--overwrite", 1, "latin1.txt", "not UTF-8"),
    (
        "train",
        "{corpus}",
        "--tokenizer",
        "{run}/tokenizer.model",
        "-o",
        "{run}",
        "--overwrite",
        1,
        "tokenizer.model",
        "input",
    ),
    (
        "train",
        "{corpus}",
        "--tokenizer",
        "{tmp}/nope.model",
        "-o",
        "{run}",
        "--overwrite",
        1,
        "nope.model",
    ),
    ("train", "{corpus}", "-o", "{run}", 1, "already holds a run", "--overwrite"),
    ("train", "{corpus}", "-o", "{new}", "--resume", 1, "nothing to resume"),
    ("train", "{corpus}", "-o", "{new}", "--grad-clip", "-1", 1, "--grad-clip"),
    ("train", "{corpus}", "-o", "{new}", "--lr", "nan", 1, "--lr"),
    ("train", "{corpus}", "-o", "{new}", "--lr", "0", 1, "--lr"),
    ("train", "{corpus}", "-o", "{new}", "--seed", "-1", 1, "--seed"),
    ("train", "{corpus}", "-o", "{new}", "--seed", str(2**70), 1, "--seed"),
    ("train", "{corpus}", "-o", "{new}", "--dropout", "1.5", 1, "--dropout"),
    (
        "train",
        "{corpus}",
        "-o",
        "{new}",
        "--batch-size",
        "100000000",
        1,
        "--batch-size 100000000",
        "GiB",
    ),
    (
        "train",
        "{corpus}",
        "-o",
        "{new}",
        "--config",
        '{toml:[train]\nbatch_size = "four"\n}',
        1,
        "batch_size",
        "integer",
    ),
    ("train", "{corpus}", "-o", "{new}", "--config", "{toml:train = 5\n}", 1, "train", "table"),
    ("train", "{corpus}", "-o", "{new}", "--config", "{toml:[train]\ntime = true\n}", 1, "time"),
    (
        "train",
        "{corpus}",
        "-o",
        "{new}",
        "--config",
        '{toml:[train]\noutput = "runs/x"\n}',
        1,
        "-o",
    ),
    ("train", "{corpus}", "-o", "{new}", "--config", '{toml:[model]\ndim = "wide"\n}', 1, "dim"),
    ("train", "{corpus}", "-o", "{new}", "--config", "{toml:BYTES}", 1, "not UTF-8"),
    ("finetune", "{base}", "{data}", "-o", "{base}", "--overwrite", 1, "input"),
    ("finetune", "{base}", "{data}", "-o", "{base}", "--overwrite", "--full", 1, "input"),
    ("finetune", "{base}", "{data}", "-o", "{base}/best", 1, "input"),
    ("finetune", "{base}", "{data}", "-o", "{new}", "--lora-rank", "0", 1, "--lora-rank"),
    ("finetune", "{base}", "{data}", "-o", "{new}", "--lora-alpha", "nan", 1, "--lora-alpha"),
    ("finetune", "{base}", "{data}", "-o", "{new}", "--lora-dropout", "1.5", 1, "--lora-dropout"),
    ("finetune", "{base}", "{data}", "-o", "{new}", "--epochs", "-1", 1, "--epochs"),
    ("finetune", "{base}", "{data}", "-o", "{new}", "--val-split", "1", 1, "--val-split"),
    ("finetune", "{base}", "{data}", "-o", "{new}", "--lr", "nan", 1, "--lr"),
    ("finetune", "{base}", "{data}", "-o", "{new}", "--batch-size", "100000000", 1, "--batch-size"),
]


def _fill(arg: str, world: dict, tmp: Path) -> str:
    if arg.startswith("{toml:"):
        body = arg[len("{toml:") : -1]
        return str(_toml(tmp, b"[train]\nlr = 1e-3 # caf\xe9\n" if body == "BYTES" else body))
    for key in ("corpus", "run", "tok", "data", "latin1"):
        arg = arg.replace("{" + key + "}", str(world[key]))
    return (
        arg.replace("{base}", str(world["run"]))
        .replace("{new}", str(tmp / "new"))
        .replace("{tmp}", str(tmp))
    )


@pytest.mark.parametrize("row", BAD_INPUTS, ids=lambda row: " ".join(str(a) for a in row[:8])[:60])
def test_bad_input_is_one_line_and_touches_nothing(row, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    split = next(i for i, a in enumerate(row) if isinstance(a, int))
    args = [_fill(a, world, tmp_path) for a in row[:split]]
    code, parts = row[split], row[split + 1 :]
    if row[0] == "train":  # the row's own options come last, so they win
        args[1:1] = [*NANO, "--max-steps", "2", "--cache-dir", str(tmp_path / "cache")]
    before = snapshot(world["run"], world["corpus"], world["data"])
    res = run_cli(*args)
    one_line_error(res, code, *parts)
    assert snapshot(world["run"], world["corpus"], world["data"]) == before
    assert not (tmp_path / "new").exists()  # a refused start leaves nothing behind


# -- one writer per run ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_a_second_writer_is_refused_naming_the_holder(command, world, tmp_path):
    out = tmp_path / "held"
    with RunLock(out):
        if command == "train":
            res = run_cli("train", world["corpus"], "-o", out, *NANO, "--max-steps", "2")
        else:
            res = run_cli("finetune", world["run"], world["data"], "-o", out, "--max-steps", "1")
    one_line_error(res, 1, f"PID {os.getpid()}")


def test_two_trainings_on_one_corpus_at_once_both_succeed(world, tmp_path):
    env = {**os.environ, "TFORMER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = [str(world["corpus"]), "--tokenizer", str(world["tok"]), *NANO, "--max-steps", "2"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tformer_cli", "train", *args, "-o", str(tmp_path / name)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert (tmp_path / "a" / "model.safetensors").is_file() and (
        tmp_path / "b" / "model.safetensors"
    ).is_file()


# -- failed starts and damaged state --------------------------------------------------------------


def test_a_start_that_fails_before_its_first_checkpoint_is_taken_over(world, tmp_path, monkeypatch):
    import tformer_cli.training.loop as trainer

    real = trainer.lm_loss
    monkeypatch.setattr(trainer, "lm_loss", lambda m, x, y: real(m, x, y) * float("nan"))
    out = tmp_path / "run"
    args = train_args(world, out, "--max-steps", "3")
    res = run_cli(*args)
    assert (
        res.exit_code == 1
        and "loss became nan at step 1" in res.stderr
        and "nothing was saved" in res.stderr
    )
    one_line_error(run_cli(*args, "--resume"), 1, "nothing to resume", "without --resume")
    monkeypatch.setattr(trainer, "lm_loss", real)
    res = run_cli(*args)  # the same command again: no --overwrite needed
    assert res.exit_code == 0, res.stderr
    assert (out / "model.safetensors").is_file()


def test_a_torn_metrics_line_is_dropped_on_resume(world, tmp_path):
    out = tmp_path / "run"
    args = train_args(world, out, "--save-every", "4", "--eval-every", "4", "--log-every", "2")
    assert run_cli(*args, "--max-steps", "4").exit_code == 0
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 6, "loss": 3.1')  # what a crash mid-write leaves
    res = run_cli(*args, "--max-steps", "8", "--resume")
    assert res.exit_code == 0, res.stderr
    assert "torn last line" in res.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 8 and 6 in steps


def test_a_damaged_token_cache_is_rebuilt_with_a_notice(world, tmp_path):
    cache = tmp_path / "cache"
    args = [
        world["corpus"],
        "--tokenizer",
        world["tok"],
        *NANO,
        "--max-steps",
        "1",
        "--cache-dir",
        cache,
    ]
    assert run_cli("train", *args, "-o", tmp_path / "a").exit_code == 0
    (train_bin,) = cache.glob("tokens/*/train.bin")
    train_bin.write_bytes(train_bin.read_bytes()[:-6])
    res = run_cli("train", *args, "-o", tmp_path / "b")
    assert res.exit_code == 0, res.stderr
    assert "token cache damaged" in res.stderr and str(train_bin) in res.stderr


def test_grad_clip_zero_means_off_and_still_trains(world, tmp_path):
    extra = ["--max-steps", "12", "--grad-clip", "0", "--log-every", "4", "--lr", "3e-3", "--json"]
    res = run_cli(*train_args(world, tmp_path / "run", *extra))
    assert res.exit_code == 0, res.stderr
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert losses[-1] < losses[0]


# -- Ctrl-C in every phase ------------------------------------------------------------------------


def interrupted(res) -> None:
    assert res.exit_code == 130, (res.exit_code, res.stderr)
    assert "Traceback" not in res.stderr and "interrupted" in res.stderr, res.stderr


def _raise(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_while_modules_load(monkeypatch, capsys):
    from tformer_cli import entry

    class Interrupt:
        def find_spec(self, name, path=None, target=None):
            if name == "tformer_cli.app":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "tformer_cli.app")
    monkeypatch.setattr(sys, "meta_path", [Interrupt(), *sys.meta_path])
    with pytest.raises(SystemExit) as exit_:
        entry.main(["info"])
    assert exit_.value.code == 130 and capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("phase", ["train_tokenizer", "pretokenize_cached"])
def test_ctrl_c_before_training_leaves_no_run_behind(phase, world, tmp_path, monkeypatch):
    import tformer_cli.training.pretrain as trainer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer, phase, _raise)
    interrupted(run_cli("train", world["corpus"], *NANO, "--max-steps", "2"))
    assert not (tmp_path / "runs" / "corpus").exists()


def test_ctrl_c_during_training_saves_and_resumes(world, tmp_path, monkeypatch):
    import tformer_cli.training.loop as trainer

    real, calls = trainer.lm_loss, {"n": 0}

    def press_ctrl_c_at_step_3(model, x, y):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:
                signal.raise_signal(signal.SIGINT)
        return real(model, x, y)

    monkeypatch.setattr(trainer, "lm_loss", press_ctrl_c_at_step_3)
    out = tmp_path / "run"
    args = train_args(world, out, "--max-steps", "10")
    res = run_cli(*args)
    assert res.exit_code == 130 and "Traceback" not in res.stderr and "--resume" in res.stderr
    assert json.loads((out / "config.json").read_text())["step"] == 3
    monkeypatch.setattr(trainer, "lm_loss", real)
    assert run_cli(*args, "--resume").exit_code == 0


def test_ctrl_c_while_saving_keeps_the_last_checkpoint(world, tmp_path, monkeypatch):
    import tformer_cli.training.checkpoint as trainer

    real, calls = trainer.save_train_state, {"n": 0}

    def second_save_interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "save_train_state", second_save_interrupted)
    out = tmp_path / "run"
    args = train_args(world, out, "--max-steps", "8", "--save-every", "4", "--eval-every", "100")
    interrupted(run_cli(*args))
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 4
    monkeypatch.setattr(trainer, "save_train_state", real)
    res = run_cli(*args, "--resume")
    assert res.exit_code == 0 and "resuming from step 4" in res.stderr, res.stderr


def test_ctrl_c_during_generation_and_chat(world, monkeypatch):
    import tformer_cli.commands.generate as generate_command
    from tformer_cli.inference.chat import ChatSession

    monkeypatch.setattr(generate_command, "run_generation", _raise)
    res = run_cli("generate", "-m", world["run"], "-p", "Hello")
    assert res.exit_code == 130 and "Traceback" not in res.stderr
    monkeypatch.setattr(ChatSession, "reply", _raise)
    res = run_cli("chat", "-m", world["run"], stdin="Hello\n")
    assert res.exit_code == 130 and "Traceback" not in res.stderr


# -- bounds ---------------------------------------------------------------------------------------


def test_load_refuses_what_is_not_a_bounded_transcript(world, tmp_path):
    from tformer_cli.errors import TformerError
    from tformer_cli.inference.chat import TRANSCRIPT_LIMIT, read_transcript

    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(TRANSCRIPT_LIMIT + 1)
    bad_system = tmp_path / "sys.json"
    bad_system.write_text(json.dumps({"system": 123, "messages": []}))
    for path, message in (
        (Path("/dev/zero"), "not a regular file"),
        (big, "limit"),
        (bad_system, '"system"'),
    ):
        with pytest.raises(TformerError, match=message):
            read_transcript(path)


def test_fitting_a_loaded_transcript_costs_linear_time(world, tmp_path):
    """Characters encoded while /load-ing and answering: 4x the messages, about 4x the work."""
    from models import load_model
    from tformer_cli.data.tokenizer import load_tokenizer
    from tformer_cli.inference.chat import ChatSession
    from tformer_cli.inference.sampling import SamplingConfig

    tok = load_tokenizer(world["tok"])
    model = load_model(world["run"])

    def encoded_chars(n: int) -> int:
        messages = [
            {"role": ("user", "assistant")[i % 2], "content": f"message {i} of the long chat"}
            for i in range(n)
        ]
        path = tmp_path / f"t{n}.json"
        path.write_text(json.dumps({"system": None, "messages": messages}))
        count = {"chars": 0}
        real = tok.encode_batch

        def counting(texts, num_threads=None):
            count["chars"] += sum(len(t) for t in texts)
            return real(texts, num_threads)

        tok.encode_batch = counting
        try:
            session = ChatSession(
                model, tok, "chat", SamplingConfig(temperature=0), max_new_tokens=2
            )
            session.load(path)
            session.reply("hi")
        finally:
            del tok.encode_batch
        return count["chars"]

    small, large = encoded_chars(1000), encoded_chars(4000)
    assert large < 4.5 * small, (small, large)
