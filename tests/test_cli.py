"""The app shell: help, version, info, the error contract, and the package boundaries."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import torch
from conftest import ROOT

from tformer_cli import __version__
from tformer_cli.device import packs_bf16
from tformer_cli.errors import TformerError


def test_version(cli):
    res = cli("--version")
    assert res.exit_code == 0
    assert res.stdout.strip() == f"tformer {__version__}"


def test_help_lists_commands(cli):
    res = cli("--help")
    assert res.exit_code == 0
    assert "info" in res.stdout


def test_info_json_reports_the_machine(cli):
    res = cli("info", "--json")
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["tformer"] == __version__
    assert data["torch_threads"] >= 1
    for job in ("train", "inference"):
        assert (
            data[f"auto_precision_{job}"] in ("fp32", "bf16", "fp16")
            and data[f"auto_precision_{job}_why"]
        )
    if data["default_device"] == "cpu":  # bf16 only where the packed bf16 path runs
        expected = "bf16" if packs_bf16(torch.device("cpu")) else "fp32"
        assert data["auto_precision_inference"] == expected
    assert isinstance(data["cpu_bf16_fast"], bool)


def test_user_errors_are_one_line_without_traceback(cli, monkeypatch):
    def boom():
        raise TformerError("corpus.txt: file not found; check the path")

    monkeypatch.setattr("tformer_cli.commands.info.machine_info", boom)
    res = cli("info")
    assert res.exit_code == 1
    assert res.stderr == "error: corpus.txt: file not found; check the path\n"
    assert "Traceback" not in res.stdout + res.stderr


def test_unexpected_errors_are_one_line_too(cli, monkeypatch):
    def boom():
        raise RuntimeError("something broke")

    monkeypatch.setattr("tformer_cli.commands.info.machine_info", boom)
    res = cli("info")
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and "--debug" in res.stderr


def test_console_script_runs():
    exe = ROOT / ".venv" / "bin" / "tformer"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tformer_cli"]
    out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"tformer {__version__}"


def test_models_imports_without_the_cli():
    code = (
        "import sys, models; "
        "assert not any(m.startswith('tformer_cli') for m in sys.modules); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_models_never_import_the_cli_and_nothing_unpickles():
    for path in (ROOT / "models").rglob("*.py"):
        assert "tformer_cli" not in path.read_text(), path
    for pkg in ("models", "tformer_cli"):
        for path in (ROOT / pkg).rglob("*.py"):
            text = path.read_text()
            assert not re.search(r"^\s*(import|from)\s+pickle", text, re.M), path
            assert "torch.load(" not in text, path
