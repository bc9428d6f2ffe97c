"""The rule engine and the built-in rules (one module per sign family)."""

from .base import Finding, Rule, Threshold, rule
from .context import RuleContext
from .engine import RuleEngine, builtin_rules

__all__ = ["Finding", "Rule", "RuleContext", "RuleEngine", "Threshold", "builtin_rules", "rule"]
