"""Polynomial-student distillation: guard + frozen-LN blend schedule, exported-form metrics, reload, resume."""
import json

import pytest
import torch

from cgf_fhe import poly as P
from cgf_fhe import surgery
from cgf_fhe.models import build_model, load_checkpoint
from cgf_fhe.training import api, engine
from cgf_fhe.training.engine import CEStep
from cgf_fhe.training.poly_train import StudentSchedule
from cgf_fhe.training.recipes import get_recipe


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the 2 shared cores are usually busy: 2 intra-op threads then run ~10-30x slower than 1 (spin contention)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _modules(model):
    return [m for _, m in surgery.named_approx_modules(model)]


def _interrupt_resume_matches(root, name: str, full: str, stop_after: int, opts, kw, st: dict) -> None:
    """Distill into ``root/name`` stopped after ``stop_after`` epochs, resume it: same weights, dev metrics and
    polynomials as the uninterrupted run ``root/full`` (whose settings are ``st``)."""
    from safetensors.torch import load_file

    api.distill("tiny", root / name, opts=api.RunOptions(**{**opts.__dict__, "stop_after": stop_after}), **kw)
    api.distill("tiny", root / name, opts=api.RunOptions(**{**opts.__dict__, "resume": True}), **kw)
    a, b = load_file(root / full / "model.safetensors"), load_file(root / name / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rs = json.loads((root / name / "cgf_fhe.json").read_text())
    assert rs["dev"] == st["dev"] and rs["fhe"]["modules"] == st["fhe"]["modules"]


def test_blend_schedule_values():
    s = StudentSchedule(guard=True, blend_epochs=1.5, frozen=True)
    # 4 steps per epoch, ramp over ceil(1.5 * 4) = 6 steps: s/6, then exactly 1
    assert [s.blend_at(k, 4) for k in range(8)] == [0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0]
    assert StudentSchedule(blend_epochs=0.0, frozen=True).blend_at(0, 4) == 1.0  # frozen from the start
    assert StudentSchedule(blend_epochs=2.0, frozen=False).blend_at(0, 4) == 1.0  # Newton LN: no blend
    with pytest.raises(ValueError):
        StudentSchedule(blend_epochs=-1, frozen=True)


def test_softmax_blend_mixes_attention_and_ramps_per_step(tiny_setup):
    from cgf_fhe.softmax import set_cgf_blend, set_softmax

    _, _, teacher = tiny_setup
    model, tok, _ = load_checkpoint(teacher, softmax="cgf", coeff=0.5)
    model.eval()
    with torch.no_grad():  # sharper scores than a tiny model's (near-uniform, where CGF ~ softmax)
        model.bert.encoder.layer[0].attention.self.query.weight.mul_(30.0)
    batch = tok(["a first sentence here", "short"], ["its pair", "and another pair"], return_tensors="pt",
                padding=True)

    def attentions(blend=None, softmax="cgf"):
        set_softmax(model, softmax)
        if blend is not None:
            set_cgf_blend(model, blend)
        with torch.no_grad():
            return model(**batch, output_attentions=True).attentions[0]

    exact, cgf = attentions(softmax="exact"), attentions(1.0)
    assert not torch.allclose(exact, cgf, atol=1e-3)
    assert torch.allclose(attentions(0.0), exact, atol=1e-6)  # blend 0: the teacher's softmax rows
    assert torch.allclose(attentions(0.3), 0.3 * cgf + 0.7 * exact, atol=1e-6)  # layer 0 sees the same scores
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        set_cgf_blend(model, 1.5)
    # the schedule: 4 steps per epoch, ramp over ceil(0.5 * 4) = 2 steps; eligible only at blend 1; exported form 1
    sched = StudentSchedule(guard=False, softmax_blend_epochs=0.5)
    assert [sched.softmax_blend_at(k, 4) for k in range(4)] == [0.0, 0.5, 1.0, 1.0]
    sched.on_step(model, 1, 4)
    mods = [layer.attention.self for layer in model.bert.encoder.layer]
    assert all(m.cgf_blend == 0.5 for m in mods)
    assert sched.epoch_info(model, lambda: None, diagnostics=False)["eligible"] is False
    with sched.exported_form(model):
        assert all(m.cgf_blend == 1.0 for m in mods)
    assert all(m.cgf_blend == 0.5 for m in mods)  # training form restored
    assert sched.to_dict()["softmax_blend_epochs"] == 0.5
    assert "softmax_blend_epochs" not in StudentSchedule().to_dict()  # older runs' settings compare unchanged
    sched.on_step(model, 2, 4)
    assert sched.epoch_info(model, lambda: None, diagnostics=False)["eligible"] is True
    sched.finish(model)
    assert all(m.cgf_blend == 1.0 for m in mods)


def test_distill_with_softmax_blend_selects_only_cgf_points(tiny_setup):
    root, opts, teacher = tiny_setup
    recipe = get_recipe("reference", epochs=2, evals_per_epoch=2, max_length=64, lr=1e-3, softmax_blend_epochs=1.0)
    st = api.distill("tiny", root / "sblend", teacher=teacher, recipe=recipe, opts=opts)
    run = json.loads((root / "sblend" / "cgf_fhe.json").read_text())  # one seed: the folder is the checkpoint
    points = [m for h in run["history"] for m in [*h.get("mid_evals", []), h]]
    assert [p["softmax_blend"] for p in points] == [0.0, 0.5, 1.0, 1.0]  # the blend of each point's last step
    assert [p["eligible"] for p in points] == [False, False, True, True]
    assert run["best_at"] >= 1.5 and run["poly_training"]["softmax_blend_epochs"] == 1.0
    assert st["student"]["accuracy"]["mean"] == run["dev"]["accuracy"]
    model, _, _ = load_checkpoint(root / "sblend")
    assert all(getattr(layer.attention.self, "cgf_blend", 1.0) == 1.0 for layer in model.bert.encoder.layer)
    with pytest.raises(api.TrainingError, match="must be >= 0 and < --epochs 2"):
        api.distill("tiny", root / "sblend-bad", teacher=teacher, opts=opts,
                    recipe=get_recipe("reference", epochs=2, max_length=64, softmax_blend_epochs=2.0))


@pytest.fixture(scope="module")
def tiny_setup(mrpc_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("polyd")
    opts = api.RunOptions(data_dir=str(mrpc_dir), max_length=64, max_train_samples=32, max_eval_samples=16,
                          progress=False)
    teacher = root / "teacher"
    api.finetune("tiny", teacher, "exact", None, 42, get_recipe("reference", epochs=1, max_length=64, lr=1e-3), opts)
    return root, opts, teacher


def test_exported_form_switches_guard_and_blend(tiny_setup):
    root, opts, teacher = tiny_setup
    model, tok, _ = load_checkpoint(teacher, softmax="cgf", coeff=0.5)
    train, _ = api.load_data(tok, opts, get_recipe("reference", max_length=64))
    from torch.utils.data import DataLoader

    ranges = surgery.calibrate(model, DataLoader(train, batch_size=16, collate_fn=api.collator(tok)), progress=False)
    surgery.polynomialize(model, surgery.FheOptions(poly="all", ln="frozen"), ranges)
    sched = StudentSchedule(guard=True, blend_epochs=1.0, frozen=True)
    sched.on_step(model, 1, 4)  # blend 1/4
    frozen = [m for m in _modules(model) if isinstance(m, P.FrozenLayerNorm)]
    polys = [m for m in _modules(model) if isinstance(m, P.PolyModule)]
    assert len(frozen) == 4 and polys
    assert all(m.blend == 0.25 for m in frozen) and all(m.guard for m in polys)
    with sched.exported_form(model):
        assert all(m.blend == 1.0 for m in frozen) and not any(m.guard for m in polys)
    assert all(m.blend == 0.25 for m in frozen) and all(m.guard for m in polys)  # training form restored
    sched.finish(model)
    assert all(m.blend == 1.0 for m in frozen) and not any(m.guard for m in polys)


def test_fit_selects_only_eligible_epochs(tiny_setup, mrpc_dir):
    _, opts, _ = tiny_setup
    model, tok = build_model("tiny", "cgf", coeff=0.5, seed=0)
    train, dev = api.load_data(tok, opts, get_recipe("reference", max_length=64))

    class OnlySecond(engine.Schedule):
        def __init__(self):
            self.epoch = 0

        def on_step(self, model, step, steps_per_epoch):
            self.epoch = step // steps_per_epoch + 1

        def exported_form(self, model):
            from contextlib import nullcontext
            return nullcontext()

        def epoch_info(self, model, evaluate, diagnostics=True):
            return {"eligible": self.epoch == 2}

    recipe = get_recipe("reference", epochs=3, max_length=64, lr=1e-3)
    res = engine.fit(model, CEStep(), train, dev, api.collator(tok), recipe, seed=0, progress=False,
                     schedule=OnlySecond())
    assert [h["eligible"] for h in res.history] == [False, True, False]
    assert res.best_epoch == 2 and res.best_metrics == res.history[1]["dev"]


def test_frozen_blend_distill_metrics_reload_resume(tiny_setup, mrpc_dir, capsys):
    root, opts, teacher = tiny_setup
    recipe = get_recipe("reference", epochs=3, max_length=64, lr=1e-3)
    kw = dict(teacher=teacher, coeff=0.5, recipe=recipe, fhe=surgery.FheOptions(poly="all", ln="frozen"),
              blend_epochs=1.5, refit=True)
    api.distill("tiny", root / "full", opts=opts, **kw)
    st = json.loads((root / "full" / "cgf_fhe.json").read_text())
    h = st["history"]
    assert st["poly_training"] == {"guard": True, "blend_epochs": 1.5, "refit": True}
    # 32 examples / batch 16 = 2 steps per epoch; ramp over ceil(1.5 * 2) = 3 steps: blend 0, 1/3, 2/3, 1, 1, 1
    assert [x["blend"] for x in h] == [pytest.approx(1 / 3), 1.0, 1.0]
    assert [x["eligible"] for x in h] == [False, True, True] and [x["refitted"] for x in h] == [False, True, True]
    assert st["best_epoch"] in (2, 3) and st["dev"] == h[st["best_epoch"] - 1]["dev"]
    assert st["dev"]["accuracy"] == max(x["dev"]["accuracy"] for x in h[1:])
    # epoch 1's dev metrics were measured at blend 1 / guard off, not in the training form (blend 1/3)
    assert h[0]["dev"]["loss"] != pytest.approx(h[0]["dev_training_form"]["loss"], rel=1e-6)
    assert st["dev_final"] == st["dev"] and st["dev"]["n_nonfinite"] == 0
    assert st["reload_max_abs_diff"] <= 1e-5
    assert st["interval_report"]["n_seen"] > 0 and st["interval_report_train"]["n_seen"] > 0
    assert len(st["calibration_trained"]["layers"]) == 2 and st["calibration_trained"]["n_examples"] == 32
    # refit at the first step with blend 1: the saved GELU intervals are the re-measured ranges widened
    fhe = st["fhe"]
    assert fhe["refit_step"] == 3
    margin = fhe["options"]["margin"]
    for i in range(2):
        want = surgery.widen(fhe["calibration_refit"]["layers"][i]["gelu"], margin)
        old = surgery.widen(fhe["calibration"]["layers"][i]["gelu"], margin)
        got = (fhe["modules"][f"layers.{i}.gelu"]["approx"]["a"], fhe["modules"][f"layers.{i}.gelu"]["approx"]["b"])
        assert got == pytest.approx(want) and got != pytest.approx(old)

    # the reloaded checkpoint is the exported form and scores exactly the stored dev metrics
    model, _, _ = load_checkpoint(root / "full")
    mods = _modules(model)
    assert mods and not any(getattr(m, "guard", False) for m in mods)
    assert all(m.blend == 1.0 for m in mods if isinstance(m, P.FrozenLayerNorm))
    from cgf_fhe.cli import main

    capsys.readouterr()
    assert main(["evaluate", str(root / "full"), "--data-dir", str(mrpc_dir), "--max-eval-samples", "16"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accuracy"] == st["dev"]["accuracy"] and res["f1"] == st["dev"]["f1"]
    assert res["loss"] == pytest.approx(st["dev"]["loss"], rel=1e-5, abs=1e-6)
    assert res["intervals"]["n_out"] == st["interval_report"]["n_out"]

    # interrupted after epoch 2 (the refit happened mid-epoch 2: restored from the training state) and
    # resumed == uninterrupted
    _interrupt_resume_matches(root, "resumed", "full", 2, opts, kw, st)

    # a different blend schedule is a different run: resume refuses it
    with pytest.raises(api.TrainingError, match="poly_training"):
        api.distill("tiny", root / "resumed", opts=api.RunOptions(**{**opts.__dict__, "resume": True}),
                    **{**kw, "blend_epochs": 0.0})


def test_cli_rejects_bad_blend_flags(tiny_setup, capsys):
    from cgf_fhe.cli import main

    root, _, teacher = tiny_setup
    base = ["distill", "--teacher", str(teacher), "-o", str(root / "bad"), "--epochs", "2", "--no-progress"]
    assert main([*base, "--poly", "all", "--ln", "newton", "--blend-epochs", "1"]) == 2
    assert "--ln frozen" in capsys.readouterr().err
    assert main([*base, "--poly", "all", "--ln", "frozen", "--blend-epochs", "2"]) == 2
    assert "< --epochs 2" in capsys.readouterr().err
    assert main([*base, "--no-guard"]) == 2
    assert "--poly all" in capsys.readouterr().err


def test_diverged_seed_is_recorded_and_the_other_seeds_finish(tiny_setup, monkeypatch, capsys):
    """A non-finite loss stops that seed's training with a message naming seed, step and loss parts, writes
    train_state/diverged.json (where, the blend, the epochs it finished), lets the other seeds of the set run,
    and the command fails at the end (rc 2) with a summary.json that says which seeds diverged."""
    from cgf_fhe.cli import main
    from cgf_fhe.training import engine

    root, _, teacher = tiny_setup
    calls = {"n": 0}
    real = engine.KDStep.__call__

    def poisoned(self, model, batch):  # the third optimizer step overall (seed 1's first of epoch 2) is NaN
        loss, parts = real(self, model, batch)
        calls["n"] += 1
        if calls["n"] == 3:
            return loss * float("nan"), {**parts, "hidden": float("nan")}
        return loss, parts

    monkeypatch.setattr(engine.KDStep, "__call__", poisoned)
    out = root / "diverge"
    rc = main(["distill", "--teacher", str(teacher), "--poly", "all", "--ln", "frozen", "--blend-epochs", "1.5",
               "--epochs", "2", "--seeds", "1", "2", "-o", str(out), "--no-progress", "--data-dir",
               str(tiny_setup[1].data_dir), "--max-length", "64", "--max-train-samples", "32",
               "--max-eval-samples", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "seed(s) 1 " in err and "step 3 (epoch 1.5, blend 0.667)" in err and "nan" in err
    rec = json.loads((out / "seed1" / "train_state" / "diverged.json").read_text())
    assert (rec["epoch"], rec["step"], rec["at"]) == (2, 3, 1.5) and rec["parts"]["hidden"] == "nan"
    assert rec["blend"] == pytest.approx(2 / 3) and rec["mean_loss_before"] is None
    assert [h["epoch"] for h in rec["history"]] == [1] and "accuracy" in rec["history"][0]["dev"]
    assert not (out / "seed1" / "cgf_fhe.json").exists()
    assert json.loads((out / "seed2" / "cgf_fhe.json").read_text())["status"] == "done"  # seed 2 finished
    summ = json.loads((out / "summary.json").read_text())
    assert summ["status"] == "diverged" and summ["finished_seeds"] == [2] and summ["diverged"]["1"]["step"] == 3


def _tiny_poly(tiny_setup, margin=0.0, calib_examples=16):
    """The tiny teacher as a Newton-LN polynomial CGF student calibrated on the first ``calib_examples``
    training examples only (margin 0), so the rest of the training data leaves some intervals."""
    from torch.utils.data import DataLoader, Subset

    root, opts, teacher = tiny_setup
    model, tok, _ = load_checkpoint(teacher, softmax="cgf", coeff=0.5)
    train, _ = api.load_data(tok, opts, get_recipe("reference", max_length=64))
    collate = api.collator(tok)
    part = DataLoader(Subset(train, range(calib_examples)), batch_size=16, collate_fn=collate)
    ranges = surgery.calibrate(model, part, progress=False)
    surgery.polynomialize(model, surgery.FheOptions(poly="all", ln="newton", margin=margin), ranges)
    return model, DataLoader(train, batch_size=16, collate_fn=collate)


def test_tracked_ranges_equal_a_calibration_pass_and_cover_widens_exactly_those_ops(tiny_setup):
    model, loader = _tiny_poly(tiny_setup)
    surgery.set_guard(model, True)  # the training form
    full = surgery.calibrate(model, loader, progress=False)  # pre-clamp inputs over all 32 examples
    surgery.set_guard(model, True)
    surgery.reset_interval_counters(model)
    with torch.no_grad():
        for batch in loader:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    tracked = surgery.tracked_ranges(model)
    outside = set()
    for key, m in surgery.named_approx_modules(model):
        lo, hi = m.interval
        want = surgery._range(full, key)
        got = surgery._range(tracked, key)
        assert got["min"] == pytest.approx(min(lo, want["min"]), rel=1e-6, abs=1e-9), key
        assert got["max"] == pytest.approx(max(hi, want["max"]), rel=1e-6, abs=1e-9), key
        if want["min"] < lo or want["max"] > hi:
            outside.add(key)
    assert outside, "calibrating on 16 of 32 examples with margin 0 should leave some interval"
    before = {k: (m.interval, m.to_settings()) for k, m in surgery.named_approx_modules(model)}
    changed = surgery.cover_ranges(model, tracked)
    assert set(changed) == outside
    for key, m in surgery.named_approx_modules(model):
        if key in outside:
            lo, hi = m.interval
            st = surgery._range(full, key)
            tol = 1e-6 * max(1.0, abs(lo), abs(hi))  # float32 inputs vs float64 statistics
            assert lo <= st["min"] + tol and st["max"] <= hi + tol and (lo, hi) != before[key][0]
        else:
            assert m.to_settings() == before[key][1]  # untouched ops keep their polynomial (same function)


def test_epoch_cover_keeps_the_best_epochs_polynomials(tiny_setup):
    model, _ = _tiny_poly(tiny_setup)
    sched = StudentSchedule(guard=True, epoch_cover=True)
    sched.on_best(model)
    best = surgery.fhe_settings(model)["modules"]
    key, m = next((k, m) for k, m in surgery.named_approx_modules(model) if m.kind == "gelu")
    lo = m.interval[0]
    m.n_out, m.n_seen, m.out_min, m.out_max = 1, 10, lo - 5.0, m.interval[1]  # a planted excursion
    sched.on_epoch_end(model)
    assert set(sched.covered) == {key}
    new = dict(surgery.named_approx_modules(model))[key]
    assert new.interval[0] <= lo - 5.0 and new.guard  # widened, and back in the training form
    assert surgery.fhe_settings(model)["modules"] != best
    sched.finish(model)
    assert surgery.fhe_settings(model)["modules"] == best
    assert not any(getattr(x, "guard", False) for x in _modules(model))


def test_distill_with_epoch_cover_records_widened_intervals_and_resumes(tiny_setup, mrpc_dir):
    root, opts, teacher = tiny_setup
    opts = api.RunOptions(**{**opts.__dict__, "calib_batches": 1})  # calibrate on 16 of the 32 examples
    kw = dict(teacher=teacher, coeff=0.5, recipe=get_recipe("reference", epochs=3, max_length=64, lr=1e-3),
              fhe=surgery.FheOptions(poly="all", ln="newton", margin=0.0), epoch_cover=True)
    api.distill("tiny", root / "ecover", opts=opts, **kw)
    st = json.loads((root / "ecover" / "cgf_fhe.json").read_text())
    h = st["history"]
    assert st["poly_training"]["epoch_cover"] is True
    widened = [x["covered"] for x in h]
    assert any(widened)  # the half of the data calibration never saw leaves some interval in epoch 1
    mods = {k: m.interval for k, m in surgery.named_approx_modules(load_checkpoint(root / "ecover")[0])}
    seen: dict = {}
    for x in h[:st["best_epoch"]]:
        for key, c in x["covered"].items():
            assert c["new"][0] <= min(c["old"][0], c["measured"][0]) and c["new"][1] >= max(c["old"][1], c["measured"][1])
            seen[key] = (min(seen.get(key, c["measured"])[0], c["measured"][0]),
                         max(seen.get(key, c["measured"])[1], c["measured"][1]))
    # the saved polynomials are the best epoch's: they cover every range training saw up to it ...
    for key, (lo, hi) in seen.items():
        assert mods[key][0] <= lo and hi <= mods[key][1], key
    # ... and score exactly what that epoch scored
    assert st["dev_final"] == st["dev"] == h[st["best_epoch"] - 1]["dev"]
    assert st["reload_max_abs_diff"] <= 1e-5
    assert [e["widened"] for e in st["fhe"]["epoch_cover"]] == [sorted(w) for w in widened]

    # interrupted after epoch 1 and resumed == uninterrupted (the covered polynomials are in the state)
    _interrupt_resume_matches(root, "ecover-r", "ecover", 1, opts, kw, st)
    # a finished run is skipped by --resume with the same settings (a fresh FheOptions holds tuples, the
    # saved settings lists) and its files stay as they are
    before = (root / "ecover" / "model.safetensors").stat().st_mtime_ns
    again = api.distill("tiny", root / "ecover", opts=api.RunOptions(**{**opts.__dict__, "resume": True}), **kw)
    assert again.get("status") != "partial" and again["seeds"] == [42]
    assert (root / "ecover" / "model.safetensors").stat().st_mtime_ns == before



def test_tracked_ranges_skip_non_finite_inputs(tiny_setup):
    model, _ = _tiny_poly(tiny_setup)
    key, m = next((k, m) for k, m in surgery.named_approx_modules(model) if m.kind == "gelu")
    lo, hi = m.interval
    m.reset_counters()
    m(torch.tensor([lo - 2.0, hi + 3.0, float("nan"), float("inf"), -float("inf"), 0.5 * (lo + hi)]))
    assert m.n_out == 5 and m.n_seen == 6  # NaN and +-inf count as outside ...
    st = surgery._range(surgery.tracked_ranges(model), key)
    assert (st["min"], st["max"]) == pytest.approx((lo - 2.0, hi + 3.0))  # ... but only finite values widen


def test_mid_epoch_cover_counts_afresh_after_each_point(tiny_setup):
    model, _ = _tiny_poly(tiny_setup)
    sched = StudentSchedule(guard=True, epoch_cover=True)
    key, m = next((k, m) for k, m in surgery.named_approx_modules(model) if m.kind == "gelu")
    m.n_out, m.n_seen, m.out_min, m.out_max = 1, 10, m.interval[0] - 5.0, m.interval[1]
    sched.on_epoch_end(model)  # a mid-epoch point covers what the steps before it saw ...
    assert set(sched.covered) == {key}
    m = dict(surgery.named_approx_modules(model))[key]
    m.n_out, m.n_seen = 3, 10  # ... the dev pass after it counts too, but must not reach the next cover
    sched.on_step(model, 5, 4)  # step 5 of 4-step epochs: not an epoch start
    assert (m.n_out, m.n_seen) == (0, 0)
    m.n_out, m.n_seen = 2, 10
    sched.on_step(model, 6, 4)  # no point in between: the counts go on
    assert (m.n_out, m.n_seen) == (2, 10)


def test_distill_with_mid_epoch_points_covers_and_keeps_the_best_point(tiny_setup):
    root, opts, teacher = tiny_setup
    opts = api.RunOptions(**{**opts.__dict__, "calib_batches": 1})
    kw = dict(teacher=teacher, coeff=0.5,
              recipe=get_recipe("reference", epochs=2, max_length=64, lr=1e-3, evals_per_epoch=2),
              fhe=surgery.FheOptions(poly="all", ln="newton", margin=0.0), epoch_cover=True)
    api.distill("tiny", root / "mid", opts=opts, **kw)
    st = json.loads((root / "mid" / "cgf_fhe.json").read_text())
    points = [p for h in st["history"] for p in [*h["mid_evals"], h]]
    assert [p.get("at", p.get("epoch")) for p in points] == [0.5, 1, 1.5, 2]
    assert [e["epoch"] for e in st["fhe"]["epoch_cover"]] == [0.5, 1, 1.5, 2]
    assert [e["widened"] for e in st["fhe"]["epoch_cover"]] == [sorted(p["covered"]) for p in points]
    assert points[0]["covered"]  # 16 calibration examples of 32: the first half-epoch leaves some interval
    # the training-form dev pass (a diagnostic) runs at epoch ends only, not at the mid-epoch points
    assert [("dev_training_form" in p) for p in points] == [False, True, False, True]
    best = next(p for p in points if p["dev"]["accuracy"] == st["dev"]["accuracy"])
    assert st["best_at"] == best.get("at", best.get("epoch"))
    # the saved student is the best point's weights with that point's polynomials: it scores what it scored
    assert st["dev_final"] == st["dev"] == best["dev"]
    mods = {k: m.interval for k, m in surgery.named_approx_modules(load_checkpoint(root / "mid")[0])}
    upto = points[:points.index(best) + 1]
    for p in upto:
        for key, c in p["covered"].items():
            assert mods[key][0] <= c["measured"][0] and c["measured"][1] <= mods[key][1], key


def test_poly_student_starts_from_a_finished_full_width_cgf_student(tiny_setup):
    from safetensors.torch import load_file

    root, opts, teacher = tiny_setup
    opts = api.RunOptions(**{**opts.__dict__, "calib_batches": 1})
    cgf = root / "cgf1"  # stage 1: CGF + KD with exact non-linearities, 1 of the teacher's 2 layers
    api.distill("tiny", cgf, teacher=teacher, coeff=0.5, opts=opts, student_layers=1,
                recipe=get_recipe("reference", epochs=1, max_length=64, lr=1e-3))
    init = json.loads((cgf / "cgf_fhe.json").read_text())
    fhe = surgery.FheOptions(poly="all", ln="newton")
    # stage 2 at lr 0: the polynomial student keeps exactly the stage-1 weights and layer map
    st = api.distill_one("tiny", root / "poly_from_cgf", 42, teacher, 0.5,
                         get_recipe("reference", epochs=1, max_length=64, lr=0.0), opts, fhe=fhe, student_init=cgf)
    assert st["student_init"] == str(cgf.resolve()) and st["student_hidden"] is None
    assert st["student_layers"] == 1 and st["layer_map"] == init["layer_map"] == [1]
    a, b = load_file(cgf / "model.safetensors"), load_file(root / "poly_from_cgf" / "model.safetensors")
    assert set(a) <= set(b) and all(torch.equal(a[k], b[k]) for k in a)
    t = load_file(teacher / "model.safetensors")
    assert any(not torch.equal(a[k], t[k]) for k in a if k in t and t[k].shape == a[k].shape)  # trained in stage 1
    assert json.loads((root / "poly_from_cgf" / "cgf_fhe.json").read_text())["reload_max_abs_diff"] < 1e-5
    # wrong inits are refused with the flag and the cause named
    bad = dict(teacher=teacher, coeff=0.5, recipe=get_recipe("reference", epochs=1, max_length=64), opts=opts,
               fhe=fhe)
    with pytest.raises(api.TrainingError, match="--student-hidden 32: --student-init .* full-width"):
        api.distill_one("tiny", root / "bad", 42, student_init=cgf, student_hidden=32, **bad)
    with pytest.raises(api.TrainingError, match="--student-layers 2 differs from --student-init"):
        api.distill_one("tiny", root / "bad", 42, student_init=cgf, student_layers=2, **bad)
    with pytest.raises(api.TrainingError, match="--student-init .*not a distilled student.*'finetune'"):
        api.distill_one("tiny", root / "bad", 42, student_init=teacher, **bad)
    with pytest.raises(api.TrainingError, match="--student-init .*already polynomial"):
        api.distill_one("tiny", root / "bad", 42, student_init=root / "poly_from_cgf", **bad)
    # a seed-set folder (as written by --seeds) resolves to its seed<S>/ checkpoint, like --teacher
    (root / "cgfset").mkdir()
    (root / "cgfset" / "seed42").symlink_to(cgf, target_is_directory=True)
    assert api._seed_checkpoint(root / "cgfset", 42, "--student-init") == root / "cgfset" / "seed42"
    assert api._seed_checkpoint(cgf, 7, "--student-init") == cgf
    with pytest.raises(api.TrainingError, match=r"--student-init .*cgfset: neither a cgf-fhe checkpoint nor a "
                                                r"folder with seed7/"):
        api.distill_one("tiny", root / "bad", 7, student_init=root / "cgfset", **bad)


def test_polynomial_student_trains_per_head_coefficients_and_keeps_its_best_point(tiny_setup):
    """--poly all with --coeff-per-head --coeff-lr: the polynomial exp sees the trainable coefficients (they move),
    and what is saved (constants, the best point's polynomials) scores exactly what that point scored."""
    from cgf_fhe.softmax import COEFF_PARAM

    root, opts, teacher = tiny_setup
    recipe = get_recipe("reference", epochs=2, max_length=64, lr=1e-3, coeff_per_head=True, coeff_lr=0.5)
    st = api.distill_one("tiny", root / "poly-clr", 42, teacher, 0.5, recipe, opts,
                         fhe=surgery.FheOptions(poly="all", ln="newton"), epoch_cover=True)
    heads = st["coeff_heads"]
    assert heads["trained"] is True and heads["source"] == "calibrated"
    moved = [abs(a - b) for la, lb in zip(heads["coeffs"], heads["start"]) for a, b in zip(la, lb)]
    assert max(moved) > 1e-3, moved  # the polynomial exp passed gradients to the coefficients
    model, _, saved = load_checkpoint(root / "poly-clr")
    assert not any(COEFF_PARAM in k for k in model.state_dict())
    assert model.config.cgf_coeff_heads == heads["coeffs"] == saved["coeff_heads"]["coeffs"]
    assert _modules(model) and all(m.kind != "exp" or m.interval[0] < 0 for m in _modules(model))
    assert st["dev_final"]["accuracy"] == st["dev"]["accuracy"]
    assert saved["reload_max_abs_diff"] <= 1e-5
