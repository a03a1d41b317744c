"""Chat: the template's exact tokens, cache reuse across turns, dropping old turns, the command."""

from __future__ import annotations

import json

import pytest
from helpers_run import make_run, shared_tokenizer

from models import load_model
from tformer_cli.commands.chat import _ReplyPrinter
from tformer_cli.data.chat_template import encode_chat, encode_chat_with_mask, plain_transcript
from tformer_cli.data.tokenizer import load_tokenizer
from tformer_cli.inference.chat import ChatSession
from tformer_cli.inference.sampling import SamplingConfig
from tformer_cli.inference.text import generate


@pytest.fixture(scope="module")
def tok_path():
    return shared_tokenizer(500)


@pytest.fixture(scope="module")
def chat_run(tok_path, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("chat") / "run", tok_path, seed=2, chat=True)


def test_two_turn_conversation_has_the_exact_token_layout(tok_path):
    tok = load_tokenizer(tok_path)
    m = tok.marker_ids
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        [tok.bos_id, m["<|system|>"], *tok.encode("Be brief."), m["<|end|>"]]
        + [m["<|user|>"], *tok.encode("Hi"), m["<|end|>"]]
        + [m["<|assistant|>"], *tok.encode("Hello."), m["<|end|>"]]
        + [m["<|user|>"], *tok.encode("Bye"), m["<|end|>"], m["<|assistant|>"]]
    )
    assert encode_chat(tok, messages) == expected
    ids, mask = encode_chat_with_mask(tok, messages[:3])
    assert ids == expected[: len(ids)]
    reply = [i for i, keep in zip(ids, mask, strict=True) if keep]
    assert reply == [
        *tok.encode("Hello."),
        m["<|end|>"],
    ]  # only the reply and its end marker carry loss


def test_plain_transcript_for_base_models():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert plain_transcript(messages) == "S\nUser: Hi\nAssistant:"


def test_second_turn_prefills_only_the_new_tokens(chat_run):
    model, tok = load_model(chat_run), load_tokenizer(chat_run / "tokenizer.model")
    session = ChatSession(model, tok, "chat", SamplingConfig(temperature=0), max_new_tokens=12)
    session.reply("Hello there")
    first = session.last
    assert first.reused_tokens == 0
    session.reply("And again")
    second = session.last
    assert second.reused_tokens > first.prefilled_tokens  # all of turn one came from the cache
    assert second.prefilled_tokens <= len(tok.encode("And again")) + 6
    fresh = ChatSession(model, tok, "chat", SamplingConfig(temperature=0), max_new_tokens=12)
    fresh.messages = [dict(m) for m in session.messages[:-1]]
    assert fresh._respond(None) == session.messages[-1]["content"]  # reuse changes nothing


def test_old_turns_are_dropped_when_the_window_is_full(tok_path, tmp_path):
    run = make_run(tmp_path / "r", tok_path, chat=True, max_seq_len=64)
    model, tok = load_model(run), load_tokenizer(run / "tokenizer.model")
    session = ChatSession(
        model, tok, "chat", SamplingConfig(temperature=0), max_new_tokens=8, system="Sys"
    )
    for n in range(8):
        session.reply(f"message number {n} with some words")
    assert session.dropped_turns > 0
    assert session.conversation()[0] == {"role": "system", "content": "Sys"}
    assert session.messages[-2]["content"] == "message number 7 with some words"
    assert (
        session.last.prefilled_tokens + session.last.reused_tokens <= 64 - 8
    )  # prompt + room for the reply
    assert len(session.cached) <= 64


def test_piped_chat_prints_two_replies_and_exits_0(chat_run, cli):
    res = cli("chat", "-m", chat_run, "--seed", "0", "-n", "10", stdin="Hello\nWho are you?\n")
    assert res.exit_code == 0, res.stderr
    assert "chat markers" in res.stderr
    assert len(res.stdout.splitlines()) == 2 and res.stdout.endswith("\n")  # one line per reply


def test_piped_replies_are_the_sessions_greedy_replies(chat_run, cli):
    model, tok = load_model(chat_run), load_tokenizer(chat_run / "tokenizer.model")
    session = ChatSession(model, tok, "chat", SamplingConfig(temperature=0), max_new_tokens=15)
    expected = [session.reply("Hello"), session.reply("Who are you?")]
    res = cli(
        "chat",
        "-m",
        chat_run,
        "--temperature",
        "0",
        "--precision",
        "fp32",
        "-n",
        "15",
        stdin="Hello\nWho are you?\n",
    )
    assert res.stdout.splitlines() == [e.strip().replace("\n", "\\n") for e in expected]


