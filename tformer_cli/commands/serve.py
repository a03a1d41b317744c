"""`tformer serve -m RUN`: an OpenAI-compatible HTTP API and a web chat page, until Ctrl-C."""

from __future__ import annotations

import ipaddress
import logging
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import typer
from rich.console import Console
from rich.markup import escape

from tformer_cli.commands import options
from tformer_cli.commands.console import pick_model
from tformer_cli.commands.options import MAX_NEW_TOKENS
from tformer_cli.errors import TformerError
from tformer_cli.inference.chat import chat_mode
from tformer_cli.inference.load import (
    check_quantize,
    inference_target,
    load_for_inference,
    model_precision,
)
from tformer_cli.profiling.fit import require_fit
from tformer_cli.runs.locate import resolve_model_path
from tformer_cli.runs.rundir import read_model_config

EXAMPLES = (
    "tformer serve",
    "tformer serve -m runs/chat --port 8080",
    "tformer serve -m runs/chat -m runs/corpus --api-key s3cret --stats 10",
)
MAX_BATCH = 1024
API_KEY_ENV = "TFORMER_API_KEY"


def _check(port: int, max_batch: int, max_tokens: int, timeout: float, stats: float) -> None:
    """Every value that needs no model, checked before anything loads."""
    if not 0 <= port <= 65535:
        raise TformerError(f"--port must be between 0 and 65535, got {port}")
    if not 1 <= max_batch <= MAX_BATCH:
        raise TformerError(f"--max-batch must be between 1 and {MAX_BATCH}, got {max_batch}")
    if not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise TformerError(
            f"--max-tokens must be between 1 and {MAX_NEW_TOKENS:,}, got {max_tokens}"
        )
    if not timeout > 0:
        raise TformerError(f"--timeout must be > 0 seconds, got {timeout}")
    if not stats >= 0:
        raise TformerError(f"--stats must be >= 0 seconds (0: off), got {stats}")


def _check_key(key: str | None) -> str | None:
    """The API key, which travels in an HTTP header: printable ASCII, no spaces."""
    if key is not None and (not key or not all(33 <= ord(c) < 127 for c in key)):
        raise TformerError(
            f"--api-key (or ${API_KEY_ENV}) must be printable ASCII without spaces, "
            "as an HTTP header carries it"
        )
    return key


