"""Chat: the template's exact tokens, cache reuse across turns, dropping old turns, the command."""

from __future__ import annotations

import json

import pytest
from helpers_run import make_run, make_tokenizer

from models import load_model
from tformer_cli.chat_session import ChatSession
from tformer_cli.chat_template import encode_chat, encode_chat_with_mask, plain_transcript
from tformer_cli.sampling import SamplingConfig
from tformer_cli.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok_path(shared_data, tmp_path_factory):
    text = (shared_data / "tinyshakespeare.txt").read_text()[:100_000]
    return make_tokenizer(text, tmp_path_factory.mktemp("chat") / "tok.model", vocab_size=500)


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
    assert reply == [*tok.encode("Hello."), m["<|end|>"]]  # only the reply and its end marker carry loss


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
    session = ChatSession(model, tok, "chat", SamplingConfig(temperature=0), max_new_tokens=8, system="Sys")
    for n in range(8):
        session.reply(f"message number {n} with some words")
    assert session.dropped_turns > 0
    assert session.conversation()[0] == {"role": "system", "content": "Sys"}
    assert session.messages[-2]["content"] == "message number 7 with some words"
    assert session.last.prefilled_tokens + session.last.reused_tokens <= 64 - 8  # prompt + room for the reply
    assert len(session.cached) <= 64


def test_piped_chat_prints_two_replies_and_exits_0(chat_run, cli):
    res = cli("chat", "-m", chat_run, "--seed", "0", "-n", "10", stdin="Hello\nWho are you?\n")
    assert res.exit_code == 0, res.stderr
    assert "chat markers" in res.stderr
    assert res.stdout.count("\n") >= 2


def test_base_model_chats_in_plain_mode(tok_path, tmp_path, cli):
    run = make_run(tmp_path / "base", tok_path)
    res = cli("chat", "-m", run, "--seed", "0", "-n", "10", stdin="Hello\nWho are you?\n")
    assert res.exit_code == 0 and "plain transcript" in res.stderr


def test_slash_commands_save_load_set_reset(chat_run, cli, tmp_path):
    transcript = tmp_path / "t.json"
    script = f"/set temperature 0\n/system Speak plainly.\nHi\n/regen\n/save {transcript}\n/stats\n/reset\n/load {transcript}\n/exit\nnever read\n"
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
