"""benchmarks/make_results.py: the results page computed from a runs folder's JSON files (fake, tiny runs)."""
import json
import re
import statistics
from pathlib import Path

import pytest
from benchlib import load_benchmark

REPO = Path(__file__).resolve().parents[1]


mr = load_benchmark("make_results")

RECIPE = {"name": "minilm", "lr": 1e-4, "epochs": 3, "batch_size": 16, "eval_batch_size": 64,
          "freeze_embeddings": False, "warmup_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0,
          "max_length": 128, "swap_pairs": False, "kd_alpha": 1.0, "kd_beta": 10.0, "kd_temperature": 1.0,
          "kd_ce_weight": 0.0, "poly_dropout": 0.0, "tuned": True, "note": ""}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _ckpt(seed, acc, f1, epochs_acc, spe, kind="finetune", **extra):
    """A cgf_fhe.json as training/api.py writes it (the keys the page reads)."""
    return {"kind": kind, "status": "done", "seed": seed, "softmax": "exact" if kind == "finetune" else "cgf",
            "coeff": None if kind == "finetune" else 0.5, "recipe": RECIPE,
            "data": {"data_dir": None, "max_length": 128, "max_train_samples": None, "max_eval_samples": None},
            "dev": {"accuracy": acc, "f1": f1, "n": 408, "loss": 0.5, "n_nonfinite": 0},
            "best_epoch": epochs_acc.index(max(epochs_acc)) + 1, "seconds_per_epoch": spe,
            "history": [{"epoch": i + 1, "dev": {"accuracy": a, "f1": f1, "n": 408}, "train_seconds": spe - 9,
                         "eval_seconds": 9.0} for i, a in enumerate(epochs_acc)], **extra}


def _sim(backend, preds, labels, ratio=1.5):
    return {"backend": backend, "n_examples": len(preds), "accuracy": 0.5, "f1": 0.5, "plain_accuracy": 0.5,
            "plain_f1": 0.5, "agreement": 1.0, "max_logit_error": 1e-5, "mean_logit_error": 1e-6, "refreshes": 3,
            "refresh_label": "client-aided refresh", "refresh_operations": 3, "seconds": 2.0,
            "backend_seconds": ratio, "plain_seconds": 1.0, "seconds_per_example": ratio / len(preds),
            "ratio_to_plain": ratio, "batches": 1, "seq_lens": [32],
            "params": {"poly_modulus": 8192, "coeff_bits": [60, 40, 40, 60], "scale_bits": 40, "log_q": 200,
                       "level_budget": 2, "slots": 4096, "security": "128-bit (HE standard)"},
            "level_budget": 2, "total_depth": 41, "error_per_layer": [
                {"layer": "input", "value": "embeddings", "max_abs_error": 1e-8, "mean_abs_error": 1e-9},
                {"layer": 0, "value": "add_1", "max_abs_error": 1e-5, "mean_abs_error": 1e-6}],
            "n_level_mismatches": 0, "diagnostics": {"min_headroom_bits": 5.0, "overflows": 0,
                                                     "bootstrap_out_of_range": 0},
            "config": {"on_overflow": "raise"}, "max_length": 32,
            "labels": labels, "predictions": preds, "plain_predictions": preds}


