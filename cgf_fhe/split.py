"""Client / server split of a BERT classifier for encrypted inference.

Who computes what
-----------------
**Client** (holds the secret key, sees the plaintext):

1. tokenizes the sentence pair (input ids, token types, attention mask);
2. embeds: word + position + token-type embeddings **and the embedding LayerNorm**, exactly and in
   plaintext (:func:`client_embed`); the embedding table never leaves the client's copy of the model
   checkpoint, so the server never sees token ids;
3. encrypts the embeddings ``[batch, seq, hidden]`` (CKKS) and sends them with the attention mask.

**Server** (no key; sees only ciphertexts and public data) runs :class:`ServerModel`: every encoder
layer (CGF attention with its polynomial exp, polynomial GELU, polynomial / frozen LayerNorms), the
pooler (polynomial tanh) and the classifier, and returns encrypted logits.

**Client** decrypts the logits and takes the argmax.

What leaks
----------
The attention mask is sent in the clear: it is *public*. It reveals the padded sequence length and
how many tokens are real (so the length of the sentence pair), nothing else. Everything derived only
from it (``1/n`` in the CGF softmax, the keep-mask multiplications) is plaintext arithmetic on the
server. Pad to a fixed length and send an all-ones mask if the length must stay private (the padded
positions then take part in attention as ordinary tokens, which changes the model's function).

Encryption boundary
-------------------
Only the ``embeddings`` input of :class:`ServerModel` is encrypted; every weight is a server-side
plaintext. :func:`fold_for_export` prepares a copy for export: constant scales are folded into
weights so they do not cost a multiplicative level on ciphertexts (attention ``1/sqrt(d)`` and the
polynomial input normalisations of exp, GELU and tanh, see :mod:`cgf_fhe.poly`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .bert import base_model, encoder_layers  # noqa: F401  (re-exported: BERT structure lives in cgf_fhe.bert)
from .softmax import CGF, EXACT

__all__ = ["client_embed", "ServerModel", "fold_for_export", "base_model", "encoder_layers"]


def client_embed(model, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Client side, plaintext: token + position + type embeddings and the (exact) embedding LayerNorm.

    Returns ``[B, S, H]``, the tensor the client encrypts. Dropout follows the model's train/eval mode."""
    emb = base_model(model).embeddings
    return emb(input_ids=input_ids, token_type_ids=token_type_ids)


