"""Check 4: the signal through depth at initialisation (activations forward, gradients back)."""

from __future__ import annotations

import math

import numpy as np

from ..layout import ModelLayout
from ..records import StepRecord
from ..rules.common import fmt
from .result import CheckResult, finding

#: Fraction of a layer's units dead (or outputs saturated) that blocks most of its gradient;
#: the rule engine's threshold for units-dead and activations-saturated.
BLOCKED = 0.5
#: Factor by which the median output scale of the hidden weight layers may shrink or grow
#: from the first third of them to the last third; a well-initialised stack (Kaiming/Xavier,
#: normalisation, residuals) keeps it within a small factor, 100x means each layer scales the
#: signal systematically. Medians of thirds, not single layers: the branch outputs of a
#: residual block (GPT-2 scales its projections by 1/sqrt(2 n_layer)) repeat block by block.
SCALE_FACTOR = 100.0
#: First/last layer gradient-norm ratio (and the first layer's norm) below which early layers
#: get nothing: the rule engine's grad-vanishing defaults. The inverse ratio counts as
#: exploding at init.
VANISH_RATIO = 1e-3
VANISH_FIRST = 1e-4
WEIGHT_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                 "ConvTranspose3d", "Conv1D", "Bilinear", "LazyLinear", "LSTM", "GRU", "RNN")
EMBEDDINGS = ("Embedding", "EmbeddingBag")


def _output_module(record: StepRecord) -> str | None:
    leaves = [(s.order, n) for n, s in record.activations.items() if s.leaf]
    return max(leaves)[1] if leaves else None


def scale_profile(layout: ModelLayout, record: StepRecord) -> list[tuple[str, float]]:
    """(module, output std) of the weight layers in the order they ran, the output layer
    last."""
    rows = [(stats.order, name, stats.std) for name, stats in record.activations.items()
            if stats.leaf and layout.module_types.get(name) in WEIGHT_LAYERS
            and stats.calls > 0 and math.isfinite(stats.std)]
    return [(name, float(std)) for _, name, std in sorted(rows)]


def grad_profile(layout: ModelLayout, record: StepRecord) -> list[tuple[str, float]]:
    """(layer, gradient norm) of the layers that got a gradient, in model order."""
    norms = record.layer_grad_norm(layout)
    return [(layout.layers[i], float(norms[i])) for i in np.flatnonzero(~np.isnan(norms))]


