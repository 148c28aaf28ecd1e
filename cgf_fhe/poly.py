"""Polynomial stand-ins for BERT's non-linearities, evaluated exactly as a CKKS evaluator would.

Fitting
-------
:func:`fit` approximates ``f`` on ``[a, b]`` by a polynomial in the normalised variable
``t = alpha*x + beta`` with ``alpha = 2/(b-a)``, ``beta = -(a+b)/(b-a)`` (so ``t`` is in [-1, 1] and every
Chebyshev polynomial / power of ``t`` stays in [-1, 1]: CKKS values must stay bounded). Methods:
Chebyshev interpolation (``numpy.polynomial.chebyshev.chebinterpolate``, near-minimax) or weighted least
squares (``chebfit``; used for 1/sqrt with relative-error weights). Give a ``degree`` or a target
``max_error`` (smallest degree that meets it). The achieved max error is measured on a dense grid
(:data:`GRID` points) and stored in :attr:`PolyApprox.max_error`.

Evaluation forms (torch code uses only ``+``, ``-``, elementwise ``*`` and multiplication by constants --
never ``**``, ``/`` or a transcendental; the same code runs on a depth tracker, see :meth:`PolyApprox.stats`)
------------------------------------------------------------------------------------------------------------
Level model (:mod:`cgf_fhe.fhe_ops`): a ct*ct product and a ct*constant product each consume one level,
additions (incl. adding a constant, ``T+T`` for ``2T``) consume none. ``N`` = 1 level for the input
normalisation ``t = x*alpha + beta``, or 0 when ``alpha`` is folded into the previous linear layer
(``prescaled``, see :func:`cgf_fhe.split.fold_for_export`).

* ``"powers"``: monomial basis. Product tree ``t^k = t^ceil(k/2) * t^floor(k/2)`` (depth ``ceil(log2 k)``),
  then the constant-weighted sum. ``depth(d) = N + ceil(log2 d) + 1``; ct-ct products ``d - 1``.
  (Monomial coefficients of a high-degree fit grow large: fine in float64, lossy in float32.)
* ``"ps"``: Paterson-Stockmeyer / baby-step giant-step in the Chebyshev basis. Baby steps
  ``T_1..T_{m-1}``, giant steps ``T_m, T_2m, T_4m, ...`` via ``T_2k = (T_k+T_k)*T_k - 1``,
  ``T_2k+1 = (T_k+1 + T_k+1)*T_k - T_1``; recursive split ``p = q*T_n + r`` with
  ``T_{n+j} = 2 T_n T_j - T_{n-j}``. For ``d + 1 = m*2^g``:
  ``depth(d) = N + ceil(log2(m-1)) + 1 + g`` -- i.e. ``N + log2(d+1)`` for ``m = 2`` (optimal) and
  ``N + log2(d+1) + 1`` for ``m >= 4``; ct-ct products ``(m-2) + g + (2^g - 1)`` (``m=2``: ``g + 2^g - 1``,
  vs ``d-1`` for powers). Other degrees: computed exactly by :meth:`PolyApprox.stats` (same code path).
  Default ``m``: the one with the smallest depth, then fewest ct-ct products.
* exp range reduction (``squarings = k`` with "ps"/"powers"): ``exp(x) = exp(x/2^k)^(2^k)``; the polynomial
  fits ``exp(x/2^k)`` on ``[a, b]`` and is squared ``k`` times: depth ``+ k``. On wide CGF intervals such as
  [-35, 9] it turns a useless degree-15 fit (relative error > 100) into ~1e-6 for 2 more levels;
  :func:`fit_exp` picks the smallest ``k`` meeting a relative-error target. Values stay bounded (>= 0).
* ``"square"`` (exp only): ``exp(x) ~ (1 + x/2^r)^(2^r)``, ``t = x*2^-r + 1`` then ``r`` squarings:
  ``depth = N + r`` (``r + 1``, or ``r`` with the scalar folded).

Modules
-------
:class:`PolyExp` (CGF's ``attention.self.cgf_exp``; ``forward(x, valid=None)``), :class:`PolyGELU`,
:class:`PolyTanh` (pooler), and two LayerNorm replacements that keep ``weight``/``bias`` under the
``nn.LayerNorm`` names (state-dict compatible):

* :class:`NewtonLayerNorm`: ``1/sqrt(var+eps)`` by a polynomial initial guess on the calibrated variance
  interval plus Newton steps ``y <- 1.5*y - (0.5*v*y)*(y*y)``. Depth :func:`newton_ln_depth`: ``3 + P`` without
  Newton steps, ``2 + P + 2*steps`` with (``P`` the prescaled polynomial depth; 1: centring, 1: squaring, P,
  2 per Newton step, 1: times ``gamma*(x-mu)`` -- which the last Newton step absorbs: ``(1.5*dg)*y -
  ((dg*v/2)*y)*(y*y)`` is as deep as the step alone, since ``dg*v/2`` is shallow).
* :class:`FrozenLayerNorm`: variance replaced by a calibrated per-layer constant: LN is affine,
  ``y = x @ ((I - 11^T/H) diag(gamma/sigma)) + beta`` -- ONE plaintext matmul, depth 1. (A learnable sigma
  would be redundant: ``gamma`` is trained and absorbs it.)

Every module records its input range while ``calibrating``; at evaluation it counts inputs outside its
interval (exp: only over ``valid`` positions) in ``n_out``/``n_seen`` and keeps ``last_penalty``, a
differentiable mean squared excess (in normalised units) for the last forward. ``guard = True`` clamps
inputs into the interval first: a plaintext *training aid* against polynomial blow-up outside the interval
(not the encrypted computation; :func:`cgf_fhe.split.fold_for_export` switches it off). Counting is skipped
while torch is exporting/compiling and when ``track`` is False. ``depth`` = levels the module consumes.
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, asdict
from typing import Callable

import numpy as np
import torch
from numpy.polynomial import chebyshev as C
from torch import nn

GRID = 20001
PENALTY_CAP = 100.0  # per-element cap of the normalised excess in the interval penalty
REL_FLOOR = 1e-3  # relative errors are reported where |f| >= this
FORMS = ("ps", "powers", "square")


# ----------------------------------------------------------------------------------------------- functions
def _erf(x):
    from scipy.special import erf

    return erf(x)


FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "exp": np.exp,
    "tanh": np.tanh,
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "invsqrt": lambda v: 1.0 / np.sqrt(v),
}


def torch_function(fn: Callable) -> Callable[[np.ndarray], np.ndarray]:
    """A torch callable (e.g. a model's activation module) as a float64 numpy function for fitting."""

    def f(x):
        with torch.no_grad():
            return fn(torch.as_tensor(np.asarray(x, dtype=np.float64))).numpy()

    return f


# ----------------------------------------------------------------------------------------------- depth tracker
class DepthVal:
    """Stand-in ciphertext: runs an evaluation schedule and records depth and operation counts."""

    def __init__(self, depth: int = 0, stats: dict | None = None):
        self.depth = depth
        self.stats = stats if stats is not None else {"ct_ct": 0, "ct_pt": 0, "add": 0}

    def _new(self, depth):
        return DepthVal(depth, self.stats)

    def __add__(self, o):
        self.stats["add"] += 1
        return self._new(max(self.depth, o.depth) if isinstance(o, DepthVal) else self.depth)

    __radd__ = __add__
    __sub__ = __add__
    __rsub__ = __add__

    def __neg__(self):
        return self._new(self.depth)

    def __mul__(self, o):
        if isinstance(o, DepthVal):
            self.stats["ct_ct"] += 1
            return self._new(max(self.depth, o.depth) + 1)
        self.stats["ct_pt"] += 1
        return self._new(self.depth + 1)

    __rmul__ = __mul__


# ----------------------------------------------------------------------------------------------- schedules
def _cheb_provider(t):
    """Lazily computed Chebyshev polynomials T_k(t) with depth ceil(log2 k)."""
    cache = {1: t}

    def T(k: int):
        if k == 0:
            return 1.0
        if k not in cache:
            h = k // 2
            if k % 2 == 0:
                a = T(h)
                cache[k] = (a + a) * a - 1.0
            else:
                a, b = T(h + 1), T(h)
                cache[k] = (a + a) * b - t
        return cache[k]

    return T


NEGLIGIBLE = 2.0 ** -40  # coefficients this small are cancellation residue (and round to 0 in a 2^40 scale)


def _ps_eval(c: list[float], m: int, T):
    """sum_k c[k] T_k by baby-step giant-step splitting (Chebyshev basis)."""
    L = len(c)
    if L <= m:
        acc = c[0]
        for k in range(1, L):
            if abs(c[k]) >= NEGLIGIBLE:  # a CKKS constant below 2^-40 encodes to 0: skip the product
                acc = acc + T(k) * c[k]
        return acc
    n = m
    while 2 * n < L:
        n *= 2
    q = [c[n]] + [2.0 * c[n + j] for j in range(1, L - n)]
    r = [c[k] - (c[2 * n - k] if 2 * n - k < L else 0.0) for k in range(n)]
    return _ps_eval(q, m, T) * T(n) + _ps_eval(r, m, T)


def _powers_eval(mono: list[float], t):
    P = {1: t}

    def pw(k):
        if k not in P:
            P[k] = pw(k - k // 2) * pw(k // 2)
        return P[k]

    acc = mono[0]
    for k in range(1, len(mono)):
        acc = acc + pw(k) * mono[k]
    return acc


def _square_eval(r: int, t):
    y = t
    for _ in range(r):
        y = y * y
    return y


_LIGHT_GRAD = True


@contextmanager
def autograd_through_schedule():
    """Inside: training records every intermediate of the polynomial schedules for autograd (the slow,
    memory-hungry reference the derivative backward of :class:`_PolyGrad` replaces; benchmarks and tests)."""
    global _LIGHT_GRAD
    old, _LIGHT_GRAD = _LIGHT_GRAD, False
    try:
        yield
    finally:
        _LIGHT_GRAD = old


def _clenshaw(c: list[float], t: torch.Tensor) -> torch.Tensor:
    """Chebyshev series ``sum c_j T_j(t)`` by Clenshaw's recurrence (plaintext helper, three live tensors)."""
    if len(c) == 1:
        return torch.full_like(t, c[0])
    b1, b2 = torch.zeros_like(t), torch.zeros_like(t)
    t2 = 2.0 * t
    for cj in reversed(c[1:]):
        b1, b2 = t2 * b1 - b2 + cj, b1
    return t * b1 - b2 + c[0]


class _PolyGrad(torch.autograd.Function):
    """``PolyApprox`` schedule with a memory-light backward: forward = the encrypted schedule (identical values,
    nothing but ``t`` and the inner series kept), backward = ``grad * p'(t)`` from the derivative series."""

    @staticmethod
    def forward(ctx, t, approx):
        if approx.form == "square":
            y, inner = approx._schedule(t), None
        else:
            inner = approx._inner(t)
            y = _square_eval(approx.squarings, inner)
        ctx.approx = approx
        ctx.save_for_backward(t, inner if (inner is not None and approx.squarings) else None)
        return y

    @staticmethod
    def backward(ctx, grad):
        t, inner = ctx.saved_tensors
        with torch.no_grad():
            return grad * ctx.approx.derivative_t(t, inner), None


# ----------------------------------------------------------------------------------------------- approximation
@dataclass
class PolyApprox:
    """A fitted approximation: Chebyshev coefficients in ``t = alpha*x + beta`` on ``[a, b]`` (or the
    ``square`` exp form with parameter ``r``) plus its evaluation form."""

    name: str
    a: float
    b: float
    degree: int
    form: str = "ps"
    coeffs: list[float] = field(default_factory=list)  # Chebyshev basis in t (empty for "square")
    baby: int = 2  # PS baby-step size m
    r: int = 0  # square form: (1 + x/2^r)^(2^r)
    squarings: int = 0  # range reduction (exp only): p fits exp(x/2^k) and the result is p^(2^k)
    method: str = "interp"
    max_error: float = float("nan")  # max |p(x) - f(x)| on the dense grid
    max_rel_error: float = float("nan")
    # method "band": least squares whose residuals outside the core [lo, hi] count tail_weight times as much
    core: tuple[float, float] | None = None
    tail_weight: float | None = None

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"{self.name}: unknown evaluation form {self.form!r}; choose one of {FORMS}")
        if not (self.b > self.a):
            raise ValueError(f"{self.name}: empty interval [{self.a}, {self.b}]")
        if self.form == "square":
            if self.r < 1:
                raise ValueError(f"{self.name}: square form needs r >= 1, got {self.r}")
            self.degree = 2 ** self.r
        elif self.degree < 1:
            raise ValueError(f"{self.name}: degree must be >= 1, got {self.degree}")
        if self.squarings < 0 or (self.squarings and self.form == "square"):
            raise ValueError(f"{self.name}: squarings must be >= 0 and not combined with the square form")

    # normalisation t = alpha*x + beta
    @property
    def alpha(self) -> float:
        return 2.0 ** -self.r if self.form == "square" else 2.0 / (self.b - self.a)

    @property
    def beta(self) -> float:
        return 1.0 if self.form == "square" else -(self.a + self.b) / (self.b - self.a)

    @property
    def monomial(self) -> list[float]:
        return [float(v) for v in C.cheb2poly(np.asarray(self.coeffs, dtype=np.float64))]

    def _inner(self, t):
        """The series ``q(t)`` before the range-reduction squarings (not for the square form)."""
        if self.form == "powers":
            return _powers_eval(self.monomial, t)
        return _ps_eval([float(v) for v in self.coeffs], self.baby, _cheb_provider(t))

    def _schedule(self, t):
        if self.form == "square":
            return _square_eval(self.r, t)
        return _square_eval(self.squarings, self._inner(t))

    def evaluate(self, x, prescaled: bool = False):
        """Torch evaluation in the encrypted form. ``prescaled``: ``x`` is already ``alpha*x`` (only
        ``beta`` is added, which is free). When a gradient is needed (training), the same schedule runs
        without recording its few hundred intermediate products and the backward pass uses the derivative
        polynomial instead (:class:`_PolyGrad`): the values are identical, autograd memory drops from every
        intermediate tensor to the input."""
        t = (x if prescaled else x * self.alpha) + self.beta
        if (_LIGHT_GRAD and isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()
                and not _exporting()):
            return _PolyGrad.apply(t, self)
        return self._schedule(t)

    def derivative_t(self, t: torch.Tensor, inner: torch.Tensor | None = None) -> torch.Tensor:
        """``d p / d t`` at ``t`` (same dtype). ``p = q(t)^(2^k)`` with ``q`` the Chebyshev series (or
        ``q = t``, ``k = r`` for the square form); ``inner``: ``q(t)`` if already known."""
        if self.form == "square":
            q, k, dq = t, self.r, None
        else:
            c = np.asarray(self.coeffs, dtype=np.float64)
            dq = _clenshaw([float(v) for v in C.chebder(c)], t) if len(c) > 1 else torch.zeros_like(t)
            k = self.squarings
            if k == 0:
                return dq
            q = inner if inner is not None else _clenshaw([float(v) for v in c], t)
        n = 2 ** k
        d = q.pow(n - 1) * float(n)
        return d if dq is None else d * dq

    def numpy_eval(self, x: np.ndarray) -> np.ndarray:
        """Direct float64 evaluation (reference for the torch form)."""
        x = np.asarray(x, dtype=np.float64)
        t = self.alpha * x + self.beta
        if self.form == "square":
            return t ** (2 ** self.r)
        return C.chebval(t, np.asarray(self.coeffs, dtype=np.float64)) ** (2 ** self.squarings)

    def stats(self, prescaled: bool = False) -> dict:
        """Depth and operation counts of the evaluation schedule (run on :class:`DepthVal`)."""
        x = DepthVal(0)
        y = self.evaluate(x, prescaled=prescaled)
        return {"depth": y.depth if isinstance(y, DepthVal) else 0, **x.stats}

    def depth(self, prescaled: bool = False) -> int:
        return form_depth(self.form, self.degree, prescaled=prescaled, baby=self.baby, r=self.r,
                          squarings=self.squarings)

    def error_on(self, f: Callable, n: int = GRID, a: float | None = None, b: float | None = None):
        """(max abs error, max relative error where |f| >= REL_FLOOR) on a grid of ``n`` points."""
        xs = np.linspace(self.a if a is None else a, self.b if b is None else b, n)
        y = f(xs)
        err = np.abs(self.numpy_eval(xs) - y)
        big = np.abs(y) >= REL_FLOOR
        rel = err[big] / np.abs(y[big]) if big.any() else err / np.maximum(np.abs(y), 1e-300)
        return float(err.max()), float(rel.max())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["alpha"], d["beta"] = self.alpha, self.beta
        d["depth"] = self.depth()
        d["depth_prescaled"] = self.depth(prescaled=True)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PolyApprox":
        keys = ("name", "a", "b", "degree", "form", "coeffs", "baby", "r", "squarings", "method", "max_error",
                "max_rel_error", "core", "tail_weight")
        kw = {k: d[k] for k in keys if k in d}
        if kw.get("core") is not None:
            kw["core"] = tuple(float(v) for v in kw["core"])
        return cls(**kw)


def ps_depth_closed(degree: int, baby: int) -> int:
    """Closed form for full degrees ``d + 1 = m * 2^g`` (prescaled; add 1 for the normalisation)."""
    g = max(0, math.ceil(math.log2((degree + 1) / baby)))
    if baby * 2 ** g != degree + 1:
        raise ValueError(f"closed form needs degree+1 = m*2^g (degree {degree}, m {baby})")
    return math.ceil(math.log2(baby - 1)) + 1 + g if baby > 1 else 1 + g


def form_depth(form: str, degree: int, prescaled: bool = False, baby: int = 2, r: int = 0,
               squarings: int = 0) -> int:
    """Levels consumed by a form (the stated depth; checked against fhe_ops.analyze in the tests)."""
    n = 0 if prescaled else 1
    if form == "square":
        return n + r
    if form == "powers":
        return n + math.ceil(math.log2(degree)) + 1 + squarings
    if form == "ps":
        # exact for every degree: run the schedule on the depth tracker (closed form in the module doc)
        probe = PolyApprox("probe", -1.0, 1.0, degree, "ps", [1.0] * (degree + 1), baby=baby)
        return probe.stats(prescaled=prescaled)["depth"] + squarings
    raise ValueError(f"unknown form {form!r}")


def best_baby(degree: int) -> int:
    """Baby-step size with the smallest depth, then the fewest ct-ct products."""
    best = None
    m = 2
    while m <= max(2, degree + 1):
        probe = PolyApprox("probe", -1.0, 1.0, degree, "ps", [1.0] * (degree + 1), baby=m)
        s = probe.stats(prescaled=True)
        key = (s["depth"], s["ct_ct"], m)
        if best is None or key < best[0]:
            best = (key, m)
        m *= 2
    return best[1]


def _resolve(fn) -> tuple[str, Callable]:
    if isinstance(fn, str):
        if fn not in FUNCTIONS:
            raise ValueError(f"unknown function {fn!r}; known: {sorted(FUNCTIONS)} (or pass a callable)")
        return fn, FUNCTIONS[fn]
    return getattr(fn, "__name__", "f"), fn


def fit(fn, a: float, b: float, degree: int | None = None, max_error: float | None = None, form: str = "ps",
        method: str = "interp", relative: bool = False, max_degree: int = 127, r: int | None = None,
        name: str | None = None, baby: int | None = None, squarings: int = 0,
        core: tuple[float, float] | None = None, tail_weight: float = 0.1) -> PolyApprox:
    """Fit ``fn`` (name in :data:`FUNCTIONS` or a numpy callable) on ``[a, b]``.

    ``degree`` or ``max_error`` (smallest degree meeting it, up to ``max_degree``; for ``square`` the
    smallest ``r``). ``method``: ``"interp"`` (Chebyshev interpolation) or ``"lsq"`` (least squares on the
    grid, weighted by ``1/|f|`` when ``relative``). ``squarings`` (exp only): fit ``exp(x/2^k)`` and square
    ``k`` times (range reduction; ``k`` more levels, far smaller error on wide intervals). ``"band"``: least
    squares where the residuals outside ``core`` (the interval most inputs fall in, e.g. calibrated quantiles)
    count ``tail_weight`` times as much as inside: on a range widened by a few outliers (MiniLM's GELU inputs:
    [-17, 25] around a 99.98% core of [-11, 4]) the error moves from the core to the tails, where few inputs are.
    The achieved max error, measured on a dense grid, is stored (over the whole interval, tails included)."""
    fname, f = _resolve(fn)
    name = name or fname
    a, b = float(a), float(b)
    if not b > a:
        raise ValueError(f"{name}: empty interval [{a}, {b}]")
    if squarings and f is not np.exp:
        raise ValueError(f"{name}: squarings (range reduction) is only valid for exp")
    if form == "square":
        if r is None and degree is not None:
            r = max(1, math.ceil(math.log2(degree)))
        if r is not None:
            return _finish(PolyApprox(name, a, b, 2 ** r, "square", [], r=r, method="square"), f)
        if max_error is None:
            raise ValueError(f"{name}: give r, degree or max_error")
        for rr in range(1, 31):
            p = _finish(PolyApprox(name, a, b, 2 ** rr, "square", [], r=rr, method="square"), f)
            if p.max_error <= max_error:
                return p
        raise ValueError(f"{name}: (1+x/2^r)^(2^r) does not reach max error {max_error} on [{a}, {b}] for r <= 30")
    band = None
    if method == "band":
        if core is None:
            raise ValueError(f"{name}: method 'band' needs core=(lo, hi)")
        lo, hi = max(a, float(core[0])), min(b, float(core[1]))
        if not hi > lo:
            raise ValueError(f"{name}: band core {tuple(core)} does not overlap [{a}, {b}]")
        if not 0.0 < float(tail_weight) <= 1.0:
            raise ValueError(f"{name}: tail_weight must be in (0, 1], got {tail_weight}")
        band = ((lo, hi), float(tail_weight))
    if degree is not None:
        return _fit_degree(name, f, a, b, degree, form, method, relative, baby, squarings, band)
    if max_error is None:
        raise ValueError(f"{name}: give degree or max_error")
    for d in range(1, max_degree + 1):
        p = _fit_degree(name, f, a, b, d, form, method, relative, baby, squarings, band)
        if p.max_error <= max_error:
            return p
    raise ValueError(f"{name}: no polynomial of degree <= {max_degree} reaches max error {max_error} on [{a}, {b}] "
                     f"(best {p.max_error:.3g}); narrow the interval or raise max_degree")


def fit_exp(a: float, b: float, degree: int, form: str = "ps", squarings: int | None = None,
            rel_target: float = 1e-3, max_squarings: int = 12, method: str = "interp") -> PolyApprox:
    """exp on ``[a, b]`` with range reduction; ``squarings=None`` picks the smallest ``k`` whose max relative
    error (where exp >= REL_FLOOR) is <= ``rel_target`` (else the most accurate ``k`` tried)."""
    if squarings is not None:
        return fit("exp", a, b, degree=degree, form=form, squarings=squarings, method=method)
    best = None
    for k in range(0, max_squarings + 1):
        p = fit("exp", a, b, degree=degree, form=form, squarings=k, method=method)
        if p.max_rel_error <= rel_target:
            return p
        if best is None or p.max_rel_error < best.max_rel_error:
            best = p
    return best


def _fit_degree(name, f, a, b, degree, form, method, relative, baby, squarings=0, band=None) -> PolyApprox:
    alpha, beta = 2.0 / (b - a), -(a + b) / (b - a)
    g = (lambda x: np.exp(x * 2.0 ** -squarings)) if squarings else f
    if method == "interp":
        coeffs = C.chebinterpolate(lambda t: g((t - beta) / alpha), degree)
    elif method == "lsq":
        xs = np.linspace(a, b, 4 * GRID)
        ys = g(xs)
        w = 1.0 / np.maximum(np.abs(ys), 1e-300) if relative else None
        coeffs = C.chebfit(alpha * xs + beta, ys, degree, w=w)
    elif method == "band":
        (lo, hi), tw = band
        xs = np.linspace(a, b, 4 * GRID)  # uniform: the weight is per unit length, the core keeps >= 1e3 points
        if np.count_nonzero((xs >= lo) & (xs <= hi)) < 1000:
            xs = np.union1d(xs, np.linspace(lo, hi, 1000))
        w = np.where((xs >= lo) & (xs <= hi), 1.0, tw)
        coeffs = C.chebfit(alpha * xs + beta, g(xs), degree, w=w)
    else:
        raise ValueError(f"{name}: unknown fit method {method!r} (interp|lsq|band)")
    extra = {"core": band[0], "tail_weight": band[1]} if band else {}
    p = PolyApprox(name, a, b, degree, form, [float(c) for c in coeffs], method=method, squarings=squarings,
                   baby=baby or (best_baby(degree) if form == "ps" else 2), **extra)
    return _finish(p, f)


def _finish(p: PolyApprox, f) -> PolyApprox:
    p.max_error, p.max_rel_error = p.error_on(f)
    return p


# ----------------------------------------------------------------------------------------------- modules
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def fp32_island(forward: Callable) -> Callable:
    """Run a module method ``forward(self, x, ...)`` in float32 with autocast off when autocast is on or ``x`` is
    fp16/bf16: a degree-63 polynomial, a squared exp or a LayerNorm variance up to ~5e4 lose their accuracy (or
    overflow fp16's 65504) in half precision. The result stays float32; autocast casts it for the next matmul."""

    @functools.wraps(forward)
    def wrapped(self, x, *args, **kwargs):
        if isinstance(x, torch.Tensor) and (x.dtype in _LOW_PRECISION or torch.is_autocast_enabled(x.device.type)):
            with torch.autocast(x.device.type, enabled=False):
                return forward(self, x.float(), *args, **kwargs)
        return forward(self, x, *args, **kwargs)

    return wrapped


def _exporting() -> bool:
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing()
                or getattr(torch.compiler, "is_exporting", lambda: False)())


