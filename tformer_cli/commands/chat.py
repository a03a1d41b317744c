"""`tformer chat -m RUN`: an interactive chat on a terminal; one turn per line from a pipe."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from tformer_cli.commands.generate import (
    MODEL_HELP,
    check_max_new_tokens,
    check_seed,
    check_text,
    load_for_inference,
    pick_model,
    require_stdin,
    utf8_problem,
)
from tformer_cli.errors import TformerError
from tformer_cli.inference.chat import ChatSession, read_transcript
from tformer_cli.inference.sampling import SamplingConfig

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


def _command(session: ChatSession, line: str, err: Console, stream: _ReplyPrinter) -> bool:
    """Run a slash command; False means exit."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("exit", "quit"):
        return False
    if name == "help":
        err.print(HELP)
    elif name == "reset":
        session.reset()
        err.print("[dim]conversation cleared[/]")
    elif name == "system":
        session.set_system(arg)
        err.print(f"[dim]system prompt {'set' if arg else 'cleared'}[/]")
    elif name == "set":
        key, _, value = arg.partition(" ")
        key, value = key.replace("-", "_"), value.strip()
        if key not in _SETTABLE or not value:
            raise TformerError(f"/set NAME VALUE with NAME one of {', '.join(_SETTABLE)}")
        try:
            parsed = _SETTABLE[key](value)
        except ValueError:
            raise TformerError(
                f"/set {key}: {value!r} is not a {_SETTABLE[key].__name__}"
            ) from None
        if key == "max_new_tokens":
            check_max_new_tokens(parsed, "/set max_new_tokens")
        if key == "seed":
            check_seed(parsed, "/set seed", MAX_CHAT_SEED)
        if key in ("max_new_tokens", "seed"):
            setattr(session, key, parsed)
        else:
            session.sampling = session.sampling.replace(**{key: parsed})
        err.print(f"[dim]{key} = {parsed}[/]")
    elif name == "regen":
        session.regenerate(stream)
        stream.end()
        _report(session, err)
    elif name == "stats":
        ctx = len(session.cached)
        err.print(
            f"context: {ctx} of {session.model.config.max_seq_len} tokens, {len(session.messages)} messages, "
            f"{session.dropped_turns} dropped; mode {session.mode}"
        )
        err.print(
            f"sampling: {session.sampling.describe()}; max_new_tokens {session.max_new_tokens}, "
            f"seed {session.seed}"
        )
        if session.last:
            _report(session, err)
    elif name == "save":
        session.save(arg or "chat.json")
        err.print(f"[dim]saved {escape(arg or 'chat.json')}[/]")
    elif name == "load":
        if not arg:
            raise TformerError("/load FILE: name the transcript to load")
        _check_transcript_text(Path(arg))
        session.load(arg)
        err.print(f"[dim]loaded {len(session.messages)} messages from {escape(arg)}[/]")
    else:
        err.print(f"unknown command /{escape(name)}; /help lists them")
    return True


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


def _report(session: ChatSession, err: Console) -> None:
    s = session.last
    if s:
        g = s.generation
        err.print(
            f"[dim]{s.reply_tokens} tokens, {g.decode_tokens_per_s:.1f} tokens/s, first after "
            f"{1000 * g.prefill_seconds:.0f} ms ({s.prefilled_tokens} prefilled, {s.reused_tokens} reused from cache)[/]"
        )


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


def chat(
    model_dir: Path = typer.Option(None, "-m", "--model", metavar="RUN_DIR", help=MODEL_HELP),
    system: str = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: int = typer.Option(
        256, "-n", "--max-new-tokens", help="Longest reply in tokens."
    ),
    temperature: float = typer.Option(0.7, "--temperature", help="0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(
        0.95, "--top-p", help="Keep the smallest set with this much probability (1: off)."
    ),
    min_p: float = typer.Option(
        0.0, "--min-p", help="Drop tokens below min-p x the top probability (0: off)."
    ),
    repetition_penalty: float = typer.Option(
        1.1, "--repetition-penalty", help="Penalise tokens already in the context (1: off)."
    ),
    seed: int = typer.Option(None, "--seed", help="The same seed gives the same replies."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16."),
    compile_model: bool = typer.Option(
        False, "--compile", help="torch.compile the prefill (slow to start; for GPUs)."
    ),
) -> None:
    """Chat with a model. On a terminal: line editing, history, /help. From a pipe: one turn per line, one reply per line on stdout."""
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty).validate()
    check_max_new_tokens(max_new_tokens)
    check_seed(seed, most=MAX_CHAT_SEED)
    if system is not None:
        check_text(system, "--system")
    require_stdin("chat reads one turn per line: run it on a terminal or pipe lines in")
    _tolerate_bad_bytes(sys.stdin)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    run, dev, prec = load_for_inference(
        pick_model(model_dir, err), device, precision, compile_model
    )
    mode = "chat" if run.info.get("chat") and run.tokenizer.has_chat_markers else "plain"
    session = ChatSession(run.model, run.tokenizer, mode, sampling, max_new_tokens, system, seed)
    interactive = sys.stdin.isatty()
    what = (
        "chat markers (fine-tuned for chat)"
        if mode == "chat"
        else 'plain transcript (a base model: it continues "User: ... Assistant:")'
    )
    hint = " /help for commands, Ctrl-D to leave." if interactive else ""
    err.print(
        f"[dim]{escape(str(run.path))}: {what}; {dev} {prec}, "
        f"context {run.config.max_seq_len} tokens.{hint}[/]"
    )
    stream = _ReplyPrinter(one_line=not interactive)

    if interactive:
        import readline  # noqa: F401 - gives input() line editing and history

    told_dropped = False
    bad_lines = 0  # piped lines skipped (not UTF-8, too long): the exit code says so at the end
    number = 0
    while True:
        try:
            if interactive:
                line = input("> ")
                problem = _text_problem(line)
            else:
                line, problem = _read_line(sys.stdin)
        except EOFError:
            if interactive:
                err.print()
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
            err.print()
            if not interactive:
                raise typer.Exit(130) from None
            continue
        except UnicodeDecodeError as e:  # input() on a stdin that could not keep bad bytes
            err.print(f"[red]that line is not UTF-8 text ({escape(e.reason)}); it was not sent[/]")
            continue
        if not interactive and line == "":
            break  # end of the piped input
        number += 1
        if problem:
            if interactive:
                err.print(f"[red]that line is {escape(problem)}; it was not sent[/]")
            else:
                bad_lines += 1
                err.print(f"error: stdin line {number}: {problem}; skipped it", markup=False)
            continue
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not _command(session, line, err, stream):
                    break
                continue
            session.reply(line, stream)
            stream.end()
            if interactive:
                _report(session, err)
            if session.dropped_turns and not told_dropped:
                err.print(
                    "[yellow]the conversation outgrew the context window: the oldest turns were dropped "
                    "(the system prompt is kept)[/]"
                )
                told_dropped = True
        except KeyboardInterrupt:
            stream.end()
            err.print("[dim]reply stopped[/]")
            if not interactive:
                raise typer.Exit(130) from None
        except TformerError as e:
            if not interactive:
                raise
            err.print(f"[red]{escape(str(e))}[/]")
    if bad_lines:
        raise typer.Exit(1)
