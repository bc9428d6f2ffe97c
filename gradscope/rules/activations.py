"""Rules on activations: dead ReLU units and saturated sigmoid/tanh-like outputs."""

from __future__ import annotations

import numpy as np

from ..records import input_owner
from . import evidence as ev
from .base import Finding, Threshold, rule
from .common import WARMUP, WINDOW, fmt, ranked, usable
from .context import RuleContext
from .thresholds import DATA_SCALE, HIGH_UPDATE, SATURATED


def _described(name: str, activation: str) -> str:
    """How a report names an activation row: a module, or the input of a parameterised
    module that a functional activation (`F.relu`, `torch.tanh`) in a forward produced.

    Example:
        >>> _described("enc.fc2:input", "ReLU")
        "the input of 'enc.fc2' (after a functional ReLU in the forward of 'enc')"
    """
    owner = input_owner(name)
    if owner is None:
        return f"'{name}'"
    parent = owner.rpartition(".")[0]
    where = f"the forward of '{parent}'" if parent else "the model's forward"
    return f"the input of '{owner}' (after a functional {activation} in {where})"


def _worst(records, field: str, limit: float) -> list[tuple[str, float]]:
    """Hidden modules over `limit` on `field` in every given record, worst first (latest).

    The model's output activation is left out: a confident classifier's final sigmoid sits
    at 0 and 1 by design, and a final ReLU may be zero for most targets.
    """
    names: frozenset[str] | None = None
    for r in reversed(records):  # the latest first: it is the one most often empty
        over = _hidden_over(r, field, limit)
        names = over if names is None else names & over
        if not names:
            return []
    last = records[-1].modules_over(field, limit)
    order = {n: i for i, n in enumerate(records[-1].activations)}  # ties: in forward order
    return sorted(((n, last[n]) for n in names or ()), key=lambda x: (-x[1], order[x[0]]))


def _hidden_over(record, field: str, limit: float) -> frozenset[str]:
    """The modules of `record` over `limit` on `field`, the output module left out (kept
    with the record: records do not change once stored)."""
    def compute() -> frozenset[str]:
        over = record.modules_over(field, limit)
        return frozenset(over) - {_output_module(record)} if over else frozenset()

    return record.derived(f"hidden_over:{field}:{limit}", compute)


FACT_WINDOW = Threshold(
    3, "recorded steps, counted from the very first one, over which a layer must be dead or "
       "saturated on every batch to be reported at once: a fact from the first batch needs no "
       "warm-up, only to be seen more than once")


def _persistent_worst(ctx: RuleContext, field: str, limit: float):
    """(records, modules over `limit` on `field` in all of them) or (None, []).

    A layer over the limit in every record since the first one is certain after
    `fact_window` records; one that got there later waits out warm-up and `window` records.
    """
    records = ctx.memo("with_activations", lambda: [
        r for r in ctx.healthy_records if r.activations])
    first = ctx.first
    if (first and records and records[0].step == first[0].step
            and len(records) >= ctx.t["fact_window"]):
        worst = _worst(records, field, limit)
        if worst:
            return records, worst
    warmup = ctx.t["warmup"]
    records = ctx.memo(f"with_activations:{warmup}", lambda: usable(records, warmup))
    window = int(ctx.t["window"])
    tail = records[-window:] if 0 < window <= len(records) else None  # persistent(..., True)
    return (tail, _worst(tail, field, limit)) if tail is not None else (None, [])


def _from_first_record(ctx: RuleContext, worst, field: str, limit: float) -> bool:
    """Whether any of the `worst` modules was already over `limit` at the first record."""
    first = [r for r in ctx.first if r.activations]
    if not first:
        return False
    over = first[0].modules_over(field, limit)
    return any(name in over for name, _ in worst)


def _output_module(record) -> str | None:
    """The leaf module that ran last in the step's forward (the model's output layer)."""

    def compute() -> str | None:
        # max((order, name)) over the leaves, read from the table's columns (no object per
        # module: this runs on every record of the rules' window)
        table = record.activations
        leaf = table.leaves
        if not leaf.any():
            return None
        orders = table.orders
        top = np.flatnonzero(leaf & (orders == orders[leaf].max())).tolist()
        names = table.names
        return max(names[i] for i in top)

    return record.derived("output_module", compute)


def _model_order(ctx: RuleContext, names: list[str]) -> list[str]:
    order = {n: i for i, n in enumerate(ctx.layout.module_names)}
    return sorted(names, key=lambda n: order.get(n, 0))