class IntervalTracker(nn.Module):
    """Calibration (min/max), out-of-interval counting and penalty for one approximated input."""

    kind = "op"

    def __init__(self, interval: tuple[float, float] | None = None):
        super().__init__()
        self.interval = tuple(float(v) for v in interval) if interval is not None else None
        self.calibrating = False
        self.track = True
        self.guard = False  # training aid: clamp inputs into the interval (plaintext only, never exported)
        self.cal_min, self.cal_max, self.cal_count = math.inf, -math.inf, 0
        self.n_out, self.n_seen = 0, 0
        self.out_min, self.out_max = math.inf, -math.inf
        self.last_penalty: torch.Tensor | None = None

    def reset_counters(self):
        self.n_out, self.n_seen = 0, 0
        self.out_min, self.out_max = math.inf, -math.inf
        self.last_penalty = None

    def _observe(self, x: torch.Tensor, valid: torch.Tensor | None = None):
        """``x`` in original units (not normalised). ``valid``: bool mask broadcastable to x."""
        if not self.track or _exporting():
            self.last_penalty = None
            return
        if valid is not None:
            valid = valid.expand_as(x) if valid.shape != x.shape else valid
            vals = x[valid]
        else:
            vals = x.reshape(-1)
        with torch.no_grad():
            v = vals.detach()
            if v.numel() and self.calibrating:
                self.cal_min = min(self.cal_min, float(v.min()))
                self.cal_max = max(self.cal_max, float(v.max()))
                self.cal_count += int(v.numel())
        if self.interval is None:
            self.last_penalty = None
            return
        a, b = self.interval
        with torch.no_grad():
            out = ~((v >= a) & (v <= b))  # NaN counts as outside
            k = int(out.sum())
            self.n_out += k
            self.n_seen += int(v.numel())
            if k:
                far = v[out & torch.isfinite(v)]  # NaN/inf count as outside but have no place to widen to
                if far.numel():
                    self.out_min = min(self.out_min, float(far.min()))
                    self.out_max = max(self.out_max, float(far.max()))
        if vals.numel():
            excess = (torch.relu(vals - b) + torch.relu(a - vals)) * (2.0 / (b - a))
            # bounded and finite even when an upstream polynomial has blown up
            excess = torch.nan_to_num(excess, nan=PENALTY_CAP, posinf=PENALTY_CAP).clamp(max=PENALTY_CAP)
            self.last_penalty = (excess * excess).mean()
        else:
            self.last_penalty = None

    def interval_stats(self) -> dict:
        d = {"interval": list(self.interval) if self.interval else None, "n_out": self.n_out, "n_seen": self.n_seen,
             "frac_out": self.n_out / self.n_seen if self.n_seen else 0.0}
        if self.n_out:
            d["out_min"], d["out_max"] = self.out_min, self.out_max
        return d


