"""The rule catalogue in Markdown (docs/rules.md), generated from the rules' own metadata.

Regenerate with ``python -m gradscope.rules.catalog > docs/rules.md``.
"""

from __future__ import annotations

from .base import Rule
from .common import fmt
from .engine import builtin_rules

HEADER = """# Rules

gradscope's rule engine turns recorded signals into diagnoses. Each rule below watches for one
sign, needs certain signals, and ranks the causes it can name by running the checks a person
would run first. Rules run on recorded steps only (every `every` steps), over at most the last
16 recorded steps and the losses of the last 256 steps, so an evaluation costs the same at
step 100 and at step 1,000,000. A warning whose rule stays silent for 3 evaluations in a row
is withdrawn (the loss started moving, the gradient came back); errors stay.

Change a threshold with `watch(model, opt, thresholds={"grad-vanishing": {"ratio": 1e-4}})`,
switch a rule off with `disable_rules=["training-unstable"]`, or run only some rules with
`rules=["loss-flat", my_rule]`. A rule of your own is a function decorated with
`gradscope.rule(...)`; see the end of this page.

Severity: `error` means training is broken now; `warning` means a pattern that held long enough
to be more than noise; `info` is context (for example layers you froze on purpose).

This file is generated from the rule metadata: `python -m gradscope.rules.catalog > docs/rules.md`.
"""

CHECKUP = """## Signs and causes from `gradscope.checkup()`

`gradscope.checkup()` (see [checkup.md](checkup.md)) runs before training and reports with the
sign and cause ids above. Two signs and a few causes exist only there, where none of the
above fits:

- sign `loss-init-off`: the loss at initialisation is far from what the task implies (ln C for
  C-class cross-entropy, ln 2 for binary cross-entropy, the target variance for MSE), or the
  outputs are not of the form the loss takes.
- sign `activations-scale`: the output scale of the weight layers shrinks or grows by 100x or
  more from the first to the last third of the network at initialisation.
- cause `label-leak`: the untrained model already predicts the labels; they reach it through
  the inputs.
- cause `data-labels`: labels outside the loss's range (class ids >= C, binary targets outside
  [0, 1]) or one target for the whole batch.
- cause `data-duplicates`: every input of the batch is the same.
- cause `probabilities-as-logits`: the model ends in a softmax (rows in [0, 1] summing to 1) or
  a sigmoid, and the loss (`cross_entropy`, `binary_cross_entropy_with_logits`) applies its own:
  predictions cannot become confident, the loss keeps a high floor and learning crawls.
- cause `model-mismatch`: the batch cannot be memorised and no other check found why; the
  outputs or the loss may not fit the task.

"""

FOOTER = """## Writing your own rule

```python
import numpy as np
import gradscope
from gradscope import Finding, Threshold, Cause

@gradscope.rule(sign="grad-exploding", severity="warning", title="Head gradient too large",
                needs=("grad_norm",),
                thresholds={"limit": Threshold(100.0, "largest head gradient norm I accept")})
def head_too_large(ctx):
    last = ctx.last
    if last is None:
        return None
    norm = last.layer_grad_norm(ctx.layout)[-1]
    if not norm > ctx.t["limit"]:
        return None
    return Finding(summary=f"head gradient norm {norm:.3g}",
                   causes=[Cause("lr-too-high", 1.0, "the head takes the largest steps")])

scope = gradscope.watch(model, opt, rules=[*gradscope.builtin_rules(), head_too_large])
```

A rule reads a `gradscope.RuleContext`: `ctx.records` (the recorded steps, each a
`gradscope.StepRecord`), `ctx.last`, `ctx.losses` (every step's loss) and `ctx.layout` (a
`gradscope.ModelLayout`: parameter and layer names). A record's per-parameter arrays follow
`ctx.layout.params`; `record.activations` is a `gradscope.ActivationTable` (a mapping from
module name to `gradscope.ActivationStats`, with `column(field)` for one field of every
module) and `record.data` a `gradscope.DataStats` (or None). `record.derived(key, compute)`
keeps a value worked out from the record so that other rules can reuse it.
"""


def rule_section(rule: Rule) -> str:
    """One rule's entry: sign, severity, what it checks, thresholds, causes."""
    lines = [f"## `{rule.id}` — {rule.title}", ""]
    lines.append(f"- sign: `{rule.sign}`")
    lines.append(f"- severity: `{rule.severity}`")
    if rule.description:
        lines.append(f"- raises when: {rule.description}")
    if rule.needs:
        lines.append("- signals: " + ", ".join(f"`{n}`" for n in rule.needs))
    if rule.causes:
        lines.append("- causes it can name: " + ", ".join(f"`{c}`" for c in rule.causes))
    lines.append("")
    if rule.thresholds:
        lines += ["| threshold | default | why |", "|---|---|---|"]
        for name, threshold in rule.thresholds.items():
            why = threshold.source.replace("|", "\\|")
            lines.append(f"| `{name}` | {fmt(threshold.default)} | {why} |")
        lines.append("")
    return "\n".join(lines)


def render(rules: list[Rule] | None = None) -> str:
    """The whole Markdown page.

    Example:
        >>> "## `loss-flat`" in render()
        True
    """
    rules = builtin_rules() if rules is None else rules
    body = "\n".join(rule_section(r) for r in rules)
    return f"{HEADER}\n{body}\n{CHECKUP}{FOOTER}"


if __name__ == "__main__":
    print(render(), end="")
