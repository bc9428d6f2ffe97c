"""The record schema: what one recorded step holds, live and read back from a run log alike.

StepRecord holds per-parameter arrays (in the order of ModelLayout.params), the step's
activation statistics as an ActivationTable (one row per module) and the input's DataStats.
The collectors in gradscope.signals fill them; history, rules, reporters and the run log
read them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from .layout import ModelLayout

T = TypeVar("T")


#: Suffix of the row that measures the input of a parameterised module when that input is
#: the output of a functional activation (`F.relu`, `torch.tanh` in a `forward`).
INPUT_SUFFIX = ":input"


def input_row(name: str) -> str:
    """The table row measuring the input of module `name` (see INPUT_SUFFIX).

    Example:
        >>> input_row("fc2")
        'fc2:input'
    """
    return name + INPUT_SUFFIX


def input_owner(row: str) -> str | None:
    """The module whose input row `row` is, or None for a module's own row.

    Example:
        >>> input_owner("decoder.fc2:input"), input_owner("fc2")
        ('decoder.fc2', None)
    """
    return row[:-len(INPUT_SUFFIX)] if row.endswith(INPUT_SUFFIX) else None


@dataclass(frozen=True, slots=True)
class ActivationStats:
    """Statistics of one module's outputs over the training forwards of one step."""

    mean: float
    std: float
    zero_frac: float
    nonfinite_frac: float
    saturated_frac: float | None
    dead_frac: float | None
    input_nonfinite: int
    calls: int
    order: int
    leaf: bool


#: Per-parameter and per-module arrays of at most this many values are worked on in plain
#: Python floats (float64 only where a sum or a comparison with a limit rounds: the same
#: additions in the same order, the same comparisons, so the same bits): numpy's per-call
#: cost dominates at that size. 0 sends every array through numpy.
SMALL_ARRAY = 64

#: The float fields of ActivationStats, in ActivationTable's column order.
FLOAT_FIELDS = ("mean", "std", "zero_frac", "nonfinite_frac", "saturated_frac", "dead_frac")