@rule(sign="units-dead", severity="warning", title="Units that never activate (dead ReLUs)",
      needs=("activations", "update_ratio", "param_norm"),
      thresholds={"dead": SATURATED, "window": WINDOW, "warmup": WARMUP,
                  "fact_window": FACT_WINDOW,
                  "high_update": HIGH_UPDATE,
                  "blocked": Threshold(0.9, "dead fraction of a layer above which it passes "
                                            "almost nothing on: a warning however it died")},
      causes=("poor-init", "lr-too-high", "dead-units"))
def units_dead(ctx: RuleContext) -> Finding | None:
    """More than half of a ReLU layer's units output zero on every example of every batch."""
    tail, worst = _persistent_worst(ctx, "dead_frac", ctx.t["dead"])
    if not worst:
        return None
    dead_from_start = _from_first_record(ctx, worst, "dead_frac", ctx.t["dead"])
    scores = [ev.lr_too_high(ctx, tail, ctx.t["high_update"])]
    if dead_from_start:
        scores.append(("poor-init", 1.0, "the units were already dead at the first recorded "
                                         "step: biases/weights start them in the negative region"))
    else:
        scores.append(("dead-units", 0.5, "units died during training: large updates pushed "
                                          "their pre-activations below zero for every input"))
    name, frac = worst[0]
    # Units that went quiet during training, with steps of an ordinary size and the layer
    # still mostly alive, are capacity the model stopped using: worth knowing, not a
    # failure. Dead from the start, nearly the whole layer, or after oversized steps: warn.
    quiet = not dead_from_start and scores[0][1] <= 0 and frac < ctx.t["blocked"]
    return Finding(
        severity="info" if quiet else None,
        summary=f"{fmt(100 * frac)}% of the units of {_described(name, 'ReLU')} are dead"
                + (f" (and {len(worst) - 1} more layer(s))" if len(worst) > 1 else ""),
        causes=ranked(scores), layers=_model_order(ctx, [n for n, _ in worst]),
        first_step=tail[0].step,
        evidence={"layer": name, "dead_fraction": frac, "layers_affected": len(worst)},
        checks=[
            "Lower the learning rate; dead units often come from one oversized update.",
            "Check the biases/initialisation before these ReLUs (Kaiming init, bias 0).",
            "Consider LeakyReLU/GELU, or normalisation before the activation.",
        ],
    )


@rule(sign="activations-saturated", severity="warning",
      title="Activations saturate at the flat ends of sigmoid/tanh",
      needs=("activations", "data", "param_norm", "update_ratio"),
      thresholds={"saturated": SATURATED, "window": WINDOW, "warmup": WARMUP,
                  "fact_window": FACT_WINDOW,
                  "data_scale": DATA_SCALE, "high_update": HIGH_UPDATE},
      causes=("data-scale", "poor-init", "lr-too-high", "saturated-activations"))
def activations_saturated(ctx: RuleContext) -> Finding | None:
    """More than half of a bounded activation's outputs sit where its derivative is ~0."""
    tail, worst = _persistent_worst(ctx, "saturated_frac", ctx.t["saturated"])
    if not worst:
        return None
    scores = [ev.data_scale(tail, ctx.t["data_scale"]),
              ev.lr_too_high(ctx, tail, ctx.t["high_update"])]
    if _from_first_record(ctx, worst, "saturated_frac", ctx.t["saturated"]):
        scores.append(("poor-init", 0.7, "outputs were saturated from the first recorded step: "
                                         "pre-activations start too large"))
    if not any(s > 0 for _, s, _ in scores):
        scores.append(("saturated-activations", 0.5, "pre-activations drifted to large values"))
    name, frac = worst[0]
    return Finding(
        summary=f"{fmt(100 * frac)}% of the values of {_described(name, 'sigmoid/tanh')} "
                "are saturated"
                if input_owner(name) else
                f"{fmt(100 * frac)}% of the outputs of '{name}' are saturated"
                + (f" (and {len(worst) - 1} more layer(s))" if len(worst) > 1 else ""),
        causes=ranked(scores), layers=_model_order(ctx, [n for n, _ in worst]),
        first_step=tail[0].step,
        evidence={"layer": name, "saturated_fraction": frac, "layers_affected": len(worst)},
        checks=[
            "Normalise the inputs (zero mean, unit variance).",
            "Use Xavier/Glorot initialisation for tanh/sigmoid layers, or normalisation before "
            "them.",
            "Prefer ReLU/GELU in hidden layers; keep sigmoid/tanh for gates and outputs.",
        ],
    )


RULES = [units_dead, activations_saturated]
