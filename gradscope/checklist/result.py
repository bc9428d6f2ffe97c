"""CheckResult (one check's outcome) and Checkup (all of them, with report and plot)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..diagnosis import SEVERITY_RANK, Cause, Diagnosis

#: The checks in the order they run, with the names the report shows.
CHECK_TITLES = {
    "init-loss": "Loss at initialisation",
    "gradients": "One forward/backward",
    "data": "Data",
    "depth": "Signal through depth at init",
    "overfit": "Overfit one batch",
    "lr-range": "Learning-rate range test",
}


def finding(sign: str, severity: str, title: str, summary: str,
            causes: list[tuple[str, float, str]], check: str, *,
            layers: list[str] | None = None, evidence: dict[str, Any] | None = None,
            checks: list[str] | None = None) -> Diagnosis:
    """A Diagnosis from a checkup check (step 0: everything is measured before training).

    Example:
        >>> finding("loss-flat", "warning", "t", "s", [("lr-too-low", 1.0, "e")], "overfit").cause
        'lr-too-low'
    """
    merged: dict[str, tuple[float, list[str]]] = {}
    for cid, score, text in causes:  # one entry per cause id, the evidence of each kept
        weight, texts = merged.get(cid, (0.0, []))
        merged[cid] = (weight + score, [*texts, text])
    total = sum(score for score, _ in merged.values()) or 1.0
    return Diagnosis(
        sign=sign, severity=severity, title=title, summary=summary,
        causes=[Cause(cid, round(score / total, 3), "; ".join(texts))
                for cid, (score, texts) in merged.items()],
        layers=list(layers or []), first_step=0, last_step=0, evidence=dict(evidence or {}),
        checks=list(checks or []), rule=f"checkup:{check}")


@dataclass
class CheckResult:
    """One check: its status, how long it took, a one-line result and its diagnoses."""

    name: str
    seconds: float = 0.0
    summary: str = ""
    diagnoses: list[Diagnosis] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    @property
    def title(self) -> str:
        return CHECK_TITLES.get(self.name, self.name)

    @property
    def status(self) -> str:
        """'skipped', 'ok', or the worst severity among its diagnoses."""
        if self.skipped is not None:
            return "skipped"
        if not self.diagnoses:
            return "ok"
        return max((d.severity for d in self.diagnoses), key=SEVERITY_RANK.__getitem__)


@dataclass
class Checkup:
    """What gradscope.checkup() found: one CheckResult per check and their diagnoses.

    Example:
        >>> ck = Checkup(results=[CheckResult("data", summary="inputs float32")])
        >>> ck.diagnoses, ck.ok
        ([], True)
    """

    results: list[CheckResult]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def diagnoses(self) -> list[Diagnosis]:
        """Every check's diagnoses, most severe first (check order within a severity)."""
        found = [d for r in self.results for d in r.diagnoses]
        return sorted(found, key=lambda d: -SEVERITY_RANK[d.severity])

    @property
    def ok(self) -> bool:
        """True when no diagnosis is a warning or an error."""
        return all(d.severity == "info" for d in self.diagnoses)

    @property
    def times(self) -> dict[str, float]:
        """Seconds each check took, by check name."""
        return {r.name: r.seconds for r in self.results}

    def __getitem__(self, name: str) -> CheckResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no check named {name!r}; checks: {[r.name for r in self.results]}")

    def report(self, file: IO[str] | None = None, width: int | None = None) -> str:
        """Print the checkup report (rich on a terminal, plain text to `file`); return its text."""
        from .report import emit_checkup_report

        return emit_checkup_report(self, file=file, width=width)

    def plot(self, path: str | Path | None = None) -> Any:
        """Draw the checkup figure (overfit curve, lr sweep, gradient norms and activation
        scale at init): save it to `path` (.png, .svg or .pdf) and return the path, or return
        the matplotlib figure when no path is given."""
        from .plot import save_checkup_plot

        return save_checkup_plot(self, path)

    def __repr__(self) -> str:
        states = ", ".join(f"{r.name} {r.status}" for r in self.results)
        return f"<gradscope.Checkup {states}>"
