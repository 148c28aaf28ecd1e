"""Knowledge-distillation loss (exact teacher -> CGF / polynomial student).

    loss = alpha * T^2 * KL(p_teacher(T) || p_student(T))                       (logits, batch mean)
         + beta  * mean_l  masked_MSE(student_hidden[l+1], teacher_hidden[layer_map[l]+1])
         + ce_weight * CE(student_logits, labels)
         + attn_weight * mean_l  attention_map_error(student_attn[l], teacher_attn[layer_map[l]])  (L1)

Hidden-state tuples follow transformers' ``output_hidden_states``: index 0 is the embeddings output,
index i+1 the output of encoder layer i. ``layer_map[l]`` is the teacher encoder layer (0-based) whose
output student layer ``l`` imitates (what :func:`cgf_fhe.surgery.shrink_layers` returns); ``None`` means
the identity map (same depth). The MSE averages over valid tokens (``mask`` = attention mask, 1 = token)
and over the hidden dimension; padding positions do not count.

Narrow students (``--student-hidden H``, :mod:`.narrow`): ``teacher_proj`` is a fixed matrix ``P`` [D, H]
(teacher hidden D, orthonormal columns); the targets become ``teacher_hidden[layer_map[l]+1] @ P``, so the
MSE compares H-dimensional vectors (averaged over valid tokens and the H units). ``None`` = no projection
(student and teacher of the same width).

The attention-map term compares each student layer's attention weights (CGF, possibly polynomial exp)
with the mapped teacher layer's softmax weights, head by head: for every valid query row, the L1 distance
``sum_j |p_student_j - p_teacher_j|`` over the valid keys (twice the total variation when both rows are
distributions; CGF rows need not sum to 1), averaged over valid query rows, heads and the batch. L1, not a
squared error or a KL: CGF rows do not sum to 1, a polynomial exp can dip below 0, and on heavy-tailed heads
an exact-exp CGF row can reach weights of 10^4 (measured on MiniLM), which a squared error would let dominate
the loss. It targets what CGF approximates (the softmax distribution) directly, where the hidden-state MSE
only sees its downstream effect.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def kl_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    s = F.log_softmax(student_logits.float() / T, dim=-1)
    t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * (T * T)


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over valid tokens and hidden units. a, b: [B, S, H]; mask [B, S] (1 = valid)."""
    diff = (a.float() - b.float()).pow(2)
    if mask is None:
        return diff.mean()
    m = mask.to(diff.dtype).unsqueeze(-1)
    denom = m.sum() * diff.shape[-1]
    return (diff * m).sum() / denom.clamp_min(1.0)


def _checked_layer_map(layer_map: Sequence[int] | None, n_student: int, n_teacher: int) -> list[int]:
    """The student -> teacher layer map (identity when None), checked against both depths."""
    layer_map = list(range(n_student)) if layer_map is None else list(layer_map)
    if len(layer_map) != n_student:
        raise ValueError(f"layer_map has {len(layer_map)} entries but the student has {n_student} layers")
    bad = [t for t in layer_map if not 0 <= t < n_teacher]
    if bad:
        raise ValueError(f"layer_map entries {bad} outside the teacher's layers 0..{n_teacher - 1}")
    return layer_map


def hidden_term(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                layer_map: Sequence[int] | None, mask: torch.Tensor | None,
                teacher_proj: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over student layers of the masked MSE to the mapped (optionally projected) teacher layer."""
    layer_map = _checked_layer_map(layer_map, len(student_hidden) - 1, len(teacher_hidden) - 1)

    def target(t):
        h = teacher_hidden[t + 1]
        if teacher_proj is None:
            return h
        return h.float() @ teacher_proj.to(device=h.device, dtype=torch.float32)

    targets = [target(t) for t in layer_map]
    if targets and targets[0].shape[-1] != student_hidden[1].shape[-1]:
        raise ValueError(f"student hidden size {student_hidden[1].shape[-1]} != teacher target size "
                         f"{targets[0].shape[-1]} (a narrower student needs teacher_proj [D, H])")
    terms = [masked_mse(student_hidden[i + 1], tgt, mask) for i, tgt in enumerate(targets)]
    return torch.stack(terms).mean()


def attention_map_error(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over valid query rows of the L1 distance over valid keys (module docstring). [B, heads, Q, K]; mask [B, K]."""
    if student.shape != teacher.shape:
        raise ValueError(f"student attention {tuple(student.shape)} != teacher attention {tuple(teacher.shape)} "
                         "(the attention-map loss needs the same heads and sequence length)")
    diff = (student.float() - teacher.float()).abs()  # [B, H, Q, K]
    if mask is None:
        return diff.sum(-1).mean()
    m = mask.to(diff.dtype)
    per_row = (diff * m[:, None, None, :]).sum(-1)  # [B, H, Q]
    rows = m[:, None, :].expand_as(per_row)  # valid query rows
    return (per_row * rows).sum() / rows.sum().clamp_min(1.0)


def attention_term(student_attn: Sequence[torch.Tensor], teacher_attn: Sequence[torch.Tensor],
                   layer_map: Sequence[int] | None, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over student layers of :func:`attention_map_error` against the mapped teacher layer."""
    layer_map = _checked_layer_map(layer_map, len(student_attn), len(teacher_attn))
    terms = [attention_map_error(a, teacher_attn[t], mask) for a, t in zip(student_attn, layer_map)]
    return torch.stack(terms).mean()


def kd_loss(student_logits, teacher_logits, student_hidden, teacher_hidden, layer_map, mask,
            alpha: float = 1.0, beta: float = 10.0, T: float = 1.0, labels=None, ce_weight: float = 0.0,
            return_parts: bool = False, teacher_proj: torch.Tensor | None = None,
            student_attn=None, teacher_attn=None, attn_weight: float = 0.0):
    """The distillation loss (see module docstring). With ``return_parts`` returns (loss, {name: float})."""
    parts = {}
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if alpha:
        kl = kl_term(student_logits, teacher_logits, T)
        loss = loss + alpha * kl
        parts["kl"] = kl.detach()
    if beta:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError("beta > 0 needs student and teacher hidden states (output_hidden_states=True)")
        mse = hidden_term(student_hidden, teacher_hidden, layer_map, mask, teacher_proj)
        loss = loss + beta * mse
        parts["mse"] = mse.detach()
    if ce_weight:
        if labels is None:
            raise ValueError("ce_weight > 0 needs labels")
        ce = F.cross_entropy(student_logits.float(), labels)
        loss = loss + ce_weight * ce
        parts["ce"] = ce.detach()
    if attn_weight:
        if student_attn is None or teacher_attn is None:
            raise ValueError("attn_weight > 0 needs student and teacher attentions (output_attentions=True)")
        att = attention_term(student_attn, teacher_attn, layer_map, mask)
        loss = loss + attn_weight * att
        parts["attn"] = att.detach()
    if return_parts:
        return loss, {k: float(v) for k, v in parts.items()}
    return loss
