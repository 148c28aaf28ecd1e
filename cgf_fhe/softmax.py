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
see :mod:`cgf_fhe.poly`), else ``torch.exp``. Coefficient: ``module.config.cgf_coeff`` (default 0.5).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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


def cgf_probs(scores: torch.Tensor, keep: torch.Tensor, coeff: float = DEFAULT_COEFF, exp_fn=torch.exp, valid=None):
    """CGF attention weights. ``scores`` [..., K]; ``keep`` 0/1 broadcastable; masked keys get exactly 0."""
    n = keep.sum(-1, keepdim=True)
    w = keep / n  # plaintext: depends only on the public mask
    cw = w * coeff
    mu = (scores * w).sum(-1, keepdim=True)
    x = scores - mu - (scores * scores * cw).sum(-1, keepdim=True) + mu * (scores * cw).sum(-1, keepdim=True)
    e = exp_fn(x) if valid is None else exp_fn(x, valid=valid)
    return e * w


def exact_probs(scores: torch.Tensor, keep: torch.Tensor):
    masked = scores.masked_fill(keep.expand_as(scores) == 0, torch.finfo(scores.dtype).min)
    return torch.softmax(masked, dim=-1)


def _attend(module, query, key, value, attention_mask, scaling, dropout, kind: str):
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3))
    if scaling != 1.0:
        scores = scores * scaling
    keep = keep_mask(attention_mask, scores)
    if kind == CGF:
        coeff = float(getattr(module.config, "cgf_coeff", DEFAULT_COEFF))
        exp_fn = getattr(module, "cgf_exp", None)
        if exp_fn is None:
            probs = cgf_probs(scores, keep, coeff)
        else:
            probs = cgf_probs(scores, keep, coeff, exp_fn=exp_fn, valid=keep.expand_as(scores) > 0)
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


register()
