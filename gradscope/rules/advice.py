"""What to try for each cause id: the engine puts these first, in the order causes are ranked,
before a rule's own general checks."""

from __future__ import annotations

import functools
import re

from ..diagnosis import Cause

CAUSE_CHECKS: dict[str, str] = {
    "lr-too-low": "Raise the learning rate (try 10x) or check the schedule: healthy layers move "
                  "about 1e-3 of their weight norm per step.",
    "lr-too-high": "Lower the learning rate (3-10x) or add warm-up, and clip gradient norms "
                   "(torch.nn.utils.clip_grad_norm_).",
    "broken-gradient-flow": "Follow the loss back to the model output: a wrong scale factor, a "
                            "detached or constant branch, or a loss on the wrong tensor starves "
                            "every layer of gradient.",
    "vanishing-gradients": "Give early layers a stronger gradient: residual connections, "
                           "normalisation layers, ReLU/GELU instead of sigmoid/tanh, and an "
                           "initialisation matched to the activation.",
    "exploding-gradients": "Clip gradients, lower the learning rate and add normalisation; look "
                           "for the layer whose gradient norm grows first.",
    "saturated-activations": "Keep sigmoid/tanh inputs near zero: normalise inputs, use "
                             "Xavier initialisation or normalisation before them, or switch "
                             "hidden activations to ReLU/GELU.",
    "dead-units": "Revive dead ReLUs: lower the learning rate, start biases at 0 with Kaiming "
                  "initialisation, or use LeakyReLU/GELU.",
    "poor-init": "Re-initialise with a scheme matched to the activation (Kaiming for ReLU, "
                 "Xavier for tanh/sigmoid) so each layer keeps the signal's scale.",
    "invalid-math": "Guard the named module's log/sqrt/division/pow with an epsilon or a clamp, "
                    "and keep exp/softmax inputs bounded.",
    "data-nonfinite": "Find the NaN/Inf in the data pipeline (missing values, divisions by zero) "
                      "and drop or impute it before training.",
    "data-scale": "Normalise the inputs (subtract the training-set mean, divide by its std).",
    "data-dtype": "Cast inputs to float (x.float()) unless the first layer is an embedding.",
    "detached-graph": "Find where the tensor leaves autograd between the named layers and the "
                      "loss: .detach(), .data, .item(), .numpy() or torch.no_grad().",
    "requires-grad-off": "Check the freezing code: these parameters had requires_grad=True when "
                         "watching started and were switched off later.",
    "missing-from-optimizer": "Build the optimizer after the model is complete, from "
                              "model.parameters(), so every trainable parameter is in it; if "
                              "you train only part of the model on purpose, set "
                              "requires_grad=False on the rest (it also saves their backward).",
    "missing-zero-grad": "Call optimizer.zero_grad() once per optimizer step, before the first "
                         "backward of the step.",
    "outlier-batches": "Inspect the batches at the spike steps for corrupt inputs or labels; "
                       "filter or clip them.",
    "bad-batch-statistics": "Use larger batches with BatchNorm, or GroupNorm/LayerNorm which do "
                            "not depend on the batch.",
    "small-batch": "Increase the batch size (or accumulate micro-batches) to reduce gradient "
                   "noise, and lower the learning rate accordingly.",
}

#: Causes below this likelihood do not put their advice ahead of the rule's own checks.
MIN_LIKELIHOOD = 0.2
MAX_CHECKS = 4


def checks_for(causes: list[Cause], general: list[str]) -> list[str]:
    """Advice for the likely causes, in rank order, then the rule's general checks that do
    not repeat it.

    Example:
        >>> checks_for([Cause("missing-zero-grad", 1.0, "")], ["General advice."])[0][:22]
        'Call optimizer.zero_gr'
    """
    specific = [CAUSE_CHECKS[c.id] for c in causes
                if c.likelihood >= MIN_LIKELIHOOD and c.id in CAUSE_CHECKS]
    merged = list(dict.fromkeys(specific))
    for check in general:  # a general check that repeats a cause's advice adds nothing
        if not any(same_advice(check, kept) for kept in merged):
            merged.append(check)
    return merged[:MAX_CHECKS]


#: Share of one check's words found in another above which they give the same advice.
SAME_ADVICE = 0.7


def same_advice(a: str, b: str) -> bool:
    """Whether two checks say the same thing (most words of the shorter one, asides in
    parentheses and short words left out, are in the other).

    Example:
        >>> same_advice("Call optimizer.zero_grad() once per optimizer step.",
        ...             "Call optimizer.zero_grad() (or model.zero_grad()) once per step.")
        True
        >>> same_advice("Lower the learning rate.", "Normalise the inputs.")
        False
    """
    words_a, words_b = _words(a), _words(b)
    if not words_a or not words_b:
        return a == b
    shared = len(words_a & words_b)
    return shared / min(len(words_a), len(words_b)) >= SAME_ADVICE


@functools.lru_cache(maxsize=1024)
def _words(text: str) -> frozenset[str]:
    """The words of a check that count for same_advice (checks repeat: kept once worked out)."""
    plain = re.sub(r"\([^()]*(\([^()]*\)[^()]*)*\)", " ", text.lower())
    return frozenset(w for w in (t.strip(".,;:!?'\"") for t in plain.split()) if len(w) > 3)
