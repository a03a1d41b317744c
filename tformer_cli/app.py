"""The `tformer` command: a Typer app with one module per command."""

from __future__ import annotations

import sys

import typer

from tformer_cli import __version__
from tformer_cli.commands import (
    chat,
    eval,
    export,
    finetune,
    generate,
    import_hf,
    info,
    profile,
    runs,
    serve,
    tokenize,
    train,
)
from tformer_cli.commands.help import QUICKSTART, TformerCommand, TformerGroup, examples
from tformer_cli.entry import INTERRUPTED
from tformer_cli.errors import TformerError

app = typer.Typer(
    name="tformer",
    cls=TformerGroup,
    help="Train, fine-tune, chat with and profile small decoder-only LLMs on your own machine.",
    epilog=examples(QUICKSTART, "Quickstart, in a folder holding corpus.txt"),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tformer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
) -> None:
    """tformer: from tokens to a chatting model, on a laptop CPU or one GPU."""


INFO_EXAMPLES = ("tformer info", "tformer info --json")


def _add(name: str, function, lines: tuple[str, ...]) -> None:
    """Register a command with natural placeholders and its examples at the end of its --help."""
    app.command(name, cls=TformerCommand, epilog=examples(lines))(function)


_add("info", info.info, INFO_EXAMPLES)
_add("profile", profile.profile, profile.EXAMPLES)
app.add_typer(tokenize.app, name="tokenize")
_add("train", train.train, train.EXAMPLES)
_add("generate", generate.generate, generate.EXAMPLES)
_add("chat", chat.chat, chat.EXAMPLES)
_add("finetune", finetune.finetune, finetune.EXAMPLES)
_add("export", export.export, export.EXAMPLES)
_add("import", import_hf.import_command, import_hf.EXAMPLES)
_add("serve", serve.serve, serve.EXAMPLES)
_add("eval", eval.eval_command, eval.EXAMPLES)
_add("runs", runs.runs, runs.EXAMPLES)


def _user_errors() -> tuple[type[BaseException], ...]:
    from models import CheckpointError, ConfigError

    return (TformerError, ConfigError, CheckpointError)


def _interrupted() -> None:
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    raise SystemExit(INTERRUPTED) from None


def _fail(message: str, code: int = 1) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _caused_by_ctrl_c(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is somewhere in the exception's chain."""
    seen = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app, turning errors into one line on stderr."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="tformer", standalone_mode=True)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as e:
        # Typer ends a command stopped by Ctrl-C with exit 130 and no word; say it in one line.
        if e.code == INTERRUPTED and _caused_by_ctrl_c(e):
            _interrupted()
        raise
    except _user_errors() as e:
        if debug:
            raise
        _fail(str(e), getattr(e, "exit_code", 1))
    except MemoryError:
        if debug:
            raise
        _fail("out of memory: try a smaller --batch-size or --seq-len")
    except Exception as e:  # noqa: BLE001 - the contract is one line, never a traceback
        if debug:
            raise
        if type(e).__name__ == "OutOfMemoryError":
            _fail("out of memory on the device: try a smaller --batch-size or --seq-len")
        _fail(f"{type(e).__name__}: {e} (run with --debug for the traceback)")


if __name__ == "__main__":
    main()
