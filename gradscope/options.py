"""Validated keyword options of :func:`gradscope.watch`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import GradscopeError

LiveMode = bool | str


@dataclass(frozen=True)
class WatchOptions:
    """Everything `watch(model, optimizer, **options)` accepts.

    Example:
        >>> WatchOptions.from_kwargs({"every": 5}).every
        5
    """

    live: LiveMode = False
    every: int = 10
    log_dir: str | Path | None = None
    rules: tuple[str, ...] | None = None
    disable_rules: tuple[str, ...] = ()
    thresholds: dict[str, Any] = field(default_factory=dict)
    history_size: int = 1000
    update_sample: int = 256
    activations: bool = True
    nonfinite_origin: bool = True
    refresh_per_second: float = 4.0
    all_ranks: bool = False

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> WatchOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise GradscopeError(
                f"watch() got unknown option(s) {', '.join(unknown)}; "
                f"use one of: {', '.join(sorted(known))}."
            )
        values = dict(kwargs)
        for name in ("rules", "disable_rules"):
            if values.get(name) is not None and not isinstance(values[name], tuple):
                if isinstance(values[name], str):
                    values[name] = (values[name],)
                values[name] = tuple(values[name])
        options = cls(**values)
        options.validate()
        return options

    def validate(self) -> None:
        if self.live not in (True, False, "auto"):
            raise GradscopeError(f"live={self.live!r} is not valid; pass True, False or 'auto'.")
        for name in ("every", "history_size", "update_sample"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GradscopeError(f"{name}={value!r} must be a positive integer.")
        if not isinstance(self.thresholds, dict):
            raise GradscopeError(
                "thresholds must be a dict like {'grad-vanishing': {'ratio': 1e-4}}."
            )
        if self.refresh_per_second <= 0:
            raise GradscopeError("refresh_per_second must be greater than 0.")
