"""cgf_fhe.stats: the one definition of the seed-set statistics."""
import math
import sys

import pytest

from cgf_fhe import stats
from cgf_fhe.errors import UserError
from cgf_fhe.training.evaluate import mean_std as eval_mean_std


def test_sample_std_and_single_value():
    ms = stats.mean_std([0.8186, 0.7990, 0.8113])
    assert ms.n == 3
    assert ms.mean == pytest.approx(0.809633, abs=1e-6)
    assert ms.std == pytest.approx(0.009905, abs=1e-6)  # ddof = 1 (ddof = 0 would give 0.008088)
    one = stats.mean_std([0.7])
    assert (one.mean, one.std, one.n) == (0.7, 0.0, 1)
    assert one.sem is None
    empty = stats.mean_std([])
    assert empty.n == 0 and math.isnan(empty.mean)


def test_evaluate_reuses_the_definition():
    assert eval_mean_std([1.0, 2.0, 4.0]) == stats.mean_std([1.0, 2.0, 4.0]).as_dict()
    assert eval_mean_std([3.0]) == {"mean": 3.0, "std": 0.0, "n": 1}


def test_paired_and_pool():
    a = {42: 0.8023, 7: 0.7990, 123: 0.8137}
    b = {42: 0.8186, 7: 0.8039, 5: 0.9}
    d = stats.paired_differences(a, b)
    assert list(d) == [42, 7]
    assert d[42] == pytest.approx(-0.0163)
    pooled = stats.pool({42: -2.45, 7: -0.49, 123: 0.0}, {1: -1.0, 2: 0.0, 3: -0.25})
    assert len(pooled) == 6
    with pytest.raises(UserError, match="seed 42"):
        stats.pool({42: 1.0}, {42: 2.0})


def test_t_interval_matches_scipy_and_table(monkeypatch):
    vals = [-2.45, -0.49, 0.0, -1.23, 0.0, -0.98]
    lo, hi = stats.t_interval(vals)
    ms = stats.mean_std(vals)
    half = 2.571 * ms.std / math.sqrt(6)  # t_{0.975, 5}
    assert lo == pytest.approx(ms.mean - half, abs=2e-3) and hi == pytest.approx(ms.mean + half, abs=2e-3)
    assert stats.t_interval([1.0]) is None
    monkeypatch.setitem(sys.modules, "scipy", None)  # import fails -> the table
    assert stats.t_quantile(5) == 2.571
    assert stats.t_quantile(100) == 1.96
    with pytest.raises(UserError, match="scipy"):
        stats.t_quantile(5, level=0.9)
