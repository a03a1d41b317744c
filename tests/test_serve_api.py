"""`tformer serve`'s HTTP API through the official `openai` client and raw HTTP: the same text as
`tformer generate` and `tformer chat`, streaming, choices and seeds, every bad input's status and
shape, API keys, a client that disconnects, metrics and the access log."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch
from conftest import run_cli
from helpers_run import make_run, shared_tokenizer

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tformer_cli.inference.chat import ChatSession, chat_mode  # noqa: E402
from tformer_cli.inference.load import load_for_inference  # noqa: E402
from tformer_cli.inference.sampling import SamplingConfig  # noqa: E402
from tformer_cli.serve.app import create_app  # noqa: E402
from tformer_cli.serve.prompts import ServedModel, ServeSettings, plan_chat  # noqa: E402
from tformer_cli.serve.schemas import ChatCompletionRequest  # noqa: E402
from tformer_cli.serve.server import ServerThread  # noqa: E402

KEY = "sk-test-key"
PROMPT = "A function definition is"
N = 24  # tokens per reply: enough to tell texts apart, few enough to stay fast


def served(path) -> ServedModel:
    run = load_for_inference(path, torch.device("cpu"), "fp32")
    return ServedModel(path.name, run, chat_mode(run.info, run.tokenizer))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-api")
    tok = shared_tokenizer(500)
    # untied random weights: greedy text varies (a tied head repeats the last token), with
    # byte tokens that split characters, which the streamed text must hold back and join
    return {
        "base": make_run(root / "base", tok, seed=3, tie_embeddings=False),
        "chat": make_run(root / "chat", tok, seed=4, chat=True, tie_embeddings=False),
    }


@pytest.fixture(scope="module")
def server(runs):
    settings = ServeSettings(api_key=KEY, max_tokens=4096, max_choices=4)
    app = create_app([served(runs["base"]), served(runs["chat"])], settings)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, path: str, body, key: str | None = KEY, timeout: float = 120) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=timeout)


def metrics(server) -> dict:
    auth = {"Authorization": f"Bearer {KEY}"}
    return httpx.get(server.url + "/metrics", headers=auth, timeout=30).json()


def idle(server) -> dict:
    """The metrics once nothing is queued or decoding (waits for it, up to a minute)."""
    deadline = time.monotonic() + 60
    while (m := metrics(server))["requests_in_flight"] or m["batch_size"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    return m


def streamed_text(stream) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            delta = getattr(choice, "delta", None)
            text += (delta.content or "") if delta is not None else (choice.text or "")
            finish = choice.finish_reason or finish
    return text, finish


def test_completions_equal_tformer_generate_greedy(server, client, runs):
    args = ["-m", runs["base"], "-p", PROMPT, "-n", N, "--temperature", 0, "--precision", "fp32"]
    cli = run_cli("generate", *args)
    assert cli.exit_code == 0, cli.stderr
    expected = cli.stdout.removesuffix("\n")
    whole = client.completions.create(model="base", prompt=PROMPT, max_tokens=N, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.usage.completion_tokens <= N and whole.usage.prompt_tokens > 1
    assert whole.choices[0].finish_reason in ("stop", "length")
    stream = client.completions.create(
        model="base", prompt=PROMPT, max_tokens=N, temperature=0, stream=True
    )
    assert streamed_text(stream) == (expected, whole.choices[0].finish_reason)


@pytest.mark.parametrize("which", ["chat", "base"])
def test_chat_completions_equal_tformer_chat(server, client, runs, which):
    """The chat template for a chat run, a plain transcript for a base run, as `tformer chat`."""
    system, user = "Answer briefly.", "What is a list?"
    args = ["-m", runs[which], "--system", system, "--temperature", 0, "-n", N]
    cli = run_cli("chat", *args, "--precision", "fp32", stdin=user + "\n")
    assert cli.exit_code == 0, cli.stderr
    expected = cli.stdout.strip()  # one line per reply; chat's default repetition penalty 1.1
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    args = dict(model=which, messages=messages, max_tokens=N, temperature=0)
    extra = {"repetition_penalty": 1.1}
    whole = client.chat.completions.create(**args, extra_body=extra)
    text = whole.choices[0].message.content
    assert text.strip().replace("\n", "\\n") == expected
    if which == "base":
        assert text == text.strip()  # a base model's reply is stripped, as chat strips it
    stream = client.chat.completions.create(**args, extra_body=extra, stream=True)
    assert streamed_text(stream)[0] == text


def test_chat_prompts_are_rendered_as_tformer_chat_renders_them(server, runs):
    state = server.app.state.tformer
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    for name in ("chat", "base"):
        model = state.models[name]
        session = ChatSession(model.run.model, model.run.tokenizer, model.mode, SamplingConfig())
        session.set_system("Be terse.")
        req = ChatCompletionRequest.model_validate_json(json.dumps({"messages": messages}))
        plan = plan_chat(model, req, state.settings)
        assert plan.rows[0].prompt == session.prompt_ids_for(messages[1:])
    assert state.models["chat"].mode == "chat" and state.models["base"].mode == "plain"


def test_choices_seeds_stops_and_finish_reasons(server, client):
    args = dict(model="base", prompt=PROMPT, max_tokens=N, temperature=0.9, seed=5, n=2)
    first = client.completions.create(**args)
    again = client.completions.create(**args)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]  # the same seed, the same choices
    assert [c.index for c in first.choices] == [0, 1]
    reference = client.completions.create(
        model="base", prompt=PROMPT, max_tokens=N, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reference.choices[0].finish_reason == "length"
    assert reference.usage.completion_tokens == N
    stop = reference.choices[0].text[8:11]
    cut = client.completions.create(
        model="base",
        prompt=PROMPT,
        max_tokens=N,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == reference.choices[0].text.split(stop)[0]
    echoed = client.completions.create(model="base", prompt=PROMPT, max_tokens=2, echo=True)
    assert echoed.choices[0].text.startswith(PROMPT)


def test_models_health_and_the_api_key(server, client):
    assert [m.id for m in client.models.list().data] == ["base", "chat"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed
    assert client.models.retrieve("chat").id == "chat"
    for key in (None, "wrong"):
        r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


LONG_PROMPT = "word " * 400  # over the 256-token window of the nano model
C, CHAT = "/v1/completions", "/v1/chat/completions"


def bad(name, path, body, status, code=None, param=None):
    return pytest.param(path, body, status, code, param, id=name)


def says(content) -> dict:
    return {"messages": [{"role": "user", "content": content}]}


BAD = [
    bad("malformed JSON", C, b'{"prompt": "x",', 400, "json_invalid"),
    bad("not an object", C, b"[1, 2]", 422, "model_type"),
    bad("wrong type", C, {"prompt": "x", "temperature": "hot"}, 422, param="temperature"),
    bad("out of range", C, {"prompt": "x", "top_p": 1.5}, 422, param="top_p"),
    bad("unknown field", C, {"prompt": "x", "frobnicate": 1}, 422, "extra_forbidden", "frobnicate"),
    bad("bad prompt type", C, {"prompt": {"a": 1}}, 422, param="prompt"),
    bad("unknown model", C, {"model": "gpt-4", "prompt": "x"}, 404, "model_not_found", "model"),
    bad("prompt too long", C, {"prompt": LONG_PROMPT}, 400, "context_length_exceeded", "prompt"),
    bad("chat too long", CHAT, says(LONG_PROMPT), 400, "context_length_exceeded", "messages"),
    bad("max_tokens over the cap", C, {"prompt": "x", "max_tokens": 5000}, 400, None, "max_tokens"),
    bad("too many choices", C, {"prompt": "x", "n": 5}, 400, param="n"),
    bad("no messages", CHAT, {"messages": []}, 422, param="messages"),
    bad("unknown role", CHAT, {"messages": [{"role": "wizard"}]}, 422, param="messages.0.role"),
    bad("image content", CHAT, says([{"type": "image_url"}]), 400, param="messages.0.content"),
    bad("unsupported", C, {"prompt": "x", "presence_penalty": 0.5}, 400, param="presence_penalty"),
    bad("token id out of range", C, {"prompt": [1, 99999]}, 400, param="prompt"),
    bad("body over the limit", C, b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413),
]


@pytest.mark.parametrize("path, body, status, code, param", BAD)
def test_bad_inputs_get_their_status_and_the_server_goes_on(
    server, client, path, body, status, code, param
):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in r.text
    if code:
        assert error["code"] == code
    if param:
        assert error["param"] == param
    if code == "context_length_exceeded":
        assert "limit of 255" in error["message"]  # the limit is named
    ok = client.completions.create(model="base", prompt="x", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_unknown_routes_and_methods_are_openai_shaped(server):
    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("no such route")
    r = httpx.get(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()


def test_a_disconnecting_client_frees_its_row(server, client):
    """A client that hangs up mid-stream, or gives up waiting for a whole answer, leaves the
    batch at the next step: its row stops long before its max_tokens."""
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 4096, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    url = server.url + "/v1/completions"
    before = idle(server)["models"]["base"]["generated_tokens"]
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"text": ""' not in line:
                break  # a token arrived: the row is decoding; now hang up
    after = idle(server)["models"]["base"]["generated_tokens"]
    assert 0 < after - before < 4096
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=0.5)
    assert idle(server)["models"]["base"]["generated_tokens"] - after < 4096
    again = client.completions.create(model="base", prompt=PROMPT, max_tokens=3, temperature=0)
    assert again.usage.completion_tokens <= 3


def test_metrics_and_the_access_log(server, client, caplog):
    with caplog.at_level(logging.INFO, logger="tformer.serve"):
        client.completions.create(model="chat", prompt=PROMPT, max_tokens=5, temperature=0)
        deadline = time.monotonic() + 30
        while not any("/v1/completions" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    line = next(r.getMessage() for r in caplog.records if "/v1/completions" in r.getMessage())
    assert '"POST /v1/completions" 200' in line and "model=chat" in line and "new=" in line
    assert "first=" in line
    m = metrics(server)
    assert m["models"]["chat"]["requests"] >= 1 and m["peak_batch_size"] >= 1
    assert m["responses"]["200"] >= 1
    text = httpx.get(
        server.url + "/metrics?format=prometheus", headers={"Authorization": f"Bearer {KEY}"}
    ).text
    assert 'tformer_generated_tokens{model="chat"}' in text
