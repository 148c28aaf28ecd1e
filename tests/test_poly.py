"""Polynomial approximations: stated errors, torch form == numpy, stated depth == fhe_ops.analyze."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cgf_fhe import fhe_ops
from cgf_fhe import poly as P

CASES = [  # (function, interval, fit kwargs)
    ("exp", (-30.0, 6.0), dict(degree=15, squarings=2)),
    ("exp", (-30.0, 6.0), dict(degree=7, squarings=4)),
    ("exp", (-12.0, 0.0), dict(degree=15)),
    ("exp", (-8.0, 1.0), dict(form="square", r=7)),
    ("gelu", (-8.0, 8.0), dict(degree=31)),
    ("gelu", (-6.0, 5.0), dict(degree=15, form="powers")),
    ("tanh", (-4.0, 4.0), dict(degree=15)),
    ("tanh", (-2.0, 2.0), dict(degree=7, form="powers")),
    ("invsqrt", (0.25, 40.0), dict(degree=31, method="lsq", relative=True)),
]


@pytest.mark.parametrize("name,iv,kw", CASES)
def test_meets_stated_error_on_dense_grid(name, iv, kw):
    p = P.fit(name, *iv, **kw)
    f = P.FUNCTIONS[name]
    xs = np.linspace(iv[0], iv[1], 200_003)  # denser than, and offset from, the fitting grid
    err = np.abs(p.numpy_eval(xs) - f(xs)).max()
    assert math.isfinite(p.max_error)
    assert err <= p.max_error * 1.01 + 1e-12, (name, err, p.max_error)
    # and the approximations are useful, not just self-consistent
    scale = np.abs(f(xs)).max()
    assert p.max_error < 0.15 * scale, (name, p.max_error, scale)


def test_target_error_picks_smallest_degree():
    p = P.fit("tanh", -3, 3, max_error=1e-3)
    assert p.max_error <= 1e-3
    q = P.fit("tanh", -3, 3, degree=p.degree - 1)
    assert q.max_error > 1e-3
    e = P.fit_exp(-40.0, 8.0, 15, rel_target=1e-4)
    assert e.max_rel_error <= 1e-4 and e.squarings >= 1
    assert P.fit("exp", -40.0, 8.0, degree=15, squarings=e.squarings - 1).max_rel_error > 1e-4


def test_range_reduction_beats_plain_exp_on_wide_interval():
    plain = P.fit("exp", -35, 9, degree=15)
    reduced = P.fit("exp", -35, 9, degree=15, squarings=2)
    assert reduced.max_error < plain.max_error / 1000
    assert reduced.depth() == plain.depth() + 2


@pytest.mark.parametrize("name,iv,kw", CASES)
def test_torch_form_equals_numpy(name, iv, kw):
    p = P.fit(name, *iv, **kw)
    xs = np.linspace(iv[0], iv[1], 5001)
    ref = p.numpy_eval(xs)
    got = p.evaluate(torch.tensor(xs, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())
    # prescaled input (alpha folded upstream) gives the same values
    got2 = p.evaluate(torch.tensor(xs * p.alpha, dtype=torch.float64), prescaled=True).numpy()
    np.testing.assert_allclose(got2, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())
    # the Chebyshev-basis forms are stable in float32 too
    if p.form == "ps":
        got32 = p.evaluate(torch.tensor(xs, dtype=torch.float32)).double().numpy()
        assert np.abs(got32 - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-5


def test_ps_closed_form_depth_and_mult_counts():
    for k in range(1, 7):
        d = 2 ** k - 1
        for m in (2, 4, 8):
            if m > d + 1:
                continue
            # generic coefficients (no cancellation: exactly-zero split terms would be skipped, see NEGLIGIBLE)
            coef = list(np.random.default_rng(d * 10 + m).uniform(0.5, 1.5, d + 1))
            p = P.PolyApprox("t", -1, 1, d, "ps", coef, baby=m)
            s = p.stats(prescaled=True)
            assert s["depth"] == P.ps_depth_closed(d, m)
            g = round(math.log2((d + 1) / m))
            assert s["ct_ct"] == (m - 2) + g + (2 ** g - 1)
        # m = 2 reaches the optimum log2(d+1); powers need one more level and d-1 products
        assert P.form_depth("ps", d, prescaled=True, baby=2) == k
        pw = P.PolyApprox("t", -1, 1, d, "powers", [1.0] * (d + 1)).stats(prescaled=True)
        if d > 1:
            assert pw["depth"] == math.ceil(math.log2(d)) + 1 and pw["ct_ct"] == d - 1


def _export_depth(module, x, name="x"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, (x,), dynamo=True, opset_version=18, input_names=[name],
                                 output_names=["y"], verbose=False)
    model = prog.model_proto
    an = fhe_ops.analyze(model, [name])
    ops = {n.op_type for n in an.nodes if n.encrypted}
    return an, ops


DEPTH_CASES = [
    ("tanh", dict(degree=1)), ("tanh", dict(degree=3)), ("tanh", dict(degree=7)), ("tanh", dict(degree=8)),
    ("tanh", dict(degree=12)), ("tanh", dict(degree=15)), ("gelu", dict(degree=31)),
    ("tanh", dict(degree=5, form="powers")), ("tanh", dict(degree=9, form="powers")),
    ("exp", dict(degree=15, squarings=3)), ("exp", dict(degree=7, form="powers", squarings=1)),
    ("exp", dict(form="square", r=5)),
]


@pytest.mark.parametrize("name,kw", DEPTH_CASES)
def test_stated_depth_equals_fhe_ops_analyze(name, kw):
    iv = {"exp": (-10.0, 2.0), "tanh": (-3.0, 3.0), "gelu": (-6.0, 6.0)}[name]
    p = P.fit(name, *iv, **kw)
    mod = {"exp": P.PolyExp, "tanh": P.PolyTanh, "gelu": P.PolyGELU}[name](p)
    x = torch.linspace(iv[0], iv[1], 24).reshape(2, 3, 4)
    for prescaled in (False, True):
        mod.prescaled = prescaled
        an, ops = _export_depth(mod, x)
        assert not an.violations
        assert an.total_depth == mod.depth == p.depth(prescaled=prescaled), (prescaled, an.total_depth, mod.depth)
        assert ops <= {"Mul", "Add", "Sub"}, ops  # no Pow, Div or transcendental on the ciphertext
    assert mod.depth == p.depth() - 1


def _ln_input(h=16, n=40, seed=0, lo=0.5, hi=20.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n // 2, h, generator=g, dtype=torch.float64)
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True)
    scale = torch.exp(torch.empty(2, n // 2, 1, dtype=torch.float64).uniform_(math.log(lo) / 2, math.log(hi) / 2,
                                                                                generator=g))
    return x * scale + torch.randn(2, n // 2, 1, generator=g, dtype=torch.float64)


def test_newton_layernorm_accuracy_and_depth():
    h = 16
    ln = nn.LayerNorm(h, eps=1e-12).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.2, 0.2)
    approx = P.fit("invsqrt", 0.4, 25.0, degree=15, method="lsq", relative=True)
    rels = [P.NewtonLayerNorm(approx, n, ln=ln).rel_error() for n in range(4)]
    assert all(b < a for a, b in zip(rels, rels[1:]))  # Newton steps converge
    mod = P.NewtonLayerNorm(approx, 2, ln=ln)
    x = _ln_input(h)
    with torch.no_grad():
        ref, got = ln(x), mod(x)
    centred = (ref - ln.bias).abs().max()
    assert (got - ref).abs().max() <= rels[2] * centred * 1.01 + 1e-9
    assert mod.depth == 2 + approx.depth(prescaled=True) + 2 * 2  # the last Newton step absorbs the output product
    assert mod.n_out == 0 and mod.n_seen == x.shape[0] * x.shape[1]
    an, ops = _export_depth(mod.float(), x.float())
    assert not an.violations and an.total_depth == mod.depth
    assert "Sqrt" not in ops and "Div" not in ops
    assert _no_centring_matrix(an, x.shape[-1])


def _no_centring_matrix(an, h):
    """No encrypted MatMul and no H x H constant: centring is x*s - ReduceSum(x)*(s/H) (issue #22, item 1)."""
    assert not any(n.op_type in ("MatMul", "Gemm") for n in an.nodes if n.encrypted)
    return True


def test_frozen_layernorm_is_depth_one_without_matrix():
    h = 12
    ln = nn.LayerNorm(h, eps=0.0)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.2, 0.2)
    x = torch.randn(3, 5, h)
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True) * 2.5 + 0.3  # variance 6.25
    mod = P.FrozenLayerNorm(1 / 2.5, ln=ln)
    torch.testing.assert_close(mod(x), ln(x), rtol=1e-5, atol=1e-5)
    assert mod.weight is ln.weight and set(dict(mod.named_parameters())) == {"weight", "bias"}
    an, ops = _export_depth(mod, x)
    assert not an.violations and an.total_depth == mod.depth == 1
    # x*g and ReduceSum(x)*(g/H): two level-consuming elementwise products in parallel, no H x H matrix
    assert sum(n.levels for n in an.nodes if n.encrypted) == 2
    assert _no_centring_matrix(an, h) and "ReduceSum" in ops