@pytest.fixture()
def fake_runs(tmp_path):
    R = tmp_path / "R"
    teacher = {42: (0.8186, 0.8771, [0.72, 0.80, 0.8186], 300.0), 7: (0.7990, 0.8551, [0.71, 0.7990, 0.79], 270.0),
               123: (0.8113, 0.8697, [0.8113, 0.80, 0.79], 265.0)}
    for s, (a, f, h, spe) in teacher.items():
        _write(R / "minilm" / "teacher" / f"seed{s}" / "cgf_fhe.json", _ckpt(s, a, f, h, spe))
    # CGF+KD: seed 42 carries teacher_dev (what distill measured), seed 7 does not (paired with the teacher ckpt)
    kd = {42: (0.8100, 0.8700, {"accuracy": 0.8150, "f1": 0.8750, "n": 408}), 7: (0.7800, 0.8400, None)}
    for s, (a, f, td) in kd.items():
        extra = {"teacher_dev": td} if td else {}
        _write(R / "minilm" / "cgf-kd" / f"seed{s}" / "cgf_fhe.json",
               _ckpt(s, a, f, [a - 0.01, a], 280.0, kind="distill", kd={"beta": 10.0, "ce_weight": 0.0}, **extra))
    _write(R / "minilm" / "poly2-newton" / "seed42" / "cgf_fhe.json",
           _ckpt(42, 0.7010, 0.8039, [0.7010, 0.69], 280.0, kind="distill", teacher_dev=teacher_dev(teacher, 42),
                 fhe={"depth": {"per_layer": [42, 36], "head": 6, "total": 84}},
                 fhe_options={"ln": "newton", "exp_degree": 15, "gelu_degree": 63, "tanh_degree": 15},
                 interval_report={"frac_out": 4e-5, "n_out": 4, "n_seen": 100000}, layer_map=[2, 5]))
    labels = [0, 1, 1, 0, 1, 1, 0, 1, 1, 0]
    emu = [0, 1, 1, 0, 1, 1, 0, 1, 0, 0]
    ten = [0, 1, 1, 0, 1, 0, 0, 1]  # 8 examples; differs from emulate at index 5 -> 7/8 agree
    _write(R / "narrow" / "emulate" / "simulation.json", _sim("emulate", emu, labels))
    _write(R / "narrow" / "tenseal" / "simulation.json", _sim("tenseal", ten, labels[:8], ratio=900.0))
    _write(R / "minilm" / "emulate-poly2" / "simulation.json", _sim("emulate", emu, labels, ratio=1.5))
    _write(R / "minilm" / "report-poly6-L9" / "report.json", "{not json")  # corrupt
    for s, step in ((42, 73), (7, 91)):  # two seeds stopped at a non-finite loss (engine.TrainingDiverged)
        _write(R / "minilm" / "poly6-frozen-ecover-heads-clr" / f"seed{s}" / "train_state" / "diverged.json",
               {"epoch": 1, "step": step, "at": round(step / 230, 4), "loss": "nan", "blend": step / 115,
                "parts": {"kl": 0.25, "hidden": "nan"}, "mean_loss_before": 1e4,
                "history": [{"epoch": 1, "mid_evals": [{"at": 0.2522, "step": 58,
                                                        "dev": {"accuracy": 0.3162, "f1": 0.0, "n": 408}}]}]})
    return R, teacher, kd


def teacher_dev(teacher, s):
    a, f, _, _ = teacher[s]
    return {"accuracy": a, "f1": f, "n": 408}


def test_page_numbers(fake_runs, tmp_path):
    R, teacher, kd = fake_runs
    out = tmp_path / "docs" / "results.md"
    empty = tmp_path / "no_calibration"
    empty.mkdir()
    assert mr.main([str(R), "-o", str(out), "--calibration-dir", str(empty)]) == 0
    md = out.read_text()

    # teacher: mean +- sample std over the 3 seeds, computed here independently
    accs = [v[0] for v in teacher.values()]
    f1s = [v[1] for v in teacher.values()]
    acc_ms = f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}"
    assert acc_ms in md
    assert f"{statistics.mean(f1s):.4f} ± {statistics.stdev(f1s):.4f}" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| MiniLM teacher"))
    assert acc_ms in row and "NOT met" in row  # 0.8096 < 0.84

    # CGF+KD paired difference: seed 42 against its teacher_dev, seed 7 against the teacher checkpoint
    diffs = [kd[42][0] - kd[42][2]["accuracy"], kd[7][0] - teacher[7][0]]
    want = f"{100 * statistics.mean(diffs):+.2f} ± {100 * statistics.stdev(diffs):.2f} pp"
    assert want in md
    assert "seeds 42, 7 (missing 123)" in md
    kd_row = next(ln for ln in md.splitlines() if ln.startswith("| CGF + KD"))
    assert want in kd_row and "not evaluable: 2 of 3 seeds" in kd_row

    # single-seed polynomial student: difference without a std, depth in the table and the plot
    assert f"{100 * (0.7010 - teacher[42][0]):+.2f} pp (n = 1, no std)" in md
    img = out.parent / "img" / "accuracy_vs_depth.png"
    assert img.is_file() and img.stat().st_size > 1000
    assert "](img/accuracy_vs_depth.png)" in md

    # TenSEAL vs emulate agreement over the examples both ran (first 8)
    assert "87.50% (7/8)" in md
    ag_row = next(ln for ln in md.splitlines() if ln.startswith("| TenSEAL vs emulate"))
    assert "NOT met" in ag_row

    # emulate ratio target from the numbers; its error-per-layer plot regenerated from the JSON
    em_row = next(ln for ln in md.splitlines() if ln.startswith("| emulated wall time vs plain, `poly2`"))
    assert "1.50x" in em_row and "| met |" in em_row
    assert (out.parent / "img" / "minilm_poly2_emulate_error_per_layer.png").is_file()

    # missing files -> "not run: <command>" (the command with this R); corrupt file -> reported, not a crash
    cmd = mr.commands(str(R))
    for key in ("tests", "poly6-frozen", "narrow", "search/ref-e3", "export/poly6", "report/poly2/14",
                "calibration/emulator_calibration_n8192.json", "depth_table"):
        assert f"not run: `{cmd[key]}`" in md, key
    assert "report-poly6-L9/report.json` is unreadable" in md

    # diverged seeds: where each stopped, its loss parts, the last dev point; NOT met (not "not run")
    assert "| 42 | 73 | 0.3174 | 0.635 | NaN | kl 0.25, hidden NaN | 0.3162 at epoch 0.2522 |" in md
    assert "| 7 | 91 | 0.3957 | 0.791 | NaN |" in md
    fz_row = next(ln for ln in md.splitlines() if ln.startswith("| `poly6-frozen-ecover-heads-clr`"))
    assert "**NOT met**: training diverged (non-finite loss) on seed(s) 42, 7; seeds 123 not run" in fz_row
    fz_target = next(ln for ln in md.splitlines() if ln.startswith("| polynomial, 6 layers, frozen LayerNorm (annealed"))
    assert "poly6-frozen-ecover-heads-clr/seed*/train_state/diverged.json" in fz_target
    assert f"not run: `{cmd['report/poly6/9']}`" in md
    assert not re.search(r"\bnan\b", md)


