"""The generation engine and `tformer generate`: cache equivalence, seeds, stops, sliding, batching."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_run import make_run, make_tokenizer

from models import load_model
from tformer_cli.generation import StreamDecoder, generate
from tformer_cli.sampling import SamplingConfig
from tformer_cli.tokenizer import load_tokenizer

GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module")
def tok_path(shared_data, tmp_path_factory):
    text = (shared_data / "tinyshakespeare.txt").read_text()[:100_000]
    return make_tokenizer(text, tmp_path_factory.mktemp("gen") / "tok.model", vocab_size=500)


@pytest.fixture(scope="module")
def run(tok_path, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("gen") / "run", tok_path, seed=3)


@pytest.fixture(scope="module")
def loaded(run):
    return load_model(run), load_tokenizer(run / "tokenizer.model")


def ids(tok, text):
    return [tok.bos_id, *tok.encode(text)]


@pytest.mark.parametrize("pos", ["rope", "learned", "sinusoidal"])
def test_greedy_is_identical_with_and_without_the_cache_past_the_window(tok_path, tmp_path, pos):
    run = make_run(tmp_path / pos, tok_path, seed=1, pos=pos, max_seq_len=48)
    model, tok = load_model(run), load_tokenizer(run / "tokenizer.model")
    (a,), sa = generate(model, tok, [ids(tok, "First Citizen:")], GREEDY, 120)
    (b,), sb = generate(model, tok, [ids(tok, "First Citizen:")], GREEDY, 120, use_cache=False)
    assert a.ids == b.ids and len(a.ids) == 120
    assert sa.slides == sb.slides >= 2  # the window slid, and both paths saw the same windows


def test_cached_decoding_matches_a_full_forward_at_each_step(loaded):
    model, tok = loaded
    prompt = ids(tok, "To be, or not")
    (out,), _ = generate(model, tok, [prompt], GREEDY, 10)
    seq = torch.tensor([prompt + out.ids])
    with torch.no_grad():
        logits = model(seq)[0]
    expected = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert expected == out.ids


def test_same_seed_same_text_and_different_seed_differs(loaded):
    model, tok = loaded
    hot = SamplingConfig(temperature=1.0, top_k=50)
    runs = [generate(model, tok, [ids(tok, "ROMEO:")], hot, 40, seed=s)[0][0].ids for s in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_batched_rows_equal_their_unbatched_greedy_outputs(loaded):
    model, tok = loaded
    prompts = [ids(tok, "Hi"), ids(tok, "What light through yonder window breaks? It is"), ids(tok, "Good morrow")]
    alone = [generate(model, tok, [p], GREEDY, 30)[0][0].ids for p in prompts]
    batched, _ = generate(model, tok, prompts, GREEDY, 30)
    assert [c.ids for c in batched] == alone
    no_cache, _ = generate(model, tok, prompts, GREEDY, 30, use_cache=False)
    assert [c.ids for c in no_cache] == alone


def test_1200_tokens_past_a_256_token_window(loaded, run):
    model, _ = loaded
    tok = load_tokenizer(run / "tokenizer.model")
    tok.eos_id, tok.marker_ids = -1, {}  # a random model may pick EOS; here nothing may end the text
    assert model.config.max_seq_len == 256
    (out,), stats = generate(model, tok, [ids(tok, "KING:")], SamplingConfig(temperature=1.0), 1200, seed=0)
    assert len(out.ids) == 1200 and out.finish == "length"
    assert stats.slides == 8  # 1203 tokens through a 256 window that keeps 128 at each slide


def test_stop_strings_end_the_text_before_them(loaded):
    model, tok = loaded
    (free,), _ = generate(model, tok, [ids(tok, "A")], GREEDY, 60)
    assert len(free.text) > 8
    stop = free.text[5:8]
    streamed = []
    (stopped,), _ = generate(model, tok, [ids(tok, "A")], GREEDY, 60, stops=(stop,), on_text=lambda r, t: streamed.append(t))
    assert stopped.finish == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert "".join(streamed) == stopped.text  # nothing of the stop string was printed


def test_stream_decoder_holds_back_partial_characters_and_stops(loaded):
    _, tok = loaded
    emoji = tok.encode("🤖")  # several byte-fallback tokens
    dec = StreamDecoder(tok)
    outs = [dec.push(t) for t in emoji]
    assert outs[:-1] == [""] * (len(emoji) - 1) and outs[-1] == "🤖"
    dec = StreamDecoder(tok, stops=("END",))
    pieces = [dec.push(t) for t in tok.encode("abc EN")]
    assert "".join(pieces) == "abc "  # "EN" might begin the stop string
    assert "".join(dec.push(t) for t in tok.encode("D more")) == "" and dec.stopped and dec.text == "abc "


# -- the command -------------------------------------------------------------------------------


def test_generate_prints_only_the_text_and_no_cache_matches(run, cli):
    a = cli("generate", "-m", run, "-p", "First", "-n", "25", "--temperature", "0")
    b = cli("generate", "-m", run, "-p", "First", "-n", "25", "--temperature", "0", "--no-cache")
    assert a.exit_code == 0 and b.exit_code == 0
    assert a.stdout == b.stdout and a.stdout.strip()
    assert "tokens/s" in a.stderr and "tokens/s" not in a.stdout


def test_generate_json_and_stdin(run, cli):
    res = cli("generate", "-m", run, "-n", "5", "--temperature", "0", "--json", stdin="Once upon")
    data = json.loads(res.stdout)
    assert data["prompt"] == "Once upon" and data["new_tokens"] == 5 and data["rows"][0]["new_tokens"] == 5
    assert {"text", "prompt_tokens", "time_to_first_token_s", "decode_tokens_per_s"} <= data.keys()


def test_generate_same_seed_same_sample(run, cli):
    args = ["generate", "-m", run, "-p", "The", "-n", "20", "--seed", "11", "--top-p", "0.9"]
    assert cli(*args).stdout == cli(*args).stdout


def test_generate_several_prompts_as_a_batch(run, cli):
    res = cli("generate", "-m", run, "-p", "One", "-p", "Two", "-n", "5", "--temperature", "0", "--json")
    data = json.loads(res.stdout)
    assert [r["prompt"] for r in data["rows"]] == ["One", "Two"] and data["new_tokens"] == 10


def test_long_prompt_is_cut_from_the_left_with_a_warning(run, cli):
    res = cli("generate", "-m", run, "-p", "word " * 400, "-n", "3", "--temperature", "0")
    assert res.exit_code == 0 and "keeping its last 255" in res.stderr


@pytest.mark.parametrize(
    "args, message",
    [(["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p"), (["--top-k", "-3"], "--top-k")],
)
def test_bad_sampling_values(run, cli, args, message):
    res = cli("generate", "-m", run, "-p", "x", *args)
    assert res.exit_code == 1 and message in res.stderr and "Traceback" not in res.stderr


def test_missing_or_incomplete_run_dir(cli, tmp_path, run):
    res = cli("generate", "-m", tmp_path / "nope", "-p", "x")
    assert res.exit_code == 1 and "no such run directory" in res.stderr
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((run / "config.json").read_text())
    res = cli("generate", "-m", tmp_path / "half", "-p", "x")
    assert res.exit_code == 1 and "model.safetensors is missing" in res.stderr


def test_tokenizer_larger_than_the_model_vocab_is_refused(tok_path, tmp_path, cli):
    run = make_run(tmp_path / "r", tok_path, vocab_size=300)  # the model embeds fewer ids than the tokenizer has
    res = cli("generate", "-m", run, "-p", "x")
    assert res.exit_code == 1 and "does not belong to this model" in res.stderr