def _model_paths(model_dirs: list[Path] | None, err: Console) -> list[Path]:
    """The runs to serve: each -m resolved as every command resolves it, or the newest run."""
    if not model_dirs:
        return [pick_model(None, err)]
    paths = [resolve_model_path(p) for p in model_dirs]
    for i, path in enumerate(paths):
        if path.resolve() in (p.resolve() for p in paths[:i]):
            raise TformerError(f"--model {model_dirs[i]}: that run is given twice")
    return paths


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _logger() -> logging.Logger:
    """The server's lines (one per request, --stats, warnings) on stderr, with the time."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log = logging.getLogger("tformer.serve")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


def _stats_loop(state, every: float, stop: threading.Event, log: logging.Logger) -> None:
    """A line every `every` seconds: requests in flight, batch size, tokens/s."""
    while not stop.wait(every):
        m = state.metrics()
        log.info(
            "stats: %d in flight (%d queued), batch %d (peak %d), %.1f tokens/s, %s tokens",
            m["requests_in_flight"],
            m["queued"],
            m["batch_size"],
            m["peak_batch_size"],
            m["tokens_per_s"],
            f"{m['generated_tokens']:,}",
        )


def serve(
    model_dirs: list[Path] = typer.Option(
        None,
        "-m",
        "--model",
        metavar="RUN_DIR",
        help=options.MODEL_HELP + " Repeat it to serve several models.",
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."
    ),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    api_key: str = typer.Option(
        None,
        "--api-key",
        envvar=API_KEY_ENV,
        show_envvar=True,
        help="Require Authorization: Bearer KEY on /v1 and /metrics.",
    ),
    max_batch: int = typer.Option(16, "--max-batch", help="Requests decoded together per model."),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Largest max_tokens a request gets."),
    timeout: float = typer.Option(
        600.0, "--timeout", help="Seconds a request may take, queueing included."
    ),
    stats: float = typer.Option(
        0.0, "--stats", help="Print a stats line every N seconds (0: off)."
    ),
    device: str = options.device(),
    precision: str = options.precision(),
    quantize: str = options.quantize(),
    compile_model: bool = options.compile_prefill(),
) -> None:
    """Serve models over an OpenAI-compatible HTTP API, with a web chat page at /."""
    _check(port, max_batch, max_tokens, timeout, stats)
    api_key = _check_key(api_key)
    serving = _serve_package()
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    paths = _model_paths(model_dirs, err)
    dev, flag_prec = inference_target(device, precision, quantize)
    check_quantize(quantize, dev)
    precs = {path: model_precision(precision, dev, flag_prec, path) for path in paths}
    for path in paths:  # each model holds a cache of max-batch rows x its window
        cfg = read_model_config(path)
        flag = f"--max-batch {max_batch}"
        require_fit("inference", cfg, cfg.max_seq_len, max_batch, precs[path], dev, flag)
    sock = serving.bind(host, port)  # before the models load: a busy port is said at once
    served = []
    for name, path in zip(serving.model_names(paths), paths, strict=True):
        where = f"{dev} {precs[path]}" + (f" {quantize}" if quantize != "none" else "")
        run = load_for_inference(path, dev, precs[path], compile_model, quantize=quantize)
        mode = chat_mode(run.info, run.tokenizer)
        served.append(serving.ServedModel(name, run, mode, serving.created_time(path)))
        err.print(_model_line(served[-1], where))
    settings = serving.ServeSettings(api_key, max_batch, max_tokens=max_tokens, timeout=timeout)
    app = serving.create_app(served, settings)
    _listening(err, host, sock.getsockname()[1], api_key)
    _run(serving, app, sock, stats)


def _serve_package() -> SimpleNamespace:
    """What the command uses of tformer_cli.serve, imported only now: it needs the serve extra."""
    try:
        from tformer_cli.serve.app import create_app
        from tformer_cli.serve.prompts import ServedModel, ServeSettings, created_time, model_names
        from tformer_cli.serve.server import bind, serve_forever
    except ImportError as e:
        raise TformerError(
            f"tformer serve needs the serve extra ({e.name} is missing): "
            "pip install 'tformer[serve]'"
        ) from None
    return SimpleNamespace(
        create_app=create_app,
        ServedModel=ServedModel,
        ServeSettings=ServeSettings,
        created_time=created_time,
        model_names=model_names,
        bind=bind,
        serve_forever=serve_forever,
    )


def _run(serving: SimpleNamespace, app, sock, stats: float) -> None:
    """Serve until Ctrl-C, with the request lines (and stats lines) on stderr."""
    log = _logger()
    state = app.state.tformer
    stop = threading.Event()
    if stats:
        threading.Thread(target=_stats_loop, args=(state, stats, stop, log), daemon=True).start()

    def draining() -> None:
        """Said once, at the first Ctrl-C."""
        n = state.metrics()["requests_in_flight"]
        log.info("stopping: finishing %d request(s) in flight (Ctrl-C again to stop now)", n)

    try:
        serving.serve_forever(app, sock, on_exit=draining)
    finally:
        stop.set()


def _model_line(model, where: str) -> str:
    """Which run serves under which name, how it is prompted, where it runs."""
    how = "chat template" if model.mode == "chat" else "plain transcript (a base model)"
    return (
        f"[dim]{escape(str(model.run.path))} as {escape(repr(model.name))}: {how}; {where}, "
        f"context {model.window} tokens[/]"
    )


def _listening(err: Console, host: str, port: int, api_key: str | None) -> None:
    """Where to point a browser or a client; a warning when anyone may reach it without a key."""
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    err.print(
        f"serving on {escape(url)}: web chat at /, OpenAI API at /v1"
        + ("; API key required" if api_key else "")
        + ". Ctrl-C stops."
    )
    if not _is_loopback(host) and not api_key:
        err.print(
            f"[yellow]warning: listening on {escape(host)} without --api-key: anyone who can "
            "reach this port can use the models[/]"
        )