class PolyModule(IntervalTracker):
    """Base of the elementwise polynomial modules (exp, GELU, tanh)."""

    foldable = True

    def __init__(self, approx: PolyApprox):
        super().__init__((approx.a, approx.b))
        self.approx = approx
        self.prescaled = False

    @property
    def alpha(self) -> float:
        return self.approx.alpha

    @property
    def beta(self) -> float:
        return self.approx.beta

    @property
    def depth(self) -> int:
        return self.approx.depth(prescaled=self.prescaled)

    @fp32_island
    def _poly(self, x, valid=None):
        if self.track and not _exporting():
            self._observe(x * (1.0 / self.alpha) if self.prescaled else x, valid)
        if self.guard and not _exporting():
            a, b = (v * self.alpha for v in self.interval) if self.prescaled else self.interval
            x = x.clamp(a, b)
        return self.approx.evaluate(x, prescaled=self.prescaled)

    def forward(self, x):
        return self._poly(x)

    def to_settings(self) -> dict:
        return {"kind": self.kind, "approx": self.approx.to_dict(), "depth": self.approx.depth(),
                "depth_folded": self.approx.depth(prescaled=True)}

    def extra_repr(self) -> str:
        p = self.approx
        return (f"[{p.a:.4g}, {p.b:.4g}], form={p.form}, degree={p.degree}, depth={self.depth}, "
                f"max_err={p.max_error:.3g}, prescaled={self.prescaled}")


