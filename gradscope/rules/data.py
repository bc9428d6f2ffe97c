"""Rule on the input batches: non-finite values, non-float dtypes, extreme scale."""

from __future__ import annotations

from .base import Finding, Threshold, rule
from .common import fmt, ranked
from .context import RuleContext
from .thresholds import DATA_SCALE, DATA_TYPICAL

EMBEDDING_TYPES = ("Embedding", "EmbeddingBag")


@rule(sign="data-suspect", severity="warning", title="Input batches look wrong",
      needs=("data",),
      thresholds={"scale": DATA_SCALE, "typical": DATA_TYPICAL,
                  "window": Threshold(3, "recorded steps with suspect inputs before it is "
                                         "reported (non-finite inputs are reported at once)")},
      causes=("data-nonfinite", "data-scale", "data-dtype"))
def data_suspect(ctx: RuleContext) -> Finding | None:
    """Inputs hold NaN/Inf, come as integers to a model without embeddings, or are huge."""
    inputs = [(r.step, r.data) for r in ctx.records if r.data is not None]
    if not inputs:
        return None
    nonfinite = [(step, d) for step, d in inputs if d.nonfinite > 0]
    window = int(ctx.t["window"])
    tail = inputs[-window:] if len(inputs) >= window else []
    has_embedding = ctx.layout.static("has_embedding", lambda: any(
        t in EMBEDDING_TYPES for t in ctx.layout.module_types.values()))
    wrong_dtype = bool(tail) and not has_embedding and all(not d.is_float for _, d in tail)
    huge = bool(tail) and all(unnormalised(d, ctx.t["scale"], ctx.t["typical"])
                              for _, d in tail)
    if not (nonfinite or wrong_dtype or huge):
        return None
    last = (nonfinite or tail)[-1][1]
    scores = []
    if nonfinite:
        scores.append(("data-nonfinite", 2.0,
                       f"{last.nonfinite} NaN/Inf value(s) in the input at step "
                       f"{nonfinite[-1][0]}"))
    if wrong_dtype:
        scores.append(("data-dtype", 1.0,
                       f"inputs arrive as {last.dtype} and the model has no embedding layer"))
    if huge:
        peak = max(abs(last.min), abs(last.max))
        scores.append(("data-scale", 1.0,
                       f"inputs reach |x| = {fmt(peak)} (mean {fmt(last.mean)}, std "
                       f"{fmt(last.std)}); normalised data has a mean near 0 and a std near 1 "
                       "(8-bit images: divide by 255)"))
    first_step = (nonfinite or tail)[0][0]
    return Finding(
        summary=f"input batch: {scores[0][2]}",
        causes=ranked(scores), severity="error" if nonfinite else None,
        first_step=first_step,
        evidence={"dtype": last.dtype, "min": last.min, "max": last.max, "mean": last.mean,
                  "std": last.std, "nonfinite": last.nonfinite},
        checks=[
            "Check the data pipeline for missing values and divisions by zero.",
            "Normalise features (subtract the mean, divide by the std of the training set).",
            "Cast inputs to float (x.float()) unless the first layer is an embedding.",
        ],
    )


def _typical(data) -> float:
    """The typical magnitude of a batch: the larger of |mean| and std."""
    return max(abs(data.mean), data.std)


def unnormalised(data, scale: float = DATA_SCALE.default,
                 typical: float = DATA_TYPICAL.default) -> bool:
    """Whether a float input batch is far from normalised: some |x| over `scale`, or a typical
    magnitude (|mean| or std) over `typical`.

    Example:
        >>> from gradscope.records import DataStats
        >>> pixels = DataStats("float32", (8, 784), 0.0, 255.0, 33.0, 78.0, 0, True)
        >>> unnormalised(pixels), unnormalised(DataStats("float32", (8, 4), -3, 3, 0, 1, 0, True))
        (True, False)
    """
    return bool(data.is_float and (max(abs(data.min), abs(data.max)) > scale
                                   or _typical(data) > typical))


RULES = [data_suspect]
