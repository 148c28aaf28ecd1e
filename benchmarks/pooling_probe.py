#!/usr/bin/env python
"""Teacher-recipe probe for issue #2: does a masked-mean-pooling head fine-tune better than the [CLS] pooler?

all-MiniLM-L6-v2 was trained as a sentence encoder whose embedding is the mean of its token vectors; its [CLS]
pooler was never trained (bias exactly 0, weight std 0.009). This probe fine-tunes the backbone exactly like
``cgf-fhe finetune --model minilm --softmax exact --preset minilm`` (same data, recipe, seed, engine), except that
the pooler's dense + tanh read the mean of the last layer's vectors over the valid tokens instead of [CLS]:

    python benchmarks/pooling_probe.py --seed 42 --resume -o runs/minilm/search/meanpool-lr1e-4-unfrz-wu

It writes the run's ``cgf_fhe.json`` (read by ``make_results.py`` like any search candidate; ``probe`` names the
head) and deletes the weights: a cgf-fhe checkpoint loads with the [CLS] pooler, so keeping them would give a
checkpoint that loads as a different model. The probe is not a product feature: mean pooling would also change
the exported server graph (every token of the last layer is needed), so it is built only if it pays.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import cgf_fhe.training.api as api
from cgf_fhe.models import SETTINGS_FILE, resolve_model

PROBE = "masked mean pooling head (pooler dense + tanh on the mean of the last layer over valid tokens)"


class MaskedMeanPooler(nn.Module):
    """BERT pooler reading the mean over valid tokens; keeps ``dense``/``activation`` (same parameter names)."""

    def __init__(self, pooler: nn.Module):
        super().__init__()
        self.dense, self.activation = pooler.dense, pooler.activation
        self.mask: torch.Tensor | None = None  # set by the backbone's forward pre-hook

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("MaskedMeanPooler: no attention mask recorded for this forward pass")
        keep = self.mask.to(hidden.dtype).unsqueeze(-1)
        return self.activation(self.dense((hidden * keep).sum(1) / keep.sum(1)))


def with_mean_pooling(name, softmax="exact", coeff=None, seed=0):
    net, tok, settings = resolve_model(name, softmax, coeff, seed)
    base = net.base_model
    pooler = MaskedMeanPooler(base.pooler)
    base.pooler = pooler

    def grab_mask(_module, args, kwargs):
        pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    base.register_forward_pre_hook(grab_mask, with_kwargs=True)
    return net, tok, settings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--preset", default="minilm")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-dir")
    p.add_argument("--max-train-samples", type=int)
    p.add_argument("--max-eval-samples", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the training state; skip a finished run")
    p.add_argument("-o", "--out", required=True)
    a = p.parse_args(argv)
    api.resolve_model = with_mean_pooling  # the only change to `cgf-fhe finetune`
    recipe = api.get_recipe(a.preset, epochs=a.epochs)
    opts = api.RunOptions(data_dir=a.data_dir, max_train_samples=a.max_train_samples,
                          max_eval_samples=a.max_eval_samples, progress=False, resume=a.resume)
    settings = api.finetune(model=a.model, out_dir=a.out, softmax="exact", recipe=recipe, seed=a.seed, opts=opts)
    out = Path(a.out)
    settings["probe"] = PROBE
    for f in out.glob("model*.safetensors"):
        f.unlink()
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True))
    print(json.dumps({"probe": PROBE, "dev": settings.get("dev"), "best_epoch": settings.get("best_epoch")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
