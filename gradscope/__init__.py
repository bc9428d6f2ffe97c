"""gradscope: training diagnostics for PyTorch.

Example:
    >>> import torch, gradscope
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> scope = gradscope.watch(model, opt)
    >>> loss = model(torch.randn(8, 4)).pow(2).mean(); loss.backward(); opt.step()
    >>> scope.step(loss)
    >>> scope.close(); scope.diagnose()
    []
"""

from ._version import __version__
from .checklist import CheckResult, Checkup, checkup
from .diagnosis import Cause, Diagnosis
from .errors import GradscopeError, GradscopeWarning
from .history import History
from .layout import ModelLayout
from .records import ActivationStats, ActivationTable, DataStats, StepRecord
from .report.sinks import Sink
from .rules import Finding, Rule, RuleContext, Threshold, builtin_rules, rule
from .scope import Scope, watch

__all__ = [
    "ActivationStats",
    "ActivationTable",
    "Cause",
    "CheckResult",
    "Checkup",
    "DataStats",
    "Diagnosis",
    "Finding",
    "GradscopeError",
    "GradscopeWarning",
    "History",
    "ModelLayout",
    "Rule",
    "RuleContext",
    "Scope",
    "Sink",
    "StepRecord",
    "Threshold",
    "__version__",
    "builtin_rules",
    "checkup",
    "rule",
    "watch",
]
