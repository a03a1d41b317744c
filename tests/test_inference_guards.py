"""Bad input to generate, chat, export and run loading: one line on stderr, nothing saved changes.

Every refusal here is checked the same way: the exit code, exactly one stderr line starting with
`error: ` that names the option or file at fault, no traceback, and the run directory byte for
byte as it was.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import Result, run_cli
from fixtures import corpus_text
from helpers_run import make_run, make_tokenizer, read_config, shared_tokenizer

from models.lora import apply_lora, lora_state
from models.weights import save_tensors, write_config
from tformer_cli.data.tokenizer import load_tokenizer
from tformer_cli.runs.lock import RunLock
from tformer_cli.runs.rundir import load_run, load_run_model

# --- helpers --------------------------------------------------------------------------------


def tree_hash(directory: Path) -> dict[str, str]:
    """sha256 of every file under directory, by relative path."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


def one_line_error(res: Result, *parts: str, code: int = 1) -> None:
    assert res.exit_code == code, (res.exit_code, res.stderr)
    assert "Traceback" not in res.stderr and "--debug" not in res.stderr, res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    for part in parts:
        assert part in res.stderr, (part, res.stderr)


class _FakeTerminal(io.TextIOWrapper):
    """A bytes-backed stdin that says it is a terminal (chat then runs interactively)."""

    def isatty(self) -> bool:
        return True


def run_bytes(*args, stdin: bytes, tty: bool = False) -> Result:
    """run_cli with stdin made of raw bytes (maybe not UTF-8), as a real pipe or terminal gives."""
    cls = _FakeTerminal if tty else io.TextIOWrapper
    old = sys.stdin
    sys.stdin = cls(io.BytesIO(stdin), encoding="utf-8")
    try:
        return run_cli(*args)
    finally:
        sys.stdin = old


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A nano chat run whose config.json records its tokenizer's sha256, as trained runs do."""
    run = make_run(tmp_path_factory.mktemp("guards") / "run", chat=True)
    _record_sha(run)
    return run


