"""Narrow students (`distill --student-hidden H`): structure, projection, KD loss, reload, resume, export + check."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig

from cgf_fhe import surgery
from cgf_fhe.models import load_checkpoint
from cgf_fhe.training import api, narrow
from cgf_fhe.training.kd import hidden_term, kd_loss
from cgf_fhe.training.recipes import get_recipe


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()  # the 2 shared cores are busy: 1 intra-op thread is much faster there
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


OPTS = dict(max_length=48, max_train_samples=40, max_eval_samples=16, progress=False)
KW = dict(coeff=0.5, fhe=surgery.FheOptions(poly="all", ln="newton"), student_layers=1, student_hidden=32)


@pytest.fixture(scope="module")
def setup(mrpc_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("narrow")
    opts = api.RunOptions(data_dir=str(mrpc_dir), **OPTS)
    teacher = root / "teacher"  # tiny: hidden 64, 2 heads of 32, 2 layers, intermediate 128
    api.finetune("tiny", teacher, "exact", None, 42, get_recipe("reference", epochs=1, max_length=48, lr=1e-3), opts)
    recipe = get_recipe("reference", epochs=1, max_length=48, lr=1e-3)
    st = api.distill("tiny", root / "student", teacher=teacher, recipe=recipe, opts=opts, **KW)
    return {"root": root, "opts": opts, "teacher": teacher, "student": root / "student", "summary": st,
            "recipe": recipe}


def test_student_structure_settings_and_reload(setup):
    ckpt = setup["student"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == \
        (32, 1, 64, 1)
    st = json.loads((ckpt / "cgf_fhe.json").read_text())
    assert st["student_hidden"] == 32 and st["layer_map"] == [1] and st["student_layers"] == 1
    assert st["projection"]["method"] == narrow.PROJ_METHOD and st["projection"]["file"] == narrow.PROJ_FILE
    assert 0 < st["projection"]["explained_second_moment"] <= 1
    assert st["fhe"]["options"]["poly"] == "all" and st["fhe"]["options"]["ln"] == "newton"
    assert setup["summary"]["student_hidden"] == 32
    # the saved checkpoint rebuilds the trained model (structure from config.json, polynomials from the settings)
    assert st["reload_max_abs_diff"] < 1e-5
    model, _, settings = load_checkpoint(ckpt)
    assert model.config.hidden_size == 32 and model.config.cgf_softmax == "cgf"
    assert model.config._attn_implementation == "cgf"
    assert {k for k, _ in surgery.named_approx_modules(model)} == set(settings["fhe"]["modules"])
    res = api.evaluate_checkpoint(ckpt, opts=setup["opts"])
    assert res["n"] == 16 and res["polynomial"]
    assert res["accuracy"] == pytest.approx(st["dev_final"]["accuracy"])
    assert not (ckpt / api.STATE_SUBDIR / narrow.PROJ_FILE).exists()  # moved to the checkpoint


def test_projection_orthonormal_deterministic_and_used(setup):
    P = load_file(setup["student"] / narrow.PROJ_FILE)["projection"]
    assert P.shape == (64, 32)
    assert torch.allclose(P.T @ P, torch.eye(32), atol=1e-5)
    # recomputed from the same first batches -> the same P (what a resume relies on, besides the stored copy)
    t_model, tok, _ = load_checkpoint(setup["teacher"], softmax="exact")
    train, _ = api.load_data(tok, setup["opts"], setup["recipe"])
    from torch.utils.data import DataLoader

    loader = DataLoader(train, batch_size=setup["recipe"].eval_batch_size, shuffle=False,
                        collate_fn=api.collator(tok))
    P2, explained = narrow.teacher_projection(t_model, loader, 32)
    assert torch.allclose(P, P2, atol=1e-6)
    st = json.loads((setup["student"] / "cgf_fhe.json").read_text())
    assert explained == pytest.approx(st["projection"]["explained_second_moment"])
    # frozen embeddings (reference recipe): the student's tables are exactly the teacher's @ P
    student = load_file(setup["student"] / "model.safetensors")
    teacher = load_file(setup["teacher"] / "model.safetensors")
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        key = f"bert.embeddings.{name}.weight"
        assert torch.allclose(student[key], teacher[key] @ P, atol=1e-5), name


def test_projected_hidden_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    D, H, B, S = 4, 2, 2, 3
    P, _ = torch.linalg.qr(torch.randn(D, H, generator=g, dtype=torch.float64))
    P = P.float()
    teacher = [torch.randn(B, S, D, generator=g) for _ in range(5)]  # embeddings + 4 layers
    student = [torch.randn(B, S, H, generator=g) for _ in range(3)]  # embeddings + 2 layers
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    layer_map = [1, 3]
    Pn, tn = P.numpy().astype(np.float64), [t.numpy().astype(np.float64) for t in teacher]
    per_layer = []
    for layer, t in enumerate(layer_map):
        total, count = 0.0, 0
        for b in range(B):
            for s in range(S):
                if not mask[b, s]:
                    continue
                target = tn[t + 1][b, s] @ Pn
                for j in range(H):
                    total += (float(student[layer + 1][b, s, j]) - target[j]) ** 2
                    count += 1
        per_layer.append(total / count)
    want = sum(per_layer) / len(per_layer)
    got = hidden_term(student, teacher, layer_map, mask, teacher_proj=P)
    assert float(got) == pytest.approx(want, rel=1e-5)
    loss = kd_loss(torch.zeros(B, 2), torch.zeros(B, 2), student, teacher, layer_map, mask, alpha=0.0, beta=3.0,
                   teacher_proj=P)
    assert float(loss) == pytest.approx(3 * want, rel=1e-5)
    with pytest.raises(ValueError, match="teacher_proj"):
        hidden_term(student, teacher, layer_map, mask)  # widths differ and no projection


def test_narrow_config_from_minilm_shape():
    t = BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6)
    c = narrow.narrow_config(t, 64, 2)
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size, c.num_hidden_layers) == (64, 2, 256, 2)
    assert t.hidden_size == 384  # the teacher's config is not touched
    assert narrow.valid_hidden_sizes(t) == list(range(32, 384, 32))


@pytest.mark.parametrize("bad", [48, 64, 96, 0])
def test_bad_hidden_size_names_flag_and_valid_values(setup, bad, capsys):
    from cgf_fhe.cli import main

    with pytest.raises(api.TrainingError) as err:
        api.distill_one("tiny", setup["root"] / f"bad{bad}", 42, setup["teacher"], 0.5, setup["recipe"],
                        setup["opts"], student_hidden=bad)
    msg = str(err.value)
    assert f"--student-hidden {bad}" in msg and "head size 32" in msg and "valid values: 32" in msg
    if bad == 48:  # through the CLI: one line, exit 2
        rc = main(["distill", "--teacher", str(setup["teacher"]), "--student-hidden", "48", "--epochs", "1",
                   "--data-dir", setup["opts"].data_dir, "--max-train-samples", "8", "--max-length", "48",
                   "--no-progress", "-o", str(setup["root"] / "badcli")])
        err_text = capsys.readouterr().err
        assert rc == 2 and "--student-hidden 48" in err_text and "valid values: 32" in err_text


def test_resume_gives_the_same_student(setup):
    teacher, opts = setup["teacher"], setup["opts"]
    recipe = get_recipe("reference", epochs=2, max_length=48, lr=1e-3)
    root = setup["root"]
    api.distill("tiny", root / "full2", teacher=teacher, recipe=recipe, opts=opts, **KW)
    stopped = api.RunOptions(**{**opts.__dict__, "stop_after": 1})
    assert api.distill("tiny", root / "res2", teacher=teacher, recipe=recipe, opts=stopped, **KW) == \
        {"status": "partial"}
    assert (root / "res2" / api.STATE_SUBDIR / narrow.PROJ_FILE).is_file()
    resumed = api.RunOptions(**{**opts.__dict__, "resume": True})
    api.distill("tiny", root / "res2", teacher=teacher, recipe=recipe, opts=resumed, **KW)
    a, b = load_file(root / "full2" / "model.safetensors"), load_file(root / "res2" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_narrow_polynomial_student_exports_and_passes_check(setup, mrpc_dir, capsys):
    from cgf_fhe.cli import main
    from cgf_fhe.export.onnx_export import read_metadata
    from cgf_fhe.export.verify import check

    out = setup["root"] / "student.onnx"
    rc = main(["export", str(setup["student"]), "-o", str(out), "--verify", "16", "--data-dir", str(mrpc_dir),
               "--strict"])
    assert rc == 0
    res = check(out)
    assert res.ok and res.summary()["encrypted_inputs"] == ["embeddings"]
    par = json.loads(out.with_suffix(".parity.json").read_text())
    assert par["n_examples"] == 16 and par["max_abs_logit_diff"] <= 1e-4 and par["agreement"] == 1.0
    meta = read_metadata(out)
    assert meta["model_config"]["hidden_size"] == 32 and meta["model_config"]["num_attention_heads"] == 1
    assert meta["model_config"]["num_hidden_layers"] == 1


def _extremes(tree, path=""):
    """{"layers.0.exp.min": value, ...}: every min/max in a calibration tree."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k in ("min", "max") and isinstance(v, (int, float)):
                out[path + k] = float(v)
            else:
                out.update(_extremes(v, f"{path}{k}."))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.update(_extremes(v, f"{path}{i}."))
    return out


