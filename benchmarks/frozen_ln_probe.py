"""Why frozen-statistics LayerNorm fails on the MiniLM CGF student: where the LayerNorm variance outliers sit,
and what swapping every LayerNorm for a frozen one does to a trained CGF student (no retraining).

For every LayerNorm of the server path the script measures, over valid tokens of ``--calib-examples`` training
pairs, the geometric-mean variance ``exp(E[log(var + eps)])`` separately for position 0 ([CLS], a public
position) and for the other tokens, and the spread (max / min) of each group. It then scores the dev set with
the checkpoint as is and with two frozen replacements built from those statistics:

* ``frozen``: one constant per LayerNorm, the geometric mean over all valid tokens (what ``--ln frozen``
  calibrates by default: ``frozen_stat="geo"``), i.e. :class:`cgf_fhe.poly.FrozenLayerNorm`;
* ``frozen_cls``: two constants per LayerNorm, one for position 0 and one for every other position;
* ``frozen_attn`` / ``frozen_ffn``: one constant per LayerNorm, but only the six after attention (``ln_attn``,
  what ``--ln frozen-attn`` freezes) or only the six after the FFN (``ln_ffn``); the others stay exact.

For each variant: dev accuracy, examples with non-finite logits, and the per-layer range of the CGF exp input
(``s - mean - c var``) on a few training batches (an exp polynomial must cover it).

Run:  python benchmarks/frozen_ln_probe.py runs/minilm/cgf-kd/seed42 -o runs/minilm/frozen-ln-probe.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from cgf_fhe import data, poly, surgery
from cgf_fhe.models import load_checkpoint
from cgf_fhe.training.evaluate import evaluate_model


class _ClsFrozenLayerNorm(poly.FrozenLayerNorm):
    """Frozen LayerNorm with its own constant for position 0 (plaintext probe only; not exportable)."""

    def __init__(self, inv_sigma: float, inv_sigma_first: float, ln: nn.LayerNorm):
        super().__init__(inv_sigma, ln=ln)
        self.inv_first = float(inv_sigma_first)

    def forward(self, x):
        d = x - x.mean(-1, keepdim=True)
        scale = torch.full(x.shape[:-1] + (1,), self.inv_sigma, dtype=x.dtype, device=x.device)
        scale[:, 0] = self.inv_first
        return d * scale * self.weight + self.bias


def ln_statistics(model, loader) -> dict:
    """Per LayerNorm key: geometric-mean variance and max/min spread for position 0 and for the other valid
    tokens, plus the all-token geometric mean."""
    acc: dict[str, dict] = {}
    ctx: dict = {}

    def hook(key, eps):
        def f(_mod, inp):
            v = inp[0].detach().double().var(-1, unbiased=False) + eps  # [B, S]
            mask = ctx["mask"].bool()
            a = acc.setdefault(key, {"cls": [], "rest": []})
            a["cls"].append(v[:, 0])
            rest = mask.clone()
            rest[:, 0] = False
            a["rest"].append(v[rest])
        return f

    handles = []
    for key, parent, attr in surgery._locations(model):
        if key.rsplit(".", 1)[1].startswith("ln"):
            ln = getattr(parent, attr)
            handles.append(ln.register_forward_pre_hook(hook(key, float(getattr(ln, "eps", 1e-12)))))
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                ctx["mask"] = batch["attention_mask"]
                model(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, a in acc.items():
        cls, rest = torch.cat(a["cls"]), torch.cat(a["rest"])
        both = torch.cat([cls, rest])
        out[key] = {"geo_var_cls": float(cls.log().mean().exp()), "geo_var_rest": float(rest.log().mean().exp()),
                    "geo_var_all": float(both.log().mean().exp()),
                    "spread_cls": float(cls.max() / cls.min()), "spread_rest": float(rest.max() / rest.min()),
                    "max_var_cls": float(cls.max()), "max_var_rest": float(rest.max()), "n_rest": int(rest.numel())}
    return out


def swap_frozen(model, stats: dict, split_cls: bool, only: str | None = None) -> int:
    """Replace the LayerNorms in ``stats`` (only the keys ending in ``only`` if given) by frozen ones."""
    n = 0
    for key, parent, attr in surgery._locations(model):
        if key not in stats or (only is not None and not key.endswith(only)):
            continue
        st, ln = stats[key], getattr(parent, attr)
        if split_cls:
            mod = _ClsFrozenLayerNorm(st["geo_var_rest"] ** -0.5, st["geo_var_cls"] ** -0.5, ln)
        else:
            mod = poly.FrozenLayerNorm(st["geo_var_all"] ** -0.5, ln=ln)
        setattr(parent, attr, mod)
        n += 1
    return n


def exp_ranges(model, loader, batches: int) -> list[list[float]]:
    """[min, max] of the CGF exp input per layer on the first ``batches`` batches."""
    cal = surgery.calibrate(model, loader, max_batches=batches, progress=False)
    return [[lay["exp"]["min"], lay["exp"]["max"]] if lay.get("exp", {}).get("count") else [None, None]
            for lay in cal["layers"]]


def probe(ckpt: str, calib_loader, dev_loader, exp_batches: int = 4) -> dict:
    model, _, settings = load_checkpoint(ckpt)
    if settings.get("fhe"):
        raise SystemExit(f"{ckpt}: already polynomial; probe a CGF student with exact LayerNorms (distill without --poly)")
    stats = ln_statistics(model, calib_loader)
    variants = {}
    for name, split, only in (("exact_ln", None, None), ("frozen", False, None), ("frozen_cls", True, None),
                              ("frozen_attn", False, "ln_attn"), ("frozen_ffn", False, "ln_ffn")):
        m, _, _ = load_checkpoint(ckpt)
        if split is not None:
            swap_frozen(m, stats, split, only)
        ev = evaluate_model(m, dev_loader, "cpu")
        with torch.no_grad():
            rng = exp_ranges(m, calib_loader, exp_batches)
        variants[name] = {"accuracy": ev["accuracy"], "f1": ev["f1"], "n": ev["n"],
                          "n_nonfinite": ev["n_nonfinite"], "exp_range_per_layer": rng}
    return {"checkpoint": str(ckpt), "softmax": settings.get("softmax"), "coeff": settings.get("coeff"),
            "layernorms": stats, "variants": variants}


def _finite(v):
    """JSON has no NaN/inf: non-finite numbers become None (a blown-up range reads as null)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a CGF student checkpoint with exact LayerNorms (e.g. distill without --poly)")
    ap.add_argument("--data-dir", default=None, help="MRPC folder (default: CGF_FHE_DATA_DIR, else the hub)")
    ap.add_argument("--calib-examples", type=int, default=640)
    ap.add_argument("--max-eval-samples", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("-o", "--output", default=None, help="write the JSON here (default: stdout only)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    _, tok, _ = load_checkpoint(args.checkpoint)
    raw = data.load_mrpc(args.data_dir)
    calib = data.tokenize_split(raw["train"], tok, args.max_length, args.calib_examples)
    dev = data.tokenize_split(raw["validation"], tok, args.max_length, args.max_eval_samples)
    calib_loader = data.make_loader(calib, tok, 32, shuffle=False)
    dev_loader = data.make_loader(dev, tok, 64, shuffle=False)
    res = probe(args.checkpoint, calib_loader, dev_loader)
    res["command"] = "python benchmarks/frozen_ln_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = _finite(res)
    text = json.dumps(res, indent=2, allow_nan=False)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    for key, st in res["layernorms"].items():
        print(f"{key:18s} geo var [CLS] {st['geo_var_cls']:8.3g} (spread {st['spread_cls']:8.3g})   "
              f"other tokens {st['geo_var_rest']:8.3g} (spread {st['spread_rest']:8.3g})")
    for name, v in res["variants"].items():
        hi = max((r[1] for r in v["exp_range_per_layer"] if r[1] is not None), default=None)
        print(f"{name:10s} dev accuracy {v['accuracy']:.4f}  non-finite logits {v['n_nonfinite']}/{v['n']}  "
              f"max exp input {hi}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
