"""TokenBatches (data/batches.py): next-token windows over memory-mapped shards, in an order that is a keyed
bijection of the sample numbers (O(batch) whatever the corpus size), each rank drawing its own rows, and a
fixed, evenly spread validation sample.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptoss_cli.data.batches import TokenBatches, permute


def test_token_batches_are_next_token_windows():
    stream = np.arange(50, dtype=np.uint16)
    data = TokenBatches([stream[:13], stream[13:31], stream[31:]], seq_len=4, batch_size=3, seed=0)  # 3 shards
    assert (data.num_samples, data.batches_per_epoch) == (12, 4)
    inputs, targets = data.batch(epoch=0, index=1)
    assert inputs.shape == targets.shape == (3, 4) and inputs.dtype == torch.int64
    assert torch.equal(targets, inputs + 1) and all(int(row[0]) % 4 == 0 for row in inputs)
    assert torch.equal(data.batch(0, 1)[0], inputs)  # a pure function of (seed, epoch, index)
    seen = torch.cat([data.batch(0, i)[0][:, 0] for i in range(4)])
    assert sorted(seen.tolist()) == list(range(0, 48, 4))  # one epoch visits every window once
    assert not torch.equal(
        torch.cat([data.batch(1, i)[0] for i in range(4)]), torch.cat([data.batch(0, i)[0] for i in range(4)])
    )
    # Each rank draws its own rows of the global batch.
    halves = TokenBatches([stream], seq_len=4, batch_size=4, seed=3)
    whole = halves.batch(2, 1)[0]
    assert torch.equal(torch.cat([halves.batch(2, 1, rank=r, world=2)[0] for r in (0, 1)]), whole)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection_for_every_size(n):
    order = permute(np.arange(n), n, seed=11, epoch=2)
    assert sorted(order.tolist()) == list(range(n))
    if n > 7:
        assert order.tolist() != list(range(n)) and not np.array_equal(order, permute(np.arange(n), n, 11, 3))


def test_validation_sample_is_fixed_and_spread():
    data = TokenBatches([np.arange(1001, dtype=np.uint32)], seq_len=10, batch_size=4, seed=0)
    batches = data.eval_batches(2)
    assert [b[0].shape for b in batches] == [(4, 10), (4, 10)]
    starts = [int(row[0]) for b in batches for row in b[0]]
    assert starts == sorted(set(starts)) and starts[0] == 0 and starts[-1] >= 800  # spread over the split
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, data.eval_batches(2), strict=True))
    assert len(data.eval_batches(100)) == 25  # all 100 samples when fewer than asked
