"""The lean-structure record (benchmarks/lean_structure.py -> record_run.py structure -> docs/results.md)."""
import json
import shutil
import sys

from benchlib import REPO, load_benchmark

sys.path.insert(0, str(REPO / "benchmarks"))
from pagegen.build import build  # noqa: E402
from pagegen.records import check_record  # noqa: E402

ROW = {"profile": "lean", "options": {"poly": "all"}, "total_depth": 145,
       "depth_per_layer": [24, 25, 25, 25, 25, 25], "depth_added_per_layer": [24, 23, 23, 23, 23, 23],
       "ct_pt_mults": 1186954634, "ct_ct_mults": 82820246, "additions": 1275306350, "rotations": 0,
       "refreshes": 10, "refreshed_values": 38, "refreshed_ciphertexts": 3149440, "refreshes_lower_bound": 10,
       "level_budget": 14, "seq_len": 128, "overrides": {"gelu_degree": 7}, "label": "after"}
OLD = {**ROW, "label": "before", "total_depth": 150, "refreshes": 17, "refreshed_values": None,
       "refreshed_ciphertexts": None, "refreshes_lower_bound": None, "depth_added_per_layer": None}


def test_structure_record_reaches_the_results_page(tmp_path):
    src = tmp_path / "lean_structure.json"
    src.write_text(json.dumps({"command": "c", "note": "structure only", "rows": [OLD, ROW]}))
    recs = tmp_path / "records"
    shutil.copytree(REPO / "records", recs)
    rr = load_benchmark("record_run")
    assert rr.main(["structure", str(src), "--name", "lean-structure", "--command", "python benchmarks/lean_structure.py",
                    "--title", "structure", "-o", str(recs / "lean-structure.json")]) == 0
    rec = check_record(json.loads((recs / "lean-structure.json").read_text()))
    assert rec["kind"] == "structure" and [r["total_depth"] for r in rec["metrics"]["rows"]] == [150, 145]
    assert "options" not in rec["metrics"]["rows"][0] and rec["metrics"]["note"] == "structure only"
    texts, _, used, _ = build(recs)
    assert "lean-structure" in used
    page = texts["results.md"]
    row = next(ln for ln in page.splitlines() if ln.startswith("| after |"))
    assert "| lean (gelu_degree 7) | 145 | 24 23 23 23 23 23 (max 24) | 24 25 25 25 25 25 (max 25) |" in row
    assert "| 1.19e+09 | 8.28e+07 | 10 (bound 10; 38 tensors, 3,149,440 ciphertexts) |" in row
    assert "| 17 (counted per tensor) |" in next(ln for ln in page.splitlines() if ln.startswith("| before |"))
    assert "refresh points at L = 14" in page


def test_structure_record_of_a_wrong_file_is_one_line(tmp_path, capsys):
    src = tmp_path / "other.json"
    src.write_text(json.dumps({"rows": [{"profile": "lean"}]}))
    rr = load_benchmark("record_run")
    assert rr.main(["structure", str(src), "--name", "x", "--command", "c", "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lacks 'total_depth'" in err and str(src) in err
    assert not (tmp_path / "x.json").exists()


def test_committed_page_shows_the_measured_refresh_points():
    rec = json.loads((REPO / "records" / "lean-structure.json").read_text())
    page = (REPO / "docs" / "results.md").read_text()
    for r in rec["metrics"]["rows"]:
        if r.get("refreshed_values") is not None:
            assert f"{r['refreshes']} (bound {r['refreshes_lower_bound']}; {r['refreshed_values']} tensors" in page
