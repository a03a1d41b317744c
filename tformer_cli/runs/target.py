"""Which run directory a training command writes to, and making it ready without losing a run.

`tformer train corpus.txt` without `-o` writes `runs/corpus`; when that holds an earlier run it
takes the next free name (`runs/corpus-2`, ...), never overwriting silently. Two commands started
at once get different names: a name is only taken by locking it (runlock), and a locked name is
passed over. A directory left by a start that failed before its first checkpoint holds nothing
worth keeping, so the next start takes it over instead of piling up names.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from models.weights import CONFIG_FILE, WEIGHTS_FILE
from tformer_cli.errors import TformerError
from tformer_cli.runs.locate import DEFAULT_RUNS_DIR
from tformer_cli.runs.lock import LOCK_FILE, RunLock
from tformer_cli.runs.rundir import (
    ADAPTER_FILE,
    BEST_DIR,
    METRICS_FILE,
    RUN_CARD_FILE,
    TOKENIZER_FILE,
    TRAIN_STATE_DIR,
    TRAIN_STATE_FILE,
    holds_checkpoint,
    resume_state_file,
)

# Everything a training command writes into a run directory (and so may remove on --overwrite).
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, ADAPTER_FILE, TOKENIZER_FILE, METRICS_FILE, RUN_CARD_FILE)
RUN_DIRS = (TRAIN_STATE_DIR, BEST_DIR)
_TEMPORARY = re.compile(r"^\..+\.tmp$")  # what an interrupted atomic write leaves (models.weights)


@dataclass
class RunTarget:
    """The directory a run writes to, the lock held on it, and how it was chosen.

    how: "given" (-o), "new" (a fresh auto name), "next" (the auto name was taken, so the next
    free one), "unfinished" (an earlier start without a checkpoint, taken over), "resume" or
    "overwrite". previous: the auto-named run that was passed over, for "next". created: the
    directory did not exist before (so a start that fails before writing anything removes it).
    """

    path: Path
    lock: RunLock
    how: str
    auto: bool
    previous: Path | None = None
    created: bool = False

    def release(self, failed: bool = False) -> None:
        """Let go of the lock; after a failure, remove the directory if this start made it empty."""
        self.lock.release()
        if failed and self.created:
            remove_if_empty(self.path)


def run_name(corpus_paths: list[str | Path]) -> str:
    """The run's name from the first corpus: corpus.txt -> corpus; a directory -> its name."""
    first = Path(corpus_paths[0])
    name = first.resolve().name if first.is_dir() else first.stem
    name = name.lstrip(".").strip()  # a hidden name would hide the run (and the scan skips it)
    return re.sub(r"[\s/\\:]+", "-", name) or "run"


def _series(root: Path, name: str):
    """root/name, root/name-2, root/name-3, ...: the candidates for an auto-named run."""
    yield root / name
    n = 2
    while True:
        yield root / f"{name}-{n}"
        n += 1


def _existing_series(root: Path, name: str) -> list[Path]:
    """The auto-named runs of this name that exist: root/name and root/name-N."""
    pattern = re.compile(re.escape(name) + r"(-[0-9]+)?")
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and pattern.fullmatch(p.name)]


def foreign_entries(run_dir: Path) -> list[str]:
    """Names in run_dir that tformer did not write there (a run never removes those)."""
    if not run_dir.is_dir():
        return []
    known = set(RUN_FILES) | set(RUN_DIRS) | {LOCK_FILE}
    return sorted(
        p.name for p in run_dir.iterdir() if p.name not in known and not _TEMPORARY.match(p.name)
    )


def is_free(run_dir: Path) -> bool:
    """Missing, empty, or an unfinished start: a directory a new run may take without asking."""
    if not run_dir.exists():
        return True
    return run_dir.is_dir() and not holds_checkpoint(run_dir) and not foreign_entries(run_dir)


def claim_auto(name: str, root: Path, resume: bool, overwrite: bool) -> RunTarget:
    """Choose and lock root/<name> or the next free name; see the module docstring."""
    if resume:
        return _claim_resume(name, root)
    if overwrite:
        path = root / name
        created = not path.exists()
        return RunTarget(path, RunLock(path).acquire(), "overwrite", auto=True, created=created)
    passed: Path | None = None
    for path in _series(root, name):
        if not is_free(path):
            passed = passed or path
            continue
        created = not path.exists()
        existed = not created and any(path.iterdir())
        lock = RunLock(path)
        if not lock.try_acquire():
            continue  # another command is starting or training there right now
        if not is_free(path):  # it finished a checkpoint between our look and our lock
            lock.release()
            passed = passed or path
            continue
        how = "unfinished" if existed else ("next" if passed else "new")
        return RunTarget(path, lock, how, auto=True, previous=passed, created=created)
    raise AssertionError("unreachable: the series of names is endless")


