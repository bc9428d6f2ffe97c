"""RuleEngine: runs the enabled rules on each recorded step and keeps one Diagnosis per rule."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .. import records as record_views
from ..diagnosis import SEVERITY_RANK, Diagnosis, by_severity
from ..errors import GradscopeError, GradscopeWarning
from ..history import History, StepRecord, history_up_to
from ..layout import ModelLayout
from .advice import checks_for
from .base import Finding, Rule
from .context import RuleContext


def builtin_rules() -> list[Rule]:
    """Every rule gradscope ships, in the order the docs list them.

    Example:
        >>> "loss-flat" in [r.sign for r in builtin_rules()]
        True
    """
    from . import activations, data, gradients, loss, nonfinite, params

    rules: list[Rule] = []
    for module in (loss, gradients, params, activations, nonfinite, data):
        rules.extend(module.RULES)
    return rules


#: Evaluations in a row without its rule firing after which a warning is withdrawn.
RESOLVE_AFTER = 3
#: The rules run at most once per this many training steps: on every recorded step when
#: every >= RULE_STEPS, on every k-th record otherwise; at once on a record with NaN/Inf.
RULE_STEPS = 10


class RuleCadence:
    """When the rules run on a stream of records (the same live and when a log is replayed).

    Example:
        >>> cadence = RuleCadence(every=1)
        >>> cadence.period
        10
    """

    def __init__(self, every: int) -> None:
        self.period = -(-RULE_STEPS // max(int(every), 1))
        self.unevaluated = 0

    def due(self, record: StepRecord) -> bool:
        """Count `record` in; whether the rules should run now."""
        self.unevaluated += 1
        return self.unevaluated >= self.period or shows_nonfinite(record)

    def ran(self) -> None:
        self.unevaluated = 0


def shows_nonfinite(record: StepRecord) -> bool:
    """Whether a record holds NaN/Inf in its loss, gradients, weights or activations (a
    NaN loss with no loss tensor given counts as no loss, as in the rules)."""
    return bool((record.loss_given and not math.isfinite(record.loss))
                or np.any(record.grad_nonfinite) or record.nonfinite_origin is not None
                or _any_nonfinite_activation(record) or not record.weights_finite())


def _any_nonfinite_activation(record: StepRecord) -> bool:
    """Whether some module output held NaN/Inf: record.modules_over("nonfinite_frac", 0.0)
    is non-empty, read from the one column (checked on every record, most of which the
    rules then do not evaluate: no per-module dict is built for them)."""
    if not record.activations:
        return False
    column = record.activations.column("nonfinite_frac")
    if column.size <= record_views.SMALL_ARRAY:  # the same test on Python floats
        return any(v > 0.0 for v in column.tolist())
    with np.errstate(invalid="ignore"):
        return bool(np.any(column > 0.0))


class RuleEngine:
    """Evaluates rules over the history; a diagnosis that persists is updated, not repeated.

    Example:
        >>> import torch
        >>> engine = RuleEngine(builtin_rules())
        >>> engine.update(History(ModelLayout.of(torch.nn.Linear(2, 2))))
        []
    """

    def __init__(self, rules: list[Rule], thresholds: dict[str, dict[str, Any]] | None = None):
        thresholds = dict(thresholds or {})
        ids = {r.id for r in rules}
        unknown = sorted(set(thresholds) - ids)
        if unknown:
            raise GradscopeError(
                f"thresholds given for unknown rule(s) {', '.join(unknown)}; known rules: "
                f"{', '.join(sorted(ids))}."
            )
        self.rules = list(rules)
        self._values = {r.id: r.resolve(thresholds.get(r.id)) for r in self.rules}
        self._active: dict[str, Diagnosis] = {}
        self._silent: dict[str, int] = {}  # evaluations since an active diagnosis last fired
        self.resolved: list[Diagnosis] = []  # withdrawn diagnoses, oldest first
        self._off: set[str] = set()

    @classmethod
    def from_options(cls, options: Any, layout: ModelLayout | None = None) -> RuleEngine:
        available = {r.id: r for r in builtin_rules()}
        if options.rules is None:
            chosen = list(available.values())
        else:
            chosen = []
            for item in options.rules:
                if isinstance(item, Rule):
                    chosen.append(item)
                elif item in available:
                    chosen.append(available[item])
                else:
                    raise GradscopeError(
                        f"unknown rule '{item}' in rules=; use a Rule object or one of: "
                        f"{', '.join(sorted(available))}."
                    )
        for item in options.disable_rules:
            if item not in available and item not in {r.id for r in chosen}:
                raise GradscopeError(
                    f"unknown rule '{item}' in disable_rules=; use one of: "
                    f"{', '.join(sorted(available))}."
                )
        chosen = [r for r in chosen if r.id not in set(options.disable_rules)]
        return cls(chosen, options.thresholds)

    def thresholds(self, rule_id: str) -> dict[str, Any]:
        return dict(self._values[rule_id])

    def evaluate(self, history: History) -> list[tuple[Rule, Finding]]:
        """Run every enabled rule once on `history`; a rule that raises is switched off for
        the rest of the run (the only engine state this changes)."""
        shared: dict[str, Any] = {}  # the values derived once per evaluation (RuleContext.memo)
        found = []
        for rule in self.rules:
            if rule.id in self._off:
                continue
            try:
                finding = rule(RuleContext(history, self._values[rule.id], shared))
            except Exception as err:
                self._off.add(rule.id)
                warnings.warn(
                    f"gradscope: rule '{rule.id}' failed ({type(err).__name__}: {err}) and is "
                    "switched off for this run.", GradscopeWarning, stacklevel=2)
                continue
            if finding is not None:
                found.append((rule, finding))
        return found

    def update(self, history: History, unseen: int = 1) -> list[Diagnosis]:
        """Evaluate on the newest record; return the diagnoses that are new or changed.

        `unseen`: how many of the latest records no evaluation has seen yet (RuleCadence).
        A sign that is new is then also looked for in the history as it stood at each of
        them, oldest first, so that its first step does not depend on when the rules ran.
        """
        last = history.last
        if last is None:
            return []
        changed = []
        fired = set()
        for rule, finding in self.evaluate(history):
            fired.add(rule.id)
            if rule.id not in self._active and unseen > 1:
                finding = self._earliest(rule, history, unseen, finding)
            diagnosis = self._merge(rule, finding, last.step)
            if diagnosis is not None:
                changed.append(diagnosis)
        self._retire(fired)
        return changed

    def _earliest(self, rule: Rule, history: History, unseen: int, finding: Finding) -> Finding:
        """`finding`, with the first step of the earliest unseen record it already held on."""
        for drop in range(unseen - 1, 0, -1):
            earlier = history_up_to(history, drop)
            try:
                found = rule(RuleContext(earlier, self._values[rule.id]))
            except Exception:  # the full evaluation reports failures; this is best effort
                return finding
            if found is not None:
                first = (found.first_step if found.first_step is not None
                         else earlier.last.step if earlier.last is not None else 0)
                if finding.first_step is None or first < finding.first_step:
                    finding.first_step = first
                return finding
        return finding

    def _retire(self, fired: set[str]) -> None:
        """Withdraw warnings and infos whose rule stayed silent for RESOLVE_AFTER evaluations
        (the loss started moving, the gradient came back); errors stay: a NaN happened."""
        for rule_id in list(self._active):
            if rule_id in fired:
                self._silent.pop(rule_id, None)
                continue
            self._silent[rule_id] = self._silent.get(rule_id, 0) + 1
            diagnosis = self._active[rule_id]
            if diagnosis.severity != "error" and self._silent[rule_id] >= RESOLVE_AFTER:
                self.resolved.append(self._active.pop(rule_id))
                del self._silent[rule_id]

    def _merge(self, rule: Rule, finding: Finding, step: int) -> Diagnosis | None:
        severity = finding.severity or rule.severity
        finding.layers = list(dict.fromkeys(finding.layers))  # each name once
        finding.evidence = {key: _once(value) for key, value in finding.evidence.items()}
        finding.causes = sorted(finding.causes, key=lambda c: -c.likelihood)
        finding.checks = checks_for(finding.causes, finding.checks)
        existing = self._active.get(rule.id)
        first = finding.first_step if finding.first_step is not None else step
        if existing is None:
            diagnosis = Diagnosis(
                sign=rule.sign, severity=severity, title=rule.title, causes=finding.causes,
                layers=finding.layers, first_step=first, last_step=step,
                evidence=finding.evidence, checks=finding.checks, summary=finding.summary,
                rule=rule.id,
            )
            self._active[rule.id] = diagnosis
            return diagnosis
        news = (existing.cause != (finding.causes[0].id if finding.causes else None)
                or SEVERITY_RANK[severity] > SEVERITY_RANK[existing.severity])
        existing.last_step = step
        existing.first_step = min(existing.first_step, first)
        if SEVERITY_RANK[severity] >= SEVERITY_RANK[existing.severity]:
            existing.severity = severity
            existing.causes = sorted(finding.causes, key=lambda c: -c.likelihood)
            existing.layers = finding.layers
            existing.evidence = finding.evidence
            existing.checks = finding.checks
            existing.summary = finding.summary
        return existing if news else None

    def diagnoses(self) -> list[Diagnosis]:
        """Diagnoses that still hold (and every error), most severe first, then by first step."""
        return by_severity(self._active.values())


def _once(value: Any) -> Any:
    """A list of names with each name once (evidence lists name a module per finding)."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(dict.fromkeys(value))
    return value
