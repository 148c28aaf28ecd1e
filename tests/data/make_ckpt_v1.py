"""Writes tests/data/ckpt_v1/: a polynomial (Newton LN, poly all), one-layer tiny CGF student distilled by the
training code of commit c50a5f0 (before the training-stage refactor of issue 25), kept small:

* ``cgf_fhe.json`` and ``config.json`` exactly as that code wrote them;
* ``weights.safetensors``: every tensor of its ``model.safetensors`` except the embeddings, which distillation
  keeps frozen at the tiny backbone's initialisation (``build_model("tiny", seed=42)``; checked here);
* ``expected.json``: the logits the code of that commit computes for the first 8 dev pairs of the reloaded
  checkpoint, and the checkpoint's dev accuracy.

Run once from the repository root: ``python tests/data/make_ckpt_v1.py DATA_DIR`` (MRPC folder)."""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EMBED_SEED = 42
N_LOGITS = 8


def main(data_dir: str) -> None:
    from cgf_fhe.models import build_model, load_checkpoint
    from cgf_fhe.training import api
    from cgf_fhe.training.evaluate import model_inputs
    from cgf_fhe.training.recipes import get_recipe

    torch.set_num_threads(1)
    dest = Path(__file__).with_name("ckpt_v1")
    dest.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "student"
        opts = api.RunOptions(data_dir=data_dir, max_length=64, max_train_samples=32, max_eval_samples=16,
                              progress=False, device="cpu")
        api.distill("tiny", out, seed=EMBED_SEED, recipe=get_recipe("reference", epochs=1, max_length=64, lr=1e-3),
                    opts=opts, fhe={"poly": "all", "ln": "newton"}, student_layers=1)
        for name in ("cgf_fhe.json", "config.json"):
            shutil.copy2(out / name, dest / name)
        sd = load_file(out / "model.safetensors")
        fresh, _ = build_model("tiny", "exact", seed=EMBED_SEED)
        emb = {k: v for k, v in fresh.state_dict().items() if "embeddings" in k and "position_ids" not in k}
        for k, v in emb.items():
            assert torch.equal(sd[k], v), k
        save_file({k: v.contiguous() for k, v in sd.items() if k not in emb}, dest / "weights.safetensors")
        model, tok, settings = load_checkpoint(out)
        dev, = [api.load_split(tok, "validation", opts, get_recipe("reference", max_length=64), N_LOGITS)]
        batch = api.collator(tok)([dev[i] for i in range(N_LOGITS)])
        with torch.no_grad():
            logits = model.eval()(**model_inputs(batch)).logits
        (dest / "expected.json").write_text(json.dumps({
            "embed_seed": EMBED_SEED, "max_length": 64, "n": N_LOGITS, "logits": logits.tolist(),
            "dev_accuracy": settings["dev"]["accuracy"]}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
