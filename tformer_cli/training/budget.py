"""--time: a wall-clock budget for the whole command, and the clock the training loop reads.

The budget counts from when the command began: training the tokenizer and pre-tokenising are
spent already. It makes two decisions, both from measured step, eval and sample times: before
each step, whether one more still leaves room for the final eval, the closing sample and the
save (out_of_time); and every few steps, at which step the time runs out (fit), so that the
learning-rate schedule ends with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# The step count a run under --time plans for until its first fit; no run reaches it.
UNTIL_FITTED = 10**9
STEP_TIMES_KEPT = 50
RECENT_STEPS = 20  # the fit uses the median of these, so it follows the machine's current speed
FIRST_FIT = 5  # steps into the run: enough for a median once the first (warm-up) step is past


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


class TimeBudget:
    """The loop's clock, and under --time (seconds) when to stop and how many steps fit.

    clock is time.perf_counter unless given (a test passes a virtual one). Without --time the
    budget only measures: out_of_time is always False and fit always None.
    """

    def __init__(self, seconds: float | None, clock: Callable[[], float] | None = None):
        self.clock = clock or time.perf_counter
        self.began = self.clock()  # when the command began
        self.seconds = seconds
        self.left: float | None = None  # what the loop may spend (settle)
        self.started = self.began  # when the loop started (start)
        self.eval_batches = 0
        self.step_times: list[float] = []
        self.eval_seconds = 0.0  # every eval so far, with the best-checkpoint saves it made
        self.sample_seconds = 0.0

    @property
    def limited(self) -> bool:
        """Whether the run stops on time (rather than at a step count)."""
        return bool(self.left)

    def settle(self) -> None:
        """Fix what the loop may spend: --time less what setting up took (None without --time)."""
        self.left = self.seconds - (self.clock() - self.began) if self.seconds else None

    def start(self, eval_batches: int, sampling: bool) -> None:
        """The loop starts now; what it spends counts from here."""
        self.eval_batches = eval_batches
        self.sample_seconds = 1.0 if sampling else 0.0  # refined once a sample has been timed
        self.started = self.clock()

    def elapsed(self) -> float:
        """Seconds since the loop started."""
        return self.clock() - self.started

    def out_of_time(
        self, last_eval: dict[str, Any] | None, any_rank: Callable[[bool], bool]
    ) -> bool:
        """Whether one more step would leave too little time to evaluate, sample and save.

        any_rank makes the answer the same on every process (all stop at the same step); it is
        asked on every process or on none.
        """
        if not self.limited or not self.step_times:
            return False
        elapsed = self.elapsed()
        settled = self.step_times[1:] or self.step_times  # the first step carries warm-up costs
        per_step = _median(settled)
        # The final eval runs forward passes only: about a third of a step per batch.
        final_eval = last_eval["eval_seconds"] if last_eval else self.eval_batches * per_step / 3
        reserve = per_step + final_eval + self.sample_seconds + 0.5  # 0.5: the save
        return any_rank(elapsed + reserve >= self.left)

    def fit(self, step: int, ran: int, every: int) -> int | None:
        """The step at which the time runs out, or None when no fit is due.

        Due at the FIRST_FIT-th step of this run and every `every` steps after: the machine may
        speed up or slow down under other load, so the fit follows it. Evals are spread over
        the steps.
        """
        if not self.limited or not (ran == FIRST_FIT or (ran > FIRST_FIT and step % every == 0)):
            return None
        per_step = _median(self.step_times[-RECENT_STEPS:]) + self.eval_seconds / max(1, ran)
        remaining = self.left - self.elapsed()
        return step + max(1, int(remaining / per_step))

    @contextmanager
    def timing_step(self) -> Iterator[None]:
        """Time one optimizer step (a step that raises is not counted)."""
        t = self.clock()
        yield
        self.step_times = [*self.step_times, self.clock() - t][-STEP_TIMES_KEPT:]

    @contextmanager
    def timing_eval(self) -> Iterator[None]:
        """Time an eval, with the best-checkpoint save it may make."""
        t = self.clock()
        yield
        self.eval_seconds += self.clock() - t

    @contextmanager
    def timing_sample(self) -> Iterator[None]:
        """Time a sample, even one that fails (its cost is what the reserve needs)."""
        t = self.clock()
        try:
            yield
        finally:
            self.sample_seconds = self.clock() - t
