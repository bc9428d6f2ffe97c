"""Rule: a pure function over the history, declared with the metadata docs and users read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..diagnosis import SEVERITY_RANK, Cause

if TYPE_CHECKING:
    from .context import RuleContext


@dataclass(frozen=True)
class Threshold:
    """A tunable number of a rule, with its default and where that default comes from."""

    default: float
    source: str


@dataclass
class Finding:
    """What a rule returns when its sign is present (the engine turns it into a Diagnosis)."""

    summary: str
    causes: list[Cause] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    first_step: int | None = None
    severity: str | None = None


@dataclass(frozen=True)
class Rule:
    """A diagnosis rule. Build one with the :func:`rule` decorator.

    Example:
        >>> @rule(sign="loss-flat", severity="warning", title="Loss is flat",
        ...       needs=("loss",), thresholds={"window": Threshold(5, "five records")})
        ... def my_rule(ctx):
        ...     return None
        >>> my_rule.id, my_rule.thresholds["window"].default
        ('my-rule', 5)
    """

    id: str
    sign: str
    severity: str
    title: str
    needs: tuple[str, ...]
    thresholds: dict[str, Threshold]
    causes: tuple[str, ...]
    check: Callable[[RuleContext], Finding | None]
    description: str = ""

    def __call__(self, ctx: RuleContext) -> Finding | None:
        return self.check(ctx)

    def resolve(self, overrides: dict[str, Any] | None) -> dict[str, float]:
        """Threshold values with the user's overrides applied (unknown names are an error)."""
        values = {name: t.default for name, t in self.thresholds.items()}
        for name, value in (overrides or {}).items():
            if name not in values:
                from ..errors import GradscopeError

                raise GradscopeError(
                    f"rule '{self.id}' has no threshold '{name}'; its thresholds are: "
                    f"{', '.join(sorted(values)) or 'none'}."
                )
            values[name] = value
        return values


def rule(
    *,
    sign: str,
    severity: str,
    title: str,
    needs: tuple[str, ...] = (),
    thresholds: dict[str, Threshold] | None = None,
    causes: tuple[str, ...] = (),
    id: str | None = None,
) -> Callable[[Callable[[RuleContext], Finding | None]], Rule]:
    """Declare a rule function with its metadata; the result plugs into `watch(rules=...)`.

    Example:
        >>> @rule(sign="loss-flat", severity="info", title="Loss never moved")
        ... def never_moved(ctx):
        ...     return None
        >>> never_moved.sign
        'loss-flat'
    """
    if severity not in SEVERITY_RANK:
        raise ValueError(f"severity must be one of {sorted(SEVERITY_RANK)}, got {severity!r}")

    def wrap(fn: Callable[[RuleContext], Finding | None]) -> Rule:
        doc = (fn.__doc__ or "").strip()
        return Rule(
            id=id or fn.__name__.replace("_", "-"),
            sign=sign, severity=severity, title=title, needs=tuple(needs),
            thresholds=dict(thresholds or {}), causes=tuple(causes), check=fn,
            description=doc.splitlines()[0] if doc else "",
        )

    return wrap
