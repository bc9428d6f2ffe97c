"""Read from the loss's autograd graph whether the model's probabilities go into a loss that
applies its own softmax or sigmoid.

`cross_entropy` is `nll_loss(log_softmax(x))` and `binary_cross_entropy_with_logits` applies
a sigmoid: fed outputs that already went through a softmax (or sigmoid), predictions can never
become confident, the loss keeps a high floor and learning crawls. The graph shows it as a
`LogSoftmaxBackward0` node whose input comes straight from a `SoftmaxBackward0` node (views,
copies and dtype casts in between), wherever the softmax was applied: at the end of the model
or in the training loop. A few graph nodes are read on recorded steps, nothing is computed.
"""

from __future__ import annotations

from typing import Any

import torch

#: The node of a loss that applies its own activation -> (the activation's node, its name).
LOGIT_LOSSES = {"LogSoftmaxBackward0": ("SoftmaxBackward0", "softmax"),
                "BinaryCrossEntropyWithLogitsBackward0": ("SigmoidBackward0", "sigmoid")}
#: Nodes that only move, reshape or cast values on the way.
PASS_THROUGH = frozenset({
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "ToCopyBackward0",
    "CloneBackward0", "TransposeBackward0", "TransposeBackward1", "PermuteBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "UnsqueezeBackward0", "ExpandBackward0",
    "SliceBackward0", "SelectBackward0", "IndexBackward0", "TBackward0"})
#: How many nodes from the loss are looked at (the loss's own arithmetic is a few nodes).
MAX_NODES = 64
MAX_DEPTH = 10


def _first_input(node: Any) -> Any:
    inputs = getattr(node, "next_functions", ())
    return inputs[0][0] if inputs else None


def _through_views(node: Any) -> Any:
    for _ in range(MAX_DEPTH):
        if node is None or type(node).__name__ not in PASS_THROUGH:
            return node
        node = _first_input(node)
    return node


def activation_before_logit_loss(loss: Any) -> str | None:
    """"softmax" or "sigmoid" when that activation's output goes straight into a loss that
    applies the same activation itself; None otherwise (or for a loss without a graph).

    Example:
        >>> import torch.nn.functional as F
        >>> z = torch.randn(4, 3, requires_grad=True); y = torch.tensor([0, 1, 2, 0])
        >>> activation_before_logit_loss(F.cross_entropy(z.softmax(-1), y))
        'softmax'
        >>> activation_before_logit_loss(F.nll_loss(z.softmax(-1).log(), y)) is None
        True
    """
    if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
        return None
    frontier: list[tuple[Any, int]] = [(loss.grad_fn, 0)]
    seen: set[int] = set()
    while frontier and len(seen) < MAX_NODES:
        node, depth = frontier.pop(0)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        pair = LOGIT_LOSSES.get(type(node).__name__)
        if pair is not None:
            source = _through_views(_first_input(node))
            if source is not None and type(source).__name__ == pair[0]:
                return pair[1]
            continue  # a logit loss on logits: what feeds it is the model
        if depth < MAX_DEPTH:
            frontier += [(n, depth + 1) for n, _ in getattr(node, "next_functions", ())]
    return None
