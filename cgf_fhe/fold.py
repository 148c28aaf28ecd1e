"""Level-saving exact rewrites of a polynomial BERT student for export (issue #22: constant folding).

A Newton LayerNorm as trained (:class:`cgf_fhe.poly.NewtonLayerNorm`) costs ``3 + P + 2*steps`` levels, one less
with Newton steps (:func:`cgf_fhe.poly.newton_ln_depth`): centring and scaling (1), the square of the variance sum
(1), the inverse square root (``P + 2*steps``) and the output product ``dg * y`` (1, absorbed by the last Newton
step when there is one). Two of those levels are plaintext multiplications that can ride on a plaintext
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
  layer before it costs no more ct x pt than before. With Newton steps the last one rides along too
  (:meth:`LNForm.times`): ``z*y - ((z*h)*y)*(y*y)`` with ``z = ds @ (diag(1.5 g) W)`` and ``h = v/3`` (a
  plaintext multiple of the variance sum), two levels after the previous ``y`` as the step alone (for a guess
  of prescaled depth ``P >= 2``); three ct x ct products on ``z``'s rows instead of one.

and in CGF attention the ``keep/n`` weights ride on V (``e @ (V * w^T)`` instead of ``(e * w) @ V``, see
:mod:`cgf_fhe.softmax`). A layer then costs ``10 + E + G + L_attn + L_ffn`` levels with ``L = P + 2 n``
(``P + 2n - 1`` for ``n >= 1``: the merged last step) instead of ``15 + E + G + ...``
(:func:`cgf_fhe.surgery.layer_depth`).

**CGF statistics on the query and key projections** (:func:`cgf_stats_core`, one more level per layer whose
input is a folded LayerNorm, i.e. every layer but the first). The CGF argument over the valid keys, with
``w_j = keep_j/n`` and ``c`` the (per-head) coefficient, is ``x_j = s_j - mu - c sum_j w_j s_j^2 + c mu^2``;
evaluated from the scores ``s`` (depth D) it needs D + 2: ``s*s`` then ``* c w`` (or ``mu = sum s w`` then
``mu * sum s c w``). The plaintext factors ride on the projections instead, where the product ``d @ W`` waits for
the LayerNorm's ``y`` anyway (a ciphertext three or more levels shallower, so a plaintext product there is free):

* the query with ``sqrt(c/n)``: ``sqrt(c)`` per head on ``W_Q``'s columns, ``1/sqrt(n)`` on its rows;
  the keys with ``keep_j``: ``t = q' k'^T = sqrt(c/n) keep_j s_j`` (masked keys 0), at depth D;
* ``kbar = sum_j w_j k_j`` (``w_j`` on the key rows, summed over the keys): ``um = q' kbar = sqrt(c/n) mu``, D;
* ``x = (t - um) sqrt(n/c) - sum_j t_j^2 + (sum_j t_j) um``: every term one product from depth D, so D + 1.

On a masked key ``x_j`` differs from the unfolded argument, but its weight on V is ``w_j = 0`` either way. The
query's ``1/sqrt(n)`` and the keys' ``keep`` come from the public mask (plaintext). Extra work per layer: two
row scalings of the key projection's ``d @ W`` and one of the query's, one more ``y`` product for ``kbar``, and
``q' kbar`` (a matrix-vector product); the three scalar products of the statistics on the ``[.., Sq, K]`` scores
become one.

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

from .poly import IntervalTracker, NewtonLayerNorm, centred_scaled, newton_ln_depth


class LNForm:
    """A LayerNorm output kept unevaluated: ``(d * g) * y + beta`` with ``d`` [..., H] the centred, scaled rows (a
    ciphertext), ``y`` [..., 1] the inverse standard deviation (a ciphertext), ``g`` and ``beta`` [H] plaintext.

    With ``h`` (a ciphertext [..., 1]) the last Newton step is still to do, merged with the product (see
    :class:`cgf_fhe.poly.NewtonLayerNorm`): the form means ``(d * g) * (y - h*y^3) + beta`` (``g`` carries the
    step's 1.5, ``h = v/3``), and :meth:`times` computes ``z*y - ((z*h)*y)*(y*y)`` for ``z = (d * g) @ ...``:
    two levels after ``y`` (``z*h`` is shallow), where the step alone would end; ``yy = y*y`` is shared."""

    def __init__(self, d: torch.Tensor, y: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                 h: torch.Tensor | None = None, yy: torch.Tensor | None = None):
        self.d, self.y, self.g, self.beta, self.h = d, y, g, beta, h
        self.yy = None if h is None else (y * y if yy is None else yy)

    @property
    def shape(self):
        return self.d.shape

    def size(self, dim=None):
        return self.d.size() if dim is None else self.d.size(dim)

    def __getitem__(self, idx):
        """Index the leading (batch, token) axes; the hidden axis stays whole."""
        if self.h is None:
            return LNForm(self.d[idx], self.y[idx], self.g, self.beta)
        return LNForm(self.d[idx], self.y[idx], self.g, self.beta, self.h[idx], self.yy[idx])

    def times(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` (a ciphertext built from ``d``, [..., M]) times the form's inverse standard deviation."""
        if self.h is None:
            return self.y * z
        return z * self.y - ((z * self.h) * self.y) * self.yy

    def materialize(self) -> torch.Tensor:
        return self.times(self.d * self.g) + self.beta


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
            return x.times(x.d @ (x.g[:, None] * wt)) + const
        return nn.functional.linear(x, self.weight, self.bias)


class CentringDense(nn.Module):
    """The dense layer before a Newton LayerNorm, producing the LayerNorm's centred rows scaled by
    ``s = sqrt(alpha/H)`` directly: ``x @ (W^T P s) + b P s`` (one product, as many ct x pt as the dense layer).

    A LayerNorm with a position-0 variance scale (``pos_scale0``, :class:`cgf_fhe.poly.NewtonLayerNorm`) needs
    row 0 scaled by ``sqrt(pos_scale0)`` as well: the token axis is split, row 0 multiplies its own plaintext
    ``W^T P s sqrt(pos_scale0)`` and the rest the usual one, then the rows are concatenated (two products in
    parallel, the same ct x pt count and depth; one more weight matrix)."""

    def __init__(self, linear: nn.Linear, ln: NewtonLayerNorm):
        super().__init__()
        s = math.sqrt(ln.approx.alpha / ln.hidden)
        with torch.no_grad():
            wt = linear.weight.t()  # [in, H]
            b = linear.bias if linear.bias is not None else torch.zeros(ln.hidden, dtype=wt.dtype)
            self.register_buffer("w", (wt - wt.mean(-1, keepdim=True)) * s)  # W^T P s
            self.register_buffer("b", (b - b.mean()) * s)
            self.scaled = ln.pos_scale0 != 1.0
            if self.scaled:
                r0 = math.sqrt(ln.pos_scale0)
                self.register_buffer("w0", self.w * r0)
                self.register_buffer("b0", self.b * r0)
        self.s = s

    def forward(self, x):
        if not self.scaled:
            return x @ self.w + self.b
        first = x[..., :1, :] @ self.w0 + self.b0
        if x.shape[-2] == 1:  # the last layer's first-token path: position 0 only
            return first
        return torch.cat([first, x[..., 1:, :] @ self.w + self.b], dim=-2)


class FoldedNewtonLN(IntervalTracker):
    """The Newton LayerNorm fed by :class:`CentringDense`: adds the centred residual, computes ``y`` and returns
    :class:`LNForm` ``(ds, y, gamma/s, beta)``. ``t = sum(ds^2) + alpha*eps = alpha*v``; the Newton steps' ``v/2``
    is the plaintext multiple ``t * 0.5/alpha`` (``(t - alpha*eps)/(2 alpha) + eps/2``: the eps terms cancel; one
    level, in parallel with the guess), the merged last step's ``v/3`` is ``t/(3 alpha)``."""

    kind = NewtonLayerNorm.kind

    def __init__(self, ln: NewtonLayerNorm, s: float):
        super().__init__(ln.interval)
        self.track = False  # an export copy: nothing to count
        object.__setattr__(self, "unfolded", ln)  # its settings (a reference, not a submodule)
        self.approx, self.newton_steps, self.eps, self.hidden = ln.approx, ln.newton_steps, ln.eps, ln.hidden
        self.s = float(s)
        self.weight, self.bias = ln.weight, ln.bias
        self.pos_scale0 = ln.pos_scale0
        self.register_buffer("pos_scale", ln.pos_scale.detach().clone(), persistent=False)

    @property
    def depth(self) -> int:
        """The unfolded LayerNorm's depth less its centring and output products (now on the neighbours' maps)."""
        return newton_ln_depth(self.approx.depth(prescaled=True), self.newton_steps) - 2

    def to_settings(self) -> dict:
        return {**self.unfolded.to_settings(), "depth_folded": self.depth}

    def forward(self, ds_lin, residual):
        a = self.approx.alpha
        ps = None if self.pos_scale0 == 1.0 else self.pos_scale[:ds_lin.shape[-2]].to(ds_lin.dtype)
        if ps is None:
            ds = ds_lin + centred_scaled(materialize(residual), self.s)
            eps = self.eps
        else:  # rows scaled by sqrt(pos_scale) (CentringDense's row 0 and this [S, 1] plaintext): t = alpha*v*ps
            ds = ds_lin + centred_scaled(materialize(residual), ps.sqrt()[:, None] * self.s)
            eps = ps[:, None] * self.eps
        t = (ds * ds).sum(-1, keepdim=True) + a * eps
        y = self.approx.evaluate(t, prescaled=True)
        n = self.newton_steps
        if not n:
            # y ~ 1/sqrt(v*ps) and ds carries sqrt(ps): (ds * gamma/s) * y is the LayerNorm's output as before
            return LNForm(ds, y, self.weight / self.s, self.bias)
        if n > 1:
            hv = t * (0.5 / a)  # v/2 = (t - a*eps)/(2a) + eps/2: the eps terms cancel (also per token)
            for _ in range(n - 1):
                y = y * 1.5 - (y * hv) * (y * y)
        # the last step rides on the next linear map (LNForm.times): 1.5 on the plaintext g, h = v/3
        h = t * (1.0 / (3.0 * a))  # v/3 = (t - a*eps)/(3a) + eps/3 = t/(3a)
        return LNForm(ds, y, self.weight * (1.5 / self.s), self.bias, h, y * y)


def _scaled_projection(linear: FoldLinear, x: LNForm, row: torch.Tensor, col: torch.Tensor | None = None):
    """``linear(x)`` with output rows scaled by ``row`` (plaintext, ``[.., tokens, 1]``) and columns by ``col``
    (``[out]``): the scales multiply ``d @ W`` (and the plaintext constant), so the result is as deep as
    ``linear(x)``: ``y * ((d @ (diag(g) W col)) * row) + (beta @ W + b) col row``."""
    wt = linear.weight.t()
    b = linear.bias
    if col is not None:
        wt = wt * col
        b = None if b is None else b * col
    const = x.beta @ wt
    if b is not None:
        const = const + b
    return x.times((x.d @ (x.g[:, None] * wt)) * row) + const * row


def cgf_stats_core(sa, hq, hkv, mask):
    """CGF attention of a self-attention module ``sa`` with the statistics folded into the query and key
    projections (module doc): the context ``[B, Sq, heads * head_size]`` for queries ``hq`` and keys/values
    ``hkv`` (:class:`LNForm`), or None when the fold does not apply (inputs not folded LayerNorm outputs, not a
    one-row float keep-mask ``[B, 1, 1, K]``, training, a blend with the exact softmax, no polynomial exp, an
    unfolded score scale; :func:`fold_cgf_statistics` checks that the coefficients are > 0)."""
    from .softmax import head_coefficient

    exp_fn = getattr(sa, "cgf_exp", None)
    if (not isinstance(hq, LNForm) or not isinstance(hkv, LNForm) or sa.training or exp_fn is None
            or mask is None or mask.dtype == torch.bool or mask.dim() != 4 or mask.shape[-2] != 1
            or getattr(sa, "cgf_blend", 1.0) < 1.0 or float(getattr(sa, "scaling", 1.0) or 1.0) != 1.0
            or not isinstance(sa.query, FoldLinear) or not isinstance(sa.key, FoldLinear)):
        return None
    dtype = hq.d.dtype
    heads, size = int(sa.num_attention_heads), int(sa.attention_head_size)
    c = head_coefficient(sa, hq.d)
    c = (c.reshape(-1) if isinstance(c, torch.Tensor) else torch.full((heads,), c, dtype=dtype)).expand(heads)
    b, sq, sk = hq.shape[0], hq.shape[1], hkv.shape[1]
    keep = mask[:, 0, 0, :].to(dtype)  # [B, K], public
    n = keep.sum(-1)  # [B]
    w = keep / n[:, None]

    def split(t, rows):
        return t.reshape(b, rows, heads, size).transpose(1, 2)

    q = split(_scaled_projection(sa.query, hq, n.rsqrt()[:, None, None], c.sqrt().repeat_interleave(size)), sq)
    k = split(_scaled_projection(sa.key, hkv, keep[:, :, None]), sk)  # keep_j k_j
    kbar = split(_scaled_projection(sa.key, hkv, w[:, :, None]).sum(1, keepdim=True), 1)  # sum_j w_j k_j
    v = split(sa.value(hkv), sk)
    t = torch.matmul(q, k.transpose(-1, -2))  # sqrt(c/n) keep_j s_j
    um = torch.matmul(q, kbar.transpose(-1, -2))  # sqrt(c/n) mu
    back = (n.view(-1, 1, 1, 1) / c.view(1, -1, 1, 1)).sqrt()  # plaintext sqrt(n/c)
    x = (t - um) * back - (t * t).sum(-1, keepdim=True) + t.sum(-1, keepdim=True) * um
    e = exp_fn(x, valid=keep[:, None, None, :].expand_as(x) > 0)
    out = torch.matmul(e, v * w[:, None, :, None])  # the keep/n weights ride on V
    return out.transpose(1, 2).reshape(b, sq, heads * size)


def _stats_self_attention_forward(self, hidden_states, attention_mask=None, **kwargs):
    """``BertSelfAttention`` forward after :func:`fold_cgf_statistics` (falls back to the class's own)."""
    out = cgf_stats_core(self, hidden_states, hidden_states, attention_mask)
    if out is None:
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    return out, None


def fold_cgf_statistics(layers) -> int:
    """Route the CGF self-attention of each folded layer through :func:`cgf_stats_core` (an export copy whose
    LayerNorms :func:`fold_layernorms` folded). Returns how many modules were switched."""
    from .softmax import head_coefficient

    count = 0
    for layer in layers:
        sa = layer.attention.self
        if getattr(sa, "cgf_exp", None) is None or getattr(sa.config, "_attn_implementation", None) != "cgf":
            continue
        c = head_coefficient(sa, torch.zeros(()))
        if not bool((torch.as_tensor(c) > 0).all()):  # sqrt(c) rides on the query
            continue
        sa.forward = types.MethodType(_stats_self_attention_forward, sa)
        sa.cgf_stats_folded = True
        count += 1
    return count


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


def fold_layernorms(layers, pooler=None, stats: bool = True) -> bool:
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
    if stats:
        fold_cgf_statistics(layers)
    return True