def test_two_stage_poly_student_calibrated_on_the_trained_init(setup):
    from torch.utils.data import DataLoader

    teacher, opts, recipe, root = setup["teacher"], setup["opts"], setup["recipe"], setup["root"]
    cgf = root / "cgf_narrow"  # stage 1: narrow CGF student (exact non-linearities)
    api.distill("tiny", cgf, teacher=teacher, recipe=recipe, opts=opts, coeff=0.5, student_layers=1,
                student_hidden=32)
    # stage 2: polynomial, from the stage-1 weights and P (hidden size / layers taken from the init)
    st = api.distill_one("tiny", root / "poly_from_init", 42, teacher, 0.5, recipe, opts, fhe=KW["fhe"],
                         student_init=cgf)
    assert st["student_hidden"] == 32 and st["student_layers"] == 1 and st["layer_map"] == [1]
    assert st["student_init"] == str(cgf.resolve()) and st["projection"]["init"] == str(cgf.resolve())
    assert json.loads((root / "poly_from_init" / "cgf_fhe.json").read_text())["reload_max_abs_diff"] < 1e-5
    P0 = load_file(cgf / narrow.PROJ_FILE)["projection"]
    assert torch.equal(load_file(root / "poly_from_init" / narrow.PROJ_FILE)["projection"], P0)
    # the intervals were calibrated on the stage-1 student, not on a random init
    init, tok, _ = load_checkpoint(cgf)
    train, _ = api.load_data(tok, opts, recipe)
    ranges = surgery.calibrate(init, DataLoader(train, batch_size=recipe.eval_batch_size, shuffle=False,
                                                collate_fn=api.collator(tok)), progress=False)
    got, want = _extremes(st["fhe"]["calibration"]), _extremes(json.loads(json.dumps(ranges)))
    assert want and set(got) == set(want)
    for key, v in want.items():
        assert got[key] == pytest.approx(v, rel=1e-5, abs=1e-6), key
    # wrong inits are refused with the flag named
    with pytest.raises(api.TrainingError, match="--student-init .*already polynomial"):
        api.distill_one("tiny", root / "bad_init", 42, teacher, 0.5, recipe, opts, student_init=setup["student"])
    with pytest.raises(api.TrainingError, match="--student-hidden 64 differs from --student-init"):
        api.distill_one("tiny", root / "bad_init", 42, teacher, 0.5, recipe, opts, student_init=cgf, student_hidden=64)
    with pytest.raises(api.TrainingError, match="--student-init .*not a distilled student"):
        api.distill_one("tiny", root / "bad_init", 42, teacher, 0.5, recipe, opts, student_init=teacher)
