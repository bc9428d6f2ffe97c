"""gradscope.checkup(): the debugging checklist, run on copies before training starts."""

from .result import CHECK_TITLES, CheckResult, Checkup
from .run import checkup

__all__ = ["CHECK_TITLES", "CheckResult", "Checkup", "checkup"]
