"""Model surgery for FHE: range calibration, polynomial replacement, interval accounting, layer pruning.

Typical use (the distillation stage)::

    ranges = calibrate(model, train_loader, max_batches=25)           # exact functions, CGF softmax
    fhe = polynomialize(model, FheOptions(poly="all", ln="frozen"), ranges)
    ... train with interval_penalty(model) added to the loss ...
    save_checkpoint(model, tok, out, {..., "fhe": fhe_settings(model, ranges)})
    # load_checkpoint -> apply_fhe_settings(model, settings["fhe"]) rebuilds the same modules.

Training aids (plaintext only, not FHE-evaluable, switched off by ``fold_for_export``): :func:`set_guard`
clamps approximated inputs into their intervals (a polynomial explodes outside its interval, e.g. when a
frozen LayerNorm has just replaced the exact one), :func:`set_frozen_blend` interpolates frozen LayerNorms
from the exact one (0) to frozen (1) so distillation can anneal; export needs blend 1.

Approximated ops and their keys (per encoder layer ``i``): ``layers.i.exp`` (CGF exp argument, over valid
keys only), ``layers.i.gelu`` (FFN pre-activation), ``layers.i.ln_attn`` / ``layers.i.ln_ffn`` (LayerNorm
input variance ``var + eps`` per token), and ``pooler.tanh``. The embedding LayerNorm is NOT replaced: it
runs exactly on the client (:mod:`cgf_fhe.split`).

Intervals: calibrated ``[min, max]`` widened by ``margin * (max - min)`` on each side (the LN variance
interval multiplicatively: ``[min*(1-margin), max*(1+margin)]``; exp's upper end by at most
``exp_headroom``). Polynomial coefficients, intervals, forms, depths and the frozen-LN constants all live in
the JSON "fhe settings"; learnable parameters (LayerNorm ``weight``/``bias``) keep their ``nn.LayerNorm``
names, so the checkpoint's state dict fills them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn

from . import poly as P
from .bert import base_model, encoder_layers

SETTINGS_VERSION = 1

# Depth of one encoder layer outside the approximations (ServerModel after fold_for_export), in levels:
# Q/K/V projection 1, scores Q@K^T 1, CGF statistics 2, (exp E), probs*w 1, probs@V 1, output dense 1,
# (LN L), FFN in 1, (GELU G), FFN out 1, (LN L). Residual additions are free.
LAYER_LINEAR_DEPTH = 9
# Export folds (cgf_fhe.fold, all-Newton students): per layer, each LayerNorm's centring rides on the preceding
# dense layer and its output product on the next linear map (2 x 2 levels), and CGF's keep/n weights on V (1).
LN_FOLD_SAVING = 4  # all-Newton students only
V_FOLD_SAVING = 1  # every CGF student with a polynomial exp
FOLD_SAVING = LN_FOLD_SAVING + V_FOLD_SAVING
# and, in every layer after the first (its input is a folded LayerNorm output), the CGF statistics' plaintext
# factors ride on the query/key projections (cgf_fhe.fold.cgf_stats_core): one more level.
STATS_FOLD_SAVING = 1
# Pooler: dense 1, (tanh T), classifier 1.
HEAD_LINEAR_DEPTH = 2


KINDS = ("exp", "gelu", "ln", "tanh")
LN_CHOICES = ("newton", "frozen", "frozen-attn")  # --ln: every LayerNorm Newton / frozen / frozen after attention only


_BAND_QUANTILES = (0.99, 0.999, 0.9999)  # upper calibration quantiles _Stats keeps (see _Stats.QUANTILES)

# Named choices of approximations (``--fhe-profile``). "default": FheOptions' own defaults (the poly6 students
# of docs/results.md, about 52 levels per encoder layer). "lean" (issue #22): each choice at the depth the
# issue allows, picked by max error on MiniLM's calibrated intervals (benchmarks/depth_table.py --lean):
# exp degree 15 with one squaring (5 levels; max rel. error 5.6e-3 on [-30, 8] where exp >= 1e-3, against
# 7.5e-2 for degree 7 with two squarings at the same depth), GELU degree 15 (4 levels), LayerNorm 1/sqrt as
# a degree-15 relative-error fit with no Newton step (7 levels per LayerNorm; 4.4e-3 max rel. error on a
# variance range of ratio 30) on the 99.9% calibration quantile, tanh 15. 9 + 5 + 4 + 7 + 7 = 32 per layer as
# trained, 27 as exported (the folds of cgf_fhe.fold save 5). On MiniLM it does not train (one class, 0.3162 dev,
# docs/results.md): the untrained screen (benchmarks/approx_screen.py) blames the exp (layer 0's CGF argument
# reaches -939: degree 15 with one squaring misses it), GELU 15 and the 99.9% band (non-finite logits).
# "lean-b": the lean choices that survive the screen and train -- exp degree 7 with two squarings (5 levels),
# GELU degree 31 (5), LayerNorm 1/sqrt degree 15 plus one Newton step on the full calibrated range (the [CLS]
# scale keeps the FFN-output ranges narrow) -- 31 levels per exported MiniLM layer (quick-leanb-g31).
PROFILES: dict[str, dict] = {
    "default": {"poly": "all"},
    "lean": {"poly": "all", "exp_degree": 15, "exp_squarings": 1, "gelu_degree": 15, "invsqrt_degree": 15,
             "newton_steps": 0, "ln_band": 0.999, "tanh_degree": 15, "ln_cls_scale": True},
    "lean-b": {"poly": "all", "exp_degree": 7, "exp_squarings": 2, "gelu_degree": 31, "invsqrt_degree": 15,
               "newton_steps": 1, "ln_band": None, "tanh_degree": 15, "ln_cls_scale": True},
}


@dataclass
class FheOptions:
    """What to approximate and how. ``poly``: "none" | "all"; ``ln``: "newton" | "frozen" | "frozen-attn".

    ``ln="frozen-attn"``: frozen statistics for the LayerNorm after attention (``ln_attn``), Newton for the one
    after the FFN (``ln_ffn``). On the MiniLM CGF student (``benchmarks/frozen_ln_probe.py``, no retraining),
    freezing the six attention-output LayerNorms keeps every CGF exp input in its exact-LayerNorm range and no
    logit becomes non-finite; freezing the six FFN-output ones pushes the exp inputs past that range and makes
    logits non-finite (the massive-activation tokens are no longer rescaled), as does freezing all twelve, which
    then does not train. With polynomial GELUs, though, the frozen-attn MiniLM student did not train either
    (1 epoch, 3 seeds: one class; ``docs/results.md``). :meth:`ln_for` gives each LayerNorm's choice.

    Forms: ``exp_form`` "ps" | "powers" | "square" (``exp_r`` squarings for "square"); ``form`` for GELU,
    tanh and the 1/sqrt guess ("ps" | "powers"). ``fit``: "interp" (Chebyshev interpolation) or "lsq".
    exp: ``exp_squarings`` k (range reduction ``p(x)^(2^k)`` with ``p ~ exp(x/2^k)``; None = per layer the
    smallest k with max relative error <= ``exp_rel_target`` where exp >= 1e-3). The exp interval's upper
    end gets at most ``exp_headroom`` of margin (exp grows e-fold per unit). ``exp_floor``: if set, the
    lower end is at least ``-exp_floor`` (exp is ~0 below; inputs there count as out-of-interval).
    Newton LN: ``newton_steps`` None = per layer the fewest steps with max relative error of 1/sqrt
    <= ``ln_rel_target`` (at most ``max_newton_steps``).
    ``ln_band`` (a calibration quantile, e.g. 0.999; None = the maximum): the top of each Newton LayerNorm's
    variance interval is that quantile of the calibrated variances instead of their maximum, so the rare
    massive-activation tokens fall outside a narrow interval; train with ``--interval-penalty`` (the LayerNorm
    penalty is differentiable: it pulls those variances in) and ``--epoch-cover`` (what stays outside is covered
    before each epoch is scored, so the exported interval is honest).
    ``ln_cls_scale`` (issue #22): a Newton LayerNorm whose calibrated median variance at position 0 (the [CLS]
    token) is more than ``ln_cls_threshold`` times the median over the other valid tokens gets the per-position
    variance scale ``pos_scale0 = 1/ratio`` (:class:`cgf_fhe.poly.NewtonLayerNorm`; no extra level): its interval,
    band and penalty are then on the scaled variance, which leaves MiniLM's [CLS] massive activation inside a
    narrow interval.
    ``gelu_tail_weight`` (None: Chebyshev interpolation on the whole interval): fit GELU by least squares whose
    residuals outside its calibrated 0.01%-99.99% quantile band (widened by ``margin``) count this much (e.g. 0.1):
    the interval stays the calibrated maximum (no input leaves it), but the error of a low degree moves from where
    99.98% of the inputs are to the tails of the few massive-activation tokens (:func:`cgf_fhe.poly.fit`, "band").
    Frozen LN constant ``frozen_stat``: "geo" (``1/sigma = exp(-E[log sqrt v])``, robust to the few
    massive-activation tokens) or "ls" (``E[sqrt v]/E[v]``, least-squares optimal output scale).

    Defaults were chosen on all-MiniLM-L6-v2 with the CGF softmax, calibrated on 200 MRPC train pairs
    (ranges: exp argument up to [-328, 13] in layer 0 and ~[-30, 8] elsewhere, GELU input ~[-17, 14], LN
    variance [0.1, 5.5e4] in layer 0 and [0.1, 130] elsewhere): exp degree 15 + automatic squarings (max rel.
    error <= 1e-3; plain degree 15 is useless on such intervals); GELU degree 63 (31 drops the mean token
    cosine to the exact model to 0.97, 63 keeps 1.000); tanh 15 (error 2e-13); 1/sqrt degree 31 with
    automatic Newton steps (fewer levels than degree 15 for the same accuracy); frozen constant "geo"
    (single-layer swaps keep a higher cosine than "ls")."""

    poly: str = "none"
    ln: str = "newton"
    exp_degree: int = 15
    gelu_degree: int = 63
    gelu_tail_weight: float | None = None
    tanh_degree: int = 15
    invsqrt_degree: int = 31
    newton_steps: int | None = None
    margin: float = 0.1
    exp_form: str = "ps"
    exp_r: int = 7
    exp_squarings: int | None = None
    exp_rel_target: float = 1e-3
    exp_headroom: float = 2.0
    exp_floor: float | None = None
    ln_rel_target: float = 1e-3
    max_newton_steps: int = 8
    frozen_stat: str = "geo"
    ln_band: float | None = None
    ln_cls_scale: bool = False
    ln_cls_threshold: float = 8.0
    form: str = "ps"
    fit: str = "interp"
    kinds: tuple[str, ...] = KINDS  # ablations: replace only these kinds (the result is not FHE-ready)

    def __post_init__(self):
        if self.poly not in ("none", "all"):
            raise ValueError(f"poly must be 'none' or 'all', got {self.poly!r}")
        if self.ln not in LN_CHOICES:
            raise ValueError(f"ln must be one of {LN_CHOICES}, got {self.ln!r}")
        if self.exp_form not in P.FORMS:
            raise ValueError(f"exp_form must be one of {P.FORMS}, got {self.exp_form!r}")
        if self.form not in ("ps", "powers"):
            raise ValueError(f"form must be 'ps' or 'powers', got {self.form!r}")
        for name in ("exp_degree", "gelu_degree", "tanh_degree", "invsqrt_degree"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.newton_steps is not None and self.newton_steps < 0) or self.margin < 0:
            raise ValueError("newton_steps and margin must be >= 0")
        self.kinds = tuple(self.kinds)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown kinds {bad}; choose from {KINDS}")
        if self.ln_band is not None and str(float(self.ln_band)) not in {str(q) for q in _BAND_QUANTILES}:
            raise ValueError(f"ln_band must be one of the calibrated quantiles {_BAND_QUANTILES}, got {self.ln_band!r}")
        if not (float(self.ln_cls_threshold) >= 1.0):
            raise ValueError(f"ln_cls_threshold must be >= 1, got {self.ln_cls_threshold!r}")
        if self.gelu_tail_weight is not None and not 0.0 < float(self.gelu_tail_weight) <= 1.0:
            raise ValueError(f"gelu_tail_weight must be in (0, 1], got {self.gelu_tail_weight!r}")
        if self.frozen_stat not in ("geo", "ls"):
            raise ValueError(f"frozen_stat must be 'geo' or 'ls', got {self.frozen_stat!r}")

    def ln_for(self, key: str) -> str:
        """"frozen" or "newton" for the LayerNorm ``key`` (``layers.<i>.ln_attn`` / ``layers.<i>.ln_ffn``)."""
        if self.ln == "frozen-attn":
            return "frozen" if key.endswith("ln_attn") else "newton"
        return self.ln

    @property
    def any_frozen(self) -> bool:
        return "frozen" in (self.ln_for("ln_attn"), self.ln_for("ln_ffn"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_profile(cls, name: str, **overrides) -> "FheOptions":
        """Options of the named profile (:data:`PROFILES`), then ``overrides`` (None values are ignored)."""
        if name not in PROFILES:
            raise ValueError(f"unknown FHE profile {name!r}; choose from {sorted(PROFILES)}")
        kw = {**PROFILES[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**kw)

    @classmethod
    def from_dict(cls, d: dict) -> "FheOptions":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


# ----------------------------------------------------------------------------------------------- locations
def _locations(model):
    """(key, parent module, attribute name) of every approximable op."""
    out = []
    for i, layer in enumerate(encoder_layers(model)):
        out.append((f"layers.{i}.exp", layer.attention.self, "cgf_exp"))
        out.append((f"layers.{i}.gelu", layer.intermediate, "intermediate_act_fn"))
        out.append((f"layers.{i}.ln_attn", layer.attention.output, "LayerNorm"))
        out.append((f"layers.{i}.ln_ffn", layer.output, "LayerNorm"))
    pooler = getattr(base_model(model), "pooler", None)
    if pooler is not None:
        out.append(("pooler.tanh", pooler, "activation"))
    return out


def named_approx_modules(model) -> list[tuple[str, nn.Module]]:
    """(key, module) for every polynomial / replaced module in the model."""
    res = []
    for key, parent, attr in _locations(model):
        mod = getattr(parent, attr, None)
        if isinstance(mod, P.IntervalTracker):
            res.append((key, mod))
    return res


def _set(parent, attr, value):
    if value is None:
        if attr in parent._modules:
            del parent._modules[attr]
        elif hasattr(parent, attr):
            delattr(parent, attr)
    else:
        setattr(parent, attr, value)


# ----------------------------------------------------------------------------------------------- calibration
class _Stats:
    """Running min/max/mean/std plus a bounded random subsample for quantiles."""

    QUANTILES = (0.0001, 0.001, 0.01, 0.5, 0.99, 0.999, 0.9999)

    def __init__(self, keep: int = 200_000, seed: int = 0):
        self.min, self.max, self.n, self.s, self.ss = math.inf, -math.inf, 0, 0.0, 0.0
        self.sample: list[np.ndarray] = []
        self.keep = keep
        self.rng = np.random.default_rng(seed)
        self.extra: dict[str, float] = {}

    def add(self, v: torch.Tensor):
        v = v.detach().reshape(-1).double()
        if not v.numel():
            return
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        self.n += int(v.numel())
        self.s += float(v.sum())
        self.ss += float((v * v).sum())
        a = v.cpu().numpy()
        per_call = max(1000, self.keep // 50)
        if a.size > per_call:
            a = self.rng.choice(a, per_call, replace=False)
        self.sample.append(a)

    def to_dict(self) -> dict:
        if not self.n:
            return {"count": 0}
        mean = self.s / self.n
        d = {"min": self.min, "max": self.max, "count": self.n, "mean": mean,
             "std": math.sqrt(max(self.ss / self.n - mean * mean, 0.0))}
        s = np.concatenate(self.sample)
        d["quantiles"] = {str(q): float(np.quantile(s, q)) for q in self.QUANTILES}
        d.update(self.extra)
        return d


class _FnRecorder(nn.Module):
    """Wraps an activation (or cgf_exp): records its input, then calls it."""

    def __init__(self, fn, stats: _Stats, with_valid: bool = False):
        super().__init__()
        self.fn, self.stats, self.with_valid = fn, stats, with_valid

    def forward(self, x, valid=None):
        if self.with_valid:
            self.stats.add(x[valid.expand_as(x)] if valid is not None else x)
            if self.fn is None:
                return torch.exp(x)
            return self.fn(x, valid=valid) if isinstance(self.fn, P.PolyExp) else self.fn(x)
        self.stats.add(x)
        return self.fn(x)


class _LNRecorder(nn.Module):
    """Wraps a LayerNorm: records ``var + eps`` per token (all tokens; in the units of a Newton LayerNorm's
    interval, i.e. times its position scale) and frozen-LN statistics over valid tokens, then calls it. Also
    splits the (unscaled) variance by position: position 0 vs the rest (``cls`` in the result, for
    ``FheOptions.ln_cls_scale``)."""

    def __init__(self, ln, stats: _Stats, ctx: dict):
        super().__init__()
        self.ln, self.stats, self.ctx = ln, stats, ctx
        self.sum_sqrt = self.sum_v = self.sum_isqrt = self.sum_log = 0.0
        self.n_valid = 0
        self.pos0: list[np.ndarray] = []  # every position-0 variance
        self.pos0_valid: list[np.ndarray] = []
        self.rest = _Stats(seed=1)  # positions >= 1, all tokens (the interval covers padding too)
        self.rest_valid = _Stats(seed=2)  # positions >= 1, valid tokens (the median of the ratio)

    def forward(self, x):
        eps = float(getattr(self.ln, "eps", 1e-12))
        v = x.detach().double().var(-1, unbiased=False) + eps  # [B, S]
        scale = self.ln.position_scale(v[..., None]) if isinstance(self.ln, P.NewtonLayerNorm) else None
        if scale is not None:  # the module's interval is on the scaled variance
            self.stats.add(v * scale.to(v.dtype))
            self.stats.extra["pos_scale0"] = self.ln.pos_scale0
        else:
            self.stats.add(v)
        mask = self.ctx.get("mask")
        has_mask = mask is not None and mask.shape == v.shape
        if v.dim() == 2 and v.shape[1] >= 2:
            self.pos0.append(v[:, 0].cpu().numpy())
            self.rest.add(v[:, 1:])
            if has_mask:
                keep = mask.bool()
                self.pos0_valid.append(v[:, 0][keep[:, 0]].cpu().numpy())
                self.rest_valid.add(v[:, 1:][keep[:, 1:]])
            else:
                self.pos0_valid.append(v[:, 0].cpu().numpy())
                self.rest_valid.add(v[:, 1:])
        vv = v[mask.bool()] if has_mask else v.reshape(-1)
        self.sum_sqrt += float(vv.sqrt().sum())
        self.sum_v += float(vv.sum())
        self.sum_isqrt += float(vv.rsqrt().sum())
        self.sum_log += float(vv.log().sum())
        self.n_valid += int(vv.numel())
        return self.ln(x)

    def finish(self):
        if self.n_valid:
            # Frozen-LN constants over valid tokens: "ls" = E[sqrt v]/E[v] (least-squares optimal scale of
            # the output (x-mu)*s), "geo" = exp(-E[log v]/2) (geometric mean, robust to massive activations).
            self.stats.extra.update({
                "valid_tokens": self.n_valid,
                "mean_v_valid": self.sum_v / self.n_valid,
                "mean_sqrt_v_valid": self.sum_sqrt / self.n_valid,
                "mean_invsqrt_v_valid": self.sum_isqrt / self.n_valid,
                "frozen_inv_sigma_ls": self.sum_sqrt / self.sum_v,
                "frozen_inv_sigma_geo": math.exp(-0.5 * self.sum_log / self.n_valid),
            })
        p0v = np.concatenate(self.pos0_valid) if self.pos0_valid else np.zeros(0)
        if p0v.size and self.rest_valid.n and self.rest.n:
            med0 = float(np.median(p0v))
            medr = float(np.median(np.concatenate(self.rest_valid.sample)))
            ratio = med0 / medr
            self.stats.extra["cls"] = {"pos0_median": med0, "rest_median": medr, "ratio": ratio,
                                       "scaled": _scaled_stats(self.rest, np.concatenate(self.pos0) / ratio)}


def _scaled_stats(rest: _Stats, pos0: np.ndarray) -> dict:
    """Statistics (as :meth:`_Stats.to_dict`) of the union of ``rest`` (a subsampled population) and every value
    of ``pos0``; the quantiles weight each kept sample of ``rest`` by the population it stands for."""
    r = np.concatenate(rest.sample)
    n = rest.n + pos0.size
    mean = (rest.s + float(pos0.sum())) / n
    ss = rest.ss + float((pos0 * pos0).sum())
    vals = np.concatenate([r, pos0])
    w = np.concatenate([np.full(r.size, rest.n / r.size), np.ones(pos0.size)])
    order = np.argsort(vals, kind="stable")
    vals, cw = vals[order], np.cumsum(w[order])
    cw /= cw[-1]
    qs = {str(q): float(vals[min(int(np.searchsorted(cw, q)), vals.size - 1)]) for q in _Stats.QUANTILES}
    return {"min": min(rest.min, float(pos0.min())), "max": max(rest.max, float(pos0.max())), "count": n,
            "mean": mean, "std": math.sqrt(max(ss / n - mean * mean, 0.0)), "quantiles": qs}


def _batch_to(batch, device):
    keep = ("input_ids", "token_type_ids", "attention_mask")
    return {k: v.to(device) for k, v in batch.items() if k in keep}


@torch.no_grad()
def calibrate(model, loader, device="cpu", max_batches: int | None = None, progress: bool = True) -> dict:
    """Input ranges of every approximated op, per layer, with the model's *current* functions.

    Returns a JSON-serialisable dict ``{"layers": [{"exp", "gelu", "ln_attn", "ln_ffn"}...], "pooler":
    {"tanh"}, "n_examples", "n_batches", "softmax"}``; each entry has min/max/mean/std/count/quantiles
    (exp: valid keys only; LN: the variance ``var + eps`` per token, plus frozen-LN statistics over valid
    tokens). Exp is recorded only when the model uses the CGF softmax."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    model.to(device)
    ctx: dict = {}
    cgf = getattr(model.config, "cgf_softmax", None) == "cgf"
    saved, recorders, ln_recs = [], {}, []
    for key, parent, attr in _locations(model):
        kind = key.rsplit(".", 1)[1]
        orig = getattr(parent, attr, None)
        st = _Stats(seed=len(recorders))
        if kind == "exp":
            if not cgf:
                continue
            rec = _FnRecorder(orig, st, with_valid=True)
        elif kind.startswith("ln"):
            rec = _LNRecorder(orig, st, ctx)
            ln_recs.append(rec)
        else:
            rec = _FnRecorder(orig, st)
        saved.append((parent, attr, orig))
        setattr(parent, attr, rec)
        recorders[key] = st
    n_ex = n_b = 0
    try:
        total = len(loader) if max_batches is None else min(max_batches, len(loader))
        for b, batch in enumerate(tqdm(loader, total=total, desc="calibrate", disable=not progress, leave=False)):
            if max_batches is not None and b >= max_batches:
                break
            inputs = _batch_to(batch, device)
            ctx["mask"] = inputs.get("attention_mask")
            model(**inputs)
            n_ex += int(inputs["input_ids"].shape[0])
            n_b += 1
    finally:
        for parent, attr, orig in saved:
            _set(parent, attr, orig)
        model.train(was_training)
    for r in ln_recs:
        r.finish()
    out = {"n_examples": n_ex, "n_batches": n_b, "softmax": getattr(model.config, "cgf_softmax", None),
           "layers": [{} for _ in encoder_layers(model)], "pooler": {}}
    for key, st in recorders.items():  # keys come from this model's locations: every layer index exists
        _put_range(out, key, st.to_dict())
    if n_ex == 0:
        raise ValueError("calibrate: the loader yielded no batches")
    return out


