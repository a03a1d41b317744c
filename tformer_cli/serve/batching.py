"""Continuous batching: the rows of many requests decoded together through one KV cache.

`DecodeBatch` holds the rows being decoded and one KV cache of (max_rows, window) slots. All
rows write their next token at the same cache slot (`width`, the slots in use), as the engine's
left-padded batches do: row i's context fills slots pad_i..width-1, its positions count from 0 at
its own first slot, and a key mask hides every slot before it. So rows can come and go between
steps:

- **join**: a new request's prompt is prefilled alone (exactly what `tformer generate` computes
  for it) into a scratch cache and copied into a free row, right-aligned so that its last token
  sits in the slot before `width`. A prompt longer than `width` first moves every row's slots
  right to make room; the keys do not change, since positions live inside them (RoPE) or in the
  hidden states they came from (learned, sinusoidal).
- **leave**: a finished or cancelled row is replaced by the last row (one row's cache copied),
  so the active rows stay the first n of the cache and a step decodes a view of them.
- **slide**: a row whose own context fills the window goes on as `TokenEngine` does alone: its
  last half window is prefilled again (positions from 0) and placed like a joining prompt.
- **compact**: when `width` reaches the end of the cache, or the rows no longer use its first
  half, every row moves left by the slots none of them uses. A lone row always sits at slot 0,
  where it decodes without a mask, exactly as it would alone.

Each row keeps its own sampling settings, seed (its own generator), stop strings and
repetition-penalty state; greedy rows are picked in one argmax. `Scheduler` runs a DecodeBatch
on a thread of its own: requests queue, join at the next step while rows are free, and get their
text through a callback as each step ends.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from models import KVCache, Transformer
from tformer_cli.data.tokenizer import Tokenizer
from tformer_cli.inference.sampling import SamplingConfig, sample
from tformer_cli.inference.text import StreamDecoder, end_ids

log = logging.getLogger("tformer.serve")
GREEDY = SamplingConfig(temperature=0)
RATE_WINDOW = 10.0  # seconds of history behind the tokens/s figure


@dataclass(frozen=True)
class RowSpec:
    """What one row (one choice of a request) asks for: its prompt ids and how to continue it."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=lambda: GREEDY)
    seed: int | None = None
    stops: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Event:
    """What a request hears after a step: a row's new text, or that it finished, or an error."""

    index: int  # the row (choice) within its request; -1 for an error of the whole request
    text: str = ""
    tokens: int = 0  # tokens the row has generated so far
    finish: str | None = None  # "stop" (EOS or a stop string) or "length" once the row ended
    error: str | None = None
    status: int = 500  # the HTTP status an error maps to


class Job:
    """One request: its rows, where its events go (`deliver`, called on the scheduler's thread
    with each step's events), cancellation and time limit."""

    def __init__(
        self,
        rows: list[RowSpec],
        deliver: Callable[[list[Event]], None],
        timeout: float | None = None,
    ):
        if not rows:
            raise ValueError("a job needs at least one row")
        self.rows, self.deliver = rows, deliver
        self.created = time.monotonic()
        self.deadline = None if timeout is None else self.created + timeout
        self.cancelled = False
        self.timed_out = False
        self.first_token_at: float | None = None
        self.open_rows = len(rows)
        self._events: list[Event] = []

    def cancel(self) -> None:
        """Drop the request (its client left): its rows leave the batch at the next step."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        """Whether every row has ended (or the job failed)."""
        return self.open_rows == 0

    def expired(self, now: float) -> bool:
        """Whether the time limit has passed."""
        return self.deadline is not None and now >= self.deadline

    def add(self, event: Event) -> None:
        """Gather an event for the next flush (and note when the first token came)."""
        if event.tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self._events.append(event)

    def fail(self, message: str, status: int) -> None:
        """End the request with an error (nothing more follows)."""
        self.open_rows = 0
        self._events.append(Event(-1, error=message, status=status))
        self.flush()

    def flush(self) -> None:
        """Hand the events gathered in a step to the request (one call per step)."""
        if not self._events:
            return
        events, self._events = self._events, []
        try:
            self.deliver(events)
        except Exception:  # noqa: BLE001 - a request whose receiver is gone must not stop others
            log.debug("a request could not take its events", exc_info=True)
            self.cancelled = True


class _Row:
    """A row of the batch: its tokens, where its context sits in the cache, how it samples."""

    def __init__(self, job: Job, index: int, tokenizer: Tokenizer, vocab: int, ends, device):
        spec = job.rows[index]
        self.job, self.index, self.spec = job, index, spec
        self.tokens = list(spec.prompt)  # the prompt and every token generated (no EOS)
        self.start = 0  # where the cached context begins in tokens (moves when the window slides)
        self.pad = 0  # the first cache slot of the context
        self.pending: int | None = None  # the newest token: sampled, not yet in the cache
        self.generated = 0
        self.finish: str | None = None
        self.decoder = StreamDecoder(tokenizer, spec.stops)
        self.ends = frozenset() if spec.ignore_eos else frozenset(ends)
        self.generator = None
        if spec.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(spec.seed)
        self.seen = None  # (1, vocab) the tokens the repetition penalty hits
        if spec.sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, [t for t in self.tokens if t < vocab]] = True

    def take(self, token: int) -> None:
        """The row's next token: an end token finishes it, anything else becomes text."""
        if token in self.ends:
            self.end("stop")
            return
        self.generated += 1
        self.tokens.append(token)
        self.pending = token
        if self.seen is not None:
            self.seen[0, token] = True
        text = self.decoder.push(token)
        self.job.add(Event(self.index, text, self.generated))
        if self.decoder.stopped:
            self.end("stop")
        elif self.generated >= self.spec.max_new_tokens:
            self.end("length")

    def end(self, reason: str) -> None:
        """Finish the row: what the decoder still holds, then its finish reason."""
        if self.finish is not None:
            return
        self.finish, self.pending = reason, None
        self.job.open_rows -= 1
        if reason != "cancelled":
            self.job.add(Event(self.index, self.decoder.finish(), self.generated, finish=reason))