def test_empty_runs_folder(tmp_path):
    R = tmp_path / "R"
    R.mkdir()
    out = tmp_path / "page.md"
    text = mr.build(R, out, calib_dir=tmp_path / "none")
    assert text.count("not run: `") >= 20
    assert "not run: `python -m pytest -q tests`" in text
    (R / "tests.txt").write_text("........\n3 passed, 1 skipped in 1.20s\nwall seconds: 2.50\n")
    text = mr.build(R, out, calib_dir=tmp_path / "none")
    assert "3 passed, 1 skipped in 1.20s; 2.5 s wall" in text
    assert "No accuracy-vs-depth plot" in text
    assert "| met |" not in text


def test_run_all_runs_every_command():
    """Each command the page prints is a command run_all.sh runs (with R = "$R")."""
    sh = (REPO / "benchmarks" / "run_all.sh").read_text()
    flat = re.sub(r"\s+", " ", sh.replace("\\\n", " ").replace('"', ""))
    assert "python benchmarks/make_results.py $R -o docs/results.md" in flat
    for key, c in mr.commands("$R").items():
        part, _, target = c.partition(" > ")
        assert part in flat, f"{key}: {part}"
        if target:
            assert target in flat, f"{key}: {target}"


def test_page_commands_parse_with_the_real_cli():
    """Every cgf-fhe command the page prints (and run_all.sh runs) is accepted by the real argument parser."""
    import shlex

    from cgf_fhe.cli import build_parser

    parser = build_parser()
    n = 0
    for key, c in mr.commands("runs").items():
        if not c.startswith("cgf-fhe "):
            continue
        argv = shlex.split(c.partition(" > ")[0])[1:]
        args = parser.parse_args(argv)  # SystemExit on an unknown flag or a bad value
        assert callable(args.func), key
        n += 1
    assert n >= 20


def test_mid_epoch_points_and_epoch_end_selection(fake_runs, tmp_path):
    R, teacher, _ = fake_runs
    st = _ckpt(42, 0.8112, 0.8700, [0.7900, 0.8000], 900.0, kind="distill", teacher_dev=teacher_dev(teacher, 42),
               best_at=1.5, kd={"beta": 10.0, "ce_weight": 0.0})
    st["best_epoch"] = 2
    st["recipe"] = {**RECIPE, "evals_per_epoch": 2, "epochs": 2}
    st["history"][0]["mid_evals"] = [{"at": 0.5, "step": 115, "dev": {"accuracy": 0.7750}}]
    st["history"][1]["mid_evals"] = [{"at": 1.5, "step": 345, "dev": {"accuracy": 0.8112}}]
    _write(R / "minilm" / "poly6-newton-ecover-e4" / "seed42" / "cgf_fhe.json", st)
    out = tmp_path / "page" / "results.md"
    empty = tmp_path / "no_calibration"
    empty.mkdir()
    assert mr.main([str(R), "-o", str(out), "--calibration-dir", str(empty)]) == 0
    md = out.read_text()
    assert "0.5: 0.7750, 1: 0.7900, 1.5: 0.8112, 2: 0.8000" in md
    # best 0.8112 mid-epoch; the epoch ends alone give 0.8000, i.e. 0.8000 - 0.8186 against the teacher
    assert f"best at 1.5 (mid-epoch); selecting among epoch ends only would give 0.8000 ({100 * (0.8 - 0.8186):+.2f} pp)" in md
    assert "2 dev evaluations per epoch" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| 42 | 0.8112 |"))
    assert "1.5 (mid-epoch)" in row and f"{100 * (0.8112 - 0.8186):+.2f}" in row


