"""Diagnosis and Cause: what the rule engine concludes, with the evidence behind it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("info", "warning", "error")
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}


def fails(diagnoses: Iterable[Diagnosis], fail_on: str) -> bool:
    """True when a diagnosis is at least as severe as `fail_on` ("never" never fails).

    Example:
        >>> fails([Diagnosis(sign="loss-flat", severity="warning", title="t")], "error")
        False
    """
    if fail_on == "never":
        return False
    return any(SEVERITY_RANK[d.severity] >= SEVERITY_RANK[fail_on] for d in diagnoses)


@dataclass(frozen=True)
class Cause:
    """One possible reason for a sign, with how likely the evidence makes it (0..1).

    Example:
        >>> Cause("lr-too-low", 0.8, "update/weight ratio 2e-08 vs ~1e-3 healthy").id
        'lr-too-low'
    """

    id: str
    likelihood: float
    evidence: str


@dataclass
class Diagnosis:
    """A sign seen in this run, its ranked causes, the layers and numbers behind it.

    Example:
        >>> d = Diagnosis(sign="loss-flat", severity="warning", title="Loss is flat",
        ...               causes=[Cause("lr-too-low", 0.8, "...")])
        >>> d.cause
        'lr-too-low'
    """

    sign: str
    severity: str
    title: str
    causes: list[Cause] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    first_step: int = 0
    last_step: int = 0
    evidence: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    summary: str = ""
    rule: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITY_RANK:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        self.causes = sorted(self.causes, key=lambda c: -c.likelihood)

    @property
    def cause(self) -> str | None:
        """Id of the most likely cause, or None when no cause could be ranked."""
        return self.causes[0].id if self.causes else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (used by the run log)."""
        return {
            "sign": self.sign, "severity": self.severity, "title": self.title,
            "causes": [{"id": c.id, "likelihood": c.likelihood, "evidence": c.evidence}
                       for c in self.causes],
            "layers": list(self.layers), "first_step": self.first_step,
            "last_step": self.last_step, "evidence": dict(self.evidence),
            "checks": list(self.checks), "summary": self.summary, "rule": self.rule,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diagnosis:
        causes = [Cause(c["id"], float(c["likelihood"]), c["evidence"]) for c in data["causes"]]
        return cls(**{**data, "causes": causes})


def by_severity(diagnoses: Iterable[Diagnosis]) -> list[Diagnosis]:
    """Most severe first, then by first step, then by sign (the order every report uses).

    Example:
        >>> found = [Diagnosis("loss-flat", "info", "a"), Diagnosis("grad-none", "error", "b")]
        >>> [d.sign for d in by_severity(found)]
        ['grad-none', 'loss-flat']
    """
    return sorted(diagnoses, key=lambda d: (-SEVERITY_RANK[d.severity], d.first_step, d.sign))
