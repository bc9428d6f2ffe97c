"""DeviceBatch: every field of a transfer against a per-item reference."""

import numpy as np
import torch

from gradscope.signals.transfer import DeviceBatch


def _reference(items, sizes):
    out, pieces = {}, {}
    for field, indices, tensor in items:
        values = tensor.detach().reshape(-1).to(torch.float64).numpy().copy()
        if indices is None:
            pieces.setdefault(field, []).append(values)
            continue
        target = out.setdefault(field, np.full(sizes.get(field, 0), np.nan))
        target[np.asarray(indices, dtype=np.int64)] = values
    out.update({field: np.concatenate(chunks) for field, chunks in pieces.items()})
    return out


def test_fetch_matches_a_per_item_reference_for_mixed_dtypes_and_shapes():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, requires_grad=True)
    items = [
        ("norm", [2, 0], torch.randn(2, generator=gen)),
        ("flags", None, torch.tensor([True, False])),
        ("norm", [4], torch.randn(1, generator=gen, dtype=torch.float64)),
        ("counts", None, torch.tensor([[3, 4], [5, 6]])),  # 2-D, int64
        ("half", None, torch.randn(3, generator=gen).to(torch.bfloat16)),
        ("half", None, torch.randn(2, generator=gen).half()),
        ("scalar", None, torch.tensor(2.5)),  # 0-d
        ("grad", None, weight * 2),  # requires grad
        ("norm", [0], torch.tensor([7.0])),  # a later put of an index wins
        ("wide", [1, 3], torch.randn(4, generator=gen)[::2]),  # a strided view
    ]
    sizes = {"norm": 5, "wide": 4}
    batch = DeviceBatch()
    for field, indices, tensor in items:
        batch.put(field, tensor, indices)
    assert len(batch) == len(items)
    host = batch.fetch(sizes)
    ref = _reference(items, sizes)
    assert host.keys() == ref.keys()
    for field, values in ref.items():
        assert host[field].dtype == np.float64
        assert host[field].tobytes() == values.tobytes(), field
    assert len(batch) == 0 and batch.fetch() == {}


def test_fetched_fields_are_independent_copies():
    source = torch.tensor([1.0, 2.0], dtype=torch.float64)
    batch = DeviceBatch()
    batch.put("a", source)
    host = batch.fetch()
    host["a"][0] = 9.0
    assert source.tolist() == [1.0, 2.0]
    batch.put("a", torch.ones(2))
    batch.put("b", torch.ones(2))
    host = batch.fetch()
    host["a"][:] = 5.0
    assert host["b"].tolist() == [1.0, 1.0]
