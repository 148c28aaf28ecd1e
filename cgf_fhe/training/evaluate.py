"""Evaluation: accuracy / F1 (positive class 1), the exact-vs-CGF probe and seed-set summaries."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .. import stats as _stats
from ..softmax import set_softmax

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def classification_metrics(preds, labels) -> dict:
    """{"accuracy", "f1", "n"}; F1 of the positive class (label 1), 0.0 when it is undefined."""
    preds = torch.as_tensor(preds).view(-1).long()
    labels = torch.as_tensor(labels).view(-1).long()
    if preds.shape != labels.shape:
        raise ValueError(f"{preds.numel()} predictions for {labels.numel()} labels")
    n = int(labels.numel())
    tp = int(((preds == 1) & (labels == 1)).sum())
    fp = int(((preds == 1) & (labels == 0)).sum())
    fn = int(((preds == 0) & (labels == 1)).sum())
    acc = float((preds == labels).sum()) / n if n else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    return {"accuracy": acc, "f1": float(f1), "n": n}


def model_inputs(batch: Mapping, device=None) -> dict:
    out = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


@torch.no_grad()
def predict(model, loader, device=None, autocast=None):
    """Logits [N, C] (float32, CPU) and labels [N] over ``loader``; the model is put in eval mode and restored."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    logits, labels = [], []
    try:
        for batch in loader:
            if autocast is not None:
                with autocast():
                    out = model(**model_inputs(batch, device))
            else:
                out = model(**model_inputs(batch, device))
            logits.append(out.logits.float().cpu())
            labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    if not logits:
        return torch.zeros(0, model.config.num_labels), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def evaluate_model(model, loader, device=None, autocast=None) -> dict:
    logits, labels = predict(model, loader, device, autocast)
    m = classification_metrics(logits.argmax(-1), labels)
    m["n_nonfinite"] = int((~torch.isfinite(logits)).any(-1).sum())  # examples with NaN/inf logits
    if len(labels):
        loss = float(torch.nn.functional.cross_entropy(logits, labels))
        m["loss"] = loss if math.isfinite(loss) else None  # None: some logits are NaN/inf (JSON has no NaN)
    return m


def probe_softmax(model, loader, coeff: float | None = None, device=None, softmaxes=("exact", "cgf")) -> dict:
    """Score the SAME weights with each softmax. Restores the model's softmax afterwards."""
    original = getattr(model.config, "cgf_softmax", "exact")
    original_coeff = getattr(model.config, "cgf_coeff", None)
    out = {}
    try:
        for sm in softmaxes:
            set_softmax(model, sm, coeff if coeff is not None else original_coeff)
            out[sm] = evaluate_model(model, loader, device)
    finally:
        set_softmax(model, original, original_coeff)
    return out


# ---------------------------------------------------------------- seed sets

def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation as a dict (the one definition is ``cgf_fhe.stats.mean_std``)."""
    return _stats.mean_std(values).as_dict()


def summarize_seeds(runs: Mapping, reference: Mapping | None = None, keys=("accuracy", "f1")) -> dict:
    """Summary of a seed set.

    ``runs`` / ``reference``: {seed: {"accuracy": .., "f1": ..}}. Returns, per metric, mean and std over the
    seeds, the per-seed values, and -- when a reference run on the same seeds is given -- the paired
    difference run - reference (per seed, mean and std of the differences) plus the reference's mean/std.
    """
    seeds = list(runs)
    out: dict = {"seeds": [_seed_key(s) for s in seeds]}
    for k in keys:
        vals = [runs[s][k] for s in seeds]
        entry = {**mean_std(vals), "values": vals}
        if reference is not None:
            missing = [s for s in seeds if s not in reference]
            if missing:
                raise ValueError(f"reference has no run for seeds {missing}")
            ref = [reference[s][k] for s in seeds]
            diffs = [a - b for a, b in zip(vals, ref)]
            entry["reference"] = {**mean_std(ref), "values": ref}
            entry["paired_diff"] = {**mean_std(diffs), "values": diffs}
        out[k] = entry
    return out


def _seed_key(s):
    try:
        return int(s)
    except (TypeError, ValueError):
        return s


def format_summary(summary: dict, label: str = "run", keys=("accuracy", "f1")) -> str:
    """Human-readable lines: 'label accuracy 0.8431 +- 0.0050 (n=3) | paired diff -0.0100 +- 0.0040'."""
    lines = []
    for k in keys:
        e = summary[k]
        line = f"{label:>10} {k:<8} {e['mean']:.4f} +- {e['std']:.4f} (n={e['n']})"
        if "paired_diff" in e:
            d = e["paired_diff"]
            line += f" | reference {e['reference']['mean']:.4f} +- {e['reference']['std']:.4f}"
            line += f" | paired diff {d['mean']:+.4f} +- {d['std']:.4f}"
        lines.append(line)
    return "\n".join(lines)