def test_a_reply_is_the_greedy_continuation_of_the_template(chat_run):
    model, tok = load_model(chat_run), load_tokenizer(chat_run / "tokenizer.model")
    session = ChatSession(
        model, tok, "chat", SamplingConfig(temperature=0), max_new_tokens=15, system="Be kind."
    )
    reply = session.reply("Hello")
    prompt = encode_chat(
        tok, [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}]
    )
    (ref,), _ = generate(model, tok, [prompt], SamplingConfig(temperature=0), 15)
    assert reply == ref.text
    assert session.messages == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": ref.text},
    ]


def test_plain_mode_continues_a_transcript(chat_run):
    model, tok = load_model(chat_run), load_tokenizer(chat_run / "tokenizer.model")
    session = ChatSession(
        model, tok, "plain", SamplingConfig(temperature=0), max_new_tokens=15, system="S"
    )
    session.messages = [{"role": "user", "content": "Hi"}]
    assert session.prompt_ids() == [tok.bos_id, *tok.encode("S\nUser: Hi\nAssistant:")]


def test_an_interrupted_reply_leaves_no_trace(chat_run):
    model, tok = load_model(chat_run), load_tokenizer(chat_run / "tokenizer.model")
    session = ChatSession(model, tok, "chat", SamplingConfig(temperature=0), max_new_tokens=30)
    session.reply("Hello")
    before = [dict(m) for m in session.messages]
    pieces = []

    def ctrl_c(text):
        pieces.append(text)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.reply("Tell me more", ctrl_c)
    assert session.messages == before and session.cached == []  # the next turn prefills afresh
    session.max_new_tokens = (
        model.config.max_seq_len
    )  # this turn must drop the first one to fit ...
    with pytest.raises(KeyboardInterrupt):
        session.reply("x " * 100, ctrl_c)
    assert session.messages == before and session.dropped_turns == 0  # ... but was interrupted
    session.max_new_tokens = 30
    session.reply("Tell me more")
    assert session.last.reused_tokens == 0


def test_reply_printer_trims_and_keeps_one_line_per_reply(capsys):
    printer = _ReplyPrinter(one_line=True)
    for piece in ["  ", "\n Hello", " there", "\n", "second line", "  \n"]:
        printer(piece)
    printer.end()
    assert capsys.readouterr().out == "Hello there\\nsecond line\n"
    terminal = _ReplyPrinter(one_line=False)
    for piece in ["Hi", "\n", "you"]:
        terminal(piece)
    terminal.end()
    assert capsys.readouterr().out == "Hi\nyou\n"


def test_base_model_chats_in_plain_mode(tok_path, tmp_path, cli):
    run = make_run(tmp_path / "base", tok_path)
    res = cli("chat", "-m", run, "--seed", "0", "-n", "10", stdin="Hello\nWho are you?\n")
    assert res.exit_code == 0 and "plain transcript" in res.stderr


def test_slash_commands_save_load_set_reset(chat_run, cli, tmp_path):
    transcript = tmp_path / "t.json"
    lines = [
        "/set temperature 0",
        "/system Speak plainly.",
        "Hi",
        "/regen",
        f"/save {transcript}",
        "/stats",
        "/reset",
        f"/load {transcript}",
        "/exit",
        "never read",
    ]
    script = "\n".join(lines) + "\n"
    res = cli("chat", "-m", chat_run, "-n", "6", stdin=script)
    assert res.exit_code == 0, res.stderr
    data = json.loads(transcript.read_text())
    assert data["system"] == "Speak plainly."
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert "temperature = 0.0" in res.stderr and "loaded 2 messages" in res.stderr
    assert "context:" in res.stderr


def test_bad_set_value_in_a_pipe_is_an_error(chat_run, cli):
    res = cli("chat", "-m", chat_run, stdin="/set top_p 7\n")
    assert res.exit_code == 1 and "--top-p" in res.stderr


def test_load_errors_are_one_line(chat_run, cli, tmp_path):
    res = cli("chat", "-m", chat_run, stdin=f"/load {tmp_path / 'missing.json'}\n")
    assert (
        res.exit_code == 1 and "no such transcript" in res.stderr and "Traceback" not in res.stderr
    )
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    res = cli("chat", "-m", chat_run, stdin=f"/load {bad}\n")
    assert res.exit_code == 1 and "not a tformer chat transcript" in res.stderr


def test_stats_shows_the_sampling_settings_as_words(chat_run, cli):
    res = cli("chat", "-m", chat_run, "--top-k", "40", stdin="/stats\n")
    assert res.exit_code == 0, res.stderr
    assert (
        "sampling: temperature 0.7, top-k 40, top-p 0.95, repetition penalty 1.1 (min-p off)"
        in res.stderr
    )
    assert "SamplingConfig" not in res.stderr