class ActivationTable(Mapping[str, ActivationStats]):
    """The ActivationStats of one step, stored as columns: a few arrays per step instead of
    an object per module (a long history of a large model holds less memory and gives the
    garbage collector far fewer objects to walk). Items are built when read.

    Example:
        >>> table = ActivationTable(["relu"], np.array([[0.5, 1.0, 0.4, 0.0, np.nan, 0.1]]),
        ...                         np.array([[0, 1, 0]]), np.array([[True, False, True]]))
        >>> table["relu"].dead_frac, table["relu"].saturated_frac
        (0.1, None)
    """

    __slots__ = ("_flags", "_floats", "_index", "_ints", "_names")

    def __init__(self, names: list[str], floats: np.ndarray, ints: np.ndarray,
                 flags: np.ndarray, index: dict[str, int] | None = None) -> None:
        self._names = names
        self._index = index if index is not None else {n: i for i, n in enumerate(names)}
        self._floats = floats  # [modules, 6] FLOAT_FIELDS (saturated/dead NaN when None)
        self._ints = ints  # [modules, 3] input_nonfinite, calls, order
        self._flags = flags  # [modules, 3] leaf, has a saturated fraction, has a dead one

    def __getitem__(self, name: str) -> ActivationStats:
        return self._row(self._index[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def _row(self, row: int) -> ActivationStats:
        mean, std, zero, nonfinite, saturated, dead = self._floats[row].tolist()
        inputs, calls, order = self._ints[row].tolist()
        leaf, has_saturated, has_dead = self._flags[row].tolist()
        return ActivationStats(mean=mean, std=std, zero_frac=zero, nonfinite_frac=nonfinite,
                               saturated_frac=saturated if has_saturated else None,
                               dead_frac=dead if has_dead else None, input_nonfinite=inputs,
                               calls=calls, order=order, leaf=leaf)

    @classmethod
    def of(cls, stats: Mapping[str, ActivationStats]) -> ActivationTable:
        """The table of `stats` (a table is returned as it is).

        Example:
            >>> s = ActivationStats(0.0, 1.0, 0.5, 0.0, None, 0.25, 0, 1, 0, True)
            >>> ActivationTable.of({"relu": s})["relu"] == s
            True
        """
        if isinstance(stats, ActivationTable):
            return stats
        names = list(stats)
        floats = np.array([[_or_nan(getattr(s, f)) for f in FLOAT_FIELDS]
                           for s in stats.values()], dtype=np.float64).reshape(-1, 6)
        ints = np.array([[s.input_nonfinite, s.calls, s.order] for s in stats.values()],
                        dtype=np.int64).reshape(-1, 3)
        flags = np.array([[s.leaf, s.saturated_frac is not None, s.dead_frac is not None]
                          for s in stats.values()], dtype=bool).reshape(-1, 3)
        return cls(names, floats, ints, flags)

    @classmethod
    def empty(cls) -> ActivationTable:
        """A table of no module (a step with no activation statistics)."""
        return cls([], np.zeros((0, 6)), np.zeros((0, 3), dtype=np.int64),
                   np.zeros((0, 3), dtype=bool))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def column(self, field: str) -> np.ndarray:
        """One float field for every module, in name order (NaN where it is None)."""
        return self._floats[:, FLOAT_FIELDS.index(field)]

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def input_nonfinite(self) -> np.ndarray:
        """NaN/Inf count of the inputs of every module, in name order."""
        return self._ints[:, 0]

    @property
    def leaves(self) -> np.ndarray:
        """Whether each module is a leaf (no submodules), in name order."""
        return self._flags[:, 0]

    @property
    def orders(self) -> np.ndarray:
        """Order of first call of every module, in name order."""
        return self._ints[:, 2]


def _or_nan(value: float | None) -> float:
    return np.nan if value is None else float(value)


@dataclass(frozen=True)
class DataStats:
    """The model input of one step (all training forwards of the step pooled)."""

    dtype: str
    shape: tuple[int, ...]
    min: float
    max: float
    mean: float
    std: float
    nonfinite: int
    is_float: bool


@dataclass(frozen=True)
class OutputStats:
    """The model's output on one recorded step (its first training forward): are its rows
    probabilities, and does the loss treat them as logits?

    `row_sum_error` is the largest |row sum - 1| over the last dimension (`classes` entries);
    `grad_row_sum` the largest |row sum| of the gradient reaching the output over its
    largest |entry| (NaN when no gradient reached it): ~0 for a loss that applies its own
    softmax, as `cross_entropy` does.

    Example:
        >>> from gradscope.records import OutputStats
        >>> s = OutputStats(10, 0.0, 0.9, 1e-7, 1e-8, False)
        >>> s.probability_rows, s.shift_invariant_loss, round(s.logit_loss_floor, 3)
        (True, True, 1.461)
    """

    classes: int
    min: float
    max: float
    row_sum_error: float
    grad_row_sum: float
    half_precision: bool = False

    @property
    def _slack(self) -> float:
        return 1e-2 if self.half_precision else 1e-4

    @property
    def probability_rows(self) -> bool:
        """Every entry in [0, 1] and every row summing to 1: a softmax was applied."""
        return (self.classes >= 2 and self.min >= 0.0 and self.max <= 1.0 + self._slack
                and self.row_sum_error <= self._slack)

    @property
    def shift_invariant_loss(self) -> bool:
        """The output's gradient sums to zero along each row: the loss does not change when a
        constant is added to a row, i.e. it applies its own softmax to what it is given."""
        return self.grad_row_sum <= 10 * self._slack  # False for NaN (not measured)

    @property
    def logit_loss_floor(self) -> float:
        """The lowest cross-entropy a probability row can reach when taken as logits:
        ln(1 + (C - 1) / e), the target entry at 1 and the others at 0."""
        return math.log1p((self.classes - 1) / math.e)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> OutputStats | None:
        """The stats of a run log's "output" entry (None for logs without one).

        Example:
            >>> from gradscope.records import OutputStats
            >>> OutputStats.from_json({"classes": 3, "min": 0, "max": 1, "row_sum_error": 0,
            ...                        "grad_row_sum": None}).grad_row_sum
            nan
        """
        if not isinstance(data, dict):
            return None

        def number(key: str) -> float:
            value = data.get(key)
            return math.nan if value is None else float(value)

        return cls(classes=int(data.get("classes") or 0), min=number("min"),
                   max=number("max"), row_sum_error=number("row_sum_error"),
                   grad_row_sum=number("grad_row_sum"),
                   half_precision=bool(data.get("half_precision")))


@dataclass
class FlightLog:
    """What the flight recorder saw since the previous recorded step (JSON-friendly).

    `steps`, `input_bad`, `output_bad`: every step up to and including the record's own.
    `norm_steps`, `grad_max`: the unrecorded steps, largest |grad| per parameter (before the
    optimizer step; inf where NaN/Inf, NaN where not measured).
    `origin`: what the replay of the first bad step found, if one ran.

    Example:
        >>> log = FlightLog([3], [False], [True])
        >>> FlightLog.from_json(log.to_json()).output_bad
        [True]
    """

    steps: list[int]
    input_bad: list[bool]
    output_bad: list[bool]
    norm_steps: list[int] = field(default_factory=list)
    grad_max: list[list[float]] = field(default_factory=list)
    origin: dict[str, Any] | None = None

    def nonfinite(self) -> bool:
        """Whether any step of the log saw NaN/Inf (input, output or gradients).

        Example:
            >>> FlightLog([0], [False], [False], [0], [[float("inf")]]).nonfinite()
            True
        """
        # a largest |gradient| is >= 0, inf or NaN (not measured): only +-inf is non-finite
        # here (a membership test scans each row at C speed)
        return bool(any(self.input_bad) or any(self.output_bad) or self.origin is not None
                    or any(math.inf in row or -math.inf in row for row in self.grad_max))

    def to_json(self) -> dict[str, Any]:
        def floats(rows: list[list[float]]) -> list[list[float | str]]:
            return [[v if math.isfinite(v) else str(v) for v in row] for row in rows]

        return {"steps": self.steps, "input_bad": self.input_bad,
                "output_bad": self.output_bad, "norm_steps": self.norm_steps,
                "grad_max": floats(self.grad_max), "origin": self.origin}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FlightLog:
        def floats(rows: list[list[Any]] | None) -> list[list[float]]:
            return [[float(v) for v in row] for row in rows or []]

        return cls(steps=[int(s) for s in data.get("steps") or []],
                   input_bad=[bool(v) for v in data.get("input_bad") or []],
                   output_bad=[bool(v) for v in data.get("output_bad") or []],
                   norm_steps=[int(s) for s in data.get("norm_steps") or []],
                   grad_max=floats(data.get("grad_max")),
                   origin=data.get("origin"))


@dataclass
class StepRecord:
    """All signals of one recorded step. Per-parameter arrays follow `History.layout.params`.

    NaN in a per-parameter array means "not measured at this step" (e.g. no gradient).
    """

    step: int
    loss: float
    stepped: bool
    skipped: bool
    lrs: list[float]
    grad_norm: np.ndarray
    grad_max: np.ndarray
    grad_nonfinite: np.ndarray
    grad_none: np.ndarray
    param_norm: np.ndarray
    update_ratio: np.ndarray
    changed: np.ndarray
    stale_grad: np.ndarray
    not_in_optimizer: np.ndarray
    requires_grad: np.ndarray
    backward_count: int
    loss_requires_grad: bool | None
    activations: ActivationTable = field(default_factory=ActivationTable.empty)
    data: DataStats | None = None
    output: OutputStats | None = None
    #: "softmax"/"sigmoid" when that activation's output went into a loss applying its own;
    #: "" when the loss's graph was read and shows neither; None when there was no graph
    activation_before_loss: str | None = None
    nonfinite_origin: str | None = None
    nonfinite_grad_params: list[str] = field(default_factory=list)
    flight: FlightLog | None = None
    _derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # one representation: statistics given as {module: ActivationStats} become a table
        if not isinstance(self.activations, ActivationTable):
            self.activations = ActivationTable.of(self.activations)

    @property
    def loss_given(self) -> bool:
        """Whether a loss was given at this step: a NaN loss with no loss tensor given (no
        grad information) is no loss, not a non-finite one."""
        return self.loss_requires_grad is not None or not math.isnan(self.loss)

    @property
    def overflow(self) -> bool:
        """An optimizer step skipped because gradients were non-finite (AMP loss scaling)."""
        return self.skipped and self.derived(
            "any_nonfinite_grad", lambda: bool(np.any(self.grad_nonfinite > 0)))

    def layer_grad_norm(self, layout: ModelLayout) -> np.ndarray:
        """Gradient L2 norm per layer (module owning the parameters), in model order."""
        return self.derived("layer_grad", lambda: _per_layer(layout, self.grad_norm))

    def layer_param_norm(self, layout: ModelLayout) -> np.ndarray:
        return self.derived("layer_param", lambda: _per_layer(layout, self.param_norm))

    def layer_update_ratio(self, layout: ModelLayout) -> np.ndarray:
        """Update/weight ratio per layer: ||dW|| / ||W|| over all of the layer's parameters,
        each parameter's sampled ratio weighted by its norm (so a small bias that moves a lot
        does not stand for the whole layer). NaN where nothing was measured.
        """

        def compute() -> np.ndarray:
            owners = layout.owners
            ok = np.isfinite(self.update_ratio) & np.isfinite(self.param_norm)
            moved = np.bincount(owners[ok], weights=(self.update_ratio[ok]
                                                     * self.param_norm[ok]) ** 2,
                                minlength=len(layout.layers))
            weight = np.bincount(owners[ok], weights=self.param_norm[ok] ** 2,
                                 minlength=len(layout.layers))
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(weight > 0, np.sqrt(moved / weight), np.nan)

        return self.derived("layer_update", compute)

    def total_grad_norm(self) -> float:
        """Global gradient L2 norm (inf if any gradient held NaN/Inf; NaN if none measured)."""

        def compute() -> float:
            measured = ~np.isnan(self.grad_norm)
            if not measured.any():
                return float("nan")
            return float(np.sqrt(np.sum(self.grad_norm[measured] ** 2)))

        return self.derived("total_grad", compute)

    def weights_finite(self) -> bool:
        """True when every measured parameter norm is finite."""
        # finite where measured: no +-inf (NaN is "not measured")
        def compute() -> bool:
            norms = self.param_norm
            if norms.size <= SMALL_ARRAY:  # the same test on Python floats
                return math.inf not in [abs(v) for v in norms.tolist()]
            return not bool(np.isinf(norms).any())

        return self.derived("weights_finite", compute)

    def modules_over(self, field: str, limit: float) -> dict[str, float]:
        """Modules whose activation statistic `field` (e.g. "dead_frac") exceeds `limit`."""

        if limit <= 0:
            return self.derived("positive", self._positive_activations)[field]
        # above a positive limit: neither NaN (not measured) nor zero, read from the column

        def compute() -> dict[str, float]:
            column = self.activations.column(field)
            if column.size <= SMALL_ARRAY and column.dtype == np.float64:  # the same test
                names = self.activations._names
                return {names[i]: v for i, v in enumerate(column.tolist()) if v > limit}
            return self._activations_where(field, column > limit)

        return self.derived(f"over:{field}:{limit}", compute)

    def _activations_where(self, field: str, mask: np.ndarray) -> dict[str, float]:
        """{module: its `field`} where `mask` holds, in table order."""
        hits = np.flatnonzero(mask)
        if not hits.size:
            return {}
        names = self.activations._names
        return dict(zip([names[i] for i in hits.tolist()],
                        self.activations.column(field)[hits].tolist()))

    def _positive_activations(self) -> dict[str, dict[str, float]]:
        """Modules with a non-zero dead, saturated or non-finite fraction (NaN: not measured)."""
        found = {}
        for name in ("dead_frac", "saturated_frac", "nonfinite_frac"):
            column = self.activations.column(name)
            if column.size <= SMALL_ARRAY and column.dtype == np.float64:  # the same test
                names = self.activations._names
                found[name] = {names[i]: v for i, v in enumerate(column.tolist())
                               if v != 0 and v == v}
                continue
            with np.errstate(invalid="ignore"):
                found[name] = self._activations_where(name, (column != 0) & (column == column))
        return found

    def derived(self, key: str, compute: Callable[[], T]) -> T:
        """`compute()`, worked out once per record and kept under `key` (records are not
        changed once stored): for views that rules and reporters share.

        Example:
            >>> r = StepRecord(0, 1.0, True, False, [], *[np.ones(1)] * 9, np.ones(1, bool),
            ...                1, True)
            >>> r.derived("twice", lambda: 2 * r.loss)
            2.0
        """
        try:
            return self._derived[key]  # type: ignore[no-any-return]
        except KeyError:
            value = self._derived[key] = compute()
            return value


def _per_layer(layout: ModelLayout, per_param: np.ndarray) -> np.ndarray:
    """Combine per-parameter L2 norms into per-layer L2 norms (NaN when none was measured)."""
    if per_param.size <= SMALL_ARRAY and per_param.dtype == np.float64:
        return _per_layer_small(layout.param_layer, per_param.tolist(), len(layout.layers))
    owners = layout.owners
    measured = ~np.isnan(per_param)
    squares = np.bincount(owners[measured], weights=per_param[measured] ** 2,
                          minlength=len(layout.layers))
    counts = np.bincount(owners[measured], minlength=len(layout.layers))
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, np.sqrt(squares), np.nan)


def _per_layer_small(owners: list[int], per_param: list[float], layers: int) -> np.ndarray:
    """_per_layer on Python floats: np.bincount adds each weight to its bin in parameter
    order starting from 0.0, and squares and square roots round the same in both.

    Example:
        >>> _per_layer_small([0, 0, 2], [3.0, 4.0, float("nan")], 3).tolist()
        [5.0, nan, nan]
    """
    squares = [0.0] * layers
    counts = [0] * layers
    for owner, value in zip(owners, per_param):
        if value == value:  # measured (not NaN)
            squares[owner] += value * value
            counts[owner] += 1
    return np.array([math.sqrt(s) if c else math.nan for s, c in zip(squares, counts)],
                    dtype=np.float64)