def test_exp_counts_only_valid_positions_and_penalty():
    p = P.fit("exp", -10.0, 2.0, degree=15)
    mod = P.PolyExp(p)
    x = torch.empty(2, 3, 4, 5).uniform_(-9.0, 1.5)
    valid = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    valid[1, ..., 3:] = False
    y = mod(x, valid=valid)
    assert mod.n_out == 0 and mod.n_seen == int(valid.expand_as(x).sum())
    assert float(mod.last_penalty) == 0.0
    torch.testing.assert_close(y, torch.exp(x), atol=1e-3 * math.e ** 2, rtol=1e-3)
    mod.reset_counters()
    x2 = x.clone().requires_grad_(True)
    with torch.no_grad():
        x2[0, 0, 0, 0] = 5.0  # valid, above
        x2[1, 2, 1, 2] = -50.0  # valid, below
        x2[0, 1, 3, 4] = 9.0  # valid, above
        x2[1, 0, 0, 4] = 40.0  # masked key: not counted
    mod(x2, valid=valid)
    assert mod.n_out == 3
    rep = mod.interval_stats()
    assert rep["out_min"] == -50.0 and rep["out_max"] == 9.0
    assert float(mod.last_penalty.detach()) > 0
    mod.last_penalty.backward()
    assert x2.grad[0, 0, 0, 0] > 0 and x2.grad[1, 2, 1, 2] < 0 and x2.grad[1, 0, 0, 4] == 0