@pytest.fixture
def run(base_run, tmp_path):
    """A private copy of base_run (a test may break it)."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def foreign_tokenizer(tmp_path_factory):
    """Another tokenizer with the same vocabulary size as the shared one: only its bytes differ."""
    path = tmp_path_factory.mktemp("foreign") / "other.model"
    tok = make_tokenizer(corpus_text(100_000)[::-1], path, vocab_size=500)
    assert load_tokenizer(tok).vocab_size == load_tokenizer(shared_tokenizer()).vocab_size
    return tok


def _record_sha(run: Path) -> None:
    data = read_config(run)
    data["tokenizer_sha256"] = load_tokenizer(run / "tokenizer.model").sha256
    (run / "config.json").write_text(json.dumps(data, indent=2) + "\n")


def _edit_config(run: Path, **changes) -> None:
    data = read_config(run)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (run / "config.json").write_text(json.dumps(data, indent=2) + "\n")


# --- 1. the tokenizer belongs to the model ----------------------------------------------------


def test_a_foreign_tokenizer_is_refused_by_every_command(run, foreign_tokenizer, tmp_path):
    shutil.copyfile(foreign_tokenizer, run / "tokenizer.model")
    before = tree_hash(run)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    for args in (
        ("generate", "-m", run, "-p", "Hi", "-n", "2"),
        ("chat", "-m", run, "-n", "2"),
        ("export", run, "--format", "hf", "-o", tmp_path / "hf"),
        ("finetune", run, data, "-o", tmp_path / "ft", "--max-steps", "1", "--quiet"),
    ):
        res = run_cli(*args, stdin="Hello\n")
        one_line_error(
            res,
            f"{run / 'tokenizer.model'} does not belong to {run / 'config.json'}",
            "copy back the run's own tokenizer",
        )
    assert tree_hash(run) == before
    assert not (tmp_path / "hf").exists() and not (tmp_path / "ft" / "config.json").exists()
    shutil.copyfile(shared_tokenizer(), run / "tokenizer.model")  # its own tokenizer back: fine
    assert run_cli("generate", "-m", run, "-p", "Hi", "-n", "2").exit_code == 0


def test_best_is_checked_as_a_run_of_its_own(run, foreign_tokenizer):
    best = run / "best"
    best.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(run / name, best / name)
    shutil.copyfile(foreign_tokenizer, best / "tokenizer.model")
    before = tree_hash(run)
    res = run_cli("generate", "-m", best, "-p", "Hi", "-n", "2")
    one_line_error(
        res, str(best / "tokenizer.model"), "does not belong to", str(best / "config.json")
    )
    res = run_cli("generate", "-m", best / "model.safetensors", "-p", "Hi", "-n", "2")
    one_line_error(res, str(best / "tokenizer.model"), "does not belong to")
    assert tree_hash(run) == before
    shutil.copyfile(run / "tokenizer.model", best / "tokenizer.model")
    assert run_cli("generate", "-m", best, "-p", "Hi", "-n", "2").exit_code == 0


def test_a_smaller_tokenizer_is_refused_unless_the_model_is_padded_on_purpose(tmp_path):
    run = make_run(tmp_path / "r", vocab_size=600)  # 500-token tokenizer, 600 embedding rows
    before = tree_hash(run)
    res = run_cli("generate", "-m", run, "-p", "Hi", "-n", "2")
    one_line_error(
        res, "tokenizer.model has 500 tokens but the model embeds 600", "does not belong"
    )
    assert tree_hash(run) == before
    _edit_config(run, imported_from="/some/hf/model")  # Hugging Face vocabularies are padded
    assert run_cli("generate", "-m", run, "-p", "Hi", "-n", "2").exit_code == 0
    _edit_config(run, imported_from=None)
    _record_sha(run)  # the very tokenizer it was trained with: the padding is its own
    assert run_cli("generate", "-m", run, "-p", "Hi", "-n", "2").exit_code == 0
    assert load_run(run).tokenizer.vocab_size == 500


def test_runs_without_a_recorded_sha_still_load(tmp_path):
    run = make_run(tmp_path / "r")
    assert "tokenizer_sha256" not in read_config(run)
    assert run_cli("generate", "-m", run, "-p", "Hi", "-n", "2").exit_code == 0


def test_import_records_the_sha256_of_the_tokenizer_it_copies(tmp_path):
    from tformer_cli.interop.hf_export import export_hf
    from tformer_cli.interop.hf_import import import_hf

    export_hf(make_run(tmp_path / "r"), tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    recorded = read_config(tmp_path / "back")["tokenizer_sha256"]
    copied = (tmp_path / "back" / "tokenizer.model").read_bytes()
    assert recorded == hashlib.sha256(copied).hexdigest()
    assert recorded == load_tokenizer(tmp_path / "hf" / "tokenizer.model").sha256


# --- 2. LoRA runs and their bases -------------------------------------------------------------


def _lora_run(directory: Path, base: Path) -> Path:
    """An unmerged LoRA run over base, as `tformer finetune --lora` writes one (random adapter)."""
    model, _ = load_run_model(base)
    apply_lora(model, ["q", "v"], 4, 8.0)
    save_tensors(lora_state(model.state_dict()), directory / "adapter.safetensors")
    sha = load_tokenizer(base / "tokenizer.model").sha256
    lora = {"rank": 4, "alpha": 8.0, "targets": ["q", "v"]}
    write_config(
        directory,
        model.config,
        {"chat": True, "base": str(base), "tokenizer_sha256": sha, "lora": lora},
    )
    shutil.copyfile(base / "tokenizer.model", directory / "tokenizer.model")
    return directory


def test_a_real_lora_run_loads_through_its_base(run, tmp_path):
    lora = _lora_run(tmp_path / "lora", run)
    model, info = load_run_model(lora)
    assert info["lora"]["rank"] == 4 and model.config.vocab_size == 500
    assert run_cli("generate", "-m", lora, "-p", "Hi", "-n", "2").exit_code == 0


def test_a_lora_run_that_is_its_own_base_is_one_line(run, tmp_path):
    lora = _lora_run(tmp_path / "lora", run)
    _edit_config(lora, base=str(lora))
    before = tree_hash(lora)
    for args in (
        ("generate", "-m", lora, "-p", "Hi"),
        ("export", lora, "--format", "hf", "-o", tmp_path / "x"),
    ):
        one_line_error(run_cli(*args), str(lora / "config.json"), "cycle of LoRA runs")
    assert tree_hash(lora) == before


def test_a_cycle_of_two_lora_runs_is_one_line(run, tmp_path):
    a = _lora_run(tmp_path / "a", run)
    b = _lora_run(tmp_path / "b", run)
    _edit_config(a, base=str(b))
    _edit_config(b, base=str(a))
    one_line_error(run_cli("generate", "-m", a, "-p", "Hi"), "cycle of LoRA runs", str(a), str(b))


def test_lora_bases_that_are_gone_or_not_runs(run, tmp_path):
    lora = _lora_run(tmp_path / "lora", run)
    _edit_config(lora, base=str(tmp_path / "gone"))
    one_line_error(run_cli("generate", "-m", lora, "-p", "Hi"), str(tmp_path / "gone"), "is gone")
    (tmp_path / "empty").mkdir()
    _edit_config(lora, base=str(tmp_path / "empty"))
    one_line_error(
        run_cli("generate", "-m", lora, "-p", "Hi"),
        f"{lora}: its base run is not usable",
        str(tmp_path / "empty"),
    )
    _edit_config(lora, base=123)
    one_line_error(
        run_cli("generate", "-m", lora, "-p", "Hi"), '"base" must be the path of the base run'
    )
    _edit_config(lora, base=str(run), lora={"rank": "four", "alpha": 8, "targets": ["q"]})
    one_line_error(run_cli("generate", "-m", lora, "-p", "Hi"), '"lora" must hold')
    _edit_config(lora, lora={"rank": 4, "alpha": 8, "targets": ["nope"]})
    one_line_error(run_cli("generate", "-m", lora, "-p", "Hi"), '"lora"', "unknown LoRA target")


# --- 3. generate ------------------------------------------------------------------------------


def test_generate_refuses_absurd_counts_before_allocating(run):
    before = tree_hash(run)
    one_line_error(
        run_cli("generate", "-m", run, "-p", "Hi", "--num-samples", "100000000"),
        "--num-samples",
        "100000000",
    )
    one_line_error(
        run_cli("generate", "-m", run, "-p", "a", "-p", "b", "--num-samples", "40000"),
        "--num-samples 40000 x 2 prompts",
    )
    one_line_error(
        run_cli("generate", "-m", run, "-p", "Hi", "-n", str(10**12)),
        "-n/--max-new-tokens",
        "1,000,000",
    )
    one_line_error(run_cli("generate", "-m", run, "-p", "Hi", "-n", "0"), "-n/--max-new-tokens")
    assert tree_hash(run) == before


def test_generate_asks_the_memory_model_before_building_the_batch(run, monkeypatch):
    import tformer_cli.profiling.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 4 << 20)  # 4 MiB free
    one_line_error(
        run_cli("generate", "-m", run, "-p", "Hi", "--num-samples", "3000"),
        "--num-samples 3000: generating 3000 x",
        "cpu has 4.0 MiB free",
    )


def test_generate_prompts_that_are_not_utf8(run):
    before = tree_hash(run)
    one_line_error(
        run_cli("generate", "-m", run, "-p", "ok\udcffno"),
        "--prompt is not valid UTF-8 text",
        "byte 0xff at character 3",
    )
    one_line_error(
        run_cli("generate", "-m", run, "-p", "Hi", "--stop", "\udcfe"), "--stop is not valid UTF-8"
    )
    one_line_error(
        run_bytes("generate", "-m", run, stdin=b"caf\xc3(\n"), "stdin: not UTF-8 text", "offset 3"
    )
    assert tree_hash(run) == before


def test_generate_with_an_empty_or_closed_stdin(run, monkeypatch):
    res = run_bytes("generate", "-m", run, "-n", "3", stdin=b"")  # < /dev/null: an empty prompt
    assert res.exit_code == 0, res.stderr
    monkeypatch.setattr(sys, "stdin", None)  # started with stdin closed (`<&-`)
    one_line_error(run_cli("generate", "-m", run, "-n", "3"), "stdin is closed", "-p")


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seeds_outside_what_a_generator_takes(run, seed):
    one_line_error(run_cli("generate", "-m", run, "-p", "Hi", "--seed", seed), "--seed", seed)
    one_line_error(run_cli("chat", "-m", run, "--seed", seed, stdin="Hi\n"), "--seed", seed)


def test_the_largest_seeds_work(run):
    res = run_cli("generate", "-m", run, "-p", "Hi", "-n", "2", "--seed", str(2**64 - 1))
    assert res.exit_code == 0, res.stderr
    res = run_cli("chat", "-m", run, "-n", "2", "--seed", str(2**63 - 1), stdin="Hi\nAgain\n")
    assert res.exit_code == 0, res.stderr
    res = run_cli("chat", "-m", run, "-n", "2", "--seed", str(2**63), stdin="Hi\n")
    one_line_error(res, "--seed", str(2**63))


def test_chat_set_seed_and_max_new_tokens_are_checked(run):
    res = run_cli("chat", "-m", run, stdin="/set seed -5\n")
    assert res.exit_code == 1 and "error: /set seed must be between 0 and" in res.stderr, res.stderr
    res = run_cli("chat", "-m", run, stdin=f"/set max_new_tokens {10**9}\n")
    assert res.exit_code == 1 and "error: /set max_new_tokens must be between 1 and" in res.stderr
    assert "Traceback" not in res.stderr


# --- 4. chat ----------------------------------------------------------------------------------


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_a_piped_line_that_is_not_utf8_is_skipped_and_the_rest_answered(run):
    before = tree_hash(run)
    res = run_bytes("chat", "-m", run, "-n", "4", stdin=b"Hello\nbad \xff\xfe line\nWho are you?\n")
    assert res.exit_code == 1, res.stderr  # the answers are there, but a line was lost: say so
    assert len(res.stdout.splitlines()) == 2 and res.stdout.endswith("\n")
    assert _errors(res.stderr) == [
        "error: stdin line 2: not UTF-8 text (byte 0xff at character 5); skipped it"
    ]
    assert "Traceback" not in res.stderr
    assert tree_hash(run) == before


def test_a_terminal_line_that_is_not_utf8_keeps_the_session(run):
    res = run_bytes("chat", "-m", run, "-n", "4", stdin=b"\xffHi\nHello\n", tty=True)
    assert res.exit_code == 0, res.stderr
    assert "that line is not UTF-8 text (byte 0xff at character 1); it was not sent" in res.stderr
    assert "Traceback" not in res.stderr and not _errors(res.stderr)


def test_a_piped_line_past_the_limit_is_skipped(run, monkeypatch):
    import tformer_cli.commands.chat as chat

    monkeypatch.setattr(chat, "LINE_LIMIT", 16)
    res = run_cli("chat", "-m", run, "-n", "3", stdin="Hello\n" + "x" * 100 + "\nAgain\n")
    assert res.exit_code == 1 and len(res.stdout.splitlines()) == 2, res.stderr
    assert _errors(res.stderr) == ["error: stdin line 2: longer than 16 characters; skipped it"]


def test_a_bad_transcript_at_the_terminal_is_reported_and_the_next_turn_works(run, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"system": 123, "messages": []}))
    escaped = tmp_path / "escaped.json"  # valid JSON whose text is a lone surrogate
    escaped.write_text('{"system": null, "messages": [{"role": "user", "content": "\\udcff"}]}')
    before = tree_hash(run)
    script = f"Hello\n/load {bad}\n/load {escaped}\nAgain\n/stats\n".encode()
    res = run_bytes("chat", "-m", run, "-n", "3", stdin=script, tty=True)
    assert res.exit_code == 0, res.stderr
    assert f'{bad}: not a tformer chat transcript: "system" must be a string or null' in res.stderr
    assert (
        f"{escaped}: not a tformer chat transcript: message 1 holds an escaped lone surrogate"
        in res.stderr
    )
    assert "4 messages" in res.stderr  # both turns kept: the bad loads changed nothing
    assert "Traceback" not in res.stderr and "--debug" not in res.stderr
    assert tree_hash(run) == before


def test_a_bad_transcript_in_a_pipe_is_one_line(run, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"system": 123, "messages": []}))
    res = run_cli("chat", "-m", run, "-n", "3", stdin=f"/load {bad}\nHello\n")
    assert res.exit_code == 1 and _errors(res.stderr) == [
        f'error: {bad}: not a tformer chat transcript: "system" must be a string or null, got int'
    ]
    assert "Traceback" not in res.stderr


def test_chat_with_stdin_closed(run, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    one_line_error(run_cli("chat", "-m", run), "stdin is closed", "pipe lines in")


def test_system_prompt_that_is_not_utf8(run):
    res = run_cli("chat", "-m", run, "--system", "\udcff", stdin="Hi\n")
    one_line_error(res, "--system", "UTF-8")


def _interrupt_first_reply(monkeypatch):
    import tformer_cli.inference.chat as chat_session

    real = chat_session.generate
    calls = []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(chat_session, "generate", generate)


def test_ctrl_c_during_a_piped_reply_exits_130_without_a_traceback(run, monkeypatch):
    _interrupt_first_reply(monkeypatch)
    res = run_cli("chat", "-m", run, "-n", "3", stdin="Hello\nAgain\n")
    assert res.exit_code == 130 and "reply stopped" in res.stderr
    assert "Traceback" not in res.stderr and not _errors(res.stderr)


def test_ctrl_c_during_a_reply_at_the_terminal_keeps_the_session(run, monkeypatch):
    _interrupt_first_reply(monkeypatch)
    res = run_bytes("chat", "-m", run, "-n", "3", stdin=b"Hello\nAgain\n/stats\n", tty=True)
    assert res.exit_code == 0 and "reply stopped" in res.stderr, res.stderr
    assert "2 messages" in res.stderr  # the stopped turn left no trace; the next was answered


# --- 5. export --------------------------------------------------------------------------------


def test_export_never_writes_into_the_run_it_exports(run, tmp_path):
    before = tree_hash(run)
    for out in (run / "hf", run, run / "best" / "x"):
        res = run_cli("export", run, "--format", "hf", "-o", out, "--overwrite")
        one_line_error(
            res, f"-o {out} lies inside the run being exported", "choose a path outside it"
        )
    res = run_cli("export", run, "--format", "hf", "-o", tmp_path, "--overwrite")
    one_line_error(res, f"-o {tmp_path} contains the run being exported")
    (tmp_path / "link").symlink_to(run)  # another spelling of the same run
    res = run_cli(
        "export", run / "model.safetensors", "--format", "hf", "-o", tmp_path / "link" / "hf"
    )
    one_line_error(res, "lies inside the run being exported")
    assert tree_hash(run) == before and not (run / "hf").exists()


def test_export_never_replaces_another_run(run, tmp_path):
    other = make_run(tmp_path / "other")
    before = tree_hash(other)
    res = run_cli("export", run, "--format", "hf", "-o", other, "--overwrite")
    one_line_error(res, f"-o {other} is a tformer run", "never replaces")
    res = run_cli("export", run, "--format", "hf", "-o", other / "hf")
    one_line_error(res, f"-o {other / 'hf'} lies inside the run {other}")
    assert tree_hash(other) == before


def test_gguf_export_into_a_run_is_refused(run, tmp_path):
    pytest.importorskip("gguf")
    before = tree_hash(run)
    for out in (run / "model.gguf", run / "model.safetensors"):
        res = run_cli("export", run, "--format", "gguf", "-o", out, "--overwrite")
        one_line_error(res, f"-o {out} lies inside the run being exported")
    assert tree_hash(run) == before


def test_hf_export_holds_the_output_lock(run, tmp_path):
    out = tmp_path / "hf"
    with RunLock(out):
        res = run_cli("export", run, "--format", "hf", "-o", out, "--overwrite")
        one_line_error(res, str(out), f"PID {os.getpid()}")
    assert not any(out.iterdir())  # the refused export wrote nothing
    res = run_cli("export", run, "--format", "hf", "-o", out)  # the lock is gone: fine now
    assert res.exit_code == 0, res.stderr
    assert not (out / ".lock").exists() and (out / "model.safetensors").is_file()


def test_an_unwritable_output_is_one_line(run, tmp_path, monkeypatch):
    """A directory the OS will not let us create in (simulated: the suite may run as root, whom
    permissions do not stop)."""
    locked = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if locked in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    res = run_cli("export", run, "--format", "hf", "-o", locked / "hf")
    one_line_error(res, "cannot write")


def test_an_output_under_a_file_is_one_line(run, tmp_path):
    (tmp_path / "file.txt").write_text("mine")
    res = run_cli("export", run, "--format", "hf", "-o", tmp_path / "file.txt" / "hf")
    one_line_error(res, "cannot write the export")
    if importlib.util.find_spec("gguf"):
        res = run_cli("export", run, "--format", "gguf", "-o", tmp_path / "file.txt" / "m.gguf")
        one_line_error(res, "cannot write the export")
    assert (tmp_path / "file.txt").read_text() == "mine"
