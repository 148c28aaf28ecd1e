"""Level-saving exact rewrites of a polynomial BERT student for export (issue #22: constant folding).

A Newton LayerNorm as trained (:class:`cgf_fhe.poly.NewtonLayerNorm`) costs ``3 + P + 2*steps`` levels: centring
and scaling (1), the square of the variance sum (1), the inverse square root (``P + 2*steps``) and the output
product ``dg * y`` (1). Two of those levels are plaintext multiplications that can ride on a plaintext
multiplication already there:

* **centring into the preceding dense layer**: ``(ctx @ W + b + r - mean) * s = ctx @ (W P s) + b P s + (r P) s``
  with ``P = I - 11^T/H``: the dense layer of the attention output (or of the FFN output) produces the centred,
  scaled rows directly (one level, the dense's own); the residual ``r`` (a ciphertext of lower level) is centred
  on its own branch (:func:`cgf_fhe.poly.centred_scaled`), off the critical path;
* **the output product into the next linear map**: the LayerNorm hands on ``(ds, y, g, beta)``
  (:class:`LNForm`, meaning ``(ds * g) * y + beta`` with ``ds`` the centred rows scaled by ``s = sqrt(alpha/H)``,
  ``y`` one scalar per token and ``g = gamma/s``), and the next linear map computes
  ``y * (ds @ (diag(g) W)) + (beta @ W + b)``: ``ds @ ...`` runs in parallel with ``y``, so the product with
  ``y`` is the linear map's only level after ``y``, and gamma rides on W. The residual branch materialises
  the output off the critical path. One centred product per LayerNorm (no separate ``dg``/``dh``): the dense
  layer before it costs no more ct x pt than before.

and in CGF attention the ``keep/n`` weights ride on V (``e @ (V * w^T)`` instead of ``(e * w) @ V``, see
:mod:`cgf_fhe.softmax`). A layer then costs ``10 + E + G + (P_attn + 2 n_attn) + (P_ffn + 2 n_ffn)`` levels
instead of ``15 + E + G + ...`` (:func:`cgf_fhe.surgery.layer_depth`).

:func:`fold_layernorms` applies the rewrite in place to a model copy made by :func:`cgf_fhe.split.fold_for_export`
when every encoder LayerNorm is a Newton LayerNorm (frozen LayerNorms are one plaintext matmul already). The
replacement modules keep the module paths (``attention.self.query``, ``attention.output.dense``, ``output.
LayerNorm``, ...), so the depth report still groups the nodes by layer and stage. Logits are unchanged up to
float rounding (``cgf-fhe export --verify`` checks parity with the unfolded torch model).
"""
from __future__ import annotations

import math
import types

import torch
from torch import nn

from .poly import IntervalTracker, NewtonLayerNorm, centred_scaled


class LNForm:
    """A LayerNorm output kept unevaluated: ``(d * g) * y + beta`` with ``d`` [..., H] the centred, scaled rows (a
    ciphertext), ``y`` [..., 1] the inverse standard deviation (a ciphertext), ``g`` and ``beta`` [H] plaintext."""

    def __init__(self, d: torch.Tensor, y: torch.Tensor, g: torch.Tensor, beta: torch.Tensor):
        self.d, self.y, self.g, self.beta = d, y, g, beta

    @property
    def shape(self):
        return self.d.shape

    def size(self, dim=None):
        return self.d.size() if dim is None else self.d.size(dim)

    def __getitem__(self, idx):
        """Index the leading (batch, token) axes; the hidden axis stays whole."""
        return LNForm(self.d[idx], self.y[idx], self.g, self.beta)

    def materialize(self) -> torch.Tensor:
        return (self.d * self.g) * self.y + self.beta


def materialize(h):
    return h.materialize() if isinstance(h, LNForm) else h