class _RowsView(KVCache):
    """The first n rows of a batch's cache, sharing its memory (a step decodes only those)."""

    def __init__(self, cache: KVCache, n: int):  # no super().__init__(): nothing to allocate
        self.k, self.v = cache.k[:, :n], cache.v[:, :n]


class DecodeBatch:
    """The rows decoded together and their shared KV cache; see the module's docstring.

    Not thread-safe: one thread adds jobs and steps (the Scheduler's, or a test's).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_rows: int):
        self.model, self.tokenizer, self.max_rows = model, tokenizer, max_rows
        self.window = model.config.max_seq_len
        self.keep = max(1, self.window // 2)  # what a slide keeps, as TokenEngine does
        self.vocab = min(tokenizer.vocab_size, model.config.vocab_size)
        self.ends = end_ids(tokenizer)
        self.device = model.tok_emb.weight.device
        self.cache = model.new_cache(max_rows, self.window)
        self.rows: list[_Row] = []
        self.width = 0  # cache slots in use; every row writes its next token here
        self.sampled = 0  # tokens sampled since the start (each prefill and each row's step)

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return len(self.rows)

    @property
    def free(self) -> int:
        """Rows that can still join."""
        return self.max_rows - len(self.rows)

    # -- joining, leaving, sliding ------------------------------------------------------------

    def add(self, job: Job) -> None:
        """Prefill the job's rows and sample their first tokens; they decode from the next step."""
        if len(job.rows) > self.free:
            raise ValueError(f"{len(job.rows)} rows do not fit: {self.free} free")
        if any(not 0 < len(r.prompt) <= self.window for r in job.rows):
            raise ValueError(f"a prompt must hold 1 to {self.window} tokens (the context window)")
        for index in range(len(job.rows)):
            row = _Row(job, index, self.tokenizer, self.vocab, self.ends, self.device)
            self.rows.append(row)
            self._prefill(len(self.rows) - 1)

    def _prefill(self, i: int) -> None:
        """Run row i's context through the model alone, place it in the cache, sample from it."""
        row = self.rows[i]
        ctx = row.tokens[row.start :]
        scratch = self.model.new_cache(1, len(ctx))
        idx = torch.tensor([ctx], device=self.device)
        logits = self.model.last_logits(idx, scratch, 0)[:, : self.vocab]
        if len(ctx) > self.width:
            self._shift(len(ctx) - self.width, exclude=i)
        lo = self.width - len(ctx)
        self.cache.k[:, i, :, lo : self.width] = scratch.k[:, 0]
        self.cache.v[:, i, :, lo : self.width] = scratch.v[:, 0]
        row.pad, row.pending = lo, None
        row.take(self._sample([row], logits)[0])

    def _shift(self, d: int, exclude: int = -1) -> None:
        """Move every row's slots right by d (room for a longer context on the left)."""
        n, w = len(self.rows), self.width
        for cache in (self.cache.k, self.cache.v):
            cache[:, :n, :, d : w + d] = cache[:, :n, :, :w].clone()
        self.width += d
        for i, row in enumerate(self.rows):
            if i != exclude:
                row.pad += d

    def _compact(self, d: int) -> None:
        """Move every row's slots left by d (slots no row uses any more)."""
        n, w = len(self.rows), self.width
        for cache in (self.cache.k, self.cache.v):
            cache[:, :n, :, : w - d] = cache[:, :n, :, d:w].clone()
        self.width -= d
        for row in self.rows:
            row.pad -= d

    def retire(self, leaving: Callable[[_Row], str | None] = lambda row: None) -> None:
        """Remove finished rows, and those leaving() gives a reason for ("cancelled", "length")."""
        i = 0
        while i < len(self.rows):
            row = self.rows[i]
            if row.finish is None and (reason := leaving(row)):
                row.end(reason)
            if row.finish is None:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:  # the last row takes this one's place: the active rows stay first
                self.cache.k[:, i, :, : self.width] = self.cache.k[:, last, :, : self.width]
                self.cache.v[:, i, :, : self.width] = self.cache.v[:, last, :, : self.width]
                self.rows[i] = self.rows[last]
            self.rows.pop()
        if not self.rows:
            self.width = 0

    # -- one step -----------------------------------------------------------------------------

    def step(self) -> int:
        """Slide the rows that fill the window, then decode one token for every row.

        Returns how many rows were decoded together. Call retire() first: every row here has
        a pending token.
        """
        for i, row in enumerate(self.rows):
            if row.finish is None and self.width - row.pad == self.window:  # full: slide
                row.start = max(row.start, len(row.tokens) - self.keep)
                self._prefill(i)
        self.retire()
        n = len(self.rows)
        if not n:
            return 0
        shift = min(row.pad for row in self.rows)
        if shift and (self.width == self.window or n == 1 or shift >= self.width // 2):
            self._compact(shift)
        logits = self._decode()
        for row, token in zip(self.rows, self._sample(self.rows, logits), strict=True):
            row.take(token)
        return n

    def _decode(self) -> torch.Tensor:
        """Logits (n, vocab) after each row's pending token, written at slot width."""
        n, w = len(self.rows), self.width
        tokens = torch.tensor([[row.pending] for row in self.rows], device=self.device)
        pos = key_mask = None
        if any(row.pad for row in self.rows):
            pads = torch.tensor([row.pad for row in self.rows], device=self.device)
            pos = (w - pads)[:, None]  # (n, 1): each row's position of its pending token
            key_mask = torch.arange(self.window, device=self.device)[None] >= pads[:, None]
        view = _RowsView(self.cache, n)
        logits = self.model.last_logits(tokens, view, w, pos=pos, key_mask=key_mask)
        self.width += 1
        return logits[:, : self.vocab]

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token from its logits row, by its own settings and generator.

        Greedy rows without a repetition penalty are picked in one argmax; the others one by one,
        each with its own generator, so a seeded row draws what it would draw alone.
        """
        self.sampled += len(rows)
        out = [0] * len(rows)
        greedy = [i for i, r in enumerate(rows) if r.spec.sampling.greedy and r.seen is None]
        if greedy:
            picked = logits if len(greedy) == len(rows) else logits[greedy]
            for i, token in zip(greedy, sample(picked, GREEDY).tolist(), strict=True):
                out[i] = token
        for i, row in enumerate(rows):
            if not (row.spec.sampling.greedy and row.seen is None):
                token = sample(logits[i : i + 1], row.spec.sampling, row.generator, row.seen)
                out[i] = int(token[0])
        return out


@dataclass
class SchedulerStats:
    """What /metrics and --stats show of one model's scheduler (written by its thread)."""

    queued: int = 0
    running: int = 0  # requests with rows in the batch
    batch_size: int = 0  # rows in the batch now
    peak_batch_size: int = 0  # the most rows one step decoded together
    requests: int = 0  # requests finished (or failed) since the start
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    started: float = field(default_factory=time.monotonic)
    history: deque = field(default_factory=deque, repr=False)  # (time, tokens) of recent steps
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, now: float, tokens: int) -> None:
        """Count the tokens of a step that ended at now."""
        with self.lock:
            self.generated_tokens += tokens
            self.history.append((now, tokens))
            self._forget(now)

    def _forget(self, now: float) -> None:
        while self.history and self.history[0][0] < now - RATE_WINDOW:
            self.history.popleft()

    def tokens_per_s(self) -> float:
        """Tokens generated per second over the last RATE_WINDOW seconds (0 when idle)."""
        now = time.monotonic()
        with self.lock:
            self._forget(now)
            recent = sum(t for _, t in self.history)
        return recent / max(1e-9, min(RATE_WINDOW, now - self.started))

    def snapshot(self) -> dict[str, float]:
        """The figures as a dict (what /metrics shows per model)."""
        names = (
            "queued running batch_size peak_batch_size requests prompt_tokens generated_tokens "
            "steps"
        ).split()
        return {
            **{name: getattr(self, name) for name in names},
            "tokens_per_s": self.tokens_per_s(),
        }