# ----------------------------------------------------------------------------------------------- polynomialize
def widen(st: dict, margin: float, positive: bool = False) -> tuple[float, float]:
    """Calibrated [min, max] widened by ``margin * (max - min)`` per side; ``positive`` (variances):
    multiplicatively, ``[min*(1-margin), max*(1+margin)]``, so it stays > 0 and is never degenerate."""
    a, b = float(st["min"]), float(st["max"])
    if positive:
        return a * (1.0 - min(margin, 0.9)), b * (1.0 + margin) + 1e-9
    w = max(b - a, 1e-6 * max(abs(a), abs(b), 1.0))
    return a - margin * w, b + margin * w


def _put_range(ranges: dict, key: str, st: dict) -> None:
    """Store ``st`` as the range of op ``key`` ("layers.<i>.<kind>" or "pooler.<kind>"), the inverse of :func:`_range`."""
    parts = key.split(".")
    if parts[0] == "layers":
        ranges["layers"][int(parts[1])][parts[2]] = st
    else:
        ranges["pooler"][parts[1]] = st


def _range(ranges: dict, key: str) -> dict:
    parts = key.split(".")
    try:
        st = ranges["layers"][int(parts[1])][parts[2]] if parts[0] == "layers" else ranges["pooler"][parts[1]]
    except (KeyError, IndexError, TypeError):
        st = None
    if not st or not st.get("count"):
        n = len(ranges.get("layers", [])) if isinstance(ranges, dict) else 0
        raise ValueError(f"calibration ranges have no data for {key} (ranges cover {n} layers; "
                         "calibrate the same model with the CGF softmax first)")
    return st


