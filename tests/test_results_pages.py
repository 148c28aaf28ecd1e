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
        assert len(json.dumps(rec)) < 16_000  # a few KB, never checkpoints


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
