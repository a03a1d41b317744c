"""Continuous batching (tformer_cli/serve/batching.py): rows join and leave between steps, slide
past the window, and each gets what it would get alone (fp32); the scheduler's thread, queue,
hold, time limits and cancellation."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers_run import make_run, shared_tokenizer

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")

from models import load_model  # noqa: E402
from tformer_cli.data.tokenizer import load_tokenizer  # noqa: E402
from tformer_cli.inference.sampling import SamplingConfig  # noqa: E402
from tformer_cli.inference.text import generate  # noqa: E402
from tformer_cli.serve.batching import (  # noqa: E402
    DecodeBatch,
    Event,
    Job,
    QueueFull,
    RowSpec,
    Scheduler,
)

GREEDY = SamplingConfig(temperature=0)
TEXTS = (
    "The",
    "A function definition is an executable statement",
    "x",
    "Lists are mutable sequences, typically used to store collections of homogeneous items",
    "import",
)


def _loaded(directory, **model):
    run = make_run(directory, shared_tokenizer(500), seed=3, tie_embeddings=False, **model)
    model = load_model(run).eval().prepare_for_inference()
    return model, load_tokenizer(run / "tokenizer.model")


@pytest.fixture(scope="module")
def small_window(tmp_path_factory):
    """A nano model with a 48-token window, so that rows slide and the cache compacts."""
    return _loaded(tmp_path_factory.mktemp("serve-batch") / "w48", max_seq_len=48)


class Collect:
    """A job's events, by row: the text so far, the last token count, the finish."""

    def __init__(self, rows: int):
        self.text, self.tokens, self.finish = [""] * rows, [0] * rows, [None] * rows
        self.errors: list[Event] = []

    def __call__(self, events: list[Event]) -> None:
        for e in events:
            if e.error:
                self.errors.append(e)
                continue
            self.text[e.index] += e.text
            self.tokens[e.index] = e.tokens
            self.finish[e.index] = e.finish or self.finish[e.index]


def _prompt(tok, text, window):
    return [tok.bos_id, *tok.encode(text)][: window - 1]


def _drive(batch: DecodeBatch, arrivals: dict[int, list[Job]], limit: int = 2000) -> None:
    """Step the batch as the scheduler does, adding jobs at the steps given."""
    jobs: list[Job] = []
    with torch.inference_mode():
        for step in range(limit):
            for job in arrivals.get(step, []):
                jobs.append(job)
                batch.add(job)
            batch.retire()
            batch.step()
            batch.retire()
            for job in jobs:
                job.flush()
            if step > max(arrivals) and not batch.rows:
                return
    raise AssertionError("the batch did not finish")


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_rows_joining_at_different_steps_get_what_they_get_alone(tmp_path, pos):
    model, tok = _loaded(tmp_path / pos, max_seq_len=48, pos=pos)
    prompts = [_prompt(tok, t, 48) for t in TEXTS]
    assert max(len(p) for p in prompts) == 47  # one prompt fills the window but for the reply
    lengths = [120, 30, 70, 90, 5]  # 120 and 90 slide past the 48-token window
    alone = [
        generate(model, tok, [p], GREEDY, n, eos_ids=())[0][0]
        for p, n in zip(prompts, lengths, strict=True)
    ]
    sinks = [Collect(1) for _ in prompts]
    jobs = [
        Job([RowSpec(p, n, ignore_eos=True)], sink)
        for p, n, sink in zip(prompts, lengths, sinks, strict=True)
    ]
    # a short prompt first, longer ones later (the rows move right to make room for them), and
    # one more once the first rows have slid
    _drive(
        DecodeBatch(model, tok, max_rows=5),
        {0: [jobs[0]], 3: [jobs[1]], 10: jobs[2:4], 60: [jobs[4]]},
    )
    for sink, ref in zip(sinks, alone, strict=True):
        assert sink.text[0] == ref.text
        assert sink.tokens[0] == len(ref.ids) and sink.finish[0] == "length"


def test_rows_that_leave_early_leave_the_others_unchanged(small_window):
    model, tok = small_window
    prompts = [_prompt(tok, t, 48) for t in TEXTS[:4]]
    alone = [generate(model, tok, [p], GREEDY, 60, eos_ids=())[0][0] for p in prompts]
    sinks = [Collect(1) for _ in prompts]
    jobs = [
        Job([RowSpec(p, n, ignore_eos=True)], s)
        for p, n, s in zip(prompts, (60, 3, 60, 9), sinks, strict=True)
    ]
    batch = DecodeBatch(model, tok, max_rows=4)
    with torch.inference_mode():
        for job in jobs:
            batch.add(job)
        for _ in range(5):
            batch.retire()
            batch.step()
        jobs[2].cancel()  # a client that left: its row goes at the next step
        batch.retire(lambda row: "cancelled" if row.job.cancelled else None)
        assert batch.size == 2  # 3 tokens done, one cancelled; the 9-token row is still on
    _drive(batch, {0: []})
    for job in jobs:
        job.flush()
    assert sinks[0].text[0] == alone[0].text
    assert sinks[1].text[0] == generate(model, tok, [prompts[1]], GREEDY, 3, eos_ids=())[0][0].text
    assert sinks[3].text[0] == generate(model, tok, [prompts[3]], GREEDY, 9, eos_ids=())[0][0].text
    assert sinks[2].finish[0] is None  # a cancelled row says nothing more