class PolyExp(PolyModule):
    """exp on the CGF argument (``attention.self.cgf_exp``); counts only ``valid`` positions."""

    kind = "exp"

    def forward(self, x, valid=None):
        return self._poly(x, valid)


class PolyGELU(PolyModule):
    kind = "gelu"


class PolyTanh(PolyModule):
    kind = "tanh"


def centred_scaled(x: torch.Tensor, scale) -> torch.Tensor:
    """``(x - mean(x)) * scale`` over the last axis, as ``x*scale - ReduceSum(x)*(scale/H)``: two elementwise
    plaintext multiplications and one rotate-and-sum (one level, like the centring matrix ``(I - 11^T/H)
    diag(scale)`` it replaces, but H ct x pt per row instead of H^2). ``scale``: a scalar or an ``[H]`` vector."""
    h = x.shape[-1]
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    return x * scale - x.sum(-1, keepdim=True) * (scale / h)


class _LNBase(IntervalTracker):
    """Keeps ``weight``/``bias`` under nn.LayerNorm's names; observes the variance ``var + eps``."""

    def __init__(self, ln: nn.LayerNorm | None = None, hidden: int | None = None, eps: float = 1e-12,
                 interval=None):
        super().__init__(interval)
        if ln is not None:
            self.weight, self.bias = ln.weight, ln.bias
            hidden, eps = ln.normalized_shape[-1], ln.eps
        else:
            self.weight = nn.Parameter(torch.ones(hidden))
            self.bias = nn.Parameter(torch.zeros(hidden))
        self.hidden, self.eps = int(hidden), float(eps)
        self.normalized_shape = (self.hidden,)

    def _observe_var(self, x, scale: torch.Tensor | None = None):
        """Count ``var + eps`` (times ``scale`` ``[S]`` per position when given: the interval's units) against
        the interval; while training, ``last_penalty`` is the differentiable
        mean squared log-excess of the variance over the interval (``log(v/b)`` above it, ``log(a/v)`` below),
        so that :func:`cgf_fhe.surgery.interval_penalty` pulls each LayerNorm's variance into its interval:
        the massive-activation tokens are the ones that pay."""
        if (self.track or self.calibrating) and not _exporting():
            grad = self.training and torch.is_grad_enabled() and self.interval is not None
            with torch.set_grad_enabled(grad):
                v = x.var(-1, unbiased=False) + self.eps
                if scale is not None:
                    v = v * scale
            self._observe(v.detach())
            if grad and v.numel():
                a, b = self.interval
                lv = torch.log(v.float().clamp_min(1e-30))
                ex = torch.relu(lv - math.log(b)) + torch.relu(math.log(max(a, 1e-30)) - lv)
                # bounded and finite even when an upstream polynomial has blown up
                ex = torch.nan_to_num(ex, nan=PENALTY_CAP, posinf=PENALTY_CAP).clamp(max=PENALTY_CAP)
                self.last_penalty = (ex * ex).mean()


