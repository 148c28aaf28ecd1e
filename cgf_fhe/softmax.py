"""Softmax variants plugged into transformers' attention interface.

Two attention implementations are registered (select with ``model.set_attn_implementation(name)``):

* ``"cgf_exact"`` -- ordinary softmax over the valid keys (the teacher).
* ``"cgf"`` -- the division-free CGF softmax::

      p_i = exp(s_i - mean(s) - c * var(s)) / n        over the n valid keys, 0 on masked keys

  The log-sum-exp is estimated from the mean and variance of the scores (exact for Gaussian scores
  when c = 0.5), so there is no max and no input-dependent reciprocal: ``1/n`` comes from the public
  attention mask. Written in the order an encrypted evaluator wants (two multiplicative levels for
  the statistics): ``w = keep/n`` and ``c*w`` are plaintext, ``mu = sum(s*w)``,
  ``x = s - mu - sum(s*s*c*w) + mu*sum(s*c*w)``.

Both names register a boolean mask function for the same name (``AttentionMaskInterface``): without it,
transformers 5 hands a newly registered attention function ``attention_mask=None`` and padding is
silently ignored. The mask the functions receive is boolean ``[B, 1, Q, K]`` (True = attend), or a
float 0/1 keep-mask of a broadcastable shape (what the exported server model passes), or None.

The exponential is ``module.cgf_exp`` when the attention module carries one (a polynomial stand-in,
see :mod:`cgf_fhe.poly`), else ``torch.exp``. Coefficient: ``module.config.cgf_coeff`` (default 0.5), or one
per head: ``module.cgf_coeff_heads`` (a [heads] tensor), set by :func:`set_softmax` from
``config.cgf_coeff_heads`` (a list per encoder layer of a list per head, saved with the config). A per-head
coefficient is still a plaintext constant (a ct-pt multiply, no extra depth). :func:`calibrate_head_coeffs`
picks each head's coefficient on a grid so that the CGF rows best match the softmax rows of the same
scores: a single c fits peaked heads (one key far above the rest, where mean + c*var underestimates the
log-sum-exp and the CGF weights explode) and flat heads at once badly.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .bert import encoder_layers

CGF = "cgf"
EXACT = "cgf_exact"
SOFTMAX_TO_ATTN = {"cgf": CGF, "exact": EXACT}
DEFAULT_COEFF = 0.5


def keep_mask(attention_mask: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
    """Float 0/1 mask broadcastable to ``scores`` (1 = valid key)."""
    if attention_mask is None:
        return torch.ones(scores.shape[-1], dtype=scores.dtype, device=scores.device)
    if attention_mask.dtype == torch.bool:
        return attention_mask.to(scores.dtype)
    return attention_mask.to(scores.dtype)


def _cgf_argument(scores: torch.Tensor, keep: torch.Tensor, coeff) -> torch.Tensor:
    """``s - mean(s) - c*var(s)`` over the valid keys, in the encrypted evaluator's order (see the module doc)."""
    w = keep / keep.sum(-1, keepdim=True)  # plaintext: depends only on the public mask
    cw = w * coeff
    mu = (scores * w).sum(-1, keepdim=True)
    return scores - mu - (scores * scores * cw).sum(-1, keepdim=True) + mu * (scores * cw).sum(-1, keepdim=True)


def cgf_probs(scores: torch.Tensor, keep: torch.Tensor, coeff: float = DEFAULT_COEFF, exp_fn=torch.exp, valid=None):
    """CGF attention weights. ``scores`` [..., K]; ``keep`` 0/1 broadcastable; masked keys get exactly 0."""
    w = keep / keep.sum(-1, keepdim=True)
    x = _cgf_argument(scores, keep, coeff)
    e = exp_fn(x) if valid is None else exp_fn(x, valid=valid)
    return e * w