def test_sampled_rows_draw_with_their_own_settings_and_seeds(small_window):
    model, tok = small_window
    configs = [
        (SamplingConfig(temperature=0.9, top_k=20), 11),
        (SamplingConfig(temperature=1.2, top_p=0.9, repetition_penalty=1.3), 12),
        (SamplingConfig(temperature=0.7, min_p=0.05), 13),
        (SamplingConfig(temperature=0, repetition_penalty=1.2), None),
    ]
    prompts = [_prompt(tok, t, 48) for t in TEXTS[:4]]
    alone = [
        generate(model, tok, [p], cfg, 70, seed=seed, eos_ids=())[0][0].text
        for p, (cfg, seed) in zip(prompts, configs, strict=True)
    ]
    sink = Collect(4)
    rows = [
        RowSpec(p, 70, cfg, seed, ignore_eos=True)
        for p, (cfg, seed) in zip(prompts, configs, strict=True)
    ]
    _drive(DecodeBatch(model, tok, max_rows=4), {0: [Job(rows, sink)]})
    assert sink.text == alone


def test_stop_strings_and_end_tokens_finish_a_row_with_stop(small_window):
    model, tok = small_window
    prompt = _prompt(tok, TEXTS[1], 48)
    (ref,), _ = generate(model, tok, [prompt], GREEDY, 40, eos_ids=())
    stop = ref.text[10:14]
    (stopped,), _ = generate(model, tok, [prompt], GREEDY, 40, stops=[stop], eos_ids=())
    first = ref.ids[0]  # as an end token, the row ends before its first token
    sink = Collect(1)
    ends = DecodeBatch(model, tok, max_rows=2)
    ends.ends = (first,)
    _drive(ends, {0: [Job([RowSpec(prompt, 40)], sink)]})
    assert sink.finish == ["stop"] and sink.tokens == [0] and sink.text == [""]
    sink = Collect(1)
    row = RowSpec(prompt, 40, stops=(stop,), ignore_eos=True)
    _drive(DecodeBatch(model, tok, 2), {0: [Job([row], sink)]})
    assert sink.finish == ["stop"] and sink.text == [stopped.text] and stop not in sink.text[0]


def _waiting(scheduler: Scheduler, n: int) -> None:
    with scheduler._cond:
        assert scheduler._cond.wait_for(lambda: len(scheduler._queue) == n, timeout=30)


def test_the_scheduler_batches_queued_requests_and_keeps_its_limits(small_window):
    model, tok = small_window
    scheduler = Scheduler(model, tok, max_rows=4, max_queue=3)
    prompt = _prompt(tok, TEXTS[0], 48)
    done = threading.Event()
    sinks = [Collect(1) for _ in range(3)]

    def last(sink):
        def deliver(events):
            sink(events)
            if all(s.finish[0] or s.errors for s in sinks):
                done.set()

        return deliver

    scheduler.start()
    try:
        with scheduler.hold():
            jobs = [Job([RowSpec(prompt, 20, ignore_eos=True)], last(s)) for s in sinks]
            for job in jobs:
                scheduler.submit(job)
            with pytest.raises(QueueFull):
                scheduler.submit(Job([RowSpec(prompt, 5)], lambda events: None))
            _waiting(scheduler, 3)
        assert done.wait(60)
        assert scheduler.stats.peak_batch_size == 3  # held, then decoded together
        assert [s.text for s in sinks] == [sinks[0].text] * 3
    finally:
        scheduler.stop()
    assert scheduler.stats.requests == 3 and scheduler.stats.queued == 0


def test_time_limits_end_queued_and_running_requests(small_window):
    model, tok = small_window
    scheduler = Scheduler(model, tok, max_rows=2, max_queue=4)
    prompt = _prompt(tok, TEXTS[0], 48)
    queued, running = Collect(1), Collect(1)
    started, finished = threading.Event(), threading.Event()

    def deliver(events):
        running(events)
        started.set()
        if running.finish[0]:
            finished.set()

    scheduler.start()
    try:
        with scheduler.hold():
            scheduler.submit(Job([RowSpec(prompt, 5)], queued, timeout=0))
            _waiting(scheduler, 1)
        job = Job([RowSpec(prompt, 10**6, ignore_eos=True)], deliver)
        scheduler.submit(job)
        assert started.wait(60)
        job.deadline = time.monotonic()  # the request decodes until its limit: make it now
        assert finished.wait(60)
    finally:
        scheduler.stop()
    assert queued.errors and queued.errors[0].status == 503
    assert running.finish == ["length"] and job.timed_out