class FrozenLayerNorm(_LNBase):
    """``y = (x - mean(x)) * gamma * inv_sigma + beta`` computed as ``x*g - ReduceSum(x)*(g/H) + beta``
    (:func:`centred_scaled`, depth 1, no H x H matrix).

    ``interval`` (optional, informational): the calibrated range of ``var + eps``; tokens outside it are
    counted like the other modules' out-of-interval inputs (the frozen constant fits them worst).

    ``blend`` (plaintext training aid, default 1 = frozen): with ``blend < 1`` the scale is
    ``blend/sigma + (1-blend)/sqrt(var+eps)`` per token, i.e. an interpolation from the exact LayerNorm
    (0) to the frozen one (1) that distillation can anneal. Only ``blend == 1`` is FHE-evaluable (and is
    what :func:`cgf_fhe.split.fold_for_export` requires)."""

    kind = "ln_frozen"
    depth = 1

    def __init__(self, inv_sigma: float, ln: nn.LayerNorm | None = None, hidden: int | None = None,
                 eps: float = 1e-12, interval: tuple[float, float] | None = None):
        super().__init__(ln, hidden, eps, interval=interval)
        self.inv_sigma = float(inv_sigma)
        self.blend = 1.0

    @fp32_island
    def forward(self, x):
        self._observe_var(x)
        if self.blend >= 1.0:
            return centred_scaled(x, self.weight * self.inv_sigma) + self.bias
        d = x - x.mean(-1, keepdim=True)
        inv = self.blend * self.inv_sigma + (1.0 - self.blend) * torch.rsqrt(
            (d * d).mean(-1, keepdim=True) + self.eps)
        return d * inv * self.weight + self.bias

    def to_settings(self) -> dict:
        return {"kind": self.kind, "inv_sigma": self.inv_sigma, "sigma": 1.0 / self.inv_sigma, "eps": self.eps,
                "hidden": self.hidden, "depth": self.depth,
                "interval": list(self.interval) if self.interval is not None else None}

    def extra_repr(self):
        return f"hidden={self.hidden}, sigma={1.0 / self.inv_sigma:.4g}, depth=1"


