"""Training batches from a token file: random windows, reproducible from (seed, step) alone.

Because a step's batch depends only on the seed and the step number, resuming needs no data
cursor, and N processes that each take their slice of the global batch see exactly what one
process would.
"""

from __future__ import annotations

import numpy as np
import torch


class BatchSampler:
    """Random (x, y) windows of seq_len tokens from a 1-D token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill one window of {seq_len + 1}")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def offsets(self, step: int, batch_size: int) -> np.ndarray:
        """The window starts of one global batch."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=batch_size)

    def batch(
        self, step: int, batch_size: int, part: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (n, seq_len) for the rows `part` of step's global batch; y is x
        shifted by one."""
        rows = [self.tokens[o : o + self.seq_len + 1] for o in self.offsets(step, batch_size)[part]]
        data = torch.from_numpy(np.stack(rows).astype(np.int64))
        return data[:, :-1], data[:, 1:]
