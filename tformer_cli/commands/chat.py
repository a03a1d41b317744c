"""`tformer chat -m RUN`: an interactive chat on a terminal; one turn per line from a pipe."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from tformer_cli.commands import options
from tformer_cli.commands.console import check_text, pick_model, require_stdin, utf8_problem
from tformer_cli.commands.options import check_max_new_tokens, check_seed
from tformer_cli.errors import TformerError
from tformer_cli.inference.chat import ChatSession, chat_mode, read_transcript
from tformer_cli.inference.load import (
    check_quantize,
    inference_target,
    load_for_inference,
    model_precision,
)
from tformer_cli.inference.sampling import SamplingConfig
from tformer_cli.runs.rundir import Run

HELP = """commands:
  /reset               start over (keeps the system prompt)
  /system TEXT         set the system prompt (empty to clear)
  /set NAME VALUE      temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, seed
  /regen               a new reply to the last message
  /stats               context size and speed of the last reply
  /save FILE, /load FILE   the transcript as JSON
  /help, /exit         this help; leave (Ctrl-D too). Ctrl-C stops a reply."""

EXAMPLES = (
    "tformer chat",
    "tformer chat --model runs/corpus --temperature 0",
    'tformer chat -m runs/chat/best --system "Answer in one sentence."',
)

# A chat's seed grows by one per turn (the turn's own seed), so it stays well below 2**64.
MAX_CHAT_SEED = 2**63 - 1
LINE_LIMIT = 4 << 20  # characters in one piped turn; a longer line is reported and skipped
_PATH_COMMANDS = ("load", "save")  # their argument is a file name: any bytes the OS allows

_SETTABLE = {
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "repetition_penalty": float,
    "max_new_tokens": int,
    "seed": int,
}


# -- slash commands --------------------------------------------------------------------------


def _command(session: ChatSession, line: str, err: Console, stream: _ReplyPrinter) -> bool:
    """Run a slash command; False means exit."""
    name, _, arg = line[1:].partition(" ")
    if name in ("exit", "quit"):
        return False
    handler = _COMMANDS.get(name)
    if handler is None:
        err.print(f"unknown command /{escape(name)}; /help lists them")
    else:
        handler(session, arg.strip(), err, stream)
    return True


def _help(session: ChatSession, arg: str, err: Console, stream: _ReplyPrinter) -> None:
    err.print(HELP)


def _reset(session: ChatSession, arg: str, err: Console, stream: _ReplyPrinter) -> None:
    session.reset()
    err.print("[dim]conversation cleared[/]")


def _system(session: ChatSession, arg: str, err: Console, stream: _ReplyPrinter) -> None:
    session.set_system(arg)
    err.print(f"[dim]system prompt {'set' if arg else 'cleared'}[/]")


def _set(session: ChatSession, arg: str, err: Console, stream: _ReplyPrinter) -> None:
    key, _, value = arg.partition(" ")
    key, value = key.replace("-", "_"), value.strip()
    if key not in _SETTABLE or not value:
        raise TformerError(f"/set NAME VALUE with NAME one of {', '.join(_SETTABLE)}")
    try:
        parsed = _SETTABLE[key](value)
    except ValueError:
        raise TformerError(f"/set {key}: {value!r} is not a {_SETTABLE[key].__name__}") from None
    if key == "max_new_tokens":
        check_max_new_tokens(parsed, "/set max_new_tokens")
    if key == "seed":
        check_seed(parsed, "/set seed", MAX_CHAT_SEED)
    if key in ("max_new_tokens", "seed"):
        setattr(session, key, parsed)
    else:
        session.sampling = session.sampling.replace(**{key: parsed})
    err.print(f"[dim]{key} = {parsed}[/]")


def _regen(session: ChatSession, arg: str, err: Console, stream: _ReplyPrinter) -> None:
    session.regenerate(stream)
    stream.end()
    _report(session, err)


def _stats(session: ChatSession, arg: str, err: Console, stream: _ReplyPrinter) -> None:
    err.print(
        f"context: {len(session.cached)} of {session.model.config.max_seq_len} tokens, "
        f"{len(session.messages)} messages, {session.dropped_turns} dropped; mode {session.mode}"
    )
    err.print(
        f"sampling: {session.sampling.describe()}; max_new_tokens {session.max_new_tokens}, "
        f"seed {session.seed}"
    )
    if session.last:
        _report(session, err)


def _save(session: ChatSession, arg: str, err: Console, stream: _ReplyPrinter) -> None:
    session.save(arg or "chat.json")
    err.print(f"[dim]saved {escape(arg or 'chat.json')}[/]")


def _load(session: ChatSession, arg: str, err: Console, stream: _ReplyPrinter) -> None:
    if not arg:
        raise TformerError("/load FILE: name the transcript to load")
    _check_transcript_text(Path(arg))
    session.load(arg)
    err.print(f"[dim]loaded {len(session.messages)} messages from {escape(arg)}[/]")


_COMMANDS: dict[str, Callable[[ChatSession, str, Console, _ReplyPrinter], None]] = {
    "help": _help,
    "reset": _reset,
    "system": _system,
    "set": _set,
    "regen": _regen,
    "stats": _stats,
    "save": _save,
    "load": _load,
}


def _report(session: ChatSession, err: Console) -> None:
    s = session.last
    if s:
        g = s.generation
        err.print(
            f"[dim]{s.reply_tokens} tokens, {g.decode_tokens_per_s:.1f} tokens/s, first after "
            f"{1000 * g.prefill_seconds:.0f} ms ({s.prefilled_tokens} prefilled, "
            f"{s.reused_tokens} reused from cache)[/]"
        )


# -- reading turns -----------------------------------------------------------------------------


def _check_transcript_text(path: Path) -> None:
    """A TformerError when a transcript holds text that is not UTF-8 (as JSON escapes allow)."""
    data = read_transcript(path)
    texts = [("system", data["system"] or "")]
    texts += [(f"message {n}", m["content"]) for n, m in enumerate(data["messages"], start=1)]
    for where, text in texts:
        if problem := utf8_problem(text):
            raise TformerError(f"{path}: {where} is not valid UTF-8 text ({problem})")


def _tolerate_bad_bytes(stream) -> None:
    """Let stdin pass bytes that are not UTF-8 on as lone surrogates: one bad line, one error."""
    try:
        stream.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):
        pass  # not a TextIOWrapper (a test's StringIO holds text already)


def _read_line(stream) -> tuple[str, str | None]:
    """The next piped line ("" at the end) and what is wrong with it (see _text_problem), if any.

    A line longer than LINE_LIMIT is read to its end and dropped, so it never fills memory.
    """
    try:
        line = stream.readline(LINE_LIMIT + 1)
        if len(line) > LINE_LIMIT and not line.endswith("\n"):
            while (rest := stream.readline(LINE_LIMIT)) and not rest.endswith("\n"):
                pass
            return " ", f"longer than {LINE_LIMIT:,} characters"
    except UnicodeDecodeError as e:  # a stream that could not be told to keep bad bytes
        raise TformerError(f"stdin: not UTF-8 text ({e.reason}); pipe in UTF-8 lines") from None
    return line, _text_problem(line)


def _text_problem(line: str) -> str | None:
    """What is wrong with a typed line that goes to the model (a file name may be any bytes)."""
    text = line.strip()
    if text.startswith("/") and text[1:].partition(" ")[0] in _PATH_COMMANDS:
        return None
    problem = utf8_problem(line)
    return f"not UTF-8 text ({problem})" if problem else None


class _ReplyPrinter:
    """Streams a reply to stdout without its leading and trailing whitespace.

    From a pipe every reply is one line: its line breaks are written as the two characters \\n.
    """

    def __init__(self, one_line: bool):
        self.one_line = one_line
        self.started = False
        self.held = ""  # whitespace that only gets printed if more text follows

    def __call__(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return
            self.started = True
        text = self.held + piece
        body = text.rstrip()
        self.held = text[len(body) :]
        if body:
            sys.stdout.write(body.replace("\n", "\\n") if self.one_line else body)
            sys.stdout.flush()

    def end(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.started, self.held = False, ""


class _Conversation:
    """The read-reply loop: one turn per line, from a terminal (interactive) or a pipe."""

    def __init__(self, session: ChatSession, err: Console, interactive: bool):
        self.session, self.err, self.interactive = session, err, interactive
        self.stream = _ReplyPrinter(one_line=not interactive)
        self.told_dropped = False
        self.bad_lines = 0  # piped lines skipped (not UTF-8, too long): the exit code says so
        self.number = 0  # lines read

    def run(self) -> None:
        """Answer every line until the input ends or /exit."""
        if self.interactive:
            import readline  # noqa: F401 - gives input() line editing and history
        while (line := self._next_line()) is not None:
            if line and not self._answer(line):
                break

    def _next_line(self) -> str | None:
        """The next line to act on ("" for one to skip), or None at the end of the input."""
        try:
            if self.interactive:
                line = input("> ")
                problem = _text_problem(line)
            else:
                line, problem = _read_line(sys.stdin)
        except EOFError:
            if self.interactive:
                self.err.print()
            return None
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
            self.err.print()
            if not self.interactive:
                raise typer.Exit(130) from None
            return ""
        except UnicodeDecodeError as e:  # input() on a stdin that could not keep bad bytes
            self.err.print(
                f"[red]that line is not UTF-8 text ({escape(e.reason)}); it was not sent[/]"
            )
            return ""
        if not self.interactive and line == "":
            return None  # the end of the piped input
        self.number += 1
        if problem:
            self._skip(problem)
            return ""
        return line.strip()

    def _skip(self, problem: str) -> None:
        if self.interactive:
            self.err.print(f"[red]that line is {escape(problem)}; it was not sent[/]")
        else:
            self.bad_lines += 1
            self.err.print(f"error: stdin line {self.number}: {problem}; skipped it", markup=False)

    def _answer(self, line: str) -> bool:
        """Reply to a turn or run a slash command; False means exit."""
        try:
            if line.startswith("/"):
                return _command(self.session, line, self.err, self.stream)
            self.session.reply(line, self.stream)
            self.stream.end()
            if self.interactive:
                _report(self.session, self.err)
            self._tell_dropped()
        except KeyboardInterrupt:
            self.stream.end()
            self.err.print("[dim]reply stopped[/]")
            if not self.interactive:
                raise typer.Exit(130) from None
        except TformerError as e:
            if not self.interactive:
                raise
            self.err.print(f"[red]{escape(str(e))}[/]")
        return True

    def _tell_dropped(self) -> None:
        """Say once that the conversation outgrew the window."""
        if self.session.dropped_turns and not self.told_dropped:
            self.err.print(
                "[yellow]the conversation outgrew the context window: the oldest turns were "
                "dropped (the system prompt is kept)[/]"
            )
            self.told_dropped = True


def chat(
    model_dir: Path = options.model(),
    system: str = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: int = options.max_new_tokens(256, "Longest reply in tokens."),
    temperature: float = options.temperature(0.7),
    top_k: int = options.top_k(),
    top_p: float = options.top_p(0.95),
    min_p: float = options.min_p(),
    repetition_penalty: float = options.repetition_penalty(
        1.1, "Penalise tokens already in the context (1: off)."
    ),
    seed: int = options.seed("The same seed gives the same replies."),
    device: str = options.device(),
    precision: str = options.precision(),
    quantize: str = options.quantize(),
    compile_model: bool = options.compile_prefill(),
) -> None:
    """Chat with a model. On a terminal: line editing, history, /help. From a pipe: one turn per line, one reply per line on stdout."""  # noqa: E501 - the command list in `tformer --help` shows this line as written
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty).validate()
    check_max_new_tokens(max_new_tokens)
    check_seed(seed, most=MAX_CHAT_SEED)
    if system is not None:
        check_text(system, "--system")
    require_stdin("chat reads one turn per line: run it on a terminal or pipe lines in")
    _tolerate_bad_bytes(sys.stdin)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    dev, prec = inference_target(device, precision, quantize)
    check_quantize(quantize, dev, compile_model)
    path = pick_model(model_dir, err)
    prec = model_precision(precision, dev, prec, path)
    run = load_for_inference(path, dev, prec, compile_model, quantize=quantize)
    mode = chat_mode(run.info, run.tokenizer)
    session = ChatSession(run.model, run.tokenizer, mode, sampling, max_new_tokens, system, seed)
    interactive = sys.stdin.isatty()
    where = f"{dev} {prec}" + ("" if quantize == "none" else f" activations, {quantize} weights")
    err.print(_greeting(run, mode, where, interactive))
    conversation = _Conversation(session, err, interactive)
    conversation.run()
    if conversation.bad_lines:
        raise typer.Exit(1)


def _greeting(run: Run, mode: str, where: str, interactive: bool) -> str:
    """The first line on stderr: which model, how it is prompted, where it runs."""
    what = (
        "chat markers (fine-tuned for chat)"
        if mode == "chat"
        else 'plain transcript (a base model: it continues "User: ... Assistant:")'
    )
    hint = " /help for commands, Ctrl-D to leave." if interactive else ""
    return (
        f"[dim]{escape(str(run.path))}: {what}; {where}, "
        f"context {run.config.max_seq_len} tokens.{hint}[/]"
    )