def test_confirmation_on_fresh_seeds_is_pooled_with_the_original(fake_runs, tmp_path):
    """The fresh-seed rerun of a chosen student pairs with the fresh teachers (by teacher_dev, else the fresh
    teacher checkpoint of that seed) and its paired differences are pooled with the original's six-way."""
    R, teacher, _ = fake_runs
    fresh_t = {1: (0.8100, 0.8700, [0.80, 0.8100], 280.0), 2: (0.8050, 0.8650, [0.8050, 0.79], 280.0),
               3: (0.8200, 0.8800, [0.81, 0.8200], 280.0)}
    for s, (a, f, h, spe) in fresh_t.items():
        _write(R / "minilm" / "teacher-fresh" / f"seed{s}" / "cgf_fhe.json", _ckpt(s, a, f, h, spe))
    orig = {42: 0.7941, 7: 0.7990, 123: 0.8113}
    fresh = {1: 0.8050, 2: 0.7900, 3: 0.8230}
    for folder, accs, tdev in (("poly6-newton-ecover-heads-clr", orig, lambda s: teacher_dev(teacher, s)),
                               ("poly6-newton-ecover-heads-clr-fresh", fresh,
                                lambda s: None if s == 2 else teacher_dev(fresh_t, s))):
        for s, a in accs.items():
            extra = {"teacher_dev": tdev(s)} if tdev(s) else {}
            _write(R / "minilm" / folder / f"seed{s}" / "cgf_fhe.json",
                   _ckpt(s, a, 0.86, [a - 0.01, a], 900.0, kind="distill", **extra))
    out = tmp_path / "results.md"
    mr.build(R, out, calib_dir=tmp_path / "none")
    md = out.read_text()
    assert "### Fresh teacher seeds" in md and "Seeds: 1, 2, 3. Recorded" in md
    d_orig = [100 * (orig[s] - teacher[s][0]) for s in orig]
    d_fresh = [100 * (fresh[s] - fresh_t[s][0]) for s in fresh]  # seed 2: the fresh teacher checkpoint
    fresh_row = next(ln for ln in md.splitlines() if ln.startswith("| confirmation on fresh seeds")
                     and "pooled" not in ln)
    assert f"{statistics.mean(d_fresh):+.2f} ± {statistics.stdev(d_fresh):.2f} pp, 3 seeds" in fresh_row
    assert "| met |" in fresh_row  # -0.17 pp
    both = d_orig + d_fresh
    m, sd = statistics.mean(both), statistics.stdev(both)
    pooled_row = next(ln for ln in md.splitlines() if ln.startswith("| confirmation on fresh seeds")
                      and "pooled with `poly6-newton-ecover-heads-clr`" in ln)
    assert f"{m:+.2f} ± {sd:.2f} pp, 6 seeds (42 7 123 1 2 3)" in pooled_row
    assert ("| met |" in pooled_row) == (m >= -1.0)
    line = next(ln for ln in md.splitlines() if ln.startswith("Pooled with `poly6-newton-ecover-heads-clr`"))
    within = sum(d >= -1.0 for d in both)
    assert f"{within} of 6 seeds within 1 pp" in line
    assert f"standard error {sd / 6 ** 0.5:.2f} pp" in line
    img = tmp_path / "img" / "paired_differences.png"
    assert img.is_file() and img.stat().st_size > 1000 and "](img/paired_differences.png)" in md
    pytest.importorskip("scipy")
    h = 2.5706 * sd / 6 ** 0.5  # t quantile 0.975, 5 degrees of freedom
    assert f"[{m - h:+.2f}, {m + h:+.2f}] pp" in line


def test_partly_finished_partly_nan_seed_set_says_diverged(fake_runs, tmp_path):
    """One seed finished, one stopped at a NaN loss (diverged.json), one not run: the status names the diverged
    seed and the missing one instead of only "not evaluable"."""
    R, teacher, _ = fake_runs
    folder = R / "minilm" / "poly6-frozenattn-ecover-heads-clr"
    _write(folder / "seed42" / "cgf_fhe.json",
           _ckpt(42, 0.80, 0.86, [0.79, 0.80], 900.0, kind="distill", teacher_dev=teacher_dev(teacher, 42)))
    _write(folder / "seed7" / "train_state" / "diverged.json",
           {"epoch": 1, "step": 12, "at": 0.05, "loss": "nan", "blend": 1.0, "parts": {"kl": "nan"}, "history": []})
    out = tmp_path / "results.md"
    mr.build(R, out, calib_dir=tmp_path / "none")
    row = next(ln for ln in out.read_text().splitlines()
               if ln.startswith("| `poly6-frozenattn-ecover-heads-clr`"))
    assert "**NOT met** on the seeds run: training diverged (seed 7); seeds 123 not run" in row
