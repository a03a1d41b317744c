"""Many clients at once against one server on a nano model: every reply complete and equal to the
request's greedy text alone, requests decoded together (/metrics), and a request sent while a
long one decodes answered before that one ends (continuous batching, by order of events)."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers_run import make_run, shared_tokenizer

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tformer_cli.inference.chat import chat_mode  # noqa: E402
from tformer_cli.inference.load import load_for_inference  # noqa: E402
from tformer_cli.inference.sampling import SamplingConfig  # noqa: E402
from tformer_cli.inference.text import generate  # noqa: E402
from tformer_cli.serve.app import create_app  # noqa: E402
from tformer_cli.serve.prompts import ServedModel, ServeSettings  # noqa: E402
from tformer_cli.serve.server import ServerThread  # noqa: E402

N = 20  # tokens per reply
WORDS = "data model object class function value method module import return yield".split()
PROMPTS = [" ".join(WORDS[i % len(WORDS) : i % len(WORDS) + 1 + i % 4]) for i in range(16)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = make_run(
        tmp_path_factory.mktemp("serve-load") / "nano",
        shared_tokenizer(500),
        seed=7,
        tie_embeddings=False,
    )
    run = load_for_inference(path, torch.device("cpu"), "fp32")
    return ServedModel("nano", run, chat_mode(run.info, run.tokenizer))


@pytest.fixture(scope="module")
def server(served):
    with ServerThread(create_app([served], ServeSettings(max_batch=16))) as s:
        yield s


@pytest.fixture(scope="module")
def expected(served):
    """Each prompt's greedy completion, generated alone."""
    tok, greedy = served.run.tokenizer, SamplingConfig(temperature=0)
    texts = []
    for prompt in PROMPTS:
        ids = [tok.bos_id, *tok.encode(prompt)]
        (done,), _ = generate(served.run.model, tok, [ids], greedy, N)
        texts.append(done.text)
    return texts


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=120)


def stream_text(api: openai.OpenAI, prompt: str, max_tokens: int = N, **extra) -> str:
    stream = api.completions.create(
        model="nano", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, **extra
    )
    return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


def concurrently(server, prompts: list[str]) -> tuple[list, list[threading.Thread]]:
    """Each prompt streamed by a client of its own, all at once; the texts (or errors)."""
    results: list[str | BaseException] = [""] * len(prompts)

    def one(i: int) -> None:
        try:
            results[i] = stream_text(client(server), prompts[i])
        except BaseException as e:  # noqa: BLE001 - reported by the test
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    return results, threads


def metrics(server) -> dict:
    return httpx.get(server.url + "/metrics", timeout=30).json()


def test_sixteen_streaming_clients_all_get_their_replies_decoded_together(server, expected):
    scheduler = server.app.state.tformer.schedulers["nano"]
    # 8 clients, held at the door until all 8 are queued: they join in one step
    with scheduler.hold():
        results, threads = concurrently(server, PROMPTS[:8])
        with scheduler._cond:
            assert scheduler._cond.wait_for(lambda: len(scheduler._queue) == 8, timeout=120)
    for t in threads:
        t.join(120)
    assert results == expected[:8]
    assert metrics(server)["peak_batch_size"] >= 8  # decoded together, not one after another
    # 16 clients as they come: every reply complete and equal to its text alone
    results, threads = concurrently(server, PROMPTS)
    for t in threads:
        t.join(120)
    assert results == expected
    m = metrics(server)
    assert m["models"]["nano"]["requests"] >= 24 and m["requests_in_flight"] == 0


def test_a_request_sent_during_a_long_one_is_answered_before_it_ends(server, expected):
    events: list[str] = []
    lock = threading.Lock()
    decoding = threading.Event()
    closed = threading.Event()

    def log(what: str) -> None:
        with lock:
            events.append(what)

    def long_request() -> None:
        greedy = dict(model="nano", temperature=0, stream=True)
        stream = client(server).completions.create(
            prompt=PROMPTS[0], max_tokens=4000, extra_body={"ignore_eos": True}, **greedy
        )
        with stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    decoding.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    log("long finished")
                if closed.is_set():
                    log("long closed")
                    return  # leaving the with-block hangs up: the row leaves the batch

    thread = threading.Thread(target=long_request)
    thread.start()
    assert decoding.wait(120)
    api = client(server)
    stream = api.completions.create(
        model="nano", prompt=PROMPTS[5], max_tokens=N, temperature=0, stream=True
    )
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            if not text:
                log("short first token")
            text += chunk.choices[0].text
    log("short finished")
    closed.set()
    thread.join(120)
    assert text == expected[5]  # joined mid-batch, the same text as alone
    assert events[:2] == ["short first token", "short finished"], events
    assert "long closed" in events and "long finished" not in events
