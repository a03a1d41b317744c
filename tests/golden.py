"""Golden outputs: what the CLI prints and writes, captured once and compared after a change.

    python tests/golden.py capture     # write tests/golden/*.json from the code as it is now
    python tests/golden.py compare     # print what differs (exit 1 if anything does)

Captured: every command's --help, the keys of `info --json`, `profile --no-measure --json -`
of the presets and of a run, `generate --temperature 0 --json` of a seeded fp32 run, and the
sha256 of every tensor that a seeded fp32 `train` writes (with the checkpoint's layout). The
numbers of the last two depend on the CPU's kernels, so they are compared only on a machine
with the same torch and CPU features as the capture (tests/test_golden.py skips them
elsewhere, saying so); the rest compare anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
COLUMNS = "100"
# Figures of `profile --no-measure` that describe the machine, not the model.
VOLATILE = {
    "device_name",
    "free_bytes",
    "free_memory_bytes",
    "label",
    "budget_bytes",
    "max_batch_size",
    "max_seq_len",
    "fits",
    "notes",
}


def _cli(*args: str) -> tuple[int, str, str]:
    """Run tformer in this process with a fixed terminal width; (exit code, stdout, stderr)."""
    from tformer_cli.entry import main

    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr, os.environ.get("COLUMNS"), os.environ.get("TERM")
    sys.stdout, sys.stderr = out, err
    os.environ["COLUMNS"], os.environ["TERM"] = COLUMNS, "dumb"
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdout, sys.stderr = old[0], old[1]
        for key, value in (("COLUMNS", old[2]), ("TERM", old[3])):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return code, out.getvalue(), err.getvalue()


def machine() -> dict[str, str]:
    """What the CPU-dependent numbers depend on."""
    import torch

    from tformer_cli.device import cpu_features

    return {"torch": torch.__version__, "cpu_features": " ".join(cpu_features())}


def commands() -> list[list[str]]:
    """Every command path of the app: [], ["train"], ["tokenize", "encode"], ..."""
    import typer

    from tformer_cli.app import app

    group = typer.main.get_command(app)
    paths: list[list[str]] = [[]]
    for name, command in sorted(group.commands.items()):
        paths.append([name])
        for sub in sorted(getattr(command, "commands", {}) or {}):
            paths.append([name, sub])
    return paths


def capture_help() -> dict[str, str]:
    return {" ".join(path) or "(tformer)": _cli(*path, "--help")[1] for path in commands()}


def capture_info_keys() -> list[str]:
    return sorted(json.loads(_cli("info", "--json")[1]))


def _strip_volatile(value):
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip_volatile(v) for v in value]
    return value


def capture_profiles(run: Path) -> dict[str, object]:
    found = {}
    for name, args in [
        ("nano", ["--preset", "nano"]),
        ("small", ["--preset", "small", "--seq-len", "512"]),
        ("gpt2", ["--preset", "gpt2", "--seq-len", "256,1024", "--batch-size", "4"]),
        ("default", []),
        ("run", ["-m", str(run)]),
    ]:
        code, out, err = _cli(
            "profile",
            *args,
            "--no-measure",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--json",
            "-",
        )
        assert code == 0, err
        found[name] = _strip_volatile(json.loads(out))
    return found


def train_run(work: Path) -> tuple[Path, dict[str, object]]:
    """A seeded fp32 nano run on the fixture corpus; the sha256 of each tensor it wrote."""
    from fixtures import write_corpus
    from safetensors import safe_open

    corpus = write_corpus(work / "corpus.txt", 60_000)
    run = work / "run"
    code, _, err = _cli(
        "train",
        corpus,
        "-o",
        run,
        "--preset",
        "nano",
        "--precision",
        "fp32",
        "--vocab-size",
        "512",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--max-steps",
        "40",
        "--eval-every",
        "20",
        "--lr",
        "3e-3",
        "--eval-batches",
        "1",
        "--save-every",
        "20",
        "--sample-every",
        "0",
        "--seed",
        "7",
        "--cache-dir",
        work / "cache",
        "--quiet",
    )
    assert code == 0, err
    hashes: dict[str, object] = {}
    for path in sorted(run.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            hashes[str(path.relative_to(run))] = {
                k: hashlib.sha256(f.get_tensor(k).numpy().tobytes()).hexdigest()[:16]
                for k in sorted(f.keys())
            }
    layout = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    config = json.loads((run / "config.json").read_text())
    return run, {
        "tensors": hashes,
        "layout": layout,
        "config_keys": sorted(config),
        "model": config["model"],
        "step": config["step"],
    }


def capture_generate(run: Path) -> dict[str, object]:
    """Greedy and seeded sampled continuations (sampling exercises more of the vocabulary)."""
    found = {}
    for name, sampling in (
        ("greedy", ["--temperature", "0"]),
        ("sampled", ["--temperature", "1", "--seed", "3"]),
    ):
        code, out, err = _cli(
            "generate",
            "-m",
            run,
            "-p",
            "The",
            "-p",
            "def",
            "-n",
            "24",
            *sampling,
            "--precision",
            "fp32",
            "--device",
            "cpu",
            "--json",
        )
        assert code == 0, err
        data = json.loads(out)
        found[name] = {"rows": data["rows"], "text": data["text"], "keys": sorted(data)}
    return found


def capture() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TFORMER_CACHE", str(Path(tmp) / "tformer-cache"))
        run, train = train_run(Path(tmp))
        return {
            "help": capture_help(),
            "info_keys": capture_info_keys(),
            "profile": capture_profiles(run),
            "machine": machine(),
            "train": train,
            "generate": capture_generate(run),
        }


def load() -> dict[str, object]:
    return json.loads((GOLDEN / "golden.json").read_text(encoding="utf-8"))


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Paths where two captures differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(f"{where}: only in {'new' if key in new else 'golden'}")
            else:
                out += differences(old[key], new[key], where)
        return out
    return [] if old == new else [prefix]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE))
    if argv[:1] == ["capture"]:
        GOLDEN.mkdir(exist_ok=True)
        data = capture()
        (GOLDEN / "golden.json").write_text(
            json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8"
        )
        print(f"wrote {GOLDEN / 'golden.json'}")
        return 0
    if argv[:1] == ["compare"]:
        diffs = differences(load(), capture())
        print("\n".join(diffs) or "no differences")
        return 1 if diffs else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
