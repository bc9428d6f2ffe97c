"""The flight recorder's per-step rows: the largest |gradient| of every parameter of every
unrecorded step is exact (against a float64 reference), input/output NaN/Inf flags are per
step, missing gradients read NaN, non-finite ones inf, and a non-finite step is replayed."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradscope.guard import Guard
from gradscope.signals.flight import FlightRecorder
from gradscope.signals.transfer import DeviceBatch


class Mixed(nn.Module):
    """Parameters of several shapes: small ones that share a shape (stacked together), one
    of its own shape, one large (read on its own) and one that may get no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.big = nn.Linear(8, 9000)  # 72,000 weights: above the stacking limit
        self.head = nn.Linear(9000, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x, use_unused=False):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        out = self.head(torch.relu(self.big(h)))
        return self.unused(out) if use_unused else out


def _reference(model):
    """Largest |grad| per parameter in float64: NaN when absent, inf when non-finite."""
    row = []
    for p in model.parameters():
        if p.grad is None:
            row.append(math.nan)
            continue
        g = p.grad.double()
        row.append(math.inf if not torch.isfinite(g).all() else float(g.abs().max()))
    return row


def _run(model, steps, poison=None, recorded=()):
    flight = FlightRecorder(model, list(model.parameters()), Guard(), optimized=False)
    flight.attach()
    expected, flags = [], []
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        x = torch.randn(5, 8, generator=gen) * (10.0 ** (step % 4))
        if poison is not None and step == poison:
            x[2, 3] = math.nan
        calls = 1 + step % 2  # two forwards on odd steps (micro-batches)
        for _ in range(calls):
            model(x, use_unused=step % 3 == 0).pow(2).mean().backward()
        if step not in recorded:
            expected.append((step, _reference(model)))
        flags.append((step, not torch.isfinite(x).all().item()))
        flight.end_step(step, recorded=step in recorded)
    batch = DeviceBatch()
    flight.put(batch, steps - 1)
    log = flight.result(batch.fetch(), steps - 1)
    flight.close()
    return flight, log, expected, flags


def test_gradient_maxima_exact_per_step():
    torch.manual_seed(0)
    model = Mixed()
    _, log, expected, flags = _run(model, 7, recorded=(4,))
    assert log.steps == list(range(7))
    assert log.input_bad == [bad for _, bad in flags] == [False] * 7
    assert log.output_bad == [False] * 7
    assert log.norm_steps == [s for s, _ in expected]
    for (step, want), got in zip(expected, log.grad_max):
        np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=f"step {step}")
    # the unused layer has gradients only on steps 0, 3, 6 (the rest: NaN, not measured)
    unused = [got[-1] for got in log.grad_max]
    assert [not math.isnan(v) for v in unused] == [s % 3 == 0 for s, _ in expected]


def test_nonfinite_input_flag_and_replay():
    torch.manual_seed(0)
    model = Mixed()
    _, log, expected, flags = _run(model, 6, poison=3)
    assert log.input_bad == [bad for _, bad in flags] == [s == 3 for s in range(6)]
    assert log.output_bad == [s == 3 for s in range(6)]
    bad_rows = [s for (s, _), got in zip(expected, log.grad_max)
                if any(math.isinf(v) for v in got)]
    assert bad_rows == [3]
    for (step, want), got in zip(expected, log.grad_max):
        np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=f"step {step}")
    assert log.origin is not None and log.origin["step"] == 3
    assert log.origin["kind"] == "input"


def test_rows_kept_across_peeks_and_reset():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    flight = FlightRecorder(model, list(model.parameters()), Guard(), optimized=False)
    flight.attach()
    for step in range(3):
        model.zero_grad(set_to_none=True)
        model(torch.randn(3, 4)).sum().backward()
        flight.end_step(step, recorded=False)
    batch = DeviceBatch()
    flight.put(batch, 2)
    peeked = flight.result(batch.fetch(), 2, keep=True)
    batch = DeviceBatch()
    flight.put(batch, 2)
    taken = flight.result(batch.fetch(), 2)
    assert peeked.steps == taken.steps == [0, 1, 2]
    assert peeked.grad_max == taken.grad_max and len(taken.grad_max) == 3
    batch = DeviceBatch()
    flight.put(batch, 3)
    assert flight.result(batch.fetch(), 3) is None
    flight.close()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_exact(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Linear(6, 1)).to(dtype)
    flight = FlightRecorder(model, list(model.parameters()), Guard(), optimized=False)
    flight.attach()
    want = []
    for step in range(3):
        model.zero_grad(set_to_none=True)
        model(torch.randn(4, 6, dtype=dtype)).sum().backward()
        want.append(_reference(model))
        flight.end_step(step, recorded=False)
    batch = DeviceBatch()
    flight.put(batch, 2)
    log = flight.result(batch.fetch(), 2)
    np.testing.assert_array_equal(np.array(log.grad_max), np.array(want))
    flight.close()


