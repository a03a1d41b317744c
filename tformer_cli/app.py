"""The `tformer` command: a Typer app with one module per command."""

from __future__ import annotations

import sys

import typer

from tformer_cli import __version__
from tformer_cli.commands import (
    chat,
    export,
    finetune,
    generate,
    import_hf,
    info,
    profile,
    tokenize,
    train,
)
from tformer_cli.errors import TformerError

app = typer.Typer(
    name="tformer",
    help="Train, fine-tune, chat with and profile small decoder-only LLMs on your own machine.",
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


app.command("info")(info.info)
app.command("profile")(profile.profile)
app.add_typer(tokenize.app, name="tokenize")
app.command("train")(train.train)
app.command("generate")(generate.generate)
app.command("chat")(chat.chat)
app.command("finetune")(finetune.finetune)
app.command("export")(export.export)
app.command("import")(import_hf.import_command)


def _user_errors() -> tuple[type[BaseException], ...]:
    from models import CheckpointError, ConfigError

    return (TformerError, ConfigError, CheckpointError)


def _fail(message: str, code: int = 1) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app, turning errors into one line on stderr."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="tformer", standalone_mode=True)
    except SystemExit:
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
