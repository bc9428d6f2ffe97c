"""The bugs of the diagnosis benchmark: each injector changes one thing in a training setup.

An injector sets one field of `Knobs`; the setups (benchmarks/bug_setups.py) read the knobs
where a user's code would have the bug. Each injector also says which sign(s) a correct
diagnosis raises, which top causes are right, whether its symptom is a fact that holds from
the first batch or a statistical sign, and how to verify with plain torch that the symptom
really happens (`verify`, on the `Probe` of an unwatched run and of the healthy run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Knobs:
    """Everything an injector can change; the defaults are the healthy setup."""

    lr_scale: float = 1.0
    skip_zero_grad: str | None = None      # "all" | "d" (one of a GAN's optimizers)
    lbfgs_zero_grad_outside: bool = False
    cut: str | None = None                 # "detach" | "data" | "numpy" inside forward
    init: str | None = None                # "zero" | "randn"
    neg_bias: bool = False                 # a large negative bias before a ReLU
    act: str | None = None                 # "sigmoid": the activation of a deep stack
    freeze_head: bool = False              # requires_grad=False on the head, by mistake
    head_not_in_optimizer: bool = False
    replace_head_after_optimizer: bool = False
    data: str | None = None                # "scale" | "uint8" | "nan" | "outliers"
    batch_std_div: bool = False            # per-batch standardisation inside forward
    softmax_before_ce: bool = False
    shuffle_labels: bool = False
    no_grad_loss: bool = False


@dataclass
class Probe:
    """What a plain-torch run saw (filled by the setups' loops when `active`)."""

    active: bool = False
    losses: list[float] = field(default_factory=list)
    none_grads: list[str] = field(default_factory=list)    # trainable, grad None at step 0
    zero_grads: list[str] = field(default_factory=list)    # trainable, grad all zero at step 0
    grad_norms: list[float] = field(default_factory=list)  # per trainable param at step 0
    stale_steps: int = 0                                   # backwards that met old gradients
    backwards: int = 0
    unchanged: list[str] = field(default_factory=list)     # trainable params never changed
    probe_frac: list[float] = field(default_factory=list)  # dead / saturated fraction seen
    input_absmax: float = 0.0
    outlier_losses: list[float] = field(default_factory=list)
    other_losses: list[float] = field(default_factory=list)
    error: str | None = None


def _tail(losses: list[float], n: int = 10) -> float:
    tail = [v for v in losses[-n:] if math.isfinite(v)]
    return sum(tail) / len(tail) if tail else math.inf


def _head(losses: list[float], n: int = 5) -> float:
    head = [v for v in losses[:n] if math.isfinite(v)]
    return sum(head) / len(head) if head else math.inf


def relative_drop(losses: list[float]) -> float:
    """(first-5 mean - last-10 mean) / |first-5 mean|: how much training lowered the loss."""
    first, last = _head(losses), _tail(losses)
    if not (math.isfinite(first) and math.isfinite(last)) or first == 0:
        return 0.0
    return (first - last) / abs(first)


def nonfinite(losses: list[float]) -> bool:
    return any(not math.isfinite(v) for v in losses)


def learns_much_less(bug: Probe, healthy: Probe) -> bool:
    """The loss drops by less than half of what the healthy run's drops."""
    return relative_drop(bug.losses) < 0.5 * relative_drop(healthy.losses)


def ends_worse(bug: Probe, healthy: Probe, factor: float = 1.3) -> bool:
    end, ref = _tail(bug.losses), _tail(healthy.losses)
    return nonfinite(bug.losses) or end > factor * ref + 0.02 * abs(_head(healthy.losses))


@dataclass(frozen=True)
class Injector:
    """One bug: how to inject it, what a right diagnosis says, how to verify it happened."""

    name: str
    family: str
    kind: str                                   # "fact" (from the first batch) or "stat"
    knobs: dict[str, Any]
    signs: tuple[str, ...]
    causes: tuple[str, ...] | None              # None: the cause is not scored
    needs: str                                  # the setup capability it applies to
    verify: Callable[[Probe, Probe], bool]
    start: int = 0                              # the step at which the bug starts to act
    what: str = ""


UNSTABLE = ("training-unstable", "loss-nonfinite", "values-nonfinite", "grad-exploding",
            "loss-flat")
NONFINITE = ("loss-nonfinite", "values-nonfinite", "data-suspect")

INJECTORS: tuple[Injector, ...] = (
    Injector("no_zero_grad", "accumulation", "fact", {"skip_zero_grad": "all"},
             ("grad-accumulating",), ("missing-zero-grad",), "zero_grad",
             lambda b, h: b.stale_steps >= max(1, b.backwards // 2),
             what="optimizer.zero_grad() never called"),
    Injector("gan_d_no_zero_grad", "accumulation", "fact", {"skip_zero_grad": "d"},
             ("grad-accumulating",), ("missing-zero-grad",), "gan",
             lambda b, h: b.stale_steps >= max(1, b.backwards // 4),
             what="netD.zero_grad() missing in a GAN's D/G loop"),
    Injector("lbfgs_zero_grad_outside", "accumulation", "fact",
             {"lbfgs_zero_grad_outside": True}, ("grad-accumulating",), ("missing-zero-grad",),
             "lbfgs", lambda b, h: b.stale_steps >= max(1, b.backwards // 2),
             what="LBFGS: zero_grad() outside the closure"),
    Injector("lr_high", "instability", "stat", {"lr_scale": 1e3}, UNSTABLE, ("lr-too-high",),
             "any", lambda b, h: nonfinite(b.losses) or ends_worse(b, h, 1.5)
             or max(b.losses) > 3 * max(_head(b.losses), 1e-3),
             what="learning rate x1e3"),
    Injector("lr_low", "flat", "stat", {"lr_scale": 1e-5}, ("loss-flat",), ("lr-too-low",),
             "any", lambda b, h: abs(relative_drop(b.losses)) < 0.02
             and relative_drop(h.losses) > 0.05, what="learning rate x1e-5"),
    Injector("detach_forward", "none-grads", "fact", {"cut": "detach"}, ("grad-none",),
             ("detached-graph",), "cut", lambda b, h: bool(b.none_grads),
             what=".detach() on an intermediate tensor in forward"),
    Injector("dot_data", "none-grads", "fact", {"cut": "data"}, ("grad-none",),
             ("detached-graph",), "cut", lambda b, h: bool(b.none_grads),
             what="`.data` taken of an intermediate tensor in forward"),
    Injector("numpy_roundtrip", "none-grads", "fact", {"cut": "numpy"}, ("grad-none",),
             ("detached-graph",), "cut", lambda b, h: bool(b.none_grads),
             what="an intermediate tensor sent through numpy and back"),
    Injector("requires_grad_off", "frozen", "fact", {"freeze_head": True},
             ("params-frozen", "grad-none", "layers-stalled"), ("requires-grad-off",), "head",
             lambda b, h: bool(b.unchanged) and ends_worse(b, h, 1.1),
             what="the classifier frozen by a name-substring freezing rule"),
    Injector("not_in_optimizer", "frozen", "fact", {"head_not_in_optimizer": True},
             ("params-frozen", "layers-stalled"), ("missing-from-optimizer",), "head",
             lambda b, h: bool(b.unchanged), what="the head left out of the optimizer"),
    Injector("replaced_after_optimizer", "frozen", "fact",
             {"replace_head_after_optimizer": True}, ("params-frozen", "layers-stalled"),
             ("missing-from-optimizer",), "head", lambda b, h: bool(b.unchanged),
             what="the head replaced after the optimizer was built"),
    Injector("zero_init", "dead", "fact", {"init": "zero"},
             ("units-dead", "grad-vanishing", "loss-flat", "layers-stalled", "params-frozen"),
             ("poor-init", "dead-units"), "init",
             lambda b, h: bool(b.zero_grads) and learns_much_less(b, h),
             what="every weight and bias initialised to zero"),
    Injector("randn_tanh", "dead", "fact", {"init": "randn"}, ("activations-saturated",),
             ("poor-init", "saturated-activations"), "tanh",
             lambda b, h: bool(b.probe_frac) and b.probe_frac[0] > 0.5,
             what="weights drawn from randn (std 1) feeding tanh"),
    Injector("neg_bias_relu", "dead", "fact", {"neg_bias": True}, ("units-dead",),
             ("dead-units", "poor-init"), "relu_probe",
             lambda b, h: bool(b.probe_frac) and min(b.probe_frac) > 0.95,
             what="a large negative bias before a ReLU (module or functional)"),
    Injector("sigmoid_stack", "dead", "fact", {"act": "sigmoid"},
             ("grad-vanishing", "layers-stalled", "activations-saturated"),
             ("vanishing-gradients", "saturated-activations"), "tanh",
             lambda b, h: len(b.grad_norms) > 1
             and b.grad_norms[0] < 1e-2 * max(b.grad_norms[-2:]),
             what="a deep stack of sigmoids"),
    Injector("unnormalised_inputs", "data", "fact", {"data": "scale"}, ("data-suspect",),
             ("data-scale",), "tabular",
             lambda b, h: b.input_absmax > 100 and (ends_worse(b, h, 1.2)
                                                    or _head(b.losses) > 2 * _head(h.losses)),
             what="raw features x1000, never standardised"),
    Injector("uint8_unscaled", "data", "fact", {"data": "uint8"}, ("data-suspect",),
             ("data-scale",), "images",
             lambda b, h: b.input_absmax > 100 and (ends_worse(b, h, 1.2)
                                                    or _head(b.losses) > 2 * _head(h.losses)),
             what="8-bit images cast to float, never divided by 255"),
    Injector("nan_rows", "data", "fact", {"data": "nan"}, NONFINITE, ("data-nonfinite",),
             "float_inputs", lambda b, h: nonfinite(b.losses), start=15,
             what="a NaN row in every 5th batch from step 15"),
    Injector("outlier_batches", "instability", "stat", {"data": "outliers"},
             ("training-unstable", "data-suspect"), ("outlier-batches", "data-scale"),
             "float_inputs", lambda b, h: bool(b.outlier_losses) and (
                 nonfinite(b.losses) or min(b.outlier_losses) > 3 * _median(b.other_losses)),
             start=10, what="every 11th batch holds rows x1000 (from step 10)"),
    Injector("batch_std_div", "data", "fact", {"batch_std_div": True},
             ("loss-nonfinite", "values-nonfinite"), ("invalid-math",), "images",
             lambda b, h: nonfinite(b.losses[:3]),
             what="inputs divided by their per-batch std (constant border pixels: 0/0)"),
    Injector("softmax_before_ce", "flat", "stat", {"softmax_before_ce": True},
             ("loss-flat",), ("probabilities-as-logits",), "ce", learns_much_less,
             what="softmax applied to the logits before CrossEntropyLoss"),
    Injector("shuffled_labels", "flat", "stat", {"shuffle_labels": True}, ("loss-flat",),
             None, "ce", learns_much_less, what="labels shuffled independently of inputs"),
    Injector("no_grad_loss", "flat", "stat", {"no_grad_loss": True}, ("loss-flat",),
             ("detached-graph", "broken-gradient-flow"), "ce", learns_much_less,
             what="the loss computed in a torch.no_grad() helper (+ an L2 term with grads)"),
    Injector("adamw_clip_100x", "lr-hidden", "stat", {"lr_scale": 100.0},
             ("loss-flat", "training-unstable", "loss-nonfinite"), ("lr-too-high",),
             "adamw_clip", lambda b, h: ends_worse(b, h, 1.3),
             what="AdamW at 100x the usual rate, with gradient clipping"),
)


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    return finite[len(finite) // 2] if finite else math.inf


INJECTOR_BY_NAME = {inj.name: inj for inj in INJECTORS}