def _banded(st: dict, q: float | None) -> dict:
    """``st`` with its maximum lowered to its calibrated ``q`` quantile (``ln_band``); unchanged for None."""
    if q is None:
        return st
    qs = st.get("quantiles") or {}
    top = qs.get(str(float(q)))
    if top is None:
        raise ValueError(f"ln_band {q}: the calibration ranges keep no {q} quantile (recalibrate)")
    return {**st, "max": min(float(st["max"]), float(top))}


def _fit_invsqrt(lo: float, hi: float, options: FheOptions) -> P.PolyApprox:
    return P.fit("invsqrt", lo, hi, degree=options.invsqrt_degree, form=options.form, method="lsq", relative=True)


def cls_scaled(st: dict, options: FheOptions) -> tuple[dict, float]:
    """(variance statistics in the Newton LayerNorm's interval units, its position-0 scale ``pos_scale0``).

    Statistics already in scaled units (they carry ``pos_scale0``: a scaled module measured by :func:`calibrate`
    or covered by :func:`cover_ranges`) keep their scale; otherwise, with ``options.ln_cls_scale`` and a
    calibrated position-0 / rest median ratio above ``options.ln_cls_threshold``, the scale is ``1/ratio`` and the
    statistics are those of the scaled variances; else the statistics as they are and 1."""
    if "pos_scale0" in st:
        return st, float(st["pos_scale0"])
    cls = st.get("cls")
    if options.ln_cls_scale and cls and float(cls["ratio"]) > float(options.ln_cls_threshold):
        return cls["scaled"], 1.0 / float(cls["ratio"])
    return st, 1.0