def _weights_ride_on_v(module, keep: torch.Tensor, dropout: float) -> bool:
    """While exporting an eval-mode CGF student whose mask has one row for every query (the server model's
    ``[B, 1, 1, K]`` keep-mask), with no exact-softmax blend: the ``keep/n`` weights can multiply V instead."""
    from .poly import _exporting

    return (_exporting() and not module.training and not dropout and keep.dim() == 4 and keep.shape[-2] == 1
            and getattr(module, "cgf_blend", 1.0) >= 1.0)


def exact_probs(scores: torch.Tensor, keep: torch.Tensor):
    masked = scores.masked_fill(keep.expand_as(scores) == 0, torch.finfo(scores.dtype).min)
    return torch.softmax(masked, dim=-1)


def _scores(query, key, scaling):
    """Attention scores ``q k^T * scaling`` (default scaling 1/sqrt(head_dim))."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3))
    return scores * scaling if scaling != 1.0 else scores


def head_coefficient(module, like: torch.Tensor):
    """The CGF coefficient of a self-attention module: a float, or a ``[1, heads, 1, 1]`` tensor (per head,
    trainable or fixed) of ``like``'s dtype and device."""
    heads = getattr(module, "cgf_coeff_heads", None)
    log_c = getattr(module, COEFF_PARAM, None)
    if log_c is not None:  # trainable (train_head_coeffs)
        return log_c.exp().to(like.dtype).view(1, -1, 1, 1)
    if heads is not None:
        return heads.to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
    return float(getattr(module.config, "cgf_coeff", DEFAULT_COEFF))


def _attend(module, query, key, value, attention_mask, scaling, dropout, kind: str):
    scores = _scores(query, key, scaling)
    keep = keep_mask(attention_mask, scores)
    if kind == CGF:
        coeff = head_coefficient(module, scores)
        exp_fn = getattr(module, "cgf_exp", None)
        if exp_fn is not None and _weights_ride_on_v(module, keep, dropout):
            # export (issue #22): (e * w) @ V == e @ (V * w^T) when w = keep/n is the same for every query row;
            # the plaintext w then multiplies V (a low-level ciphertext) instead of e (the deepest one): -1 level
            w = keep / keep.sum(-1, keepdim=True)
            e = exp_fn(_cgf_argument(scores, keep, coeff), valid=keep.expand_as(scores) > 0)
            out = torch.matmul(e, value * w.transpose(-1, -2)).transpose(1, 2).contiguous()
            return out, None
        if exp_fn is None:
            probs = cgf_probs(scores, keep, coeff)
        else:
            probs = cgf_probs(scores, keep, coeff, exp_fn=exp_fn, valid=keep.expand_as(scores) > 0)
        blend = getattr(module, "cgf_blend", 1.0)
        if blend < 1.0:  # training aid (set_cgf_blend): part exact softmax
            probs = blend * probs + (1.0 - blend) * exact_probs(scores, keep)
    else:
        probs = exact_probs(scores, keep)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def cgf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return _attend(module, query, key, value, attention_mask, scaling, dropout, CGF)


def exact_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return _attend(module, query, key, value, attention_mask, scaling, dropout, EXACT)


def _bool_mask(*args, **kwargs):
    # Always materialise the mask (never the "no padding -> None" shortcut) so both paths see the same thing.
    kwargs["allow_is_bidirectional_skip"] = False
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register both implementations (idempotent). Called on import of :mod:`cgf_fhe`."""
    AttentionInterface.register(CGF, cgf_attention)
    AttentionInterface.register(EXACT, exact_attention)
    AttentionMaskInterface.register(CGF, _bool_mask)
    AttentionMaskInterface.register(EXACT, _bool_mask)


def set_softmax(model, softmax: str, coeff: float | None = None) -> None:
    """Switch a loaded model's attention to ``softmax`` in {'exact','cgf'} (and set the CGF coefficient)."""
    if softmax not in SOFTMAX_TO_ATTN:
        raise ValueError(f"unknown softmax {softmax!r}; choose one of {sorted(SOFTMAX_TO_ATTN)}")
    register()
    model.set_attn_implementation(SOFTMAX_TO_ATTN[softmax])
    if coeff is not None:
        model.config.cgf_coeff = float(coeff)
    elif not hasattr(model.config, "cgf_coeff"):
        model.config.cgf_coeff = DEFAULT_COEFF
    model.config.cgf_softmax = softmax
    set_head_coeffs(model, getattr(model.config, "cgf_coeff_heads", None))


