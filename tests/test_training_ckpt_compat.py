"""Checkpoints written before the training-stage refactor (issue 25) still load: tests/data/ckpt_v1 holds a
polynomial one-layer tiny student written by the code of that time (see tests/data/make_ckpt_v1.py)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cgf_fhe.models import build_model, load_checkpoint, load_tokenizer
from cgf_fhe.training import api
from cgf_fhe.training.evaluate import model_inputs
from cgf_fhe.training.recipes import get_recipe

FIXTURE = Path(__file__).parent / "data" / "ckpt_v1"


@pytest.fixture(scope="module")
def old_ckpt(tmp_path_factory):
    """The v1 checkpoint reassembled: its settings and config as written, its weights + the frozen embeddings."""
    expected = json.loads((FIXTURE / "expected.json").read_text())
    d = tmp_path_factory.mktemp("ckpt_v1") / "student"
    d.mkdir()
    for name in ("cgf_fhe.json", "config.json"):
        shutil.copy2(FIXTURE / name, d / name)
    fresh, _ = build_model("tiny", "exact", seed=expected["embed_seed"])
    sd = {k: v for k, v in fresh.state_dict().items() if "embeddings" in k and "position_ids" not in k}
    sd.update(load_file(FIXTURE / "weights.safetensors"))
    save_file(sd, d / "model.safetensors")
    load_tokenizer("tiny").save_pretrained(d)
    return d, expected


def test_v1_polynomial_student_loads_with_the_same_logits(old_ckpt, mrpc_dir):
    d, expected = old_ckpt
    model, tok, settings = load_checkpoint(d)
    assert settings["fhe"] and settings["student_layers"] == 1 and model.config.num_hidden_layers == 1
    opts = api.RunOptions(data_dir=str(mrpc_dir), max_length=expected["max_length"])
    dev = api.load_split(tok, "validation", opts, get_recipe("reference", max_length=64), expected["n"])
    batch = api.collator(tok)([dev[i] for i in range(expected["n"])])
    with torch.no_grad():
        logits = model.eval()(**model_inputs(batch)).logits
    want = torch.tensor(expected["logits"])
    assert float((logits - want).abs().max()) < 1e-5


def test_v1_checkpoint_evaluates_to_its_recorded_accuracy(old_ckpt, mrpc_dir):
    d, expected = old_ckpt
    res = api.evaluate_checkpoint(d, opts=api.RunOptions(data_dir=str(mrpc_dir), max_eval_samples=16,
                                                         device="cpu"))
    assert res["polynomial"] and res["max_length"] == 64 and res["n"] == 16
    assert res["accuracy"] == expected["dev_accuracy"]
    assert res["intervals"]["n_seen"] > 0
