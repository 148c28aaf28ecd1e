"""``cgf-fhe report --packed-seal``: the packed SEAL schedule's per-layer counts and latency next to the element
packing's, equal to what ``simulate --backend seal``'s dry run counts on a real example of the same length."""
import json

import onnx

from cgf_fhe.cli import main


def _dry_run(student, mrpc_dir):
    from cgf_fhe.simulate.batch import SimConfig, client_batches
    from cgf_fhe.simulate.packed_runner import PackedRunner

    cfg = SimConfig(backend="seal", poly_modulus=8192, coeff_bits=(60, 40, 40, 60), limit=1, max_length=6,
                    batch_size=1, data_dir=str(mrpc_dir), progress=False)
    (feeds, _labels), = client_batches(onnx.load(str(student / "student.onnx")), cfg)[0]
    return feeds["embeddings"].shape[1], PackedRunner(str(student / "student.onnx"), cfg).dry_run(feeds)


def test_report_packed_seal_counts_are_the_dry_runs(micro_student_packed, mrpc_dir, capsys, tmp_path):
    tokens, dry = _dry_run(micro_student_packed, mrpc_dir)
    onnx_path = str(micro_student_packed / "student.onnx")
    # --levels 2 --scale-bits 40: the chain [60, 40, 40, 60] at N=8192, the dry run's parameters
    assert main(["report", onnx_path, "--packed-seal", "--seq-len", str(tokens), "--levels", "2",
                 "--format", "json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    ps = rep["packed_seal"]
    assert ps["tokens"] == tokens and ps["ckks"]["poly_modulus"] == 8192 and ps["ckks"]["level_budget"] == 2
    got = [(r["layer"], r["ct_pt_mults"], r["ct_ct_mults"], r["rotations"], r["level_matches"], r["refreshes"])
           for r in ps["layers"]]
    want = [(r["layer"], r["mul_pt"], r["mul_ct"], r["rotate"], r["level_match"], r["refreshes"])
            for r in dry["layers"]]
    assert got == want and [g[0] for g in got] == [0, "head"]
    assert got[0][3] > 0 and got[0][2] > 0  # layer 0 rotates and multiplies ciphertexts
    assert ps["totals"]["rotations"] == dry["counts"]["rotate"] == sum(g[3] for g in got)
    assert ps["galois_keys"] == dry["galois_keys"] and ps["refreshes"] == dry["refreshes"]
    est = {r["layer"]: r["estimated_seconds"] for r in dry["layers"]}
    for r in ps["layers"]:
        assert abs(r["latency_seconds"] - est[r["layer"]]) <= 1e-3 * est[r["layer"]]
    assert abs(ps["latency_seconds"] - dry["estimated_seconds"]) <= 1e-3 * dry["estimated_seconds"]
    assert rep["layers"][0]["rotations"] == 0  # the element packing never rotates: the two sit side by side

    # markdown: one row per layer with both packings; no estimate without the flag
    assert main(["report", onnx_path, "--packed-seal", "--seq-len", str(tokens), "--levels", "2",
                 "-o", str(tmp_path / "r"), "--format", "md"]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| group | element: rotations | element: time / pass | element: time / example | seal: ct x pt |" in md
    row = next(line for line in md.splitlines() if line.startswith("| layer 0 | 0 |"))
    assert f"| {got[0][1]:,} | {got[0][2]:,} | {got[0][3]:,} | {got[0][4]:,} | {got[0][5]} |" in row
    assert "packed_seal" in json.loads((tmp_path / "r" / "report.json").read_text())
    capsys.readouterr()
    assert main(["report", onnx_path, "--seq-len", str(tokens), "--format", "json"]) == 0
    assert "packed_seal" not in json.loads(capsys.readouterr().out)


def test_report_packed_seal_refuses_a_graph_it_cannot_pack(tmp_path, capsys):
    """A graph the element packing counts but the packed schedule cannot run: one line naming the node, exit 2."""
    from test_simulate import ops_zoo_graph

    path = tmp_path / "zoo.onnx"
    onnx.save(ops_zoo_graph(H=4), str(path))
    assert main(["report", str(path), "--seq-len", "4", "--levels", "2", "--format", "json"]) == 0
    capsys.readouterr()
    assert main(["report", str(path), "--packed-seal", "--seq-len", "4", "--levels", "2"]) == 2
    err = capsys.readouterr().err
    assert "node concat (Concat)" in err and "plaintext with a packed ciphertext" in err and "Traceback" not in err