def _self_attentions(model) -> list[nn.Module]:
    return [layer.attention.self for layer in encoder_layers(model)]


def set_head_coeffs(model, coeffs) -> None:
    """Per-head CGF coefficients (list per encoder layer of list per head; None = the single ``cgf_coeff``),
    stored in ``model.config.cgf_coeff_heads`` and put on each self-attention module."""
    if coeffs is None:  # also for models that are not BERT-shaped (nothing to clear there)
        try:
            mods = _self_attentions(model)
        except (TypeError, AttributeError):
            mods = []
        for m in mods:
            m.cgf_coeff_heads = None
        model.config.cgf_coeff_heads = None
        return
    mods = _self_attentions(model)
    coeffs = [[float(c) for c in layer] for layer in coeffs]
    heads = int(model.config.num_attention_heads)
    if len(coeffs) != len(mods) or any(len(layer) != heads for layer in coeffs):
        raise ValueError(f"cgf_coeff_heads has {[len(layer) for layer in coeffs]} coefficients per layer; the model "
                         f"has {len(mods)} encoder layers of {heads} heads")
    bad = [(i, j, c) for i, layer in enumerate(coeffs) for j, c in enumerate(layer) if not c > 0]
    if bad:
        raise ValueError(f"cgf_coeff_heads must be > 0; (layer, head, value): {bad[:5]}")
    for m, layer in zip(mods, coeffs):
        m.cgf_coeff_heads = torch.tensor(layer)
    model.config.cgf_coeff_heads = coeffs


def set_cgf_blend(model, blend: float) -> None:
    """Training aid: CGF attention weights become ``blend * CGF + (1 - blend) * exact softmax`` of the same scores
    (1 = CGF only, what is exported; the softmax part divides, so it never reaches the server)."""
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"softmax blend must be in [0, 1], got {blend}")
    for m in _self_attentions(model):
        m.cgf_blend = float(blend)


COEFF_PARAM = "cgf_log_coeff"  # the trainable per-head log-coefficient of a self-attention module


def train_head_coeffs(model) -> list[list[float]]:
    """Make each head's CGF coefficient trainable: a parameter ``cgf_log_coeff`` [heads] (log c, so c stays > 0)
    on every self-attention module, starting from the per-head values if set, else the single ``cgf_coeff``.
    Training sees it like any weight (``named_parameters``); :func:`fix_head_coeffs` turns it back into
    plaintext constants. Returns the starting coefficients."""
    mods = _self_attentions(model)
    heads = int(model.config.num_attention_heads)
    single = float(getattr(model.config, "cgf_coeff", DEFAULT_COEFF))
    start = getattr(model.config, "cgf_coeff_heads", None) or [[single] * heads for _ in mods]
    set_head_coeffs(model, start)  # checks the shape and the sign
    for m, layer in zip(mods, start):
        device = next(m.parameters()).device
        m.register_parameter(COEFF_PARAM, nn.Parameter(torch.tensor(layer, device=device).log()))
    return [[float(c) for c in layer] for layer in start]


