"""Seed-set statistics, defined once: mean and sample standard deviation, paired differences, pooling of
seed sets and Student-t confidence intervals.

Conventions (every caller in the package and in ``benchmarks/`` relies on them):

* the standard deviation is the *sample* standard deviation (ddof = 1);
* a single value has standard deviation ``0.0`` and ``n == 1`` -- one observation shows no spread, and the
  training summaries have always stored 0.0 there. Anything that prints a spread must look at ``n`` and say
  "n = 1, no std" instead of printing 0; a t-interval needs ``n >= 2`` and is ``None`` otherwise;
* an empty list gives ``mean = std = nan`` and ``n == 0``;
* a paired difference is ``a - b`` per key (seed) present in both, in the order of ``a``.

The t quantile comes from scipy when it is installed (it is not a dependency); otherwise from a table of
two-sided 95% quantiles for 1-30 degrees of freedom, then 1.96. Other levels need scipy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .errors import UserError

# two-sided 95% Student-t quantiles t_{0.975, df} for df = 1 .. 30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n}

    @property
    def sem(self) -> float | None:
        """Standard error of the mean (None below two values)."""
        return self.std / math.sqrt(self.n) if self.n >= 2 else None


def mean_std(values: Iterable[float]) -> MeanStd:
    """Mean and sample standard deviation (ddof = 1; 0.0 for one value; nan for none)."""
    vals = [float(v) for v in values]
    if not vals:
        return MeanStd(float("nan"), float("nan"), 0)
    mean = math.fsum(vals) / len(vals)
    if len(vals) == 1:
        return MeanStd(mean, 0.0, 1)
    var = math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return MeanStd(mean, math.sqrt(var), len(vals))


def paired_differences(a: Mapping, b: Mapping) -> dict:
    """``{key: a[key] - b[key]}`` for the keys of ``a`` that ``b`` also has (None values are skipped)."""
    return {k: float(a[k]) - float(b[k]) for k in a
            if k in b and a[k] is not None and b[k] is not None}


def pool(*groups: Mapping) -> dict:
    """Pool seed sets ``{seed: value}`` into one; a seed in two sets is an error (they would not be independent)."""
    out: dict = {}
    for g in groups:
        for k, v in g.items():
            if k in out:
                raise UserError(f"cannot pool: seed {k} appears in two seed sets")
            out[k] = v
    return out


def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t quantile for ``df`` degrees of freedom."""
    if df < 1:
        raise UserError(f"a t quantile needs at least 1 degree of freedom, got {df}")
    try:
        from scipy import stats as _st
    except ImportError:
        if abs(level - 0.95) > 1e-12:
            raise UserError(f"t quantile at level {level} needs scipy (only 0.95 is tabulated)") from None
        return _T975[df - 1] if df <= len(_T975) else 1.96
    return float(_st.t.ppf(0.5 + level / 2, df))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Confidence interval for the mean of ``values`` (None below two values)."""
    ms = mean_std(values)
    if ms.n < 2:
        return None
    half = t_quantile(ms.n - 1, level) * ms.sem
    return ms.mean - half, ms.mean + half
