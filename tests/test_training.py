"""Training stage: KD loss values, metrics/summaries, the fit loop (loss goes down, exact resume), CLI runs."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from cgf_fhe.models import build_model, load_checkpoint
from cgf_fhe.training import api, engine
from cgf_fhe.training.evaluate import classification_metrics, evaluate_model, summarize_seeds
from cgf_fhe.training.kd import kd_loss
from cgf_fhe.training.recipes import get_recipe

SMALL = ["--max-length", "64", "--no-progress"]


# ---------------------------------------------------------------- KD loss

def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(xs):
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def test_kd_logit_term_hand_computed():
    s = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    # T = 1: row 0: KL([.75,.25] || [.5,.5]); row 1: KL([.5,.5] || softmax([1,-1])); batch mean
    want1 = (_kl([0.75, 0.25], [0.5, 0.5]) + _kl([0.5, 0.5], _softmax([1, -1]))) / 2
    assert _kl([0.75, 0.25], [0.5, 0.5]) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    got = kd_loss(s, t, None, None, None, None, alpha=1.0, beta=0.0, T=1.0)
    assert got.item() == pytest.approx(want1, rel=1e-6)
    # T = 2, alpha = 0.5: 0.5 * 4 * KL at temperature 2
    want2 = (_kl(_softmax([math.log(3) / 2, 0]), [0.5, 0.5]) + _kl([0.5, 0.5], _softmax([0.5, -0.5]))) / 2
    got2 = kd_loss(s, t, None, None, None, None, alpha=0.5, beta=0.0, T=2.0)
    assert got2.item() == pytest.approx(0.5 * 4 * want2, rel=1e-6)
    # identical logits -> zero
    assert kd_loss(t, t, None, None, None, None, alpha=1.0, beta=0.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_hidden_term_masks_padding_and_uses_layer_map():
    B, S, H = 1, 3, 4
    mask = torch.tensor([[1, 1, 0]])
    emb = torch.zeros(B, S, H)
    student = (emb, torch.zeros(B, S, H))  # index 0 = embeddings, 1 = student layer 0
    t1 = torch.full((B, S, H), 5.0)  # teacher layer 0: would give 25
    t2 = torch.ones(B, S, H)  # teacher layer 1: diff 1 on valid tokens ...
    t2[0, 2] = 100.0  # ... and a huge one on the padding position, which must not count
    teacher = (emb, t1, t2)
    logits = torch.zeros(1, 2)
    mse = kd_loss(logits, logits, student, teacher, [1], mask, alpha=0.0, beta=1.0)
    assert mse.item() == pytest.approx(1.0)
    assert kd_loss(logits, logits, student, teacher, [0], mask, alpha=0.0, beta=1.0).item() == pytest.approx(25.0)
    # two student layers mapped to teacher layers 0 and 1: mean of 25 and (diff 1 -> 1) = 13; beta scales it
    student2 = (emb, torch.zeros(B, S, H), torch.zeros(B, S, H))
    assert kd_loss(logits, logits, student2, teacher, [0, 1], mask, alpha=0.0, beta=10.0).item() == pytest.approx(130.0)
    # full loss: alpha*T^2*KL + beta*MSE + ce_weight*CE, with CE of uniform logits = ln 2
    t_logits = torch.tensor([[math.log(3.0), 0.0]])
    total, parts = kd_loss(logits, t_logits, student, teacher, [1], mask, alpha=2.0, beta=3.0, T=1.0,
                           labels=torch.tensor([0]), ce_weight=0.5, return_parts=True)
    kl = _kl([0.75, 0.25], [0.5, 0.5])
    assert total.item() == pytest.approx(2.0 * kl + 3.0 * 1.0 + 0.5 * math.log(2.0), rel=1e-6)
    assert parts == pytest.approx({"kl": kl, "mse": 1.0, "ce": math.log(2.0)}, rel=1e-6)
    with pytest.raises(ValueError, match="layer_map"):
        kd_loss(logits, logits, student, teacher, [0, 1], mask, beta=1.0)
    with pytest.raises(ValueError, match="outside"):
        kd_loss(logits, logits, student, teacher, [2], mask, beta=1.0)


def test_kd_attention_term_hand_computed_ignores_padding():
    from cgf_fhe.training.kd import attention_map_error

    mask = torch.tensor([[1, 1, 0]])  # n = 2 valid keys
    teacher = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]).view(1, 1, 3, 3)
    student = torch.tensor([[0.7, 0.3, 0.0],  # |0.7-0.5| + |0.3-0.5| = 0.4
                            [0.5, 0.5, 9.0],  # padding key: must not count -> 0
                            [5.0, 5.0, 5.0]]).view(1, 1, 3, 3)  # padding query row: must not count
    assert attention_map_error(student, teacher, mask).item() == pytest.approx(0.2)  # (0.4 + 0) / 2 valid rows
    # no mask: every key and row valid
    s2, t2 = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 1, 3), torch.full((1, 1, 1, 3), 1 / 3)
    assert attention_map_error(s2, t2, None).item() == pytest.approx(4 / 3)
    logits = torch.zeros(1, 2)
    # layer map picks the teacher layer; the weight scales; the part is reported
    total, parts = kd_loss(logits, logits, None, None, [1], mask, alpha=0.0, beta=0.0, student_attn=(student,),
                           teacher_attn=(student, teacher), attn_weight=10.0, return_parts=True)
    assert total.item() == pytest.approx(2.0) and parts == pytest.approx({"attn": 0.2})
    assert kd_loss(logits, logits, None, None, [0], mask, alpha=0.0, beta=0.0, student_attn=(student,),
                   teacher_attn=(student, teacher), attn_weight=10.0).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="needs student and teacher attentions"):
        kd_loss(logits, logits, None, None, None, mask, beta=0.0, attn_weight=1.0)
    with pytest.raises(ValueError, match="outside the teacher's layers"):
        kd_loss(logits, logits, None, None, [2], mask, beta=0.0, student_attn=(student,),
                teacher_attn=(student, teacher), attn_weight=1.0)
    with pytest.raises(ValueError, match="same heads"):
        attention_map_error(student, teacher[..., :2], mask)


def test_attention_map_loss_trains_cgf_weights_toward_the_teacher_softmax(tiny_data):
    from cgf_fhe.softmax import set_softmax

    tok, train, dev = tiny_data
    teacher, _ = build_model("tiny", "exact", seed=5)
    student, _ = build_model("tiny", "exact", seed=5)
    with torch.no_grad():  # random-init scores are near 0, where CGF ~ softmax: spread them (same in both)
        for m in (teacher, student):
            for layer in m.bert.encoder.layer:
                layer.attention.self.query.weight.mul_(8.0)
                layer.attention.self.key.weight.mul_(8.0)
    set_softmax(student, "cgf", 0.5)
    student.eval()  # no dropout: the loss is a deterministic function of the weights
    batch = api.collator(tok)([train[i] for i in range(8)])
    step = engine.KDStep(teacher, None, alpha=0.0, beta=0.0, attn_weight=1.0)
    _, parts = step(student, batch)
    start = parts["attn"]
    assert start > 0  # CGF weights differ from softmax weights on the same scores
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(30):
        loss, parts = step(student, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, parts = step(student, batch)
    # CGF cannot match softmax exactly (measured here: 0.133 -> 0.091 in 30 steps, 0.084 in 60), but it gets closer
    assert parts["attn"] < 0.75 * start, (start, parts["attn"])
    with pytest.raises(ValueError, match="full-width"):
        engine.KDStep(teacher, None, attn_weight=1.0, teacher_proj=torch.eye(64)[:, :32])


def test_attn_weight_flag_is_recorded_and_rejects_negative(mrpc_dir, tmp_path, capsys):
    from cgf_fhe.cli import main

    out = tmp_path / "att"
    base = ["distill", "--model", "tiny", "--data-dir", str(mrpc_dir), "--max-train-samples", "32",
            "--max-eval-samples", "16", "--epochs", "1", "-o", str(out), *SMALL]
    assert main(base + ["--attn-weight", "-1"]) != 0
    assert "--attn-weight must be >= 0, got -1" in capsys.readouterr().err
    assert not out.exists()
    assert main(base + ["--attn-weight", "2.5"]) == 0
    _, _, settings = load_checkpoint(out)
    assert settings["status"] == "done" and settings["kd"]["attn_weight"] == 2.5
    assert settings["recipe"]["kd_attn_weight"] == 2.5


def test_coeff_per_head_flag_calibrates_records_and_reloads(mrpc_dir, tmp_path):
    from cgf_fhe.cli import main

    out = tmp_path / "heads"
    assert main(["distill", "--model", "tiny", "--data-dir", str(mrpc_dir), "--max-train-samples", "32",
                 "--max-eval-samples", "16", "--epochs", "1", "--poly", "all", "--coeff-per-head", "-o", str(out),
                 *SMALL]) == 0
    model, _, settings = load_checkpoint(out)
    heads = settings["coeff_heads"]
    assert settings["status"] == "done" and settings["recipe"]["coeff_per_head"] is True
    assert heads["source"] == "calibrated" and heads["examples"] == 32
    assert len(heads["coeffs"]) == 2 and all(len(layer) == 2 for layer in heads["coeffs"])
    assert model.config.cgf_coeff_heads == heads["coeffs"]  # saved with the config, put back on load
    for layer, coeffs in zip(model.bert.encoder.layer, heads["coeffs"]):
        assert layer.attention.self.cgf_coeff_heads.tolist() == pytest.approx(coeffs)
    for l1, single in zip(heads["l1"], heads["l1_at_single"]):  # each head at its best grid point
        assert all(a <= b + 1e-9 for a, b in zip(l1, single))


def test_coeff_lr_flag_trains_records_resumes_and_reloads(mrpc_dir, tmp_path, capsys):
    from cgf_fhe.cli import main
    from cgf_fhe.softmax import COEFF_PARAM

    base = ["distill", "--data-dir", str(mrpc_dir), "--max-train-samples", "32", "--max-eval-samples", "16",
            "--epochs", "2", "--coeff-lr", "0.5", *SMALL]
    assert main(base[:-4] + ["-0.1", *SMALL, "--model", "tiny", "-o", str(tmp_path / "bad")]) != 0
    assert "--coeff-lr must be >= 0, got -0.1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    full = tmp_path / "full"
    assert main(base + ["--model", "tiny", "--keep-state", "-o", str(full)]) == 0
    model, _, settings = load_checkpoint(full)
    heads = settings["coeff_heads"]
    assert settings["recipe"]["coeff_lr"] == 0.5 and heads["trained"] is True
    assert heads["start"] == [[0.5, 0.5], [0.5, 0.5]] and heads["source"] == "--coeff"
    assert max(abs(c - 0.5) for layer in heads["coeffs"] for c in layer) > 1e-3  # they moved
    assert model.config.cgf_coeff_heads == heads["coeffs"]  # saved as constants, put back on load
    for layer, coeffs in zip(model.bert.encoder.layer, heads["coeffs"]):
        assert layer.attention.self.cgf_coeff_heads.tolist() == pytest.approx(coeffs)
    assert not any(COEFF_PARAM in k for k in model.state_dict())
    from cgf_fhe.softmax import train_head_coeffs

    train_head_coeffs(model)  # the optimizer gives the coefficients their own rate, without weight decay
    named = engine.trainable_parameters(model, freeze_embeddings=True)
    coeff_ids = {id(p) for n, p in named if n.endswith(COEFF_PARAM)}
    assert len(coeff_ids) == 2
    for g in engine.build_optimizer(named, get_recipe("reference", coeff_lr=0.5)).param_groups:
        ids = {id(p) for p in g["params"]}
        assert not ids & coeff_ids or (ids == coeff_ids and g["lr"] == 0.5 and g["weight_decay"] == 0.0)
    with pytest.raises(ValueError, match="coeff_lr is 0.0"):
        engine.build_optimizer(named, get_recipe("reference"))
    # interrupted after epoch 1 and resumed: the same coefficients (restored with the training state)
    part = tmp_path / "part"
    teacher = ["--teacher", str(full / "teacher"), "-o", str(part)]
    assert main(base + teacher + ["--stop-after-epochs", "1"]) == 0
    assert main(base + teacher + ["--resume", "--keep-state"]) == 0
    _, _, resumed = load_checkpoint(part)
    assert resumed["coeff_heads"]["coeffs"] == heads["coeffs"]
    assert resumed["dev"] == settings["dev"]
    last = [torch.load(d / "train_state" / "train_state.pt", weights_only=False)["model"] for d in (full, part)]
    keys = [k for k in last[0] if k.endswith(COEFF_PARAM)]
    assert len(keys) == 2  # the last epoch's trainable coefficients are in the training state...
    assert all(torch.equal(last[0][k], last[1][k]) for k in keys)  # ...and the resumed run reached the same ones
    # a second stage from this student (--student-init) trains on from its trained coefficients
    again = tmp_path / "again"
    assert main(base + ["--teacher", str(full / "teacher"), "--student-init", str(full), "-o", str(again)]) == 0
    second = load_checkpoint(again)[2]["coeff_heads"]
    assert second["source"] == "student init" and second["start"] == heads["coeffs"] != second["coeffs"]


def test_exact_student_softmax_is_the_kd_control(mrpc_dir, tmp_path, capsys, monkeypatch):
    from cgf_fhe.cli import main

    trained_with = []  # the attention the student really trains with (the reload below restores it from settings)

    real_fit = engine.fit

    def fit(model, *a, **kw):
        trained_with.append(model.config._attn_implementation)
        return real_fit(model, *a, **kw)

    monkeypatch.setattr(engine, "fit", fit)
    out = tmp_path / "exact"
    base = ["distill", "--model", "tiny", "--data-dir", str(mrpc_dir), "--max-train-samples", "32",
            "--max-eval-samples", "16", "--epochs", "1", "--student-softmax", "exact", *SMALL]
    assert main(base + ["--poly", "all", "--coeff-lr", "0.1", "-o", str(out)]) != 0
    err = capsys.readouterr().err
    assert "exact-softmax student" in err and "--poly all, --coeff-lr" in err
    assert not (out / "cgf_fhe.json").exists()
    assert main(base + ["-o", str(out)]) == 0
    from cgf_fhe.softmax import SOFTMAX_TO_ATTN

    assert trained_with == [SOFTMAX_TO_ATTN["exact"]] * 2  # the teacher's fine-tune, then the student's KD
    model, tok, settings = load_checkpoint(out)
    assert settings["status"] == "done" and settings["softmax"] == "exact" and settings["coeff"] is None
    assert model.config.cgf_softmax == "exact"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["softmax"] == "exact" and summary["coeff"] is None
    teacher, _, _ = load_checkpoint(out / "teacher")
    batch = tok(["a short sentence", "another one"], ["and its pair", "pair"], return_tensors="pt", padding=True)
    with torch.no_grad():
        rows = model(**batch, output_attentions=True).attentions[0].sum(-1)
        moved = (model(**batch).logits - teacher(**batch).logits).abs().max()
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)  # softmax rows (CGF rows do not sum to 1)
    assert moved > 0  # it was trained (KD from its own copy still moves it: dropout, hidden-state targets)


# ---------------------------------------------------------------- metrics / summaries

def test_metrics_and_seed_summary_hand_computed():
    m = classification_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    # tp=2 fp=1 fn=1 -> f1 = 4/6; accuracy 3/5
    assert m == pytest.approx({"accuracy": 0.6, "f1": 4 / 6, "n": 5})
    runs = {42: {"accuracy": 0.80, "f1": 0.85}, 7: {"accuracy": 0.82, "f1": 0.86}, 123: {"accuracy": 0.84, "f1": 0.90}}
    ref = {42: {"accuracy": 0.81, "f1": 0.85}, 7: {"accuracy": 0.85, "f1": 0.88}, 123: {"accuracy": 0.84, "f1": 0.89}}
    s = summarize_seeds(runs, ref)
    assert s["accuracy"]["mean"] == pytest.approx(0.82)
    assert s["accuracy"]["std"] == pytest.approx(0.02)  # sample std of 0.80, 0.82, 0.84
    diffs = [-0.01, -0.03, 0.0]
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert s["accuracy"]["paired_diff"]["values"] == pytest.approx(diffs)
    assert s["accuracy"]["paired_diff"]["mean"] == pytest.approx(mean)
    assert s["accuracy"]["paired_diff"]["std"] == pytest.approx(std)
    assert s["f1"]["reference"]["mean"] == pytest.approx((0.85 + 0.88 + 0.89) / 3)
    with pytest.raises(ValueError, match="seeds"):
        summarize_seeds(runs, {42: ref[42]})


# ---------------------------------------------------------------- fit loop

@pytest.fixture(scope="module")
def tiny_data(mrpc_dir):
    _, tok = build_model("tiny", "cgf", seed=0)
    opts = api.RunOptions(data_dir=str(mrpc_dir), max_length=64, max_train_samples=32, max_eval_samples=16)
    recipe = get_recipe("reference", max_length=64)
    train, dev = api.load_data(tok, opts, recipe)
    return tok, train, dev


def _mean_ce(model, ds, tok):
    from torch.utils.data import DataLoader

    return evaluate_model(model, DataLoader(ds, batch_size=32, collate_fn=api.collator(tok)))["loss"]


def test_few_steps_lower_the_loss(tiny_data):
    tok, train, dev = tiny_data
    model, _ = build_model("tiny", "cgf", coeff=0.5, seed=0)
    before = _mean_ce(model, train, tok)
    # a random-init tiny BERT needs a few dozen steps before it starts fitting 32 pairs
    recipe = get_recipe("reference", lr=3e-3, epochs=25, batch_size=16, max_length=64)
    res = engine.fit(model, engine.CEStep(), train, dev.select(range(8)), api.collator(tok), recipe, seed=0,
                     progress=False, keep_best=False)
    after = _mean_ce(model, train, tok)  # last-epoch weights (keep_best=False)
    assert len(res.history) == 25 and res.completed
    assert after < before - 0.1, (before, after)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"] - 0.1
    # frozen embeddings really stayed frozen, the rest moved
    fresh, _ = build_model("tiny", "cgf", coeff=0.5, seed=0)
    assert torch.equal(fresh.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    assert torch.equal(fresh.bert.embeddings.LayerNorm.weight, model.bert.embeddings.LayerNorm.weight)
    assert not torch.equal(fresh.classifier.weight, model.classifier.weight)


def _states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_reproduces_uninterrupted_run(tiny_data, tmp_path):
    tok, train, dev = tiny_data
    recipe = get_recipe("reference", lr=1e-3, epochs=3, batch_size=8, max_length=64)

    def run(state_dir, stop_after=None, resume=False):
        model, _ = build_model("tiny", "cgf", coeff=0.5, seed=3)  # dropout is on: RNG state matters
        res = engine.fit(model, engine.CEStep(), train, dev, api.collator(tok), recipe, seed=3,
                         state_dir=state_dir, resume=resume, progress=False, stop_after=stop_after)
        return model, res

    full_model, full = run(tmp_path / "full")
    part_model, part = run(tmp_path / "resumed", stop_after=1)
    assert not part.completed and len(part.history) == 1
    res_model, resumed = run(tmp_path / "resumed", resume=True)
    assert resumed.completed and resumed.resumed_from == 1
    assert _states_equal(full_model.state_dict(), res_model.state_dict())  # best weights, bit for bit
    a = torch.load(tmp_path / "full" / engine.STATE_FILE, weights_only=True)
    b = torch.load(tmp_path / "resumed" / engine.STATE_FILE, weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    assert _states_equal(a["model"], b["model"])  # last-epoch weights
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert _states_equal(sa, sb)
    assert a["scheduler"] == b["scheduler"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert full.best_metrics == resumed.best_metrics and full.best_epoch == resumed.best_epoch
    # the interrupted run really was behind: its last weights differ from the finished ones
    assert not _states_equal(part_model.state_dict(), a["model"])
    # resuming with another seed is refused with a clear error
    model, _ = build_model("tiny", "cgf", seed=4)
    with pytest.raises(engine.ResumeError, match="seed"):
        engine.fit(model, engine.CEStep(), train, dev, api.collator(tok), recipe, seed=4,
                   state_dir=tmp_path / "full", resume=True, progress=False)


def test_kd_step_is_zero_for_identical_teacher_and_student(tiny_data):
    tok, train, dev = tiny_data
    teacher, _ = build_model("tiny", "exact", seed=5)
    student, _ = build_model("tiny", "exact", seed=5)
    student.eval()
    step = engine.KDStep(teacher, None, alpha=1.0, beta=10.0, T=2.0)
    batch = api.collator(tok)([train[i] for i in range(4)])
    loss, parts = step(student, batch)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    from cgf_fhe.softmax import set_softmax

    set_softmax(student, "cgf", 0.5)
    loss, parts = step(student, batch)
    assert loss.item() > 0 and parts["mse"] > 0


# ---------------------------------------------------------------- CLI

def test_distill_smoke_cli_under_two_minutes(mrpc_dir, tmp_path, capsys):
    out = tmp_path / "smoke"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CGF_FHE_DATA_DIR": str(mrpc_dir)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cgf_fhe.cli", "distill", "--model", "tiny", "--max-train-samples", "64",
         "--max-eval-samples", "32", "--epochs", "1", "-o", str(out), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"distill smoke wall time: {wall:.1f}s")
    assert wall < 120
    model, tok, settings = load_checkpoint(out)
    assert settings["softmax"] == "cgf" and settings["coeff"] == 0.5 and settings["status"] == "done"
    assert model.config._attn_implementation == "cgf"
    assert settings["teacher"] == str((out / "teacher").resolve()) and settings["layer_map"] == [0, 1]
    assert settings["dev"]["n"] == 32 and settings["recipe"]["epochs"] == 1
    assert not (out / api.STATE_SUBDIR).exists()  # state removed once finished
    summary = json.loads((out / "summary.json").read_text())
    assert summary["student"]["accuracy"]["mean"] == settings["dev"]["accuracy"]
    assert summary["student"]["accuracy"]["paired_diff"]["mean"] == pytest.approx(
        settings["dev"]["accuracy"] - settings["teacher_dev"]["accuracy"])

    from cgf_fhe.cli import main

    capsys.readouterr()
    assert main(["evaluate", str(out), "--data-dir", str(mrpc_dir), "--max-eval-samples", "32", "--probe"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 32 and res["softmax"] == "cgf"
    assert res["accuracy"] == pytest.approx(settings["dev"]["accuracy"])  # same score as during training
    assert res["probe"]["cgf"]["accuracy"] == res["accuracy"]
    assert set(res["probe"]) == {"exact", "cgf"} and res["probe"]["exact"]["n"] == 32
    assert main(["evaluate", str(out / "teacher"), "--data-dir", str(mrpc_dir), "--max-eval-samples", "32"]) == 0
    t = json.loads(capsys.readouterr().out)
    assert t["softmax"] == "exact" and t["accuracy"] == pytest.approx(settings["teacher_dev"]["accuracy"])


def test_sweep_with_exact_reference_and_seed_folders(mrpc_dir, tmp_path, capsys):
    from cgf_fhe.cli import main

    out = tmp_path / "sweep"
    rc = main(["sweep", "--model", "tiny", "--coeffs", "0.5", "0.8", "--with-exact", "--seeds", "1", "2",
               "--data-dir", str(mrpc_dir), "--max-train-samples", "16", "--max-eval-samples", "16",
               "--epochs", "1", "--lr", "1e-3", "-o", str(out), *SMALL])
    assert rc == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [(r["softmax"], r["coeff"]) for r in result["rows"]] == [("exact", None), ("cgf", 0.5), ("cgf", 0.8)]
    for c in ("0.5", "0.8"):
        accs = {s: json.loads((out / f"c{c}" / f"seed{s}" / "cgf_fhe.json").read_text())["dev"]["accuracy"]
                for s in (1, 2)}
        refs = {s: json.loads((out / "exact" / f"seed{s}" / "cgf_fhe.json").read_text())["dev"]["accuracy"]
                for s in (1, 2)}
        row = next(r for r in result["rows"] if r["coeff"] == float(c))
        assert row["accuracy"]["mean"] == pytest.approx((accs[1] + accs[2]) / 2)
        assert row["accuracy"]["paired_diff"]["values"] == pytest.approx([accs[s] - refs[s] for s in (1, 2)])
        assert json.loads((out / f"c{c}" / "seed1" / "cgf_fhe.json").read_text())["coeff"] == float(c)
    # evaluate refuses a multi-seed folder with a message naming its seed folders
    rc = main(["evaluate", str(out / "exact"), "--data-dir", str(mrpc_dir)])
    assert rc == 2 and "seed1" in capsys.readouterr().err


def test_polynomial_shallow_student_distill_resume_and_evaluate(mrpc_dir, tmp_path):
    surgery = pytest.importorskip("cgf_fhe.surgery")
    from safetensors.torch import load_file

    opts = api.RunOptions(data_dir=str(mrpc_dir), max_length=64, max_train_samples=32, max_eval_samples=16,
                          progress=False)
    recipe = get_recipe("reference", epochs=2, max_length=64, lr=1e-3)
    fhe = surgery.FheOptions(poly="all", ln="newton")
    kw = dict(coeff=0.5, recipe=recipe, fhe=fhe, student_layers=1, interval_penalty=0.1)
    full = api.distill("tiny", tmp_path / "full", opts=opts, **kw)  # trains the teacher into full/teacher
    teacher = tmp_path / "full" / "teacher"
    st = json.loads((tmp_path / "full" / "cgf_fhe.json").read_text())
    assert st["layer_map"] == [1] and st["student_layers"] == 1 and st["teacher"] == str(teacher.resolve())
    assert st["fhe"]["options"]["poly"] == "all" and st["fhe"]["options"]["ln"] == "newton"
    assert st["reload_max_abs_diff"] <= 1e-5  # the saved checkpoint rebuilds the trained polynomial model
    assert st["interval_report"]["n_seen"] > 0
    assert "train_penalty" in st["history"][0]
    assert full["student"]["accuracy"]["n"] == 1

    # interrupted after epoch 1 (the polynomial settings are kept with the state) + resumed == uninterrupted
    stopped = api.RunOptions(**{**opts.__dict__, "stop_after": 1})
    part = api.distill("tiny", tmp_path / "resumed", teacher=teacher, opts=stopped, **kw)
    assert part == {"status": "partial"}
    assert (tmp_path / "resumed" / api.STATE_SUBDIR / api.FHE_STATE_FILE).is_file()
    api.distill("tiny", tmp_path / "resumed", teacher=teacher, opts=api.RunOptions(**{**opts.__dict__, "resume": True}),
                **kw)
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert _states_equal(a, b)

    res = api.evaluate_checkpoint(tmp_path / "resumed", opts=opts)
    assert res["polynomial"] and res["n"] == 16
    assert res["accuracy"] == pytest.approx(st["dev"]["accuracy"])
    assert res["intervals"]["n_seen"] > 0 and "totals" in res["intervals"]

    # cover: measure in the training form, widen what the data leaves, save next to the weights (unchanged)
    cov = api.cover(tmp_path / "full", tmp_path / "cov", opts)
    c = cov["cover"]
    assert c["source"] == str((tmp_path / "full").resolve()) and c["n_train"] == 32
    assert cov["dev"]["n"] == 16 and c["dev_before"]["accuracy"] == pytest.approx(st["dev"]["accuracy"])
    saved = json.loads((tmp_path / "cov" / "cgf_fhe.json").read_text())
    assert saved["reload_max_abs_diff"] <= 1e-5 and "calibration_cover" in saved["fhe"]
    for key, ch in c["changed"].items():  # every refitted interval covers what was measured
        assert ch["new"][0] <= ch["measured"][0] and ch["new"][1] >= ch["measured"][1], key
        assert saved["fhe"]["modules"][key]["approx"]["a"] == pytest.approx(ch["new"][0]), key
    assert _states_equal(load_file(tmp_path / "full" / "model.safetensors"),
                         load_file(tmp_path / "cov" / "model.safetensors"))
    again = api.cover(tmp_path / "full", tmp_path / "cov", api.RunOptions(**{**opts.__dict__, "resume": True}))
    assert again["cover"] == saved["cover"]  # --resume skips a finished cover of the same source
    with pytest.raises(api.TrainingError, match="not a polynomial student"):
        api.cover(teacher, tmp_path / "x", opts)
    with pytest.raises(api.TrainingError, match="is the input checkpoint"):
        api.cover(tmp_path / "full", tmp_path / "full", opts)


def test_layer_wise_lr_decay_groups_and_schedule():
    from transformers import get_linear_schedule_with_warmup

    model, _ = build_model("tiny", "exact", seed=0)  # 2 encoder layers
    recipe = get_recipe("reference", lr=1e-3, layer_lr_decay=0.5, freeze_embeddings=False, warmup_ratio=0.0)
    named = engine.trainable_parameters(model, recipe.freeze_embeddings)
    opt = engine.build_optimizer(named, recipe, n_layers=2)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    want = {"classifier.weight": 1e-3, "bert.pooler.dense.weight": 1e-3,
            "bert.encoder.layer.1.output.dense.weight": 5e-4, "bert.encoder.layer.0.attention.self.query.bias": 2.5e-4,
            "bert.embeddings.word_embeddings.weight": 1.25e-4, "bert.embeddings.LayerNorm.weight": 1.25e-4}
    params = dict(named)
    for name, lr in want.items():
        assert lr_of[id(params[name])] == pytest.approx(lr), name
    assert wd_of[id(params["bert.encoder.layer.0.attention.self.query.bias"])] == 0.0
    assert wd_of[id(params["bert.encoder.layer.1.output.dense.weight"])] == recipe.weight_decay
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)  # every parameter exactly once
    # the linear schedule scales each group's own base lr: the ratios hold at every step
    sched = get_linear_schedule_with_warmup(opt, 0, 10)
    for _ in range(3):
        opt.step()
        sched.step()
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([1e-3 * 0.7 * f for f in (0.125, 0.25, 0.5, 1.0)])
    # off (1.0): the two groups of the plain recipe, in the order old training states were saved with
    plain = engine.build_optimizer(named, get_recipe("reference", freeze_embeddings=False))
    assert [g["weight_decay"] for g in plain.param_groups] == [0.01, 0.0]
    with pytest.raises(ValueError, match="layer_lr_decay must be in"):
        engine.build_optimizer(named, get_recipe("reference", layer_lr_decay=1.5), n_layers=2)


def test_layer_lr_decay_flag_rejects_out_of_range(mrpc_dir, tmp_path, capsys):
    from cgf_fhe.cli import main

    rc = main(["finetune", "--model", "tiny", "--data-dir", str(mrpc_dir), "--layer-lr-decay", "1.5", "-o",
               str(tmp_path / "x")])
    assert rc == 2
    assert "--layer-lr-decay must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_eval_steps_are_evenly_spaced_and_end_the_epoch():
    assert engine.eval_steps(10, 1) == {10}
    assert engine.eval_steps(10, 4) == {3, 5, 8, 10}
    assert engine.eval_steps(3, 5) == {1, 2, 3}  # more points than batches: one per batch
    with pytest.raises(ValueError, match="evals_per_epoch"):
        engine.eval_steps(10, 0)


def test_mid_epoch_evaluations_select_over_more_points_without_changing_training(tiny_data, tmp_path):
    from torch.utils.data import DataLoader

    tok, train, dev = tiny_data
    runs = {}
    for k in (1, 3):
        # a large learning rate so the tiny model's dev predictions (and accuracy) move from step to step
        recipe = get_recipe("reference", lr=2e-2, epochs=2, batch_size=8, max_length=64, evals_per_epoch=k)
        model, _ = build_model("tiny", "cgf", coeff=0.5, seed=3)  # dropout on: an RNG draw would show
        res = engine.fit(model, engine.CEStep(), train, dev, api.collator(tok), recipe, seed=3,
                         state_dir=tmp_path / f"k{k}", progress=False)
        runs[k] = (model, res, torch.load(tmp_path / f"k{k}" / engine.STATE_FILE, weights_only=True))
    (_, r1, s1), (m3, r3, s3) = runs[1], runs[3]
    # 32 examples / batch 8 = 4 steps per epoch -> mid points after steps 2 and 3 of each epoch
    assert [[m["step"] for m in h["mid_evals"]] for h in r3.history] == [[2, 3], [6, 7]]
    assert [[m["at"] for m in h["mid_evals"]] for h in r3.history] == [[0.5, 0.75], [1.5, 1.75]]
    assert all("mid_evals" not in h for h in r1.history)
    # the mid-epoch points are RNG-neutral: same epoch-end losses, dev scores and last weights
    assert [h["train_loss"] for h in r1.history] == [h["train_loss"] for h in r3.history]
    assert [h["dev"] for h in r1.history] == [h["dev"] for h in r3.history]
    assert _states_equal(s1["model"], s3["model"])
    # selection runs over every point: the first point with the highest accuracy wins, and the kept
    # weights score exactly what it scored
    points = [(m["dev"]["accuracy"], m.get("at", float(h["epoch"]))) for h in r3.history
              for m in [*h["mid_evals"], h]]
    accs = [a for a, _ in points]
    assert len(set(accs)) > 1, points  # the test only means something if the points differ
    assert r3.best_metrics["accuracy"] == max(accs) >= r1.best_metrics["accuracy"]
    best_at = next(at for a, at in points if a == max(accs))
    assert r3.best_at == best_at == s3["best"]["at"]
    assert r3.best_epoch == math.ceil(best_at)
    kept = evaluate_model(m3, DataLoader(dev, batch_size=32, collate_fn=api.collator(tok)))
    assert kept["accuracy"] == r3.best_metrics["accuracy"] and kept["loss"] == pytest.approx(r3.best_metrics["loss"])


def test_evals_per_epoch_flag_runs_and_rejects_zero(mrpc_dir, tmp_path, capsys):
    from cgf_fhe.cli import main

    rc = main(["finetune", "--model", "tiny", "--data-dir", str(mrpc_dir), "--evals-per-epoch", "0", "-o",
               str(tmp_path / "bad")])
    assert rc == 2 and "--evals-per-epoch must be > 0, got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "ok"
    rc = main(["finetune", "--model", "tiny", "--data-dir", str(mrpc_dir), "--max-train-samples", "32",
               "--max-eval-samples", "16", "--epochs", "1", "--batch-size", "8", "--evals-per-epoch", "2",
               *SMALL, "-o", str(out)])
    assert rc == 0
    st = json.loads((out / "cgf_fhe.json").read_text())
    assert st["recipe"]["evals_per_epoch"] == 2
    assert [m["step"] for m in st["history"][0]["mid_evals"]] == [2]  # 4 steps: one mid point after step 2
    assert st["best_at"] in (0.5, 1.0)
    assert f"{out}: dev accuracy" in capsys.readouterr().out


def test_reinit_top_layers_touches_exactly_the_pooler_and_top_layers(mrpc_dir, tmp_path, capsys):
    from cgf_fhe.cli import main
    from cgf_fhe.models import reinit_top_layers

    model, _ = build_model("tiny", "exact", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = reinit_top_layers(model, 1, seed=5)
    assert names == ["encoder.layer.1", "pooler"]  # tiny has 2 layers
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("bert.encoder.layer.1.", "bert.pooler.")) for k in changed)
    assert "bert.encoder.layer.1.attention.self.query.weight" in changed and "bert.pooler.dense.weight" in changed
    w = after["bert.encoder.layer.1.intermediate.dense.weight"]
    assert abs(float(w.std()) - model.config.initializer_range) < 0.1 * model.config.initializer_range
    assert torch.equal(after["bert.encoder.layer.1.output.LayerNorm.weight"],
                       torch.ones_like(after["bert.encoder.layer.1.output.LayerNorm.weight"]))
    again, _ = build_model("tiny", "exact", seed=0)
    reinit_top_layers(again, 1, seed=5)  # same seed -> same weights
    assert _states_equal(again.state_dict(), after)
    with pytest.raises(ValueError, match=r"reinit_layers must be in \[0, 2\]"):
        reinit_top_layers(again, 3)
    rc = main(["finetune", "--model", "tiny", "--data-dir", str(mrpc_dir), "--reinit-layers", "3", *SMALL,
               "--max-train-samples", "16", "--max-eval-samples", "8", "-o", str(tmp_path / "bad")])
    assert rc == 2 and "--reinit-layers: reinit_layers must be in [0, 2]" in capsys.readouterr().err
    rc = main(["finetune", "--model", "tiny", "--data-dir", str(mrpc_dir), "--reinit-layers", "1", "--epochs", "1",
               *SMALL, "--max-train-samples", "16", "--max-eval-samples", "8", "-o", str(tmp_path / "ok")])
    st = json.loads((tmp_path / "ok" / "cgf_fhe.json").read_text())
    assert rc == 0 and st["recipe"]["reinit_layers"] == 1 and st["reinitialized"] == ["encoder.layer.1", "pooler"]


def test_holdout_split_is_stratified_disjoint_and_seed_independent(mrpc_dir):
    from cgf_fhe.data import holdout_split, read_glue_tsv

    ds = read_glue_tsv(mrpc_dir / "train.tsv").select(range(400))
    rest, held = holdout_split(ds, 0.1)
    labels = ds["label"]
    assert len(rest) + len(held) == 400 and set(rest["idx"]).isdisjoint(held["idx"])
    for lab in (0, 1):  # stratified: each label keeps its share (rounded)
        assert held["label"].count(lab) == round(0.1 * labels.count(lab))
    again = holdout_split(ds, 0.1)[1]
    assert again["idx"] == held["idx"]  # deterministic: the same held-out examples for every training seed
    assert holdout_split(ds, 0.1, seed=1)[1]["idx"] != held["idx"]
    with pytest.raises(ValueError, match="holdout fraction"):
        holdout_split(ds, 1.0)


def test_fit_selects_on_the_select_set_not_on_dev(tiny_data, tmp_path):
    tok, train, dev = tiny_data
    recipe = get_recipe("reference", lr=2e-2, epochs=2, batch_size=8, max_length=64, evals_per_epoch=3)
    model, _ = build_model("tiny", "cgf", coeff=0.5, seed=3)
    select = train.select(range(16))
    res = engine.fit(model, engine.CEStep(), train, dev, api.collator(tok), recipe, seed=3,
                     state_dir=tmp_path / "s", progress=False, select_dataset=select)
    points = [m for h in res.history for m in [*h["mid_evals"], h]]
    sel = [p["select"]["accuracy"] for p in points]
    assert len(set(sel)) > 1 and all("select" in p for p in points)
    best = next(p for p in points if p["select"]["accuracy"] == max(sel))  # first point with the top select acc
    assert res.best_select == best["select"] and res.best_metrics == best["dev"]
    assert res.best_at == best.get("at", float(best.get("epoch", 0)))
    st = torch.load(tmp_path / "s" / engine.STATE_FILE, weights_only=True)
    assert st["best"]["select"] == best["select"]  # a resumed run keeps comparing on the selection set


def test_select_holdout_finetune_records_selection_and_rejects_bad_fraction(mrpc_dir, tmp_path, capsys):
    from cgf_fhe.cli import main

    rc = main(["finetune", "--model", "tiny", "--data-dir", str(mrpc_dir), "--select-holdout", "1.5", "-o",
               str(tmp_path / "bad")])
    assert rc == 2 and "--select-holdout must be in [0, 1)" in capsys.readouterr().err
    out = tmp_path / "ok"
    rc = main(["finetune", "--model", "tiny", "--data-dir", str(mrpc_dir), "--max-train-samples", "40",
               "--max-eval-samples", "16", "--epochs", "1", "--batch-size", "8", "--select-holdout", "0.2",
               *SMALL, "-o", str(out)])
    assert rc == 0
    st = json.loads((out / "cgf_fhe.json").read_text())
    assert st["recipe"]["select_holdout"] == 0.2 and st["selected_on"] == "train-holdout"
    assert st["n_select"] == 8  # 20% of 40, stratified
    assert st["select"] == st["history"][0]["select"] and st["dev"] == st["history"][0]["dev"]
    assert "held-out training examples" in capsys.readouterr().out
