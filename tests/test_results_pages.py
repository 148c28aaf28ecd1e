"""docs/results.md and docs/recipes.md are generated from records/ only, byte for byte."""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from benchlib import REPO, load_benchmark

sys.path.insert(0, str(REPO / "benchmarks"))
from pagegen import students  # noqa: E402
from pagegen.build import build  # noqa: E402
from pagegen.records import check_record, load_records  # noqa: E402
from cgf_fhe.errors import DataError  # noqa: E402

RECORDS, DOCS = REPO / "records", REPO / "docs"


@pytest.fixture(scope="module")
def built():
    return build(RECORDS)


def test_pages_regenerate_byte_exact_from_records(built, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no runs folder anywhere near
    texts, _, _, _ = built
    assert set(texts) == {"results.md", "recipes.md"}
    for name, text in texts.items():
        assert (DOCS / name).read_text() == text, f"docs/{name} differs: run python benchmarks/make_results.py"
    mr = load_benchmark("make_results")
    assert mr.main(["--check", "--records", str(RECORDS), "--docs", str(DOCS)]) == 0


def test_a_hand_edit_is_caught(tmp_path, capsys):
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    page = docs / "results.md"
    text = page.read_text()
    assert "-0.98 ± 1.30" in text
    page.write_text(text.replace("-0.98 ± 1.30", "-0.58 ± 1.30", 1))
    mr = load_benchmark("make_results")
    assert mr.main(["--check", "--records", str(RECORDS), "--docs", str(docs)]) == 1
    assert "-0.58 ± 1.30" in capsys.readouterr().out


def test_answer_first(built):
    text = built[0]["results.md"]
    first = text[text.index("## The answer"):text.index("## Targets")]
    for q in ("dev accuracy", "paired difference to the teacher", "depth per encoder layer", "L = 14",
              "emulated CKKS", "real CKKS", "wall times"):
        assert q in first, q
    assert "0.8023 ± 0.0102" in first and "-0.69 ± 1.08 pp" in first and "[-1.83, +0.44]" in first
    assert text.index("## The answer") < text.index("## 1. Training")


def test_every_image_comes_from_records_and_exists(built, tmp_path):
    texts, images, _, _ = built
    refs = {m for t in texts.values() for m in re.findall(r"\]\(img/([^)]+)\)", t)}
    assert refs == set(images)
    assert {p.name for p in (DOCS / "img").glob("*.png")} == refs  # no stale image left behind
    for name in sorted(refs)[:2]:
        draw, args = images[name]
        draw(*args, tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_record_is_on_a_page_and_recovered_ones_say_where_from(built):
    texts, _, used, recs = built
    assert set(recs) - used == set()
    assert len(recs) >= 50
    for rec in recs.values():
        if rec["source"] == "recovered-from-page":
            assert rec["recovered_from"]["commit"] and rec["recovered_from"]["section"]
        n_seal = len(((rec.get("metrics") or {}).get("seal") or {}).get("examples") or [])
        assert len(json.dumps(rec)) < 16_000 + 4_000 * n_seal  # a few KB (and per SEAL example), never checkpoints


def test_paired_differences_use_exact_counts():
    rec = load_records(RECORDS)["cgf-kd"]
    d = students.diffs_pp(rec)
    # 0.7966 / 0.8186 are 325/408 and 334/408: -2.21 pp (not -2.20 from the rounded figures)
    assert round(d[42], 2) == -2.21


def _fake_seed(folder: Path, seed: int, acc: float, teacher: float):
    folder.mkdir(parents=True)
    (folder / "cgf_fhe.json").write_text(json.dumps({
        "status": "done", "seed": seed, "best_epoch": 1, "best_at": 0.5, "seconds_per_epoch": 600.0,
        "dev": {"accuracy": acc, "f1": 0.85, "n": 408, "n_nonfinite": 0},
        "teacher_dev": {"accuracy": teacher, "f1": 0.87},
        "history": [{"epoch": 1, "dev": {"accuracy": acc - 0.01, "f1": 0.84},
                     "mid_evals": [{"at": 0.5, "dev": {"accuracy": acc, "f1": 0.85}}]}],
        "fhe": {"depth": {"total": 250, "per_layer": [40, 40, 40, 40, 40, 40]}},
        "interval_report": {"frac_out": 0.0}}))


def test_record_run_then_page_shows_the_new_student(tmp_path):
    run = tmp_path / "runs" / "lean"
    _fake_seed(run / "seed42", 42, 330 / 408, 334 / 408)
    _fake_seed(run / "seed7", 7, 328 / 408, 328 / 408)
    (run / "seed123" / "train_state").mkdir(parents=True)
    (run / "seed123" / "train_state" / "diverged.json").write_text(json.dumps(
        {"seed": 123, "step": 60, "at": 0.26, "blend": 0.5, "loss": "nan", "parts": {"kl": "nan"}}))
    recs = tmp_path / "records"
    shutil.copytree(RECORDS, recs)
    rr = load_benchmark("record_run")
    assert rr.main(["student", str(run), "--name", "lean", "--command", "cgf-fhe distill ... --seeds 42 7 123 -o runs/lean",
                    "--teacher", "teacher-retrained", "-o", str(recs / "lean.json")]) == 0
    rec = check_record(json.loads((recs / "lean.json").read_text()))
    assert [r["seed"] for r in rec["runs"]] == [42, 7, 123]
    assert rec["runs"][2]["status"] == "diverged" and rec["runs"][0]["depth"]["total"] == 250
    assert rec["packages"]["numpy"] and rec["machine"]["cpus"]
    pages = json.loads((recs / "pages.json").read_text())
    pages["students"].append({"record": "lean", "target_pp": 1.0, "issue": "#3"})
    pages["pages"][1]["sections"][3]["items"].append({"type": "student", "record": "lean"})
    (recs / "pages.json").write_text(json.dumps(pages))
    texts, _, used, _ = build(recs)
    assert "lean" in used
    row = next(ln for ln in texts["results.md"].splitlines() if ln.startswith("| `lean` |"))
    assert "-0.49 (n = 1" not in row and "-0.49 ± 0.69" in row  # (-0.98 + 0.00) / 2, sample std 0.69
    assert "diverged on seed(s) 123" in row
    assert "### `lean`" in texts["recipes.md"]


def test_record_run_bad_input_is_one_line(tmp_path, capsys):
    rr = load_benchmark("record_run")
    assert rr.main(["student", str(tmp_path / "nope"), "--name", "x", "--command", "c", "-o",
                    str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no cgf_fhe.json" in err
    assert not (tmp_path / "x.json").exists()


def test_a_bad_record_names_its_problem(tmp_path):
    shutil.copytree(RECORDS, tmp_path / "r")
    p = tmp_path / "r" / "teacher.json"
    rec = json.loads(p.read_text())
    rec["schema"] = 2
    p.write_text(json.dumps(rec))
    with pytest.raises(DataError, match="teacher.json: schema version 2"):
        load_records(tmp_path / "r")


def test_report_and_simulation_records_reach_the_headline(tmp_path):
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "report.json").write_text(json.dumps({
        "total_depth": 289, "bootstraps_total": 21, "bootstraps_lower_bound": 20, "level_budget": 14, "seq_len": 128,
        "latency_seconds": 1e8, "latency_per_example_seconds": 6000.0,
        "layers": [{"index": 0, "depth": 49, "bootstraps": 3, "encrypted_nodes": 10}],
        "head": [{"name": "pooler", "depth": 5, "bootstraps": 1, "encrypted_nodes": 3}]}))
    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "simulation.json").write_text(json.dumps({
        "n_examples": 408, "batches": 13, "seq_lens": [71], "accuracy": 0.8137, "f1": 0.8685, "plain_accuracy": 0.8137,
        "agreement": 407 / 408, "max_logit_error": 0.0155, "mean_logit_error": 0.00126, "refreshes": 61,
        "refresh_operations": 793, "refresh_label": "client-aided refresh", "seconds": 810.0, "backend_seconds": 342.0,
        "plain_seconds": 444.0, "ratio_to_plain": 0.77, "seconds_per_example": 0.835, "n_level_mismatches": 0,
        "params": {"poly_modulus": 16384, "coeff_bits": [60, 40, 60], "level_budget": 7, "scale_bits": 40,
                   "security": "128-bit"}, "diagnostics": {"overflows": 0},
        "error_per_layer": [{"layer": "0", "max_abs_error": 1e-3, "mean_abs_error": 1e-4}]}))
    recs = tmp_path / "records"
    shutil.copytree(RECORDS, recs)
    rr = load_benchmark("record_run")
    assert rr.main(["report", str(rep), "--name", "report-poly6-clr-L14", "--command", "cgf-fhe report ...",
                    "-o", str(recs / "report-poly6-clr-L14.json")]) == 0
    assert rr.main(["simulate", str(sim), "--name", "emulate-poly6-clr", "--command", "cgf-fhe simulate ...",
                    "--title", "Emulated CKKS: `poly6-clr`", "-o", str(recs / "emulate-poly6-clr.json")]) == 0
    pages = json.loads((recs / "pages.json").read_text())
    pages["pages"][0]["sections"][4]["items"].append({"type": "report", "record": "report-poly6-clr-L14"})
    (recs / "pages.json").write_text(json.dumps(pages))
    texts, images, used, _ = build(recs)
    head = texts["results.md"].split("## Targets")[0]
    assert "21 bootstraps per pass at L = 14" in head
    assert "99.75% (407/408)" in head  # the agreement now comes from the new simulation record
    assert "report-poly6-clr-L14" in used and "emulate-poly6-clr_error_per_layer.png" in images
    assert "| levels per group | layer 0 49, pooler 5 |" in texts["results.md"]


def test_recovery_is_reproducible(tmp_path):
    rec = load_benchmark("recover_records")
    assert rec.main(["-o", str(tmp_path)]) == 0
    made = {p.name: p.read_text() for p in tmp_path.glob("*.json")}
    committed = {p.name: p.read_text() for p in RECORDS.glob("*.json") if p.name != "pages.json"}
    assert len(made) >= 50
    assert {n: made[n] == committed.get(n) for n in made} == {n: True for n in made}


def _seal_example(folder: Path, index: int, fp: str, *, logits, plain, seconds, estimate, ratios, rss):
    """One finished example of a packed SEAL run (the fields simulate --backend seal writes), built by hand."""
    layer = {"layer": 0, "seconds": seconds * 0.9, "nodes": 150, "refreshes": 14, "mul_pt": 1404, "mul_ct": 543,
             "rotate": 960, "level_match": 343, "refresh": 81, "encode": 0, "add": 2730, "rescale": 628,
             "estimated_seconds": estimate * 0.8}
    head = {**layer, "layer": "head", "seconds": seconds * 0.1, "mul_pt": 132, "estimated_seconds": estimate * 0.2}
    dry_layers = [{**layer, "mul_pt": 1420, "encode": 1835}, {**head, "encode": 139}]
    (folder / f"{index:05d}.json").write_text(json.dumps({
        "index": index, "n": 1, "labels": [1], "seq_len": 44, "logits": [logits], "plain_logits": [plain],
        "seconds": seconds, "refreshes": 248, "fingerprint": fp,
        "seal": {"layers": [layer, head], "peak_rss_bytes": rss, "keygen_seconds": 60.0, "galois_keys": 200,
                 "dry_run": {"estimated_seconds": estimate, "estimated_peak_bytes": 11 * 2**30,
                             "layout": {"tokens": 44}, "layers": dry_layers},
                 "compare_emulator": [{"layer": k, "std_ratio": r} for k, r in ratios.items()]}}))


def test_seal_record_carries_every_finished_example_and_the_page_shows_them(tmp_path):
    run = tmp_path / "run-seal"
    (run / "examples").mkdir(parents=True)
    (run / "simulation.json").write_text(json.dumps({
        "backend": "seal", "fingerprint": "A", "n_examples": 2, "batches": 2, "seq_lens": [44], "accuracy": 0.5,
        "f1": 0.5, "plain_accuracy": 0.5, "agreement": 0.5, "max_logit_error": 4e-5, "refreshes": 248,
        "refresh_label": "client-aided refresh", "seconds": 6000.0, "params": {"poly_modulus": 16384,
                                                                              "coeff_bits": [60, 40, 60]}}))
    ex = run / "examples"
    _seal_example(ex, 0, "A", logits=[0.1, 0.3], plain=[0.1, 0.30004], seconds=2600.0, estimate=2000.0,
                  ratios={"input": 1.02, 0: 0.9, 1: 1.3}, rss=10 * 2**30)
    _seal_example(ex, 1, "A", logits=[0.20001, 0.2], plain=[0.19999, 0.2], seconds=2400.0, estimate=2000.0,
                  ratios={"input": 0.98, 0: 0.4, 1: 1.1}, rss=11 * 2**30)
    _seal_example(ex, 2, "B", logits=[0.0, 1.0], plain=[5.0, 0.0], seconds=1.0, estimate=1.0,  # another run's
                  ratios={"input": 100.0}, rss=1)
    recs = tmp_path / "records"
    shutil.copytree(RECORDS, recs)
    rr = load_benchmark("record_run")
    args = ["simulate", str(run), "--name", "seal-quick-poly6", "--command", "cgf-fhe simulate ... --backend seal",
            "--title", "packed real CKKS", "-o", str(recs / "seal-quick-poly6.json")]
    assert rr.main(args) == 0
    se = json.loads((recs / "seal-quick-poly6.json").read_text())["metrics"]["seal"]
    assert [e["index"] for e in se["examples"]] == [0, 1] and se["examples_of_other_runs"] == 1
    e0, e1 = se["examples"]
    assert (e0["tokens"], e0["prediction"], e0["plain_prediction"], e0["label"]) == (44, 1, 1, 1)
    assert (e1["prediction"], e1["plain_prediction"]) == (0, 1)  # 0.20001 > 0.2 encrypted, 0.19999 < 0.2 plain
    assert e0["max_logit_error"] == pytest.approx(4e-5, rel=1e-3) and e0["peak_rss_bytes"] == 10 * 2**30
    assert e0["layers"][0]["counts"]["mul_pt"] == 1404 and e0["layers"][0]["estimated_counts"]["mul_pt"] == 1420
    assert e0["layers"][1]["seconds"] == pytest.approx(260.0) and e0["emulator_std_ratio"]["1"] == 1.3
    a = se["aggregate"]
    assert (a["n_examples"], a["n_agree"], a["agreement"]) == (2, 1, 0.5)
    assert a["worst_std_ratio"] == {"ratio": 0.4, "example": 1, "layer": "0"}  # |log 0.4| > |log 1.3|
    assert a["median_seconds_over_estimate"] == pytest.approx(1.25)  # median of 1.3 and 1.2
    assert a["max_logit_error"] == pytest.approx(4e-5, rel=1e-3) and a["max_peak_rss_bytes"] == 11 * 2**30
    texts, _, used, _ = build(recs)
    page = texts["results.md"]
    assert "| prediction agreement with plain | 50.00% (1/2) |" in page
    assert "| accuracy / F1 (real CKKS, SEAL packed) | 0.5000 / 0.5000 |" in page and "emulated / plain" not in \
        page[page.index("### packed real CKKS"):page.index("Every finished example")]
    assert "| emulator / SEAL error std per layer, farthest from 1 | 0.40 (example 1, layer 0) |" in page
    assert "| 1 | 44 | 40.0 min | 33.3 min | 1.20 | 11.0 GiB | 2.00e-05 | 0 (1) | 0.40 (0) |" in page
    assert "| 0 | 1.2 h | 53.3 min | 1.41 | 2,808 (2,840) | 1,086 | 1,920 | 162 |" in page
    # a later, longer run of the same model re-records the same name with more examples
    _seal_example(ex, 2, "A", logits=[0.5, 0.1], plain=[0.5, 0.1], seconds=1800.0, estimate=2000.0,
                  ratios={"input": 1.0, 0: 0.95, 1: 1.05}, rss=11 * 2**30)
    assert rr.main(args) == 0
    se = json.loads((recs / "seal-quick-poly6.json").read_text())["metrics"]["seal"]
    assert [e["index"] for e in se["examples"]] == [0, 1, 2] and "examples_of_other_runs" not in se
    assert se["aggregate"]["agreement"] == pytest.approx(2 / 3) and se["aggregate"]["median_seconds_over_estimate"] == 1.2
    assert "(2/3)" in build(recs)[0]["results.md"]


def test_seal_record_keeps_the_examples_for_a_later_session(tmp_path, capsys):
    """--keep-examples copies the run's own finished example files (not another run's) byte for byte, so a later
    session can put them back into RUN/examples and resume; a kept file is never overwritten by other bytes."""
    run = tmp_path / "run"
    (run / "examples").mkdir(parents=True)
    (run / "simulation.json").write_text(json.dumps({
        "backend": "seal", "fingerprint": "A", "n_examples": 1, "batches": 1, "seq_lens": [44], "accuracy": 1.0,
        "f1": 1.0, "plain_accuracy": 1.0, "agreement": 1.0, "max_logit_error": 4e-5, "refreshes": 248,
        "refresh_label": "client-aided refresh", "seconds": 60.0, "params": {"poly_modulus": 16384}}))
    ex = run / "examples"
    _seal_example(ex, 0, "A", logits=[0.1, 0.3], plain=[0.1, 0.30004], seconds=2600.0, estimate=2000.0,
                  ratios={"input": 1.0}, rss=2**30)
    _seal_example(ex, 1, "B", logits=[0.0, 1.0], plain=[5.0, 0.0], seconds=1.0, estimate=1.0,
                  ratios={"input": 1.0}, rss=1)
    keep = tmp_path / "kept"
    rr = load_benchmark("record_run")
    args = ["simulate", str(run), "--name", "s", "--command", "c", "--keep-examples", str(keep),
            "-o", str(tmp_path / "s.json")]
    assert rr.main(args) == 0
    assert sorted(f.name for f in keep.iterdir()) == ["00000.json"]
    assert (keep / "00000.json").read_bytes() == (ex / "00000.json").read_bytes()
    se = json.loads((tmp_path / "s.json").read_text())["metrics"]["seal"]
    assert "_files" not in se and se["examples_kept_in"] == keep.as_posix()
    (keep / "00000.json").write_text("{}")  # another run's bytes under the same name: refused, kept as it is
    assert rr.main(args) == 2
    assert "exists with other contents" in capsys.readouterr().err and (keep / "00000.json").read_text() == "{}"


def test_seal_record_refuses_examples_of_another_run(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "examples").mkdir(parents=True)
    (run / "simulation.json").write_text(json.dumps({"backend": "seal", "fingerprint": "A", "n_examples": 1}))
    _seal_example(run / "examples", 0, "B", logits=[0.0, 1.0], plain=[0.0, 1.0], seconds=1.0, estimate=1.0,
                  ratios={}, rss=1)
    rr = load_benchmark("record_run")
    assert rr.main(["simulate", str(run), "--name", "s", "--command", "c", "-o", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none of the 1 examples is from the run of simulation.json" in err
    assert not (tmp_path / "s.json").exists()
