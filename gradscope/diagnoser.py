"""Diagnoser: runs a RuleEngine on a stream of records at the documented cadence.

The same loop serves a live run (Scope) and a run log read back (RunLog.replay), so the
rules see the same records at the same points in both.
"""

from __future__ import annotations

from .diagnosis import Diagnosis
from .history import History, StepRecord
from .rules.engine import RuleCadence, RuleEngine


class Diagnoser:
    """The rule engine and its cadence over one History.

    `feed(record)` after each record is appended runs the rules when the cadence says so
    (see RuleCadence) and returns the diagnoses that are new or changed; `catch_up()` runs
    them on the records they have not seen yet (before answering diagnose(), report(), close()).

    Example:
        >>> import torch
        >>> from gradscope.layout import ModelLayout
        >>> from gradscope.rules.engine import builtin_rules
        >>> history = History(ModelLayout.of(torch.nn.Linear(2, 2)))
        >>> diagnoser = Diagnoser(RuleEngine(builtin_rules()), history, every=1)
        >>> diagnoser.catch_up(), diagnoser.evaluations
        ([], 0)
    """

    def __init__(self, engine: RuleEngine, history: History, every: int) -> None:
        self.engine = engine
        self.history = history
        self.cadence = RuleCadence(every)
        self.evaluations = 0  # how many times the rules ran

    def feed(self, record: StepRecord) -> list[Diagnosis]:
        """Count in `record` (already in the history); run the rules if they are due."""
        if self.cadence.due(record):
            return self._evaluate()
        return []

    def catch_up(self, new_losses: bool = False) -> list[Diagnosis]:
        """Run the rules on the records they have not seen yet, or once more when
        `new_losses` (of unrecorded steps) reached the history since they last ran; when
        neither, nothing runs."""
        if not self.cadence.unevaluated and not (new_losses and self.history.last is not None):
            return []
        return self._evaluate()

    def diagnoses(self) -> list[Diagnosis]:
        """The diagnoses as of the last evaluation, most severe first (runs no rule)."""
        return self.engine.diagnoses()

    def _evaluate(self) -> list[Diagnosis]:
        unseen = self.cadence.unevaluated
        self.cadence.ran()
        self.evaluations += 1
        return self.engine.update(self.history, max(unseen, 1))
