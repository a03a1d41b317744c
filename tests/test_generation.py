"""The generation engine and `tformer generate`: cache equivalence, seeds, stops, sliding,
batching, the fused decode step."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_run import make_run, shared_tokenizer

from models import Transformer, get_preset, load_model
from models.decode import DecodeStep
from tformer_cli.data.tokenizer import load_tokenizer
from tformer_cli.inference.engine import TokenEngine
from tformer_cli.inference.sampling import SamplingConfig
from tformer_cli.inference.text import StreamDecoder, generate

GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module")
def tok_path():
    return shared_tokenizer(500)


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
    runs = [
        generate(model, tok, [ids(tok, "ROMEO:")], hot, 40, seed=s)[0][0].ids for s in (5, 5, 6)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_batched_rows_equal_their_unbatched_greedy_outputs(loaded):
    model, tok = loaded
    prompts = [
        ids(tok, "Hi"),
        ids(tok, "What light through yonder window breaks? It is"),
        ids(tok, "Good morrow"),
    ]
    alone = [generate(model, tok, [p], GREEDY, 30)[0][0].ids for p in prompts]
    batched, _ = generate(model, tok, prompts, GREEDY, 30)
    assert [c.ids for c in batched] == alone
    no_cache, _ = generate(model, tok, prompts, GREEDY, 30, use_cache=False)
    assert [c.ids for c in no_cache] == alone


def test_1200_tokens_past_a_256_token_window(loaded):
    model, tok = loaded
    assert model.config.max_seq_len == 256
    # a random model may pick EOS; here nothing may end the text
    (out,), stats = generate(
        model, tok, [ids(tok, "KING:")], SamplingConfig(temperature=1.0), 1200, seed=0, eos_ids=()
    )
    assert len(out.ids) == 1200 and out.finish == "length"
    assert stats.slides == 8  # 1203 tokens through a 256 window that keeps 128 at each slide


def test_stop_strings_end_the_text_before_them(loaded):
    model, tok = loaded
    (free,), _ = generate(model, tok, [ids(tok, "A")], GREEDY, 60)
    assert len(free.text) > 8
    stop = free.text[5:8]
    streamed = []
    (stopped,), _ = generate(
        model,
        tok,
        [ids(tok, "A")],
        GREEDY,
        60,
        stops=(stop,),
        on_text=lambda r, t: streamed.append(t),
    )
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
    assert (
        "".join(dec.push(t) for t in tok.encode("D more")) == ""
        and dec.stopped
        and dec.text == "abc "
    )


def test_stream_pieces_add_up_to_the_decoded_text(loaded):
    _, tok = loaded
    text = "Où est le café? Ça va: naïve façade, 東京 and 🤖 robots.\nSecond  line,  double spaces."
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(t) for t in ids] + [dec.finish()]
    assert "".join(pieces) == tok.decode(ids) == dec.text
    assert sum(bool(p) for p in pieces) > len(text.split()) // 2  # it streamed, not all at the end


# -- the fused decode step -----------------------------------------------------------------------

VARIANTS = {
    "llama": {},
    "gpt": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "sinusoidal": dict(pos="sinusoidal"),
    "gqa": dict(n_kv_heads=2),
    "untied": dict(tie_embeddings=False),
}


@pytest.mark.parametrize("prepared", [False, True], ids=["copy", "prepared"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_step_matches_the_model_on_a_padded_batch(variant, prepared):
    torch.manual_seed(0)
    model = Transformer(
        get_preset("nano", vocab_size=300, max_seq_len=32, **VARIANTS[variant])
    ).eval()
    if prepared:  # the model's own step, through its entry point
        model.prepare_for_inference()
        assert model.fused_decoding

        def step(tokens, cache, slot, positions, key_mask):
            return model.last_logits(
                tokens[:, None], cache, slot, pos=positions[:, None], key_mask=key_mask
            )
    else:  # a step with its own fused copy of the weights
        assert DecodeStep.supports(model)
        fused = DecodeStep(model)

        def step(tokens, cache, slot, positions, key_mask):
            return fused(model, tokens, cache, slot, positions, key_mask)

    idx = torch.randint(0, 300, (2, 10))
    pads = torch.tensor([0, 3])
    pos = (torch.arange(10)[None] - pads[:, None]).clamp(min=0)
    key_mask = torch.arange(32)[None] >= pads[:, None]
    tokens = torch.tensor([[3, 7], [11, 5]])  # two decoding steps
    with torch.inference_mode():
        ours, ref = model.new_cache(2), model.new_cache(2)
        model.hidden(idx, cache=ours, pos=pos, key_mask=key_mask)
        model.hidden(idx, cache=ref, pos=pos, key_mask=key_mask)
        for n, tok in enumerate(tokens):
            slot = 10 + n
            got = step(tok, ours, slot, slot - pads, key_mask)
            want = model.last_logits(
                tok[:, None], ref, slot, fused=False, pos=(slot - pads)[:, None], key_mask=key_mask
            )
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.k[:, :, :, :12], ref.k[:, :, :, :12], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.v[:, :, :, :12], ref.v[:, :, :, :12], atol=1e-5, rtol=1e-5)


def test_the_fused_path_equals_the_unfused_one_token_by_token():
    torch.manual_seed(0)
    model = Transformer(get_preset("nano", vocab_size=300)).prepare_for_inference()
    idx = torch.randint(0, 300, (1, 9))
    with torch.inference_mode():
        fused, plain = model.new_cache(1), model.new_cache(1)
        model.last_logits(idx[:, :4], fused)
        model.last_logits(idx[:, :4], plain)
        for t in range(4, 9):
            a = model.last_logits(idx[:, t : t + 1], fused, t)
            b = model.last_logits(idx[:, t : t + 1], plain, t, fused=False)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            full = model.last_logits(idx[:, : t + 1])  # no cache: the whole context again
            torch.testing.assert_close(a, full, atol=1e-5, rtol=1e-5)


def test_prepared_model_shares_its_weights_and_computes_the_same():
    torch.manual_seed(0)
    model = Transformer(get_preset("nano", vocab_size=300)).eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        before = model(x)
        model.prepare_for_inference()
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    step = model.decode_step
    assert step is not None and model.fused_decoding
    fused = step.layers[0].qkv.storage
    assert (
        fused.data_ptr()
        < model.layers[0].attn.wk.weight.data_ptr()
        < fused.data_ptr() + fused.nbytes
    )
    # tied: one copy of the embedding
    assert model.tok_emb.weight.data_ptr() == step.head.storage.data_ptr()
    model.to(torch.float64)  # moved or cast: the fused buffers no longer hold the weights
    assert not model.fused_decoding


def test_models_the_fused_step_does_not_cover_fall_back_to_the_plain_forward(run):
    model, tok = load_model(run).prepare_for_inference(), load_tokenizer(run / "tokenizer.model")
    prompt = ids(tok, "Good morrow")
    (fast,), _ = generate(model, tok, [prompt], GREEDY, 20)
    model.set_attention("math")  # the reference attention: not what the fused step computes
    assert not model.fused_decoding
    (slow,), _ = generate(model, tok, [prompt], GREEDY, 20)
    assert slow.ids == fast.ids
    model.set_attention("sdpa")
    assert model.fused_decoding
    (unfused,), _ = generate(model, tok, [prompt], GREEDY, 20, fused=False)
    assert unfused.ids == fast.ids


# -- the engine ----------------------------------------------------------------------------------


def test_the_token_engine_yields_ids_and_the_caller_can_stop_a_row(loaded):
    model, tok = loaded
    prompts = [ids(tok, "Hi"), ids(tok, "Good morrow")]
    engine = TokenEngine(model, prompts, GREEDY, 6)
    steps = []
    for step in engine:
        steps.append(step)
        if len(steps) == 2:
            engine.stop(0)  # as the text layer does when row 0's text reaches a stop string
    assert all(s[0] is None for s in steps[2:]) and all(s[1] is not None for s in steps)
    assert engine.finish == ["stop", "length"] and engine.ids[1] == [s[1] for s in steps]
    text, _ = generate(model, tok, prompts[1:], GREEDY, 6, eos_ids=())
    assert text[0].ids == engine.ids[1]  # the text layer runs the same engine


def test_rows_that_end_early_leave_the_other_rows_unchanged(tok_path, tmp_path):
    run = make_run(tmp_path / "r", tok_path, seed=4, max_seq_len=40)  # short window: rows slide too
    model, tok = load_model(run), load_tokenizer(run / "tokenizer.model")
    prompts = [
        ids(tok, "Hi"),
        ids(tok, "What light through yonder window breaks"),
        ids(tok, "Good"),
    ]
    (free,), _ = generate(model, tok, prompts[:1], GREEDY, 60, eos_ids=())
    eos = (free.ids[7],)  # row 0 will end at its 8th token (or before)
    alone = [generate(model, tok, [p], GREEDY, 60, eos_ids=eos)[0][0] for p in prompts]
    assert alone[0].finish == "eos" and len(alone[0].ids) <= 7
    for use_cache in (True, False):
        batched, stats = generate(model, tok, prompts, GREEDY, 60, eos_ids=eos, use_cache=use_cache)
        assert [c.ids for c in batched] == [c.ids for c in alone]
        assert [c.finish for c in batched] == [c.finish for c in alone]
        assert stats.slides >= 1


def test_ids_the_tokenizer_lacks_are_never_sampled(tok_path):
    tok = load_tokenizer(tok_path)
    torch.manual_seed(0)
    model = Transformer(
        get_preset("nano", vocab_size=tok.vocab_size + 64, tie_embeddings=False)
    ).eval()
    with torch.no_grad():
        model.head.weight[: tok.vocab_size] = 0.0  # every id the tokenizer knows scores 0 ...
        model.head.weight[tok.vocab_size :] *= 1e4  # ... and the padding ids score far from it
    for sampling in (GREEDY, SamplingConfig(temperature=1.0)):
        (out,), _ = generate(model, tok, [[tok.bos_id]], sampling, 20, seed=0, eos_ids=())
        assert len(out.ids) == 20 and max(out.ids) < tok.vocab_size


def test_a_chat_cache_is_reused_and_holds_the_context(loaded):
    model, tok = loaded
    prompt = ids(tok, "Now is the winter of our discontent")
    (whole,), _ = generate(model, tok, [prompt], GREEDY, 12, eos_ids=())
    cache = model.new_cache(1)
    (first,), _ = generate(model, tok, [prompt[:5]], GREEDY, 1, cache=cache, eos_ids=())
    assert first.context == prompt[:5]  # the sampled token was never fed back in
    (rest,), _ = generate(model, tok, [prompt], GREEDY, 12, cache=cache, reuse=5, eos_ids=())
    assert rest.ids == whole.ids
    assert rest.context == prompt + whole.ids[:-1]


# -- the command -------------------------------------------------------------------------------


def test_generate_prints_only_the_text_and_no_cache_matches(run, cli):
    greedy = ("generate", "-m", run, "-p", "First", "-n", "25", "--temperature", "0")
    a = cli(*greedy, "--precision", "fp32")
    b = cli(*greedy, "--precision", "fp32", "--no-cache")
    assert a.exit_code == 0 and b.exit_code == 0
    assert a.stdout == b.stdout and a.stdout.strip()
    assert "tokens/s" in a.stderr and "tokens/s" not in a.stdout


def test_generate_json_and_stdin(run, cli):
    res = cli("generate", "-m", run, "-n", "5", "--temperature", "0", "--json", stdin="Once upon")
    data = json.loads(res.stdout)
    assert (
        data["prompt"] == "Once upon"
        and data["new_tokens"] == 5
        and data["rows"][0]["new_tokens"] == 5
    )
    assert {"text", "prompt_tokens", "time_to_first_token_s", "decode_tokens_per_s"} <= data.keys()


def test_generate_same_seed_same_sample(run, cli):
    args = ["generate", "-m", run, "-p", "The", "-n", "20", "--seed", "11", "--top-p", "0.9"]
    assert cli(*args).stdout == cli(*args).stdout


def test_generate_several_prompts_as_a_batch(run, cli):
    res = cli(
        "generate", "-m", run, "-p", "One", "-p", "Two", "-n", "5", "--temperature", "0", "--json"
    )
    data = json.loads(res.stdout)
    assert [r["prompt"] for r in data["rows"]] == ["One", "Two"] and data["new_tokens"] == 10


def test_long_prompt_is_cut_from_the_left_with_a_warning(run, cli):
    res = cli("generate", "-m", run, "-p", "word " * 400, "-n", "3", "--temperature", "0")
    assert res.exit_code == 0 and "keeping its last 255" in res.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--top-k", "-3"], "--top-k"),
    ],
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
    run = make_run(
        tmp_path / "r", tok_path, vocab_size=300
    )  # the model embeds fewer ids than the tokenizer has
    res = cli("generate", "-m", run, "-p", "x")
    assert res.exit_code == 1 and "does not belong to this model" in res.stderr