def newton_ln(approx: P.PolyApprox, options: FheOptions, ln, pos_scale0: float = 1.0,
              max_len: int = 512) -> P.NewtonLayerNorm:
    """Newton LN with ``options.newton_steps`` steps, or (None) the fewest meeting ``ln_rel_target``."""
    kw = {"pos_scale0": pos_scale0, "max_len": max_len}
    if options.newton_steps is not None:
        return P.NewtonLayerNorm(approx, options.newton_steps, ln=ln, **kw)
    for n in range(options.max_newton_steps + 1):
        m = P.NewtonLayerNorm(approx, n, ln=ln, **kw)
        if m.rel_error() <= options.ln_rel_target:
            return m
    return m


def gelu_core(st: dict, margin: float) -> tuple[float, float] | None:
    """The band a "band" GELU fit weights fully: a refit's kept ``core`` (cover), else the calibrated 0.01% and
    99.99% quantiles widened by ``margin``; None when the ranges keep neither (the fit is then plain)."""
    if st.get("core") is not None:
        return tuple(float(v) for v in st["core"])
    qs = st.get("quantiles") or {}
    if "0.0001" not in qs or "0.9999" not in qs:
        return None
    return widen({"min": qs["0.0001"], "max": qs["0.9999"]}, margin)


def build_modules(model, options: FheOptions, ranges: dict, keys=None) -> dict[str, nn.Module]:
    """The polynomial modules for ``model`` (not installed). Keys as in :func:`named_approx_modules`;
    ``keys``: build only these ops (default: every op ``options.kinds`` names)."""
    from transformers.activations import ACT2FN

    act = model.config.hidden_act
    gelu_f = P.torch_function(ACT2FN[act]) if isinstance(act, str) else P.FUNCTIONS["gelu"]
    mods = {}
    for key, parent, attr in _locations(model):
        kind = key.rsplit(".", 1)[1]
        if kind[:2] not in {k[:2] for k in options.kinds} or (keys is not None and key not in keys):
            continue
        st = _range(ranges, key)
        if kind == "exp":
            lo, hi = widen(st, options.margin)
            hi = min(hi, float(st["max"]) + options.exp_headroom)
            if options.exp_floor is not None:
                lo = max(lo, -float(options.exp_floor))
            if options.exp_form == "square":
                approx = P.fit("exp", lo, hi, form="square", r=options.exp_r)
            else:
                approx = P.fit_exp(lo, hi, options.exp_degree, form=options.exp_form, squarings=options.exp_squarings,
                                   rel_target=options.exp_rel_target, method=options.fit)
            mods[key] = P.PolyExp(approx)
        elif kind == "gelu":
            lo, hi = widen(st, options.margin)
            core = gelu_core(st, options.margin) if options.gelu_tail_weight is not None else None
            band = {"method": "band", "core": core, "tail_weight": float(options.gelu_tail_weight)} if core else \
                {"method": options.fit}
            mods[key] = P.PolyGELU(P.fit(gelu_f, lo, hi, degree=options.gelu_degree, form=options.form, name="gelu",
                                         **band))
        elif kind == "tanh":
            lo, hi = widen(st, options.margin)
            mods[key] = P.PolyTanh(P.fit("tanh", lo, hi, degree=options.tanh_degree, form=options.form,
                                         method=options.fit))
        else:
            ln = getattr(parent, attr)
            if options.ln_for(key) == "frozen":
                inv = st.get(f"frozen_inv_sigma_{options.frozen_stat}") or 1.0 / math.sqrt(st["mean"])
                mods[key] = P.FrozenLayerNorm(inv, ln=ln, interval=widen(st, options.margin, positive=True))
            else:
                st, s0 = cls_scaled(st, options)
                lo, hi = widen(_banded(st, options.ln_band), options.margin, positive=True)
                max_len = int(getattr(model.config, "max_position_embeddings", 512) or 512)
                mods[key] = newton_ln(_fit_invsqrt(lo, hi, options), options, ln, pos_scale0=s0, max_len=max_len)
    return mods