class FoldLinear(nn.Module):
    """A linear map that also takes an :class:`LNForm`: ``y * (d @ (diag(g) W^T)) + (beta @ W^T + b)`` (the
    product ``diag(g) W^T`` is plaintext; ``d @ ...`` runs in parallel with ``y``). Same op count as the map."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        if isinstance(x, LNForm):
            wt = self.weight.t()
            const = x.beta @ wt
            if self.bias is not None:
                const = const + self.bias
            return x.y * (x.d @ (x.g[:, None] * wt)) + const
        return nn.functional.linear(x, self.weight, self.bias)


class CentringDense(nn.Module):
    """The dense layer before a Newton LayerNorm, producing the LayerNorm's centred rows scaled by
    ``s = sqrt(alpha/H)`` directly: ``x @ (W^T P s) + b P s`` (one product, as many ct x pt as the dense layer)."""

    def __init__(self, linear: nn.Linear, ln: NewtonLayerNorm):
        super().__init__()
        s = math.sqrt(ln.approx.alpha / ln.hidden)
        with torch.no_grad():
            wt = linear.weight.t()  # [in, H]
            b = linear.bias if linear.bias is not None else torch.zeros(ln.hidden, dtype=wt.dtype)
            self.register_buffer("w", (wt - wt.mean(-1, keepdim=True)) * s)  # W^T P s
            self.register_buffer("b", (b - b.mean()) * s)
        self.s = s

    def forward(self, x):
        return x @ self.w + self.b


class FoldedNewtonLN(IntervalTracker):
    """The Newton LayerNorm fed by :class:`CentringDense`: adds the centred residual, computes ``y`` and returns
    :class:`LNForm` ``(ds, y, gamma/s, beta)``. ``t = sum(ds^2) + alpha*eps = alpha*v``; the Newton steps' ``v/2``
    is the plaintext multiple ``(t - alpha*eps) * 0.5/alpha + 0.5*eps`` (one level, in parallel with the guess)."""

    kind = NewtonLayerNorm.kind

    def __init__(self, ln: NewtonLayerNorm, s: float):
        super().__init__(ln.interval)
        self.track = False  # an export copy: nothing to count
        object.__setattr__(self, "unfolded", ln)  # its settings (a reference, not a submodule)
        self.approx, self.newton_steps, self.eps, self.hidden = ln.approx, ln.newton_steps, ln.eps, ln.hidden
        self.s = float(s)
        self.weight, self.bias = ln.weight, ln.bias

    @property
    def depth(self) -> int:
        return 1 + self.approx.depth(prescaled=True) + 2 * self.newton_steps

    def to_settings(self) -> dict:
        return {**self.unfolded.to_settings(), "depth_folded": self.depth}

    def forward(self, ds_lin, residual):
        ds = ds_lin + centred_scaled(materialize(residual), self.s)
        a = self.approx.alpha
        t = (ds * ds).sum(-1, keepdim=True) + a * self.eps
        y = self.approx.evaluate(t, prescaled=True)
        if self.newton_steps:
            hv = (t - a * self.eps) * (0.5 / a) + 0.5 * self.eps
            for _ in range(self.newton_steps):
                y = y * 1.5 - (y * hv) * (y * y)
        return LNForm(ds, y, self.weight / self.s, self.bias)


def _ln_output_forward(self, hidden_states, input_tensor):
    """``BertSelfOutput`` / ``BertOutput`` forward after :func:`fold_layernorms` (eval: no dropout)."""
    return self.LayerNorm(self.dense(hidden_states), input_tensor)


def foldable(layers) -> bool:
    """True when every encoder LayerNorm is a Newton LayerNorm in a BERT-style layer (the rewrite applies)."""
    layers = list(layers)
    for layer in layers:
        for parent in (getattr(getattr(layer, "attention", None), "output", None), getattr(layer, "output", None)):
            if not (isinstance(getattr(parent, "LayerNorm", None), NewtonLayerNorm)
                    and isinstance(getattr(parent, "dense", None), nn.Linear)):
                return False
        sa = getattr(layer.attention, "self", None)
        if not all(isinstance(getattr(sa, n, None), nn.Linear) for n in ("query", "key", "value")):
            return False
        if not isinstance(getattr(getattr(layer, "intermediate", None), "dense", None), nn.Linear):
            return False
    return bool(layers)


def fold_layernorms(layers, pooler=None) -> bool:
    """Apply the rewrite in place to the encoder ``layers`` (and the ``pooler``'s dense layer) of an eval-mode
    export copy. Returns False (and changes nothing) when it does not apply (:func:`foldable`)."""
    layers = list(layers)
    if not foldable(layers):
        return False
    for layer in layers:
        sa = layer.attention.self
        for n in ("query", "key", "value"):
            setattr(sa, n, FoldLinear(getattr(sa, n)))
        layer.intermediate.dense = FoldLinear(layer.intermediate.dense)
        for parent in (layer.attention.output, layer.output):
            ln = parent.LayerNorm
            dense = CentringDense(parent.dense, ln)
            parent.dense = dense
            parent.LayerNorm = FoldedNewtonLN(ln, dense.s)
            parent.forward = types.MethodType(_ln_output_forward, parent)
    if pooler is not None and isinstance(getattr(pooler, "dense", None), nn.Linear):
        pooler.dense = FoldLinear(pooler.dense)
    return True