def test_nonfinite_gradient_alone_is_caught_at_its_step():
    # input and output finite, one gradient infinite at step 2: that step is replayed (its
    # forward finds nothing: the origin is in the backward) and its row reads inf there
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    flight = FlightRecorder(model, list(model.parameters()), Guard(), optimized=False)
    flight.attach()
    for step in range(4):
        model.zero_grad(set_to_none=True)
        handle = (model[2].bias.register_hook(lambda g: g * math.inf) if step == 2 else None)
        model(torch.randn(3, 4)).sum().backward()
        if handle is not None:
            handle.remove()
        flight.end_step(step, recorded=False)
    batch = DeviceBatch()
    flight.put(batch, 3)
    log = flight.result(batch.fetch(), 3)
    flight.close()
    assert log.input_bad == log.output_bad == [False] * 4
    assert [math.isinf(row[-1]) for row in log.grad_max] == [False, False, True, False]
    assert log.origin == {"step": 2, "kind": "none"}
    assert log.nonfinite()


class Scalars(nn.Module):
    """Two 0-d parameters (stacked together: a row of values, nothing to reduce) and a
    layer whose weight changes shape mid-run (its stacked group is read afresh)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.shift = nn.Parameter(torch.tensor(-0.5))
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale + self.shift


def test_scalar_parameters_and_changed_shapes_exact():
    torch.manual_seed(0)
    model = Scalars()
    flight = FlightRecorder(model, list(model.parameters()), Guard(), optimized=False)
    flight.attach()
    want = []
    for step in range(5):
        if step in (2, 3):  # both weights of one stacked group take a new shape
            shape = (8, 2) if step == 2 else (16,)  # then a new number of dims too
            with torch.no_grad():
                model.a.weight.data = model.a.weight.data.reshape(shape).contiguous()
                model.b.weight.data = model.b.weight.data.reshape(shape).contiguous()
            model.a.forward = lambda x, m=model.a: x @ m.weight.reshape(4, 4).t() + m.bias
            model.b.forward = lambda x, m=model.b: x @ m.weight.reshape(4, 4).t() + m.bias
        model.zero_grad(set_to_none=True)
        model(torch.randn(3, 4) * 10.0 ** step).pow(2).sum().backward()
        want.append(_reference(model))
        flight.end_step(step, recorded=False)
    batch = DeviceBatch()
    flight.put(batch, 4)
    log = flight.result(batch.fetch(), 4)
    flight.close()
    assert log.norm_steps == list(range(5))
    np.testing.assert_array_equal(np.array(log.grad_max), np.array(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_finite_check_matches_elementwise_reference(dtype):
    from gradscope.signals.flight_rows import StepRows

    rows = StepRows(1)
    gen = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max
    for n in (1, 2, 7, 16, 33, 1000, 4099):
        for value in (None, math.nan, math.inf, -math.inf, big, -big, -0.0):
            for pos in {0, n // 2, n - 1}:
                piece = (torch.randn(n, generator=gen) * 1e30).to(dtype)
                if value is not None:
                    piece[pos] = value
                want = bool(torch.isfinite(piece).all())
                assert rows.finite(piece) == want, (n, value, pos)


def _read_row_by_row(values, layouts, params):
    """Reference reading of rows: one row at a time, segment by segment."""
    from gradscope.signals.flight_rows import FULL, IN, OUT, PAIRS, SKIP

    input_bad, output_bad, maxima, offset = [], [], [], 0
    for layout in layouts:
        bad, flags, row = [False, False], False, None
        for kind, what in layout:
            size = (what if isinstance(what, int) else len(what)) * (2 if kind == PAIRS else 1)
            part = values[offset:offset + size]
            offset += size
            if kind in (IN, OUT):
                flags = True
                bad[kind] = bad[kind] or not np.isfinite(part).all()
            elif kind != SKIP:
                row = np.full(params, -1.0) if row is None else row
                for j, i in enumerate(range(what) if kind == FULL else what):
                    row[i] = (max(abs(part[2 * j]), abs(part[2 * j + 1]))
                              if not np.isnan(part[2 * j:2 * j + 2]).any()
                              else math.nan) if kind == PAIRS else part[j]
        if flags:
            input_bad.append(bad[IN])
            output_bad.append(bad[OUT])
        if row is not None:
            maxima.append([math.nan if v < 0 else math.inf if math.isnan(v) else float(v)
                           for v in row])
    return input_bad, output_bad, maxima


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_read_as_blocks_match_row_by_row(dtype):
    from gradscope.signals.flight_rows import FULL, IN, OUT, PAIRS, PEAKS, SKIP, StepRows

    params = 5
    pairs, peaks_a, peaks_b = [1, 4], [0, 2], [3]
    layouts = [
        ((IN, 2), (OUT, 2), (PAIRS, pairs), (PEAKS, peaks_a), (PEAKS, peaks_b)),
        ((IN, 2), (OUT, 2), (PAIRS, pairs), (PEAKS, peaks_a), (PEAKS, peaks_b)),
        ((IN, 4), (PAIRS, pairs), (PEAKS, peaks_a)),  # parameter 3 not measured
        ((OUT, 2), (SKIP, 4), (SKIP, 2), (SKIP, 1)),  # a recorded step: flags alone
        ((IN, 2), (OUT, 2), (FULL, params)),
        ((PEAKS, [0, 1, 2, 3, 4]),),  # every parameter in order, no flags
        ((PEAKS, [0, 1, 2, 3, 4]),),
        ((IN, 2), (OUT, 2), (PAIRS, pairs), (PEAKS, peaks_a), (PEAKS, peaks_b)),
    ]
    sizes = [sum((w if isinstance(w, int) else len(w)) * (2 if k == PAIRS else 1)
                 for k, w in layout) for layout in layouts]
    gen = np.random.default_rng(0)
    for trial in range(20):
        values = (gen.standard_normal(sum(sizes)) * 1e3).astype(dtype)
        for _ in range(trial % 4):
            values[gen.integers(values.size)] = gen.choice([math.nan, math.inf, -math.inf])
        rows = StepRows(params)
        rows.layouts = list(layouts)
        rows.steps = [0, 1]
        rows.norm_steps = [0, 1]
        _, input_bad, output_bad, _, grad_max = rows.read({"flight:rows": values})
        want_in, want_out, want_max = _read_row_by_row(values, layouts, params)
        assert input_bad == want_in and output_bad == want_out
        np.testing.assert_array_equal(np.array(grad_max), np.array(want_max))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_check_piece_verdict_matches_piece(dtype):
    # a recorded step reads gradients for the check alone: check_piece() must call a step
    # non-finite exactly when piece() does (stacked groups, a large and a lone gradient, a
    # missing one, limits of the input and output), and keep the same input/output limits
    from gradscope.signals.flight_rows import IN, OUT, SKIP, RowReader, StepRows

    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (4, 3), (5,), (5,), (5,), (7,), (300, 300), None]
    for target in range(len(shapes)):
        for value in (None, math.nan, math.inf, -math.inf, 1e30):
            grads = [None if s is None else (torch.randn(s, generator=gen) * 1e3).to(dtype)
                     for s in shapes]
            if value is not None and grads[target] is not None:
                grads[target].view(-1)[grads[target].numel() // 2] = value
            for bad_input in (False, True):
                limits = torch.tensor([1.0, math.inf if bad_input else 2.0])
                general, checked = StepRows(len(shapes)), StepRows(len(shapes))
                for rows in (general, checked):
                    rows.limits(IN, torch.aminmax(limits))
                    rows.limits(OUT, torch.aminmax(torch.tensor([3.0, -4.0])))
                want = general.finite(general.piece(grads, keep=False))
                got = checked.check_piece(grads, checked.plan(grads))
                assert checked.finite(got) == want, (target, value, bad_input)
                reference = all(g is None or bool(torch.isfinite(g).all()) for g in grads)
                assert want == (reference and not bad_input)
                for rows in (general, checked):
                    rows.end(0)
                    assert rows.steps == [0] and rows.norm_steps == []
                    assert {kind for kind, _ in rows.layouts[0]} <= {IN, OUT, SKIP}
                    reader = RowReader(rows.layouts[0], len(shapes))
                    flags_in, flags_out, maxima = [], [], []
                    block = torch.cat(rows.rows).to(torch.float64).numpy()[None, :]
                    reader.read(block, flags_in, flags_out, maxima)
                    assert (flags_in, flags_out, maxima) == ([bad_input], [False], [])