def test_settings_round_trip():
    for mod in (P.PolyExp(P.fit_exp(-20, 4, 15)), P.PolyGELU(P.fit("gelu", -5, 5, degree=15)),
                P.NewtonLayerNorm(P.fit("invsqrt", 0.3, 9, degree=7, method="lsq", relative=True), 2, hidden=8),
                P.FrozenLayerNorm(0.7, hidden=8)):
        import json
        d = json.loads(json.dumps(mod.to_settings()))
        back = P.module_from_settings(d)
        x = torch.linspace(0.5, 3.0, 32).reshape(4, 8)
        torch.testing.assert_close(back(x), mod(x))
        assert back.depth == mod.depth


def test_negligible_coefficients_are_not_multiplied():
    """A split coefficient below 2^-40 (cancellation residue) would encode to 0 in CKKS, and TenSEAL then
    returns a ciphertext at an unplanned level: the schedule skips that product instead."""
    # the baby-step split computes r[3] = c[3] - c[5]: equal up to 1e-15 here
    coef = [0.3, 0.7, -0.2, 0.1 + 1e-15, 0.4, 0.1, -0.05, 0.02]
    p = P.PolyApprox("t", -1, 1, 7, "ps", coef, baby=2)
    clean = P.PolyApprox("t", -1, 1, 7, "ps", coef[:3] + [0.1] + coef[4:], baby=2)
    xs = np.linspace(-1, 1, 101)
    np.testing.assert_allclose(p.evaluate(torch.tensor(xs)).numpy(), p.numpy_eval(xs), atol=1e-12)
    generic = P.PolyApprox("t", -1, 1, 7, "ps", coef[:3] + [0.35] + coef[4:], baby=2)
    # the skipped product leaves that baby-step sum a plaintext constant: one ct-ct product becomes ct-pt
    sp, sg = p.stats(prescaled=True), generic.stats(prescaled=True)
    assert sp["ct_ct"] == sg["ct_ct"] - 1 and sp["add"] == sg["add"] - 1
    assert p.stats(prescaled=True) == clean.stats(prescaled=True)


