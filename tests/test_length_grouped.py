"""`train_sampling_strategy="group_by_length"`: transformers' grouping, vectorised, at a million rows."""

import numpy as np
import torch
from datasets import Dataset
from transformers.trainer_pt_utils import get_length_grouped_indices

from tests.conftest import reward_rows
from trl_rpo import RPOTrainer
from trl_rpo.data import LengthGroupedSampler


def test_same_order_as_transformers_grouping():
    """Same permutation draw, same mega-batches, same longest-first order and the longest row first: the lengths come
    out in exactly transformers' order (ties may swap rows of equal length)."""
    lengths = np.random.default_rng(0).integers(1, 40, size=203)  # not a multiple of the batch; many ties
    ours = LengthGroupedSampler(lengths, batch_size=4, generator=torch.Generator().manual_seed(3)).indices()
    theirs = get_length_grouped_indices(lengths.tolist(), 4, generator=torch.Generator().manual_seed(3))
    assert lengths[ours.numpy()].tolist() == lengths[theirs].tolist()
    mega = 4 * min(203 // 16, 50)
    for start in range(0, 203, mega):
        assert set(ours[start : start + mega].tolist()) == set(theirs[start : start + mega])
    assert lengths[ours[0]] == lengths.max()


def test_a_million_rows():
    lengths = np.random.default_rng(1).lognormal(5, 1, size=1_000_000).astype(np.int64) + 1
    sampler = LengthGroupedSampler(lengths, batch_size=8)
    order = sampler.indices().numpy()
    assert np.array_equal(np.sort(order), np.arange(len(lengths)))  # every row once
    assert len(sampler) == len(lengths)
    assert lengths[order[0]] == lengths.max()
    grouped = lengths[order[1:400]]  # inside the first mega-batch (50 × 8 rows): longest first
    assert np.all(grouped[:-1] >= grouped[1:])

    # Batches of similar lengths: the padded tokens of 8-row batches fall well below a random order's.
    def padding(indices):
        batches = lengths[indices[: len(indices) // 8 * 8]].reshape(-1, 8)
        return (batches.max(1, keepdims=True) - batches).sum()

    assert padding(order) < 0.1 * padding(np.random.default_rng(2).permutation(len(lengths)))


def test_the_trainer_groups_by_the_length_column(model_dir, make_args):
    rows = reward_rows(num_prompts=8)
    rows["completion"] = [c * (1 + i % 5) for i, c in enumerate(rows["completion"])]  # lengths from 1× to 5×
    dataset = Dataset.from_dict(rows)
    args = make_args(train_sampling_strategy="group_by_length", padding_free=True, per_device_train_batch_size=2)
    trainer = RPOTrainer(model_dir, args=args, train_dataset=dataset)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    assert sampler.lengths.tolist() == trainer.train_dataset["length"]
    assert sampler.mega_batch_size == 2 * 3  # min(24 // 8, 50) mega-batches of the batch size
    trainer.train()
    assert trainer.state.global_step == 3