def polynomialize(model, options: FheOptions, ranges: dict) -> dict:
    """Replace every non-linearity of the server path by its polynomial module (in place).

    Intervals come from ``ranges`` (:func:`calibrate`) widened by ``options.margin``. Returns the
    JSON-serialisable fhe settings (see :func:`fhe_settings`). ``poly="none"`` changes nothing."""
    if isinstance(options, dict):
        options = FheOptions.from_dict(options)
    if options.poly == "none":
        model.cgf_fhe_options = options
        return fhe_settings(model, ranges)
    if getattr(model.config, "cgf_softmax", None) != "cgf":
        raise ValueError("poly='all' needs the CGF softmax (softmax's max and division have no polynomial form): "
                         f"the model uses {getattr(model.config, 'cgf_softmax', None)!r}; set_softmax(model, 'cgf')")
    mods = build_modules(model, options, ranges)
    for key, parent, attr in _locations(model):
        if key in mods:
            setattr(parent, attr, mods[key])
    model.cgf_fhe_options = options
    return fhe_settings(model, ranges)


def cover_ranges(model, ranges: dict, options: FheOptions | None = None) -> dict:
    """Widen every polynomial interval that ``ranges`` leave, in place: that op's polynomial is refitted on
    the union of its interval and the measured [min, max] (plus ``options.margin``); every other op keeps its
    module (same coefficients, same function). Meant for a trained student: measure ``ranges`` with
    :func:`calibrate` in the training form (guard on, so each op sees the inputs a sane upstream gives it).

    Returns ``{key: {"old": [lo, hi], "new": [lo, hi], "measured": [min, max], "depth_old": d, "depth_new": d}}``
    for the refitted ops (rebuilt modules start with the guard off). Frozen LayerNorms have no interval to widen and are left as they are."""
    options = options or getattr(model, "cgf_fhe_options", None) or FheOptions(poly="all")
    mods = dict(named_approx_modules(model))
    union, changed = {"layers": [dict(lay) for lay in ranges.get("layers", [])],
                      "pooler": dict(ranges.get("pooler", {}))}, {}
    for key, m in mods.items():
        if m.interval is None or getattr(m, "kind", "") == "ln_frozen":
            continue
        try:
            st = _range(ranges, key)
        except ValueError:
            continue
        lo, hi = m.interval
        mn, mx = float(st["min"]), float(st["max"])
        if not (math.isfinite(mn) and math.isfinite(mx)):
            raise ValueError(f"{key}: the measured range [{mn}, {mx}] is not finite; measure in the training form "
                             "(guard on) so every op sees finite inputs")
        # a banded LayerNorm (ln_band) starts at its variance's top quantile; tokens the interval penalty did not
        # pull in would make the unclamped polynomial explode, so cover widens its top too (to what was measured)
        banded = options.ln_band is not None and getattr(m, "kind", "") == "ln_newton"
        if lo <= mn and mx <= hi:
            continue
        entry = {**st, "min": min(lo, mn), "max": max(hi, mx)}
        core = getattr(getattr(m, "approx", None), "core", None)
        if core is not None:  # a band fit keeps its core: the counters keep no quantiles
            entry["core"] = list(core)
        if banded:  # build_modules re-applies the band: its quantile is the new top (the counters keep none)
            entry["quantiles"] = {**(st.get("quantiles") or {}), str(float(options.ln_band)): entry["max"]}
        _put_range(union, key, entry)
        changed[key] = {"old": [lo, hi], "measured": [mn, mx], "depth_old": int(m.depth)}
    if not changed:
        return {}
    new = build_modules(model, options, union, keys=set(changed))
    settings = fhe_settings(model)
    settings["modules"].update({k: new[k].to_settings() for k in changed})
    apply_fhe_settings(model, settings)
    for key, m in named_approx_modules(model):
        if key in changed:
            changed[key].update({"new": list(m.interval), "depth_new": int(m.depth)})
    return changed