def _claim_resume(name: str, root: Path) -> RunTarget:
    """--resume without -o: the most recently saved resumable run of this name."""
    runs = [p for p in _existing_series(root, name) if resume_state_file(p).is_file()]
    if not runs:
        raise TformerError(
            f"nothing to resume: no run under {root}/ named {name} or {name}-N holds "
            f"{TRAIN_STATE_DIR}/{TRAIN_STATE_FILE}; start a new run without --resume, "
            "or name one with -o"
        )
    path = max(runs, key=lambda p: (resume_state_file(p).stat().st_mtime, p.name))
    return RunTarget(path, RunLock(path).acquire(), "resume", auto=True)


def claim_given(path: Path, resume: bool, overwrite: bool) -> RunTarget:
    """-o RUN_DIR: lock it (refused while another command writes there)."""
    if path.exists() and not path.is_dir():
        raise TformerError(f"{path}: exists and is not a directory; choose another -o")
    how = "resume" if resume else "overwrite" if overwrite else "given"
    if not resume and not overwrite and path.is_dir() and any(path.iterdir()) and is_free(path):
        how = "unfinished"
    created = not path.exists()
    return RunTarget(path, RunLock(path).acquire(), how, auto=False, created=created)


def claim_run_dir(
    run_dir: str | Path | None,
    corpus_paths: list[str | Path],
    resume: bool,
    overwrite: bool,
    root: str | Path = DEFAULT_RUNS_DIR,
) -> RunTarget:
    """The locked run directory for `tformer train`: -o as given, else auto-named under root."""
    if run_dir is not None:
        return claim_given(Path(run_dir), resume, overwrite)
    return claim_auto(run_name(corpus_paths), Path(root), resume, overwrite)


def check_run_dir_use(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Raise unless run_dir may be written as asked; touches nothing (see clear_run_dir).

    --resume needs a resumable checkpoint; without --overwrite a directory that holds a
    checkpoint or someone else's files is refused. A directory without a checkpoint (a start
    that failed early) may be taken over without asking.
    """
    if resume:
        if not resume_state_file(run_dir).is_file():
            raise TformerError(
                f"{run_dir}: nothing to resume (no {TRAIN_STATE_DIR}/{TRAIN_STATE_FILE}); "
                "start it again without --resume (an unfinished start is taken over)"
            )
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise TformerError(f"{run_dir}: exists and is not a directory; choose another -o")
    if run_dir.is_dir() and not overwrite:
        if holds_checkpoint(run_dir):
            raise TformerError(
                f"{run_dir}: already holds a run; pass --resume to continue it "
                "or --overwrite to start over"
            )
        foreign = foreign_entries(run_dir)
        if foreign:
            raise TformerError(
                f"{run_dir}: holds files that are not a tformer run ({', '.join(foreign[:3])}); "
                "choose another -o, or pass --overwrite (which removes only tformer's files)"
            )


def clear_run_dir(run_dir: Path, resume: bool) -> None:
    """Make run_dir ready for a new run: remove only tformer's files of an earlier one.

    Called once every input of the new run is known good, after check_run_dir_use.
    """
    if resume:
        return
    if run_dir.is_dir():
        _remove_run_files(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """check_run_dir_use, then clear_run_dir: for callers whose inputs are already checked."""
    check_run_dir_use(run_dir, resume, overwrite)
    clear_run_dir(run_dir, resume)


def refuse_output_over_inputs(output: Path, files: list[Path], dirs: list[Path] = ()) -> None:
    """Refuse an output directory that is, contains or lies inside what the command reads.

    files: input files (an output containing one could delete it); dirs: input directories
    that must not be the output, contain it or lie inside it (a base run, say). A corpus
    directory may hold the runs trained on it (the corpus scan skips them), so it is not here.
    """
    out = Path(output).resolve()
    for f in files:
        f = Path(f).resolve()
        if out == f or out in f.parents:
            raise TformerError(
                f"{output}: holds {f.name}, an input of this command; "
                "write the run elsewhere with -o"
            )
    for d in dirs:
        d = Path(d).resolve()
        if out == d or out in d.parents or d in out.parents:
            raise TformerError(
                f"{output}: is, holds or lies inside {d}, an input of this command; "
                "write the run elsewhere with -o"
            )


def _remove_run_files(run_dir: Path) -> None:
    """Delete what a run wrote (not the lock, not anyone else's files)."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for path in run_dir.iterdir():
        if _TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def remove_if_empty(run_dir: Path) -> None:
    """Remove a run directory a failed start left empty (so a typo leaves no trace)."""
    try:
        run_dir.rmdir()  # only succeeds when empty
    except OSError:
        pass
