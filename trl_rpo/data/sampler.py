"""Length-grouped batches for a million rows: transformers' grouping, vectorised."""

import numpy as np
import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """
    Indices in an order where each run of `batch_size` rows has similar lengths, with some randomness kept.

    The grouping is transformers' `LengthGroupedSampler`: shuffle, cut into mega-batches of `mega_batch_mult ×
    batch_size` rows (50, or fewer to have at least 4 mega-batches), sort each by length (longest first), and put
    the longest row of all first so that an out-of-memory error comes at the first step. Here it is one `randperm`
    and one stable sort over (mega-batch, −length) on the lengths array, read once from the dataset's Arrow column:
    no Python work per row, so a million rows take milliseconds instead of seconds. Each pass draws a new
    permutation from `generator` (torch's global generator when `None`, which the Trainer seeds, as transformers'
    sampler does).

    Example:

    ```python
    >>> sampler = LengthGroupedSampler(np.array([3, 9, 1, 7, 5, 2, 8, 4]), batch_size=2, mega_batch_mult=2)
    >>> [int(i) for i in sampler]  # doctest: +SKIP
    [1, 3, 2, 0, 6, 4, 7, 5]
    ```
    """

    def __init__(self, lengths, batch_size: int, mega_batch_mult: int | None = None, generator=None):
        self.lengths = torch.as_tensor(np.asarray(lengths, dtype=np.int64))
        if mega_batch_mult is None:
            mega_batch_mult = max(min(len(self.lengths) // (batch_size * 4), 50), 1)
        self.mega_batch_size = mega_batch_mult * batch_size
        self.generator = generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(self.indices().tolist())

    def indices(self) -> torch.Tensor:
        order = torch.randperm(len(self.lengths), generator=self.generator)
        if len(order) == 0:
            return order
        mega_batch = torch.arange(len(order)) // self.mega_batch_size
        lengths = self.lengths[order]
        # One sort key: mega-batch first, then longest first inside it (stable, so ties keep the shuffled order).
        key = mega_batch * (int(lengths.max()) + 1) + (lengths.max() - lengths)
        order = order[torch.sort(key, stable=True).indices]
        longest = int(torch.argmax(self.lengths[order]))  # the first maximum: the head of its mega-batch
        order[[0, longest]] = order[[longest, 0]]
        return order


class PromptGroupedSampler(Sampler[int]):
    """
    Indices with each prompt's rows side by side: prompts in a random order, and a random order inside each prompt.

    A batch of consecutive indices then holds whole prompts when its size is a multiple of the rows per prompt (and
    at most two pieces of a prompt otherwise), which a loss over each prompt's rows in the batch needs
    (`RPOConfig.level_weight`). One `randperm` over the prompts, one over the rows, and a stable sort: no Python
    work per row. Each pass draws new orders from `generator` (torch's global generator when `None`, which the
    Trainer seeds).

    Example:

    ```python
    >>> sampler = PromptGroupedSampler(np.array([7, 7, 3, 3, 3, 9]))
    >>> [int(i) for i in sampler]  # doctest: +SKIP
    [4, 2, 3, 5, 1, 0]
    ```
    """

    def __init__(self, group_keys, generator=None):
        _, self.groups = np.unique(np.asarray(group_keys), return_inverse=True)
        self.groups = torch.as_tensor(self.groups.astype(np.int64))
        self.generator = generator

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.indices().tolist())

    def indices(self) -> torch.Tensor:
        if len(self.groups) == 0:
            return self.groups.clone()
        rank = torch.randperm(int(self.groups.max()) + 1, generator=self.generator)  # each prompt's place
        rows = torch.randperm(len(self.groups), generator=self.generator)  # rows shuffled, then sorted by place
        return rows[torch.sort(rank[self.groups[rows]], stable=True).indices]