def newton_ln_depth(poly_depth: int, newton_steps: int) -> int:
    """Depth of a :class:`NewtonLayerNorm` with a prescaled guess of depth ``poly_depth`` (``P``): ``3 + P`` without
    Newton steps, ``2 + P + 2*steps`` with (the last step absorbs the output product; ``P >= 1``)."""
    steps = int(newton_steps)
    return 3 + int(poly_depth) + 2 * steps - (1 if steps > 0 else 0)


class NewtonLayerNorm(_LNBase):
    """LayerNorm with ``1/sqrt(v)`` (``v = var + eps``) = polynomial guess on ``[vlo, vhi]`` + Newton steps.

    Encrypted schedule (centring as ``x*s - ReduceSum(x)*(s/H)``, :func:`centred_scaled`; every constant is
    plaintext): ``ds`` with ``s = sqrt(alpha/H)``, ``dh`` with ``s = sqrt(0.5/H)``, ``dg`` with ``s = gamma``
    (1 level each, in parallel, H ct x pt per row each instead of an H x H centring matrix); ``t = sum(ds*ds) + alpha*eps`` = ``alpha*v`` (2); ``y = poly(t)`` prescaled (2 + P);
    ``hv = sum(dh*dh) + 0.5*eps`` = ``v/2``; Newton ``y <- y*1.5 - (y*hv)*(y*y)`` (2 levels each);
    output ``dg * y + beta`` (1). Depth ``3 + P + 2*steps`` -- less one with Newton steps
    (:func:`newton_ln_depth`): the last step and the output product are one expression,
    ``out = dg'*y - ((dg'*h)*y)*(y*y) + beta`` with ``dg'`` centred with ``1.5*gamma`` (the 1.5 rides on the
    plaintext) and ``h = v/3`` (``dh`` scaled by ``sqrt(1/(3H))`` with one step; ``hv * 2/3`` with more, a
    ``[S, 1]`` plaintext product off the critical path). With ``y`` at depth ``D``: ``y*y``, ``dg'*y`` and
    ``(dg'*h)*y`` (``dg'*h`` is at depth 3) at ``D + 1``, the product at ``D + 2`` -- where the step alone ends.
    Same function up to float rounding; the plaintext guard branch (training aid) keeps the unmerged form.

    Per-position variance scale (issue #22, ``pos_scale0 != 1``): the buffer ``pos_scale`` ``[max_len]`` is 1
    except ``pos_scale0`` at position 0 (the [CLS] token, whose variance is a massive activation in MiniLM's
    FFN-output LayerNorms; the position is public). The guess and the Newton steps run on ``v' = v *
    pos_scale[:S]`` and the result is multiplied by ``sqrt(pos_scale[:S])``, so ``1/sqrt(v)`` is unchanged while
    the interval (on ``v'``) stays narrow. Both scales are per-position plaintexts that ride on the centring
    products (``s`` becomes ``[S, 1]``, ``gamma`` ``[S, H]``): no extra level."""

    kind = "ln_newton"

    def __init__(self, approx: PolyApprox, newton_steps: int, ln: nn.LayerNorm | None = None,
                 hidden: int | None = None, eps: float = 1e-12, pos_scale0: float = 1.0, max_len: int = 512):
        super().__init__(ln, hidden, eps, interval=(approx.a, approx.b))
        self.approx = approx
        self.newton_steps = int(newton_steps)
        self.pos_scale0 = float(pos_scale0)
        if not (math.isfinite(self.pos_scale0) and self.pos_scale0 > 0):
            raise ValueError(f"pos_scale0 must be a finite number > 0, got {pos_scale0!r}")
        self.max_len = int(max_len)
        ps = torch.ones(self.max_len, dtype=torch.float32)
        ps[0] = self.pos_scale0
        # fhe settings carry pos_scale0 (not the state dict: checkpoints without it load as before)
        self.register_buffer("pos_scale", ps, persistent=False)

    @property
    def depth(self) -> int:
        return newton_ln_depth(self.approx.depth(prescaled=True), self.newton_steps)

    def position_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """``pos_scale[:S]`` ``[S]`` for ``x`` ``[..., S, H]`` (x's dtype), or None without a position scale."""
        if self.pos_scale0 == 1.0:
            return None
        s = x.shape[-2]
        if s > self.max_len:
            raise ValueError(f"sequence of {s} tokens is longer than this LayerNorm's position scale ({self.max_len})")
        return self.pos_scale[:s].to(dtype=x.dtype, device=x.device)

    def invsqrt(self, v):
        """Plaintext helper: the same guess + Newton iteration applied to a variance tensor ``v``."""
        y = self.approx.evaluate(v * self.approx.alpha, prescaled=True)
        hv = v * 0.5
        for _ in range(self.newton_steps):
            y = y * 1.5 - (y * hv) * (y * y)
        return y

    @fp32_island
    def forward(self, x):
        ps = self.position_scale(x)
        self._observe_var(x, ps)
        ps_col = ps[:, None] if ps is not None else None  # [S, 1]
        if self.guard and not _exporting():
            # training aid: the same guess + Newton iteration on the variance clamped into the interval
            d = x - x.mean(-1, keepdim=True)
            v = (d * d).mean(-1, keepdim=True) + self.eps
            if ps_col is None:
                return d * self.invsqrt(v.clamp(*self.interval)) * self.weight + self.bias
            return d * (self.invsqrt((v * ps_col).clamp(*self.interval)) * ps_col.sqrt()) * self.weight + self.bias
        H = self.hidden
        a = self.approx.alpha
        n = self.newton_steps
        c = 0.5 if n != 1 else 1.0 / 3.0  # hv = c*v: v/2 for the steps; v/3 when only the merged step uses it
        g = self.weight * 1.5 if n else self.weight  # the merged step's 1.5 rides on the centring plaintext
        if ps_col is None:
            ds = centred_scaled(x, math.sqrt(a / H))
            dh = centred_scaled(x, math.sqrt(c / H)) if n else None
            dg = centred_scaled(x, g)
            t = (ds * ds).sum(-1, keepdim=True) + a * self.eps
            hv = (dh * dh).sum(-1, keepdim=True) + c * self.eps if n else None
        else:  # the per-position scales are plaintexts of the centring products: same depth
            root = ps_col.sqrt()
            ds = centred_scaled(x, root * math.sqrt(a / H))
            dh = centred_scaled(x, root * math.sqrt(c / H)) if n else None
            dg = centred_scaled(x, g * root)
            t = (ds * ds).sum(-1, keepdim=True) + ps_col * (a * self.eps)
            hv = (dh * dh).sum(-1, keepdim=True) + ps_col * (c * self.eps) if n else None
        y = self.approx.evaluate(t, prescaled=True)
        if not n:
            return dg * y + self.bias
        for _ in range(n - 1):
            y = y * 1.5 - (y * hv) * (y * y)
        h = hv if n == 1 else hv * (2.0 / 3.0)  # v/3: [S, 1], off the critical path
        # the last Newton step and the output product in one: dg'*y - ((dg'*h)*y)*(y*y), dg' = 1.5*dg
        return dg * y - ((dg * h) * y) * (y * y) + self.bias

    def rel_error(self, n: int = GRID) -> float:
        """Max relative error of guess + Newton vs 1/sqrt(v) on the interval (dense grid, float64)."""
        v = torch.linspace(self.approx.a, self.approx.b, n, dtype=torch.float64)
        with torch.no_grad():
            y = self.invsqrt(v)
        return float(((y * v.sqrt()) - 1.0).abs().max())

    def to_settings(self) -> dict:
        d = {"kind": self.kind, "approx": self.approx.to_dict(), "newton_steps": self.newton_steps,
             "eps": self.eps, "hidden": self.hidden, "depth": self.depth, "rel_error": self.rel_error()}
        if self.pos_scale0 != 1.0:
            d.update(pos_scale0=self.pos_scale0, max_len=self.max_len)
        return d

    def extra_repr(self):
        p = self.approx
        return (f"hidden={self.hidden}, var in [{p.a:.4g}, {p.b:.4g}], degree={p.degree}, "
                f"newton_steps={self.newton_steps}, depth={self.depth}"
                + (f", pos_scale0={self.pos_scale0:.4g}" if self.pos_scale0 != 1.0 else ""))


POLY_KINDS = {"exp": PolyExp, "gelu": PolyGELU, "tanh": PolyTanh}


def module_from_settings(d: dict, ln: nn.LayerNorm | None = None) -> nn.Module:
    """Rebuild a module from its :meth:`to_settings` dict (LayerNorms reuse ``ln``'s weight/bias)."""
    kind = d.get("kind")
    if kind in POLY_KINDS:
        return POLY_KINDS[kind](PolyApprox.from_dict(d["approx"]))
    if kind == "ln_frozen":
        return FrozenLayerNorm(d["inv_sigma"], ln=ln, hidden=d.get("hidden"), eps=d.get("eps", 1e-12),
                               interval=d.get("interval"))
    if kind == "ln_newton":
        return NewtonLayerNorm(PolyApprox.from_dict(d["approx"]), d["newton_steps"], ln=ln, hidden=d.get("hidden"),
                               eps=d.get("eps", 1e-12), pos_scale0=d.get("pos_scale0", 1.0),
                               max_len=d.get("max_len", 512))
    raise ValueError(f"unknown polynomial module kind {kind!r} in fhe settings")