class QueueFull(Exception):
    """The scheduler's queue holds max_queue requests already."""


class Scheduler:
    """A DecodeBatch on a thread of its own: requests queue, join the batch at the next step
    while it has free rows (oldest first), and leave as they finish, time out or are cancelled.

    The thread starts with start() and ends with stop(); hold() keeps queued requests out of the
    batch until it ends, so that they join together (tests and benchmarks).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_rows: int, max_queue: int):
        self.batch = DecodeBatch(model, tokenizer, max_rows)
        self.max_queue = max_queue
        self.stats = SchedulerStats()
        self._queue: deque[Job] = deque()
        self._running: set[Job] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._held = 0
        self._thread: threading.Thread | None = None
        self._counted = 0  # batch.sampled already in the stats

    def start(self) -> None:
        """Start the decoding thread."""
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tformer-decode", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread; requests still queued or running end with an error."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        """Queue a request (QueueFull when max_queue are waiting already)."""
        if len(job.rows) > self.batch.max_rows:
            raise ValueError(f"a request may have at most {self.batch.max_rows} rows")
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already")
            self._queue.append(job)
            self.stats.queued = len(self._queue)
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep queued requests waiting until the block ends; then they join in one step."""
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while (joining := self._wait_for_work()) is not None:
                try:
                    self._iteration(joining)
                except Exception as e:  # noqa: BLE001 - one bad step must not end the server
                    log.exception("decoding failed")
                    self._fail_all(f"decoding failed: {type(e).__name__}: {e}", joining)
        self._fail_all("the server is shutting down", [], status=503)

    def _wait_for_work(self) -> list[Job] | None:
        """The queued jobs that join now (possibly none while rows decode); None to stop."""
        with self._cond:
            while not self._stopping and not self.batch.rows and (self._held or not self._queue):
                self._cond.wait()
            if self._stopping:
                return None
            joining, free, now = [], self.batch.free, time.monotonic()
            while self._queue and not self._held:
                job = self._queue[0]
                if job.cancelled or job.expired(now):
                    self._queue.popleft()
                    if not job.cancelled:
                        job.fail("the request waited in the queue past its time limit", 503)
                    continue
                if len(job.rows) > free:
                    break  # first come, first served: a big request is not overtaken
                joining.append(self._queue.popleft())
                free -= len(job.rows)
            self.stats.queued = len(self._queue)
            return joining

    def _iteration(self, joining: list[Job]) -> None:
        """Admit the joining jobs, retire rows that are done, decode one step, hand out text."""
        self._running.update(joining)
        self.stats.running = len(self._running)  # in flight from here: no longer queued
        for job in joining:
            self.stats.prompt_tokens += sum(len(r.prompt) for r in job.rows)
            self.batch.add(job)
        now = time.monotonic()
        self.batch.retire(lambda row: self._leaving(row, now))
        n = self.batch.step()
        if n:
            self.stats.steps += 1
            self.stats.peak_batch_size = max(self.stats.peak_batch_size, n)
        self.batch.retire()
        self.stats.batch_size = self.batch.size
        for job in self._running:
            job.flush()
        finished = {job for job in self._running if job.done}
        self._running -= finished
        self.stats.requests += len(finished)
        self.stats.running = len(self._running)
        self.stats.record(time.monotonic(), self.batch.sampled - self._counted)
        self._counted = self.batch.sampled

    @staticmethod
    def _leaving(row: _Row, now: float) -> str | None:
        if row.job.cancelled:
            return "cancelled"
        if row.job.expired(now):
            row.job.timed_out = True
            return "length"
        return None

    def _fail_all(self, message: str, joining: list[Job], status: int = 500) -> None:
        """Every request running, joining or queued ends with an error; the batch empties."""
        with self._cond:
            queued = list(self._queue)
            self._queue.clear()
            self.stats.queued = 0
        jobs = {row.job for row in self.batch.rows} | set(joining) | self._running | set(queued)
        self.batch.rows.clear()
        self.batch.width = 0
        self._running.clear()
        for job in jobs:
            if not job.done:
                job.fail(message, status)
        self.stats.running = self.stats.batch_size = 0