class ServerModel(nn.Module):
    """Server side: encoder layers + pooler + classifier on (encrypted) embeddings.

    ``forward(embeddings [B,S,H] float, attention_mask [B,S] float 0/1) -> logits [B, num_labels]``.
    The mask (public) reaches the attention functions as a float keep-mask ``[B,1,1,S]`` (the CGF and
    exact-softmax implementations of :mod:`cgf_fhe.softmax` accept it). Models using another attention
    implementation (``eager``/``sdpa``) get the usual additive mask instead; that path is for plaintext
    comparison only. The wrapped model's parameters are shared, not copied.

    ``first_token_last_layer`` (default on): the pooler reads only the first ([CLS]) token of the last
    layer's output, so that layer computes one query row and runs its attention output, LayerNorms and
    FFN on that token only (keys and values still cover every token). The logits are unchanged; the last
    layer's ciphertext count and its work drop by a factor of the sequence length, and its LayerNorms
    never see the non-[CLS] tokens (whose values nothing downstream reads). Used only for BERT-style layers
    (``attention.self`` / ``attention.output`` / ``feed_forward_chunk``) with a CGF or exact attention
    implementation and a pooler; other models run every layer in full.
    """

    def __init__(self, model, first_token_last_layer: bool = True):
        super().__init__()
        base_model(model)  # validates the structure
        if not hasattr(model, "classifier"):
            raise TypeError(f"{type(model).__name__} has no .classifier head")
        self.model = model
        self.first_token_last_layer = first_token_last_layer
        layers = list(base_model(model).encoder.layer)
        if layers and self._first_token_only(layers[-1]):  # attach now: a module created while tracing gets no scope
            _first_token_core(layers[-1], model.config._attn_implementation)

    def _first_token_only(self, layer) -> bool:
        base = base_model(self.model)
        att = getattr(layer, "attention", None)
        return (self.first_token_last_layer and getattr(base, "pooler", None) is not None
                and getattr(self.model.config, "_attn_implementation", None) in (CGF, EXACT)
                and hasattr(att, "self") and hasattr(att, "output") and hasattr(layer, "feed_forward_chunk")
                and all(hasattr(att.self, n) for n in ("query", "key", "value", "attention_head_size")))

    def forward(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = self.model
        base = base_model(model)
        keep = attention_mask.to(embeddings.dtype)[:, None, None, :]
        impl = getattr(model.config, "_attn_implementation", None)
        if impl in (CGF, EXACT):
            mask = keep
        else:
            mask = (1.0 - keep) * torch.finfo(embeddings.dtype).min
        h = embeddings
        layers = list(base.encoder.layer)
        for i, layer in enumerate(layers):
            if i == len(layers) - 1 and self._first_token_only(layer):
                h = _first_token_layer(layer, h, mask, impl)
                break
            out = layer(h, mask)
            h = out[0] if isinstance(out, tuple) else out
        pooler = getattr(base, "pooler", None)
        if pooler is not None:
            pooled = pooler(h)
            dropout = getattr(model, "dropout", None)
            if dropout is not None:
                pooled = dropout(pooled)
            return model.classifier(pooled)
        # heads that pool themselves (e.g. RoBERTa's classification head takes the sequence output)
        return model.classifier(h.materialize() if hasattr(h, "materialize") else h)


class FirstTokenAttention(nn.Module):
    """The attention core of a BERT self-attention module with one query row (the first token).

    Attached (parameter-free) as ``attention.self.first_token`` of the last layer so that the exported
    nodes carry that layer's module scope (the depth report groups nodes by scope). The attention
    itself is the registered implementation, called through transformers' ``ALL_ATTENTION_FUNCTIONS``
    as ``BertSelfAttention.forward`` calls it."""

    def __init__(self, self_attention: nn.Module, impl: str):
        super().__init__()
        object.__setattr__(self, "sa", self_attention)  # a reference, not a submodule (no double registration)
        self.impl = impl

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        sa = self.sa
        if getattr(sa, "cgf_stats_folded", False):  # CGF statistics folded into the projections (cgf_fhe.fold)
            from .fold import cgf_stats_core

            ctx = cgf_stats_core(sa, h[:, :1], h, mask)
            if ctx is not None:
                return ctx
        b, s, _ = h.shape
        d = sa.attention_head_size
        q = sa.query(h[:, :1]).view(b, 1, -1, d).transpose(1, 2)
        k = sa.key(h).view(b, s, -1, d).transpose(1, 2)
        v = sa.value(h).view(b, s, -1, d).transpose(1, 2)
        ctx, _ = ALL_ATTENTION_FUNCTIONS[self.impl](sa, q, k, v, mask, scaling=sa.scaling,
                                                    dropout=sa.dropout.p if sa.training else 0.0)
        return ctx.reshape(b, 1, -1).contiguous()


def _first_token_layer(layer, h: torch.Tensor, mask: torch.Tensor, impl: str) -> torch.Tensor:
    """``layer(h, mask)[:, :1]`` computed with one query row: attention output, LayerNorms, FFN on token 0."""
    att = layer.attention.output(_first_token_core(layer, impl)(h, mask), h[:, :1])
    return layer.feed_forward_chunk(att)


def _first_token_core(layer, impl: str) -> FirstTokenAttention:
    sa = layer.attention.self
    core = getattr(sa, "first_token", None)
    if not isinstance(core, FirstTokenAttention) or core.impl != impl:
        core = sa.first_token = FirstTokenAttention(sa, impl)
    return core


@torch.no_grad()
def _scale_linear(linear: nn.Linear, alpha: float, beta: float = 0.0) -> None:
    """linear(x) -> alpha * linear(x) + beta, in place."""
    linear.weight.mul_(alpha)
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
    linear.bias.mul_(alpha).add_(beta)


def _foldable(mod) -> bool:
    return bool(getattr(mod, "foldable", False)) and not getattr(mod, "prescaled", False)


def fold_for_export(model, fold_layernorms: bool = True, fold_stats: bool = True) -> nn.Module:
    """Deep copy of ``model`` with constant scales folded into plaintext weights (same logits).

    * attention ``scaling`` (1/sqrt(head_dim)) -> query weight and bias; ``.scaling = 1.0``;
    * a polynomial exp (``attention.self.cgf_exp``) with normalisation ``t = alpha*x + beta``: ``alpha``
      also goes into the query projection (scores scale by alpha) and the CGF coefficient becomes
      ``c/alpha`` (the CGF argument is then exactly ``alpha*x``; the module only adds ``beta``, free), and so
      does each per-head coefficient (``cgf_coeff_heads``).
      The coefficient is per layer, so each self-attention module gets its own copy of the config;
    * polynomial GELU: ``alpha``, ``beta`` into ``intermediate.dense``; polynomial tanh: into ``pooler.dense``.

    Each folded polynomial module is switched to ``prescaled`` mode, which saves one level on it.
    ``fold_layernorms`` (default): when every encoder LayerNorm is a Newton LayerNorm, the LayerNorms' centring
    rides on the preceding dense layer and their output product on the next linear map (:mod:`cgf_fhe.fold`;
    two levels less per LayerNorm, logits unchanged); ``m.cgf_folded_layernorms`` says whether it applied.
    ``fold_stats`` (default, with ``fold_layernorms``): the CGF statistics ride on the query/key projections too
    (:func:`cgf_fhe.fold.cgf_stats_core`, one level less per layer after the first).
    The copy is in eval mode; interval counting and the training-only input guard are off on it.
    """
    m = copy.deepcopy(model)
    m.eval()
    for name, mod in m.named_modules():
        if getattr(mod, "blend", 1.0) < 1.0:
            raise ValueError(f"{name}: frozen LayerNorm blend is {mod.blend} < 1 (a training aid that still uses the "
                             "exact variance); set it to 1 before export")
    for layer in encoder_layers(m):
        att = layer.attention.self
        scaling = float(getattr(att, "scaling", 1.0) or 1.0)
        exp = getattr(att, "cgf_exp", None)
        alpha = 1.0
        if exp is not None and _foldable(exp) and getattr(m.config, "cgf_softmax", None) == "cgf":
            alpha = float(exp.alpha)
            att.config = copy.copy(att.config)
            att.config.cgf_coeff = float(getattr(m.config, "cgf_coeff", 0.5)) / alpha
            if getattr(att, "cgf_coeff_heads", None) is not None:  # per-head coefficients: the same c/alpha
                att.cgf_coeff_heads = att.cgf_coeff_heads / alpha
            exp.prescaled = True
        if scaling != 1.0 or alpha != 1.0:
            _scale_linear(att.query, scaling * alpha)
            att.scaling = 1.0
        act = getattr(layer.intermediate, "intermediate_act_fn", None)
        if _foldable(act):
            _scale_linear(layer.intermediate.dense, float(act.alpha))
            act.prescaled = True
    pooler = getattr(base_model(m), "pooler", None)
    if pooler is not None and _foldable(getattr(pooler, "activation", None)):
        _scale_linear(pooler.dense, float(pooler.activation.alpha))
        pooler.activation.prescaled = True
    for mod in m.modules():
        if hasattr(mod, "track"):
            mod.track = False
        if hasattr(mod, "guard"):
            mod.guard = False
    if fold_layernorms:
        from .fold import fold_layernorms as _fold

        m.cgf_folded_layernorms = _fold(encoder_layers(m), pooler, stats=fold_stats)
    return m