def tracked_ranges(model) -> dict:
    """The input ranges the out-of-interval counters saw since their last reset, as :func:`calibrate`-style
    ranges for :func:`cover_ranges`: per op ``[min(lo, smallest outside input), max(hi, largest outside
    input)]`` over its interval ``[lo, hi]`` (an op whose inputs all fell inside reports its interval, i.e.
    nothing to widen). Free during training: the counters run on every forward. Under
    ``torch.distributed`` the ranges are reduced over all processes so every replica widens the same ops.
    NaN and infinite inputs are counted as outside but cannot be covered; they leave the range as it is."""
    ops = [(key, m) for key, m in named_approx_modules(model) if m.interval is not None]

    def seen(bound: float, v: float, pick) -> float:
        return pick(bound, v) if math.isfinite(v) else bound

    lo = torch.tensor([seen(m.interval[0], m.out_min, min) for _, m in ops], dtype=torch.float64)
    hi = torch.tensor([seen(m.interval[1], m.out_max, max) for _, m in ops], dtype=torch.float64)
    count = torch.tensor([m.n_seen for _, m in ops], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and ops:
        dev = next(model.parameters()).device
        lo, hi, count = lo.to(dev), hi.to(dev), count.to(dev)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(count)
        lo, hi, count = lo.cpu(), hi.cpu(), count.cpu()
    out: dict = {"layers": [{} for _ in encoder_layers(model)], "pooler": {}}
    for (key, m), a, b, n in zip(ops, lo.tolist(), hi.tolist(), count.tolist()):
        entry = {"min": a, "max": b, "count": int(n)}
        s0 = float(getattr(m, "pos_scale0", 1.0))
        if s0 != 1.0:  # a position-scaled LayerNorm counts in its scaled units: a refit must keep the scale
            entry["pos_scale0"] = s0
        _put_range(out, key, entry)
    return out


def fhe_settings(model, ranges: dict | None = None) -> dict:
    """The current fhe settings of ``model`` (options, per-op modules with intervals, coefficients, forms,
    stated depths, frozen-LN constants) and, if given, calibration statistics. JSON-serialisable."""
    options = getattr(model, "cgf_fhe_options", None) or FheOptions()
    mods = {k: m.to_settings() for k, m in named_approx_modules(model)}
    d = {"version": SETTINGS_VERSION, "options": options.to_dict(), "modules": mods,
         "depth": model_depth(model)}
    if ranges is not None:
        d["calibration"] = ranges
    return d


def apply_fhe_settings(model, fhe_settings: dict) -> None:
    """Rebuild the polynomial modules recorded in ``fhe_settings`` (no refitting; LayerNorm replacements
    reuse the model's current LayerNorm ``weight``/``bias``, i.e. the loaded checkpoint's)."""
    if not fhe_settings:
        return
    version = fhe_settings.get("version", SETTINGS_VERSION)
    if version > SETTINGS_VERSION:
        raise ValueError(f"fhe settings version {version} is newer than this cgf-fhe ({SETTINGS_VERSION})")
    model.cgf_fhe_options = FheOptions.from_dict(fhe_settings.get("options", {}))
    mods = fhe_settings.get("modules") or {}
    locs = {key: (parent, attr) for key, parent, attr in _locations(model)}
    unknown = sorted(set(mods) - set(locs))
    if unknown:
        raise ValueError(f"fhe settings name ops {unknown} that the model does not have "
                         f"({len(encoder_layers(model))} encoder layers)")
    for key, d in mods.items():
        parent, attr = locs[key]
        cur = getattr(parent, attr, None)
        mod = P.module_from_settings(d, ln=cur if d.get("kind", "").startswith("ln") else None)
        setattr(parent, attr, mod)


# ----------------------------------------------------------------------------------------------- intervals
def interval_report(model) -> dict:
    """Out-of-interval input counts per op (per layer) since the last reset, plus totals per kind."""
    ops, totals = {}, {}
    for key, m in named_approx_modules(model):
        if m.interval is None:
            continue
        st = m.interval_stats()
        ops[key] = st
        t = totals.setdefault(m.kind, {"n_out": 0, "n_seen": 0})
        t["n_out"] += st["n_out"]
        t["n_seen"] += st["n_seen"]
    n_out = sum(t["n_out"] for t in totals.values())
    n_seen = sum(t["n_seen"] for t in totals.values())
    return {"ops": ops, "totals": totals, "n_out": n_out, "n_seen": n_seen,
            "frac_out": n_out / n_seen if n_seen else 0.0}


def set_frozen_blend(model, blend: float) -> int:
    """Set every FrozenLayerNorm's ``blend`` (0 = exact LayerNorm, 1 = frozen, the FHE form); returns how many.
    A distillation schedule can anneal it from 0 to 1; export needs 1."""
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be in [0, 1], got {blend}")
    n = 0
    for _, m in named_approx_modules(model):
        if isinstance(m, P.FrozenLayerNorm):
            m.blend = float(blend)
            n += 1
    return n


def set_guard(model, on: bool = True) -> int:
    """Clamp every approximated op's input into its interval (plaintext training aid against polynomial
    blow-up; not what the encrypted evaluation computes). Returns the number of modules switched."""
    n = 0
    for _, m in named_approx_modules(model):
        if isinstance(m, (P.PolyModule, P.NewtonLayerNorm)):
            m.guard = bool(on)
            n += 1
    return n


def reset_interval_counters(model) -> None:
    for _, m in named_approx_modules(model):
        m.reset_counters()


def interval_penalty(model) -> torch.Tensor:
    """Sum over modules of the mean squared out-of-interval excess (normalised units, last forward)."""
    terms = [m.last_penalty for _, m in named_approx_modules(model) if m.last_penalty is not None]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return torch.stack([t.to(terms[0].device) for t in terms]).sum()


# ----------------------------------------------------------------------------------------------- layers
def kept_layer_indices(n_layers: int, k: int) -> list[int]:
    if not 1 <= k <= n_layers:
        raise ValueError(f"cannot keep {k} of {n_layers} encoder layers (need 1 <= k <= {n_layers})")
    return [round((j + 1) * n_layers / k) - 1 for j in range(k)]


def shrink_layers(model, k: int) -> list[int]:
    """Keep ``k`` evenly spaced encoder layers (always including the last), in place. Returns the kept
    teacher layer indices: student layer ``j`` was teacher layer ``kept[j]`` (the hidden-state KD map)."""
    layers = encoder_layers(model)
    kept = kept_layer_indices(len(layers), k)
    new = nn.ModuleList([layers[i] for i in kept])
    base_model(model).encoder.layer = new
    for j, layer in enumerate(new):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    model.config.num_hidden_layers = k
    return kept


# ----------------------------------------------------------------------------------------------- depth
def ln_depth(ln: str, invsqrt_degree: int = 31, newton_steps: int = 2, form: str = "ps") -> int:
    """Stated depth of one LayerNorm replacement: frozen 1; Newton ``3 + P`` without steps, ``2 + P + 2*steps``
    with (:func:`cgf_fhe.poly.newton_ln_depth`: the last step absorbs the output product)."""
    if ln == "frozen":
        return P.FrozenLayerNorm.depth
    baby = P.best_baby(invsqrt_degree) if form == "ps" else 2
    return P.newton_ln_depth(P.form_depth(form, invsqrt_degree, prescaled=True, baby=baby), newton_steps)


def poly_depth(form: str, degree: int, r: int = 0, squarings: int = 0) -> int:
    """Stated depth of an elementwise polynomial as exported (normalisation folded into the previous layer)."""
    if form == "square":
        return r
    return P.form_depth(form, degree, prescaled=True, baby=P.best_baby(degree) if form == "ps" else 2,
                        squarings=squarings)


def layer_depth(exp: int, gelu: int, ln: int, ln_ffn: int | None = None) -> int:
    """``9 + exp + gelu + ln_attn + ln_ffn`` (``ln_ffn`` defaults to ``ln``)."""
    return LAYER_LINEAR_DEPTH + exp + gelu + ln + (ln if ln_ffn is None else ln_ffn)


def depth_table(options: FheOptions | dict | None = None,
                exp_choices=(("ps", 15, 0), ("ps", 15, 1), ("ps", 15, 2), ("ps", 15, 3), ("ps", 15, 4),
                             ("ps", 7, 2), ("ps", 7, 3), ("ps", 7, 4), ("square", 6, 0), ("square", 7, 0)),
                gelu_degrees=(15, 31, 63), newton_steps=(1, 2, 3)) -> dict:
    """Per-encoder-layer multiplicative depth for each approximation choice, from the forms' stated depths
    (as exported: normalisation scales folded). ``layer = 9 + E + G + L_attn + L_ffn``
    (:data:`LAYER_LINEAR_DEPTH`), head ``2 + T``. ``exp_choices``: (form, degree, squarings) with degree = r for
    "square". LN choices (:data:`LN_CHOICES`): frozen; Newton with ``options.invsqrt_degree`` for each of
    ``newton_steps``; frozen-attn (frozen after attention, that Newton after the FFN). Each row has
    ``ln_attn_depth`` and ``ln_ffn_depth``; ``ln_depth`` is their common value (None for frozen-attn).
    ``"current"`` evaluates ``options`` itself (auto squarings/steps are per layer: see ``model_depth``)."""
    if options is None:
        options = FheOptions(poly="all")
    elif isinstance(options, dict):
        options = FheOptions.from_dict(options)
    F = ln_depth("frozen")
    newton = [(n, ln_depth("newton", options.invsqrt_degree, n, options.form)) for n in newton_steps]
    # (choice, Newton steps, depth after attention, depth after the FFN)
    lns = [("frozen", None, F, F)] + [("newton", n, L, L) for n, L in newton] + [("frozen-attn", n, F, L)
                                                                               for n, L in newton]
    components = [{"ln": "frozen", "newton_steps": None, "invsqrt_degree": None, "depth": F}] + [
        {"ln": "newton", "newton_steps": n, "invsqrt_degree": options.invsqrt_degree, "depth": L} for n, L in newton]
    exps = []
    for form, deg, k in exp_choices:
        E = poly_depth("square", 2 ** deg, r=deg) if form == "square" else poly_depth(form, deg, squarings=k)
        exps.append({"exp_form": form, "exp_degree": 2 ** deg if form == "square" else deg,
                     "exp_squarings": deg if form == "square" else k, "exp_depth": E})
    gelus = [(g, poly_depth(options.form, g)) for g in sorted(set(gelu_degrees) | {options.gelu_degree})]
    rows = []
    for ln, n, La, Lf in lns:
        for e in exps:
            for g, G in gelus:
                L = layer_depth(e["exp_depth"], G, La, Lf)
                rows.append({"ln": ln, "newton_steps": n, "ln_depth": La if La == Lf else None,
                             "ln_attn_depth": La, "ln_ffn_depth": Lf, **e, "gelu_degree": g, "gelu_depth": G,
                             "layer_depth": L, "layer_depth_exported": L - (FOLD_SAVING if ln == "newton" else V_FOLD_SAVING)})
    cur = {}
    if options.exp_form == "square":
        cur["exp_depth"] = poly_depth("square", 0, r=options.exp_r)
    elif options.exp_squarings is not None:
        cur["exp_depth"] = poly_depth(options.exp_form, options.exp_degree, squarings=options.exp_squarings)
    cur["gelu_depth"] = poly_depth(options.form, options.gelu_degree)
    if options.ln == "frozen" or options.newton_steps is not None:
        La, Lf = (ln_depth(options.ln_for(k), options.invsqrt_degree, options.newton_steps or 0, options.form)
                  for k in ("ln_attn", "ln_ffn"))
        cur.update(ln_attn_depth=La, ln_ffn_depth=Lf, ln_depth=La if La == Lf else None)
    cur["tanh_depth"] = poly_depth(options.form, options.tanh_degree)
    cur["head_depth"] = HEAD_LINEAR_DEPTH + cur["tanh_depth"]
    if "exp_depth" in cur and "ln_attn_depth" in cur:
        cur["layer_depth"] = layer_depth(cur["exp_depth"], cur["gelu_depth"], cur["ln_attn_depth"],
                                         cur["ln_ffn_depth"])
        cur["layer_depth_exported"] = cur["layer_depth"] - (FOLD_SAVING if options.ln == "newton" else V_FOLD_SAVING)
        cur["layer_depth_exported_after_first"] = cur["layer_depth_exported"] - (
            STATS_FOLD_SAVING if options.ln == "newton" else 0)
    return {
        "formula": "layer = 9 + exp + gelu + ln_attn + ln_ffn (QKV 1, QK^T 1, CGF stats 2, *w 1, @V 1, dense 1, "
                   "FFN 2); head = 2 + tanh; frozen ln = 1; newton ln = 3 + P (no steps), 2 + P + 2*steps; "
                   "exported all-Newton "
                   f"layers save {FOLD_SAVING} (cgf_fhe.fold: LN centring and output products, *w on V)",
        "linear_depth": LAYER_LINEAR_DEPTH,
        "components": {"ln": components,
                       "exp": exps, "gelu": [{"degree": g, "depth": G} for g, G in gelus]},
        "rows": rows,
        "current": cur,
    }


def ln_cells(row: dict) -> tuple[str, str]:
    """(LayerNorm label, LN depth text) of a :func:`depth_table` row, for Markdown tables."""
    n = row.get("newton_steps")
    steps = f"Newton, {n} step" + ("" if n == 1 else "s")
    if row.get("ln") == "frozen":
        label = "frozen"
    elif row.get("ln") == "frozen-attn":
        label = f"frozen after attention, {steps} after the FFN"
    else:
        label = steps
    if row.get("ln_depth") is not None:
        return label, str(row["ln_depth"])
    return label, f"{row.get('ln_attn_depth')} + {row.get('ln_ffn_depth')}"


def model_depth(model) -> dict:
    """Stated depth of ``model`` as exported (fold_for_export): per layer, head, total. Layers without
    polynomial modules count their exact ops as 0 (not FHE-evaluable). When every LayerNorm is a Newton one,
    the export folds save :data:`FOLD_SAVING` levels per layer, and :data:`STATS_FOLD_SAVING` more in every layer
    after the first (:mod:`cgf_fhe.fold`)."""
    mods = dict(named_approx_modules(model))

    def d(key, kind):
        m = mods.get(key)
        if m is None:
            return 0
        if isinstance(m, P.PolyModule):
            return m.approx.depth(prescaled=True)
        return m.depth

    from .fold import foldable

    folded = foldable(encoder_layers(model))
    per = []
    for i in range(len(encoder_layers(model))):
        per.append(layer_depth(d(f"layers.{i}.exp", "exp"), d(f"layers.{i}.gelu", "gelu"),
                               d(f"layers.{i}.ln_attn", "ln"), d(f"layers.{i}.ln_ffn", "ln"))
                   - ((LN_FOLD_SAVING + (STATS_FOLD_SAVING if i else 0) if folded else 0) + V_FOLD_SAVING
                      if isinstance(mods.get(f"layers.{i}.exp"), P.PolyExp) else 0))
    head = HEAD_LINEAR_DEPTH + d("pooler.tanh", "tanh")
    return {"per_layer": per, "head": head, "total": sum(per) + head}
