"""Narrow students (``cgf-fhe distill --student-hidden H``): a teacher of hidden size D distilled into a student
of hidden size H < D.

Real TenSEAL evaluation packs one ciphertext per tensor element, so the cost of a layer grows with the hidden
size; a narrow student is what can be encrypted for real.

* Structure (:func:`narrow_config`): the teacher's config with ``hidden_size=H``, the teacher's head size
  (``H / head_dim`` heads), ``intermediate_size`` scaled by ``H / D`` and ``num_hidden_layers = K`` (or the
  teacher's). Same vocabulary and tokenizer.
* Projection ``P`` [D, H] (:func:`teacher_projection`): fixed, orthonormal columns, the top-H eigenvectors of the
  uncentered second-moment matrix ``sum h h^T`` of the teacher's hidden states (embedding output and every
  layer output, valid tokens only) over the first :data:`PROJ_BATCHES` training batches in order (no shuffling).
  Column signs are fixed (largest-magnitude entry positive), so the same data gives the same ``P``.
* Initialisation (:func:`init_narrow_student`): word / position / token-type embeddings are the teacher's
  matrices ``@ P`` (the embedding sum is linear, so ``x_s = x_t @ P`` before the LayerNorm); the embedding
  LayerNorm's weight/bias are a per-unit least-squares fit of ``LayerNorm_t(x_t) @ P`` on the normalised
  ``x_t @ P`` over the same batches; encoder, pooler and classifier are transformers' random init
  (the config's ``initializer_range``) seeded by the run's seed.
* KD: the student's hidden states imitate ``h_t @ P`` (``teacher_proj`` in :mod:`.kd`).
* Two stages for polynomial narrow students (``--student-init``): the polynomial intervals are calibrated on the
  student before training, and a random-init encoder's activations are far smaller than a trained one's (e.g.
  attention scores within +-0.15 instead of +-1.5), so train a narrow CGF student first, then distill it with
  ``--poly all --student-init <it>`` (same ``P``, ranges measured on the trained student).
"""
from __future__ import annotations

import torch
from torch import nn

PROJ_BATCHES = 8
PROJ_FILE = "kd_projection.safetensors"
PROJ_METHOD = "pca-uncentered"


def _bert(model) -> nn.Module:
    from ..bert import base_model

    return base_model(model)


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def valid_hidden_sizes(config) -> list[int]:
    d = head_dim(config)
    return list(range(d, config.hidden_size, d))


def narrow_config(t_config, hidden: int, layers: int | None = None):
    """The student config for hidden size ``hidden`` (see module docstring). ValueError names the valid values."""
    d, big = head_dim(t_config), int(t_config.hidden_size)
    if not isinstance(hidden, int) or hidden <= 0 or hidden % d or hidden >= big:
        raise ValueError(f"must be a positive multiple of the teacher's head size {d} smaller than its hidden size "
                         f"{big}; valid values: {', '.join(map(str, valid_hidden_sizes(t_config))) or 'none'}")
    cfg = type(t_config).from_dict(t_config.to_dict())
    cfg.hidden_size = hidden
    cfg.num_attention_heads = hidden // d
    cfg.intermediate_size = max(1, round(t_config.intermediate_size * hidden / big))
    if layers is not None:
        cfg.num_hidden_layers = int(layers)
    return cfg


def _batches(loader, max_batches: int, device):
    from .evaluate import model_inputs

    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        yield model_inputs(batch, device)


@torch.no_grad()
def teacher_projection(teacher, loader, hidden: int, max_batches: int = PROJ_BATCHES, device="cpu"):
    """(P [D, hidden] float32 with orthonormal columns, explained fraction of the second moment)."""
    teacher.eval()
    gram = None
    for inputs in _batches(loader, max_batches, device):
        out = teacher(**inputs, output_hidden_states=True)
        valid = inputs["attention_mask"].bool()
        for h in out.hidden_states:
            x = h[valid].double()
            g = x.T @ x
            gram = g if gram is None else gram + g
    if gram is None:
        raise ValueError("no training batches to compute the projection from")
    vals, vecs = torch.linalg.eigh(gram.cpu())
    order = torch.argsort(vals, descending=True)[:hidden]
    p = vecs[:, order]
    idx = p.abs().argmax(dim=0)
    sign = torch.sign(p[idx, torch.arange(p.shape[1])])
    p = p * torch.where(sign == 0, torch.ones_like(sign), sign)
    explained = float(vals[order].sum() / vals.sum())
    return p.float().contiguous(), explained


@torch.no_grad()
def _embedding_ln_fit(teacher, P: torch.Tensor, loader, eps: float, max_batches: int, device):
    """Per-unit least squares ``y_j ~ w_j z_j + b_j`` with ``z = LN_noaffine(x @ P)``, ``y = LN_t(x) @ P``."""
    emb = _bert(teacher).embeddings
    seen = {}
    hook = emb.LayerNorm.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    n, sz, sy, szz, szy = 0, 0.0, 0.0, 0.0, 0.0
    Pd = P.double().to(device)
    try:
        for inputs in _batches(loader, max_batches, device):
            emb(input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))
            valid = inputs["attention_mask"].bool()
            xp = seen["x"][valid].double() @ Pd
            z = (xp - xp.mean(-1, keepdim=True)) / torch.sqrt(xp.var(-1, unbiased=False, keepdim=True) + eps)
            y = seen["y"][valid].double() @ Pd
            n += len(z)
            sz, sy = sz + z.sum(0), sy + y.sum(0)
            szz, szy = szz + (z * z).sum(0), szy + (z * y).sum(0)
    finally:
        hook.remove()
    mz, my = sz / n, sy / n
    var = (szz / n - mz * mz).clamp_min(1e-12)
    w = (szy / n - mz * my) / var
    b = my - w * mz
    return w.float(), b.float()


def init_narrow_student(teacher, config, P: torch.Tensor, seed: int, coeff: float, loader=None,
                        max_batches: int = PROJ_BATCHES, device="cpu"):
    """A CGF student of structure ``config`` initialised as in the module docstring. Without ``loader`` the
    embedding LayerNorm starts at weight 1, bias 0."""
    from transformers import AutoModelForSequenceClassification

    from ..softmax import set_softmax

    torch.manual_seed(int(seed))
    student = AutoModelForSequenceClassification.from_config(config)
    set_softmax(student, "cgf", coeff)
    t_emb, s_emb = _bert(teacher).embeddings, _bert(student).embeddings
    Pc = P.to(torch.float32).cpu()
    with torch.no_grad():
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            src, dst = getattr(t_emb, name, None), getattr(s_emb, name, None)
            if src is None or dst is None:
                continue
            dst.weight.copy_(src.weight.detach().float().cpu() @ Pc)
        if loader is not None:
            w, b = _embedding_ln_fit(teacher, P, loader, float(s_emb.LayerNorm.eps), max_batches, device)
            s_emb.LayerNorm.weight.copy_(w.cpu())
            s_emb.LayerNorm.bias.copy_(b.cpu())
        else:
            s_emb.LayerNorm.weight.fill_(1.0)
            s_emb.LayerNorm.bias.zero_()
    return student


def save_projection(P: torch.Tensor, path, meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"projection": P.detach().float().cpu().contiguous()}, str(path),
              metadata={k: str(v) for k, v in (meta or {}).items() if v is not None})


def load_projection(path) -> tuple[torch.Tensor, dict]:
    """(P, metadata strings) from a file written by :func:`save_projection`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("projection"), dict(f.metadata() or {})
