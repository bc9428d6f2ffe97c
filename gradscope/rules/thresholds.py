"""Thresholds that several rule families share (one definition, one meaning).

Example:
    >>> HIGH_UPDATE.default
    0.01
"""

from __future__ import annotations

from .base import Threshold

HIGH_UPDATE = Threshold(
    1e-2, "update/weight ratio above which steps are too large: ten times the healthy ~1e-3")

SATURATED = Threshold(0.5, "fraction of a layer's outputs saturated/dead that blocks most of its "
                           "gradient (the >50%-of-a-layer rule used by AUTOTRAINER)")

DATA_SCALE = Threshold(1e3, "largest |input| considered normalised data; beyond it inputs "
                            "saturate or blow up the first layers")

DATA_TYPICAL = Threshold(
    20, "typical input magnitude (the larger of |mean| and std of the batch) above which the "
        "inputs are not normalised: standardised features have std ~1, images scaled to [0, 1] "
        "~0.3, while raw 8-bit pixels have a mean and std of tens to ~100")

__all__ = ["DATA_SCALE", "DATA_TYPICAL", "HIGH_UPDATE", "SATURATED"]