@pytest.mark.parametrize("name,iv,kw", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_backward_uses_the_derivative_with_same_values_and_gradients(name, iv, kw, dtype):
    p = P.fit(name, *iv, **kw)
    xs = torch.linspace(iv[0], iv[1], 4001, dtype=dtype)
    w = torch.randn(4001, dtype=dtype, generator=torch.Generator().manual_seed(0))  # a generic upstream gradient
    x1 = xs.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y1 = p.evaluate(x1)
    (g1,) = torch.autograd.grad((y1 * w).sum(), x1)
    x0 = xs.clone().requires_grad_(True)
    recorded = []
    with P.autograd_through_schedule(), torch.autograd.graph.saved_tensors_hooks(
            lambda t: recorded.append(t.numel()) or t, lambda t: t):
        y0 = p.evaluate(x0)
    (g0,) = torch.autograd.grad((y0 * w).sum(), x0)
    assert torch.equal(y1, y0)  # the forward is the encrypted schedule itself
    # the derivative polynomial gives autograd's gradient (float32: the reference itself carries rounding)
    scale = float(g0.abs().max())
    assert float((g1 - g0).abs().max()) <= (1e-9 if dtype == torch.float64 else 2e-4) * scale
    # and autograd keeps at most t (+ the inner series) instead of every intermediate product
    assert sum(saved) <= 2 * 4001 and sum(recorded) >= 4 * sum(saved)


def test_layernorm_variance_penalty_is_differentiable_and_pulls_outliers_in():
    """The LayerNorm's interval penalty (issue #22) has a gradient that shrinks the variance of the tokens above
    the interval and leaves tokens inside it alone."""
    h = 16
    approx = P.fit("invsqrt", 0.5, 4.0, degree=7, method="lsq", relative=True)
    mod = P.NewtonLayerNorm(approx, 0, hidden=h)
    mod.train()
    x = torch.randn(2, 4, h)
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True)  # variance 1: inside
    x[0, 1] *= 10.0  # variance 100: a massive-activation token, far above 4
    x.requires_grad_(True)
    mod(x)
    pen = mod.last_penalty
    assert pen is not None and pen.requires_grad
    expected = math.log(100.0 / 4.0) ** 2 / 8  # one of 8 tokens, squared log-excess
    assert abs(float(pen) - expected) < 1e-3 * expected
    pen.backward()
    g = x.grad
    assert float(g[0, 1].norm()) > 0 and float(g[0, 0].abs().max()) == 0.0 and float(g[1].abs().max()) == 0.0
    assert float((g[0, 1] * x[0, 1]).sum()) > 0  # descending the gradient shrinks that token's spread


def test_band_fit_moves_gelu_error_from_the_core_to_the_tails():
    """MiniLM's layer-0 GELU inputs span ~[-21, 29] (margin included) around a 99.98% core of ~[-6, 3]: a plain
    degree-31 interpolation errs ~0.15 everywhere, core included; the band fit (tails weighted 0.1) must err
    at least 2x less in the core, stay bounded in the tails, state its error over the whole interval, and
    round-trip its core through the settings."""
    a, b, core = -21.0, 29.0, (-6.0, 3.0)
    plain = P.fit("gelu", a, b, degree=31)
    band = P.fit("gelu", a, b, degree=31, method="band", core=core, tail_weight=0.1)
    f = P.FUNCTIONS["gelu"]
    xc = np.linspace(*core, 50_001)
    xa = np.linspace(a, b, 200_003)
    err_core = lambda p: np.abs(p.numpy_eval(xc) - f(xc)).max()  # noqa: E731
    assert err_core(band) < 0.5 * err_core(plain), (err_core(band), err_core(plain))
    assert np.abs(band.numpy_eval(xa) - f(xa)).max() <= band.max_error * 1.01
    assert band.max_error < 3 * plain.max_error  # the tails pay, boundedly
    assert band.depth() == plain.depth()
    back = P.PolyApprox.from_dict(band.to_dict())
    assert back.core == core and back.tail_weight == 0.1 and back.coeffs == band.coeffs
    with pytest.raises(ValueError, match="needs core"):
        P.fit("gelu", a, b, degree=31, method="band")
    with pytest.raises(ValueError, match="tail_weight"):
        P.fit("gelu", a, b, degree=31, method="band", core=core, tail_weight=0.0)
