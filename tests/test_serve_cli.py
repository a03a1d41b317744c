"""The `tformer serve` command: its help, its one-line refusals, and a real server process that
answers, logs each request, and on Ctrl-C lets the request in flight finish before it exits 130."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
from helpers_run import make_run, shared_tokenizer

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve-cli") / "cli", shared_tokenizer(500), seed=2)


def test_serve_is_a_command_with_examples(cli):
    assert "serve" in cli("--help").stdout
    out = cli("serve", "--help").stdout
    for flag in ("--model", "--host", "--port", "--api-key", "--max-batch", "--quantize"):
        assert flag in out
    assert "tformer serve -m runs/chat --port 8080" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "70000"], "--port must be between 0 and 65535"),
        (["--max-batch", "0"], "--max-batch must be between 1 and 1024"),
        (["--max-tokens", "0"], "--max-tokens must be between 1"),
        (["--timeout", "0"], "--timeout must be > 0"),
        (["--api-key", "two words"], "--api-key (or $TFORMER_API_KEY) must be printable ASCII"),
        (["--quantize", "int4"], "--quantize 'int4': choose one of"),
        (["-m", "no/such/run"], "no/such/run: no such run directory"),
    ],
)
def test_bad_options_are_one_line(cli, run, args, message):
    full = ["serve", *args] if "-m" in args else ["serve", "-m", run, *args]
    result = cli(*full)
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_same_run_twice_is_refused(cli, run):
    result = cli("serve", "-m", run, "-m", run / "model.safetensors")
    assert result.exit_code == 1 and "given twice" in result.stderr


def _start(run) -> tuple[subprocess.Popen, str]:
    """`tformer serve` on a free port, and its URL once it listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TFORMER_API_KEY", None)
    serve = ["serve", "-m", str(run), "--port", "0", "--precision", "fp32"]
    cmd = [sys.executable, "-m", "tformer_cli", *serve]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if match := re.search(r"serving on (http://\S+):", line):
            return proc, match.group(1)
    proc.wait(30)
    pytest.fail(f"tformer serve did not start (exit {proc.returncode})")


def test_a_real_server_answers_and_drains_on_ctrl_c(run):
    proc, url = _start(run)
    rest: list[str] = []
    reader = threading.Thread(target=lambda: rest.extend(proc.stderr), daemon=True)
    try:
        reader.start()
        assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
        body = {"prompt": "The", "max_tokens": 600, "temperature": 0, "ignore_eos": True}
        chunks = []
        stream = {**body, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=stream, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                chunks.append(line[6:])
                if len(chunks) == 3:
                    proc.send_signal(signal.SIGINT)  # Ctrl-C while the reply streams
        assert chunks[-1] == "[DONE]"  # the request in flight was finished, not cut
        finish = [json.loads(c)["choices"][0]["finish_reason"] for c in chunks[:-1]]
        assert finish[-1] == "length"
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(30)
    log = "".join(rest)
    assert "stopping: finishing" in log  # said at the first Ctrl-C
    assert '"POST /v1/completions" 200' in log and "new=600" in log
    assert log.rstrip().endswith("interrupted") and "Traceback" not in log
