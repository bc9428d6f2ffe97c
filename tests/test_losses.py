"""LossBuffer: losses come back in step order, whatever mix of tensors and floats was given,
and a buffer of tensors alone (one stacked field) reads the same as the general path."""

import math

import torch

from gradscope.history import History
from gradscope.layout import ModelLayout
from gradscope.losses import LossBuffer
from gradscope.signals.transfer import DeviceBatch


def _buffer():
    return LossBuffer(History(ModelLayout.of(torch.nn.Linear(1, 1))))


def _values(n):
    gen = torch.Generator().manual_seed(0)
    return [v * 10.0 ** (i % 7 - 3) for i, v in enumerate(torch.randn(n, generator=gen).tolist())]


def test_tensor_losses_in_step_order_exact():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        losses = _buffer()
        given = [torch.tensor(v, dtype=dtype) for v in _values(12)] + [torch.tensor(math.nan)]
        for step, value in enumerate(given):
            losses.add(step, value)
        batch = DeviceBatch()
        losses.put(batch)
        moved = losses.take(batch.fetch())
        want = [float(t.double()) for t in given]
        assert list(moved) == list(range(13)) and len(losses) == 0
        assert all(a == b or (math.isnan(a) and math.isnan(b))
                   for a, b in zip(moved.values(), want))
        assert losses.history.losses()[0].tolist() == list(range(13))


def test_mixed_floats_and_tensors_in_step_order():
    losses = _buffer()
    values = _values(9)
    for step, v in enumerate(values):
        losses.add(step, torch.tensor(v, dtype=torch.float64) if step % 3 else v)
    assert losses.flush() == dict(enumerate(values))
    losses.add(9, 1.5)
    assert losses.flush() == {9: 1.5} and losses.flush() == {}
