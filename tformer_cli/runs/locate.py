"""What `--model` accepts: the one place that turns what people call a checkpoint into a directory.

Every command that loads a model goes through resolve_model_path (generate, chat, profile,
export, finetune's BASE_RUN), so they all accept the same things:

- a run directory, or its `best/` (a complete run of its own);
- the `model.safetensors` or `adapter.safetensors` file inside either (the directory holding it);
- a Hugging Face Llama directory, read in place and never written to (as `tformer import` reads it).

`chat` and `generate` without `--model` take the newest run under ./runs (newest_run).
"""

from __future__ import annotations

from pathlib import Path

from models.weights import CONFIG_FILE
from tformer_cli.errors import TformerError
from tformer_cli.runs.rundir import CHECKPOINT_FILES, check_run_dir, is_hf_dir, is_run_dir

DEFAULT_RUNS_DIR = Path("runs")
EXPECTED = (
    "--model takes a run directory, its best/, the model.safetensors or adapter.safetensors "
    "inside either, or a Hugging Face Llama directory"
)


def resolve_model_path(path: str | Path, tokenizer: bool = True) -> Path:
    """The directory to load for `--model PATH`, checked; a TformerError in one line otherwise.

    tokenizer=False: a run without tokenizer.model is fine (for `tformer profile`).
    """
    path = Path(path)
    if path.is_file():
        return check_run_dir(_directory_of_file(path), tokenizer)
    if not path.is_dir():
        raise TformerError(f"{path}: no such run directory or checkpoint file; {EXPECTED}")
    if (path / CONFIG_FILE).is_file() or any((path / name).is_file() for name in CHECKPOINT_FILES):
        # a run, a Hugging Face directory, or a broken run: check_run_dir names what is wrong
        return check_run_dir(path, tokenizer)
    raise TformerError(
        f"{path}: not a run directory (no config.json){_runs_hint(path)}; {EXPECTED}"
    )


def _directory_of_file(path: Path) -> Path:
    """The model directory a checkpoint file belongs to, or why this file is not one."""
    if path.suffix.lower() == ".gguf":
        raise TformerError(
            f"{path}: a GGUF file is an export format for llama.cpp, not loadable here; "
            "use the run directory it was exported from "
            "(or `tformer import` for a Hugging Face directory)"
        )
    if path.name in CHECKPOINT_FILES:
        return path.parent
    if is_run_dir(path.parent) or is_hf_dir(path.parent):
        raise TformerError(
            f"{path}: not a checkpoint file; use its directory, --model {path.parent}"
        )
    raise TformerError(f"{path}: not a model; {EXPECTED}")


def _runs_hint(path: Path) -> str:
    """' (it holds runs: ...)' when path is a folder of runs, such as ./runs."""
    runs = list_runs(path)
    if not runs:
        return ""
    names = ", ".join(str(r) for r in runs[:3]) + (" ..." if len(runs) > 3 else "")
    return f" but holds runs: {names}"


def list_runs(root: str | Path = DEFAULT_RUNS_DIR) -> list[Path]:
    """The run directories directly under root that hold weights, newest checkpoint first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        mtime = _checkpoint_mtime(child)
        if mtime is not None:
            found.append((mtime, child))
    return [child for _, child in sorted(found, key=lambda pair: (-pair[0], str(pair[1])))]


def _checkpoint_mtime(directory: Path) -> float | None:
    """When the run's weights were last written, or None when directory is no run with weights."""
    if not directory.is_dir() or not is_run_dir(directory):
        return None
    times = [
        (directory / name).stat().st_mtime
        for name in CHECKPOINT_FILES
        if (directory / name).is_file()
    ]
    return max(times) if times else None


def newest_run(root: str | Path = DEFAULT_RUNS_DIR) -> Path:
    """The most recently trained run under root (by its checkpoint's time), for no --model."""
    runs = list_runs(root)
    if not runs:
        raise TformerError(
            f"no --model given and no trained run under {Path(root)}/; pass -m RUN_DIR, "
            "or train one first: tformer train corpus.txt"
        )
    return runs[0]


def find_model(path: str | Path | None, root: str | Path = DEFAULT_RUNS_DIR) -> tuple[Path, bool]:
    """(directory to load, whether it was chosen for the user): --model PATH, or the newest run."""
    if path is not None:
        return resolve_model_path(path), False
    return check_run_dir(newest_run(root)), True