def check_depth(layout: ModelLayout, record: StepRecord, data_scale_flagged: bool
                ) -> CheckResult:
    """Dead and saturated fractions, output scale through depth, first/last gradient ratio."""
    result = CheckResult("depth")
    output = _output_module(record)
    dead = {n: s.dead_frac for n, s in record.activations.items()
            if s.dead_frac is not None and n != output}
    saturated = {n: s.saturated_frac for n, s in record.activations.items()
                 if s.saturated_frac is not None and n != output}
    scales = scale_profile(layout, record)
    grads = grad_profile(layout, record)
    result.data = {"dead": dead, "saturated": saturated, "scale": scales, "grad_norm": grads}
    parts = []
    worst_dead = sorted(((f, n) for n, f in dead.items() if f > BLOCKED), reverse=True)
    if worst_dead:
        frac, name = worst_dead[0]
        result.diagnoses.append(finding(
            "units-dead", "warning", "Units that never activate at initialisation",
            f"{fmt(100 * frac)}% of the units of '{name}' are zero for every example"
            + (f" (and {len(worst_dead) - 1} more layer(s))" if len(worst_dead) > 1 else ""),
            [("poor-init", 1.0, "dead before the first update: biases/weights start the "
                                "pre-activations in the negative region")], "depth",
            layers=[n for _, n in worst_dead], evidence={"layer": name, "dead_fraction": frac},
            checks=["Use Kaiming initialisation and zero biases before ReLUs, or normalisation "
                    "before the activation; consider LeakyReLU/GELU."]))
    worst_sat = sorted(((f, n) for n, f in saturated.items() if f > BLOCKED), reverse=True)
    if worst_sat:
        frac, name = worst_sat[0]
        causes = [("poor-init", 1.0, "pre-activations start too large for the squashing "
                                     "function")]
        if data_scale_flagged:
            causes.append(("data-scale", 1.5, "the inputs are not normalised (see the data "
                                              "check)"))
        result.diagnoses.append(finding(
            "activations-saturated", "warning", "Activations saturated at initialisation",
            f"{fmt(100 * frac)}% of the outputs of '{name}' sit on the flat ends"
            + (f" (and {len(worst_sat) - 1} more layer(s))" if len(worst_sat) > 1 else ""),
            causes, "depth", layers=[n for _, n in worst_sat],
            evidence={"layer": name, "saturated_fraction": frac},
            checks=["Normalise the inputs; use Xavier/Glorot init for tanh/sigmoid layers or "
                    "normalisation before them."]))
    hidden = scales[:-1] if len(scales) > 2 else []
    if len(hidden) >= 2 and all(std > 0 for _, std in hidden):
        third = max(1, len(hidden) // 3)
        early = float(np.median([std for _, std in hidden[:third]]))
        late = float(np.median([std for _, std in hidden[-third:]]))
        factor = late / early
        span = len(hidden) - third  # layers between the centres of the two groups
        result.data["scale_factor"] = factor
        parts.append(f"output std {fmt(early)} -> {fmt(late)} from the first to the last "
                     f"third of {len(hidden)} hidden weight layers (x{fmt(factor)})")
        if factor < 1 / SCALE_FACTOR or factor > SCALE_FACTOR:
            shrink = factor < 1
            scale_causes = [("poor-init", 1.0, f"each layer scales its input by about "
                                               f"{fmt(factor ** (1 / max(1, span)))} on average: "
                                               "the weights' variance does not match 1/fan_in "
                                               "(or 2/fan_in for ReLU)")]
            if data_scale_flagged:
                scale_causes.append(("data-scale", 2.0, "the inputs are not normalised: the "
                                                        "first layers pass their scale on until "
                                                        "a normalisation layer resets it"))
            result.diagnoses.append(finding(
                "activations-scale", "warning",
                f"Layer outputs {'shrink' if shrink else 'grow'} with depth at initialisation",
                f"the median output std of the weight layers goes from {fmt(early)} (first "
                f"third, from '{hidden[0][0]}') to {fmt(late)} (last third, to "
                f"'{hidden[-1][0]}'), a factor of {fmt(factor)}", scale_causes, "depth",
                layers=[name for name, _ in hidden],
                evidence={"early_std": early, "late_std": late, "factor": factor,
                          "layers": len(hidden)},
                checks=["Use Kaiming (ReLU) or Xavier (tanh) initialisation, or add "
                        "normalisation layers / residual connections."]))
    trunk = [(n, g) for n, g in grads if layout.module_types.get(n) not in EMBEDDINGS]
    if len(trunk) >= 2 and trunk[-1][1] > 0:
        ratio = trunk[0][1] / trunk[-1][1]
        result.data["grad_ratio"] = ratio
        parts.append(f"gradient norm first/last layer {fmt(ratio)}")
        vanishing = ratio < VANISH_RATIO and trunk[0][1] < VANISH_FIRST
        if vanishing or ratio > 1 / VANISH_RATIO:
            cause_ids = [("poor-init", 1.0, "the initialisation's per-layer gain compounds "
                                            "through depth")]
            if worst_sat:
                cause_ids.append(("saturated-activations", 1.5,
                                  f"saturated activations in '{worst_sat[0][1]}'"))
            if worst_dead:
                cause_ids.append(("dead-units", 1.5, f"dead units in '{worst_dead[0][1]}'"))
            sign = "grad-vanishing" if vanishing else "grad-exploding"
            result.diagnoses.append(finding(
                sign, "warning",
                "Gradients vanish toward the early layers at initialisation" if vanishing
                else "Gradients grow toward the early layers at initialisation",
                f"layer '{trunk[0][0]}' grad norm {fmt(trunk[0][1])} vs '{trunk[-1][0]}' "
                f"{fmt(trunk[-1][1])}, ratio {fmt(ratio)}", cause_ids, "depth",
                layers=[trunk[0][0], trunk[-1][0]],
                evidence={"first_layer_grad_norm": trunk[0][1],
                          "last_layer_grad_norm": trunk[-1][1], "ratio": ratio},
                checks=["Add residual connections or normalisation; use Kaiming/Xavier "
                        "initialisation; clip gradients as depth grows."]))
    dead_max = max(dead.values(), default=0.0)
    sat_max = max(saturated.values(), default=0.0)
    parts.insert(0, f"dead up to {fmt(100 * dead_max)}%, saturated up to {fmt(100 * sat_max)}%")
    result.summary = "; ".join(parts)
    return result