def fix_head_coeffs(model) -> list[list[float]] | None:
    """Undo :func:`train_head_coeffs`: the parameters' current values become the per-head constants
    (``config.cgf_coeff_heads``, what a checkpoint saves and export folds) and the parameters are removed.
    Returns them (None when no coefficient was trainable)."""
    mods = [m for m in _self_attentions(model) if getattr(m, COEFF_PARAM, None) is not None]
    if not mods:
        return None
    coeffs = [m._parameters.pop(COEFF_PARAM).detach().exp().cpu().tolist() for m in mods]
    set_head_coeffs(model, coeffs)
    return model.config.cgf_coeff_heads


HEAD_COEFF_GRID = (0.25, 0.35, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
_CALIB = "cgf_calibrate_heads"
_CALIB_SUMS: dict = {}


def _calibrating_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Exact softmax attention that also adds, per head and grid coefficient, the L1 distance of the CGF
    rows to the softmax rows (summed over valid query rows) into ``_CALIB_SUMS[module]``."""
    scores = _scores(query, key, scaling)
    keep = keep_mask(attention_mask, scores)
    probs = exact_probs(scores, keep)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    # valid query rows: in a BERT encoder query q is valid iff key q is (the mask only hides padded keys)
    rows = keep.expand_as(scores).diagonal(dim1=-2, dim2=-1) if scores.shape[-2] == scores.shape[-1] \
        else torch.ones_like(scores[..., 0])
    entry = _CALIB_SUMS.setdefault(module, [torch.zeros(scores.shape[1], len(HEAD_COEFF_GRID)), 0.0])
    for g, c in enumerate(HEAD_COEFF_GRID):
        l1 = ((cgf_probs(scores, keep, c) - probs).abs() * keep).sum(-1)  # [B, H, Q]
        entry[0][:, g] += (l1 * rows).sum((0, 2)).float().cpu()
    entry[1] += float(rows.sum() / scores.shape[1])  # valid query rows per head
    return out, probs


def calibrate_head_coeffs(model, batches, device="cpu") -> dict:
    """Choose each head's CGF coefficient from :data:`HEAD_COEFF_GRID`: the one whose CGF rows are closest
    (mean L1 over valid query rows) to the softmax rows of the same scores, with the model's own weights
    (the teacher's, for a student initialised from it). ``batches``: an iterable of model-input dicts.
    Sets them on the model (:func:`set_head_coeffs`) and returns ``{"coeffs", "l1", "l1_at_single"}`` where
    ``l1`` / ``l1_at_single`` are per layer and head: the mean L1 at the chosen coefficient and at the
    model's single ``cgf_coeff`` (taken from the grid's nearest point)."""
    AttentionInterface.register(_CALIB, _calibrating_attention)
    AttentionMaskInterface.register(_CALIB, _bool_mask)
    original = model.config._attn_implementation
    single = float(getattr(model.config, "cgf_coeff", DEFAULT_COEFF))
    at = min(range(len(HEAD_COEFF_GRID)), key=lambda g: abs(HEAD_COEFF_GRID[g] - single))
    _CALIB_SUMS.clear()
    was_training = model.training
    model.eval()
    try:
        model.set_attn_implementation(_CALIB)
        with torch.no_grad():
            for batch in batches:
                model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        model.set_attn_implementation(original)
        model.train(was_training)
    mods = _self_attentions(model)
    missing = [i for i, m in enumerate(mods) if m not in _CALIB_SUMS]
    if missing:
        raise ValueError(f"no calibration data reached encoder layers {missing} (empty batches?)")
    coeffs, l1, l1_single = [], [], []
    for m in mods:
        sums, count = _CALIB_SUMS[m]
        mean = sums / max(count, 1.0)
        coeffs.append([HEAD_COEFF_GRID[g] for g in mean.argmin(1).tolist()])
        l1.append(mean.min(1).values.tolist())
        l1_single.append(mean[:, at].tolist())
    _CALIB_SUMS.clear()
    set_head_coeffs(model, coeffs)
    return {"coeffs": coeffs, "l1": l1, "l1_at_single": l1_single, "grid": list(HEAD_COEFF_GRID)}


register()
