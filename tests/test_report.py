"""Depth report, bootstrap placement, cost model, plots (`cgf-fhe report`, `cgf-fhe calibrate-costs`)."""
import dataclasses
import json
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from cgf_fhe import fhe_ops
from cgf_fhe.bootstrap import LevelBudgetError, plan_bootstraps
from cgf_fhe.cli import main
from cgf_fhe.export import costs
from cgf_fhe.export.report import build_report, to_markdown


def vi(name, shape):
    return h.make_tensor_value_info(name, T.FLOAT, list(shape))


def make(nodes, inputs, outputs, inits=(), encrypted=("x",)):
    m = h.make_model(h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits)),
                     opset_imports=[h.make_opsetid("", 18)])
    h.set_model_props(m, {"cgf_fhe.encrypted_inputs": json.dumps(list(encrypted))})
    onnx.checker.check_model(m)
    return m


def chain(n, shape=(4,)):
    """x -> m0 = x*x -> m1 = m0*m0 -> ... (n squarings)."""
    nodes, prev = [], "x"
    for i in range(n):
        nodes.append(h.make_node("Mul", [prev, prev], [f"m{i}"], name=f"mul{i}"))
        prev = f"m{i}"
    return make(nodes, [vi("x", shape)], [vi(prev, shape)])


# --- known depths -----------------------------------------------------------------------------------------------

def test_x4_by_squaring_has_depth_2_and_naive_has_3():
    sq = make([h.make_node("Mul", ["x", "x"], ["x2"], name="sq1"), h.make_node("Mul", ["x2", "x2"], ["x4"], name="sq2")],
              [vi("x", (4,))], [vi("x4", (4,))])
    rep = build_report(sq)
    assert rep["total_depth"] == 2
    assert [(n["name"], n["depth"], n["operands"]) for n in rep["nodes"]] == [("sq1", 1, "ct-ct"), ("sq2", 2, "ct-ct")]
    naive = make([h.make_node("Mul", ["x", "x"], ["a"]), h.make_node("Mul", ["a", "x"], ["b"]),
                  h.make_node("Mul", ["b", "x"], ["c"])], [vi("x", (4,))], [vi("c", (4,))])
    assert build_report(naive)["total_depth"] == 3
    assert build_report(naive)["min_level_budget_no_bootstrap"] == 3


def test_matmul_ct_pt_depth_1_and_counts():
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    m = make([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", (2, 4))], [vi("y", (2, 3))], [w])
    rep = build_report(m)
    node = rep["nodes"][0]
    assert rep["total_depth"] == 1 and node["depth"] == 1 and node["operands"] == "ct-pt"
    # slot packing: M*N*K ct-pt mults, M*N*(K-1) additions, no rotation
    assert (node["ct_pt_mults"], node["additions"], node["rotations"], node["ct_ct_mults"]) == (24, 18, 0, 0)
    assert node["ciphertexts"] == 6
    # row packing: 2 row ciphertexts, BSGS with d = max(4, 3) = 4 -> n1 = n2 = 2 -> 2 rotations per row
    row = build_report(m, packing="row")["nodes"][0]
    assert (row["rotations"], row["ct_pt_mults"], row["additions"], row["ciphertexts"]) == (4, 8, 6, 2)


def test_row_packing_reduction_uses_rotate_and_sum():
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    m = make([h.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1, name="rs")], [vi("x", (3, 16))],
             [vi("s", (3, 1))], [axes])
    node = build_report(m, packing="row")["nodes"][0]
    assert node["rotations"] == 3 * 4 and node["additions"] == 3 * 4  # log2(16) per ciphertext
    assert build_report(m)["nodes"][0]["rotations"] == 0


@pytest.mark.parametrize("form,degree,prescaled", [("ps", 7, False), ("ps", 7, True), ("ps", 15, False),
                                                   ("powers", 7, False), ("square", 0, False)])
def test_polynomial_forms_report_their_stated_depth(form, degree, prescaled, tmp_path):
    from cgf_fhe import poly

    if form == "square":
        approx = poly.fit("exp", -4.0, 0.0, form="square", r=5)
    else:
        approx = poly.fit("tanh", -3.0, 3.0, degree=degree, form=form)

    class P(torch.nn.Module):
        def forward(self, x):
            return approx.evaluate(x, prescaled=prescaled)

    path = tmp_path / "p.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(P(), (torch.randn(2, 5),), str(path), dynamo=True, opset_version=18, input_names=["x"],
                          output_names=["y"], verbose=False)
    rep = build_report(str(path), encrypted=["x"])
    assert rep["total_depth"] == approx.depth(prescaled=prescaled)
    assert rep["total_depth"] == poly.form_depth(form, approx.degree, prescaled=prescaled, baby=approx.baby, r=approx.r)


# --- bootstrap placement ----------------------------------------------------------------------------------------

def test_chain_L3_refreshes_exactly_where_expected():
    m = chain(7)
    a = fhe_ops.analyze(m, ["x"])
    plan = plan_bootstraps(m, a, 3)
    # 7 squarings, 3 levels per fresh ciphertext: refresh after the 3rd and the 6th
    assert plan.refresh == ["m2", "m5"] and plan.refresh_nodes == ["mul2", "mul5"] and plan.count == 2
    assert [plan.remaining[f"m{i}"] for i in range(7)] == [2, 1, 3, 2, 1, 3, 2]
    assert plan.nodes["mul3"].levels_in == 3 and plan.nodes["mul2"].levels_out == 0
    # the same through the report: positions, per-node levels left, budget search
    rep = build_report(m, level_budget=3)
    assert rep["bootstraps_total"] == 2 and rep["bootstrap_nodes"] == ["mul2", "mul5"]
    assert [n["levels_left"] for n in rep["nodes"]] == [2, 1, 0, 2, 1, 0, 2]
    assert rep["min_level_budget_no_bootstrap"] == 7
    assert build_report(m, level_budget=7)["bootstraps_total"] == 0
    assert build_report(m, level_budget=6)["bootstraps_total"] == 1
    assert build_report(m)["level_budget"] == 7  # default: the smallest budget without bootstrap


def test_hoisting_refreshes_the_shared_ancestor_once():
    # h (depth 2) feeds q = h*w1 and k = h*w2; s = q*k. With L = 3: lazy refresh would refresh q and k;
    # one refresh of h is enough.
    w1 = numpy_helper.from_array(np.full(4, 2.0, np.float32), "w1")
    w2 = numpy_helper.from_array(np.full(4, 3.0, np.float32), "w2")
    nodes = [h.make_node("Mul", ["x", "x"], ["a"], name="n_a"), h.make_node("Mul", ["a", "a"], ["h"], name="n_h"),
             h.make_node("Mul", ["h", "w1"], ["q"], name="n_q"), h.make_node("Mul", ["h", "w2"], ["k"], name="n_k"),
             h.make_node("Mul", ["h", "w1"], ["q2"], name="n_q2"), h.make_node("Mul", ["q", "k"], ["s"], name="n_s"),
             h.make_node("Mul", ["s", "q2"], ["y"], name="n_y")]
    m = make(nodes, [vi("x", (4,))], [vi("y", (4,))], [w1, w2])
    a = fhe_ops.analyze(m, ["x"])
    lazy = plan_bootstraps(m, a, 3, hoist=False)
    assert lazy.count >= 2
    plan = plan_bootstraps(m, a, 3)
    assert plan.refresh == ["h"] and plan.count == 1
    assert plan.remaining["y"] == 0


def test_node_needing_more_than_budget_is_a_clear_error():
    e = numpy_helper.from_array(np.array(8.0, np.float32), "e")
    m = make([h.make_node("Pow", ["x", "e"], ["y"], name="pow8")], [vi("x", (4,))], [vi("y", (4,))], [e])
    a = fhe_ops.analyze(m, ["x"])
    with pytest.raises(LevelBudgetError, match="pow8.*3 levels.*budget is 2"):
        plan_bootstraps(m, a, 2)
    assert plan_bootstraps(m, a, 3).count == 0


def test_report_refuses_graphs_with_violations():
    m = make([h.make_node("Exp", ["x"], ["y"], name="e")], [vi("x", (4,))], [vi("y", (4,))])
    with pytest.raises(fhe_ops.GraphError, match="not FHE-evaluable"):
        build_report(m)


# --- layers, stages, JSON, Markdown, plots, comparison, costs ---------------------------------------------------

def _layered_graph():
    """Two 'encoder layers' named like the TorchScript exporter does (name-based scope fallback)."""
    nodes, inits, prev = [], [], "x"
    for i in range(2):
        p = f"/bert/encoder/layer.{i}"
        inits.append(numpy_helper.from_array(np.eye(8, dtype=np.float32), f"w{i}"))
        nodes += [h.make_node("MatMul", [prev, f"w{i}"], [f"q{i}"], name=f"{p}/attention/self/query/MatMul"),
                  h.make_node("Mul", [f"q{i}", f"q{i}"], [f"e{i}"], name=f"{p}/attention/self/cgf_exp/Mul"),
                  h.make_node("Mul", [f"e{i}", f"e{i}"], [f"e2{i}"], name=f"{p}/attention/self/cgf_exp/Mul_1"),
                  h.make_node("Add", [f"e2{i}", prev], [f"r{i}"], name=f"{p}/output/Add")]
        prev = f"r{i}"
    inits.append(numpy_helper.from_array(np.ones((8, 2), np.float32), "wc"))
    nodes.append(h.make_node("MatMul", [prev, "wc"], ["logits"], name="/classifier/MatMul"))
    return make(nodes, [vi("x", (1, 4, 8))], [vi("logits", (1, 4, 2))], inits)


def test_layers_stages_and_json_schema(tmp_path, capsys):
    path = tmp_path / "layered.onnx"
    onnx.save(_layered_graph(), str(path))
    assert main(["report", str(path), "--levels", "3", "--format", "json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("total_depth", "bootstraps_total", "level_budget", "layers", "nodes"):
        assert key in rep
    for lay in rep["layers"]:
        for key in ("index", "depth", "ct_ct_mults", "ct_pt_mults", "rotations", "bootstraps"):
            assert key in lay
    for n in rep["nodes"]:
        assert {"name", "op_type", "depth", "encrypted"} <= set(n)
    assert rep["total_depth"] == 7 and rep["level_budget"] == 3
    assert [lay["index"] for lay in rep["layers"]] == [0, 1]
    assert rep["levels_per_layer"] == [3, 3]
    assert [lay["depth_out"] for lay in rep["layers"]] == [3, 6]
    assert rep["layers"][0]["stages"]["projections"]["depth"] == 1
    assert rep["layers"][0]["stages"]["exp"]["depth"] == 2
    assert rep["layers"][0]["stages"]["exp"]["ct_ct_mults"] == 2 * 32
    assert [g["name"] for g in rep["head"]] == ["classifier"]
    assert sum(rep["bootstraps_per_layer"]) + sum(g["bootstraps"] for g in rep["head"]) == rep["bootstraps_total"]
    assert rep["bootstraps_total"] == 2
    assert [c["name"] for c in rep["critical_path"]][-1] == "/classifier/MatMul"
    assert sum(c["levels"] for c in rep["critical_path"]) == rep["total_depth"]


def test_outputs_md_plots_and_comparison(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_layered_graph(), str(a))
    onnx.save(chain(5, (1, 4, 8)), str(b))
    out = tmp_path / "single"
    assert main(["report", str(a), "--levels", "4", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layer 0" in text and "total multiplicative depth: 7" in text
    for f in ("report.json", "report.md", "levels_per_layer.png", "ops_per_stage.png"):
        assert (out / f).stat().st_size > 0
    assert (out / "levels_per_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["level_budget"] == 4
    assert "| layer 0 |" in (out / "report.md").read_text()
    # comparison of two files
    cmp_dir = tmp_path / "cmp"
    assert main(["report", str(a), str(b), "--levels", "4", "--format", "json", "-o", str(cmp_dir)]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [r["total_depth"] for r in payload["models"]] == [7, 5]
    assert (cmp_dir / "comparison.md").is_file() and (cmp_dir / "b" / "levels_per_layer.png").is_file()
    assert main(["report", str(a), str(b), "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert "a.onnx" in md and "b.onnx" in md and "total depth" in md


def test_latency_follows_the_cost_table(tmp_path, capsys):
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    m = make([h.make_node("MatMul", ["x", "w"], ["y"], name="mm"), h.make_node("Mul", ["y", "y"], ["z"], name="sq")],
             [vi("x", (2, 4))], [vi("z", (2, 3))], [w])
    table = {"schema": costs.SCHEMA, "source": "test", "entries": [
        {"poly_modulus": 8192, "coeff_bits": [60, 40, 40, 60], "scale_bits": 40,
         "ms": {"ct_ct_mult": 10.0, "ct_pt_mult": 2.0, "add": 0.5, "rotation": 7.0, "refresh": 100.0}}]}
    tf = tmp_path / "costs.json"
    tf.write_text(json.dumps(table))
    rep = build_report(m, cost_table=str(tf))  # L = 2 -> chain 60+40+40+60 = 200 bits -> N = 8192 exactly
    assert rep["ckks"]["poly_modulus"] == 8192 and rep["ckks"]["secure_128"]
    expected = (24 * 2.0 + 18 * 0.5 + 6 * 10.0) / 1e3
    assert rep["latency_seconds"] == pytest.approx(expected)
    assert rep["latency_per_example_seconds"] == pytest.approx(expected / 4096)
    # with one refresh point (L = 1): the 6 ciphertexts of y are refreshed
    rep1 = build_report(m, cost_table=str(tf), level_budget=1)
    assert rep1["bootstraps_total"] == 1 and rep1["refreshed_ciphertexts"] == 6
    # L = 1: chain 60+40+60 -> still N = 8192, but 2 limbs instead of the entry's 3: costs scaled by 2/3
    assert rep1["costs"]["ms"]["refresh"] == pytest.approx(100.0 * 2 / 3)
    assert rep1["latency_seconds"] == pytest.approx((24 * 2.0 + 18 * 0.5 + 6 * 10.0 + 6 * 100.0) * 2 / 3 / 1e3)
    # a bootstrap figure, when given, prices the refresh points
    table["entries"][0]["ms"]["bootstrap"] = 1000.0
    tf.write_text(json.dumps(table))
    r2 = build_report(m, cost_table=str(tf), level_budget=1)
    assert r2["bootstrap_kind"] == "bootstrap"
    assert r2["latency_seconds"] == pytest.approx((24 * 2.0 + 18 * 0.5 + 6 * 10.0 + 6 * 1000.0) * 2 / 3 / 1e3)
    # invalid tables are user errors (exit 2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": [{"poly_modulus": 8192, "ms": {"add": 1}}]}))
    onnx.save(m, str(tmp_path / "m.onnx"))
    assert main(["report", str(tmp_path / "m.onnx"), "--cost-table", str(bad)]) == 2
    assert "ct_ct_mult" in capsys.readouterr().err


def test_ring_selection_follows_the_he_standard():
    assert costs.ring_for(costs.chain_for(2, 40)) == 8192  # 200 bits
    assert costs.ring_for(costs.chain_for(7, 40)) == 16384  # 400 bits
    assert costs.ring_for(costs.chain_for(9, 40)) == 32768  # 480 bits
    assert costs.ring_for(costs.chain_for(50, 40)) is None
    default = costs.load_cost_table(None)
    ms16 = costs.costs_for(default, 16384, costs.chain_for(7, 40))["ms"]
    assert (ms16["ct_ct_mult"], ms16["ct_pt_mult"], ms16["rotation"], ms16["refresh"]) == (54.0, 13.0, 33.0, 26.0)
    assert costs.costs_for(default, 8192, [60, 40, 40, 60])["ms"]["refresh"] == 17.0
    scaled = costs.costs_for(default, 32768, costs.chain_for(9, 40))
    assert scaled["scale"] == pytest.approx(2 * 10 / 8) and "scaled" in scaled["note"]


def test_calibrate_costs_measures_with_tenseal(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["calibrate-costs", "--poly-modulus", "8192", "--reps", "1", "-o", str(out)]) == 0
    table = costs.load_cost_table(out)
    ms = table["entries"][0]["ms"]
    assert table["entries"][0]["poly_modulus"] == 8192
    for k in ("ct_ct_mult", "ct_pt_mult", "add", "rotation", "encrypt", "decrypt", "refresh"):
        assert ms[k] > 0, k
    assert ms["add"] < ms["ct_ct_mult"]  # relinearisation + rescale dominate an addition
    assert main(["calibrate-costs", "--poly-modulus", "8192", "--coeff-bits", "60", "60", "60", "60",
                 "-o", str(out)]) == 2  # 240 bits > 218: insecure
    assert "128-bit" in capsys.readouterr().err
    assert math.isfinite(ms["refresh"])


# --- a tiny polynomial student: the report's per-layer levels equal the stated depths ---------------------------

@pytest.fixture(scope="module")
def tiny_poly_onnx(tmp_path_factory, mrpc_dir):
    from cgf_fhe import surgery
    from cgf_fhe.data import load_mrpc, make_loader, tokenize_split
    from cgf_fhe.export.onnx_export import export_checkpoint
    from cgf_fhe.models import build_model, save_checkpoint

    d = tmp_path_factory.mktemp("poly")
    model, tok = build_model("tiny", "cgf", seed=0)
    model.eval()
    ds = tokenize_split(load_mrpc(mrpc_dir)["train"], tok, max_length=32, max_samples=16)
    ranges = surgery.calibrate(model, make_loader(ds, tok, 8, False), max_batches=2, progress=False)
    opts = surgery.FheOptions(poly="all", ln="frozen", exp_degree=7, gelu_degree=7, tanh_degree=7)
    fhe = surgery.polynomialize(model, opts, ranges)
    save_checkpoint(model, tok, d / "ckpt", {"softmax": "cgf", "coeff": 0.5, "fhe": fhe, "max_length": 32})
    export_checkpoint(d / "ckpt", d / "m.onnx")
    stated = surgery.model_depth(model)
    return d / "m.onnx", stated


def test_tiny_student_levels_match_stated_depths(tiny_poly_onnx):
    path, stated = tiny_poly_onnx
    rep = build_report(str(path), level_budget=9)
    assert rep["seq_len"] == 32  # from the export metadata
    assert rep["total_depth"] == stated["total"]
    assert rep["levels_per_layer"] == stated["per_layer"]
    assert sum(g["depth"] for g in rep["head"] if g["name"] in ("pooler", "classifier")) == stated["head"]
    assert set(rep["layers"][0]["stages"]) >= {"projections", "scores", "cgf_stats", "exp", "attn_v", "layernorm",
                                               "gelu", "ffn"}
    assert rep["layers"][0]["stages"]["exp"]["depth"] == 3  # degree 7 PS, prescaled: log2(8)
    # L = 9 needs at least ceil(total/9) - 1 refreshes on the critical path; the plan is valid and near that bound
    lower = math.ceil(rep["total_depth"] / 9) - 1
    assert lower <= rep["bootstraps_total"] <= lower + 2
    assert all(n["levels_left"] >= 0 for n in rep["nodes"] if n["encrypted"])


def test_fmt_seconds_units_and_thresholds():
    from cgf_fhe.fmt import fmt_seconds

    assert fmt_seconds(None) == "n/a"
    assert fmt_seconds(0.0123) == "0.0123 s"
    assert fmt_seconds(90) == "1.5 min"  # the report switches to minutes at 60 s
    assert fmt_seconds(90, minutes_from=120) == "90.0 s"  # the results page at 120 s
    assert fmt_seconds(5400) == "1.5 h"
    assert fmt_seconds(3 * 86400, day_unit="days") == "3.0 days"


def test_report_and_simulate_share_one_security_table():
    """At L = 20 (log Q = 920 bits) no ring size of the HE standard is 128-bit secure: report says so and names
    the ring simulate would use with --insecure; simulate refuses without --insecure (report used to call
    N = 65536 secure)."""
    from cgf_fhe import ckks
    from cgf_fhe.simulate import InsecureParamsError

    m = chain(30)
    rep = build_report(m, level_budget=20)
    assert rep["ckks"]["log_q"] == 920 and rep["ckks"]["secure_128"] is False
    with pytest.raises(InsecureParamsError):
        ckks.CKKSParams.from_options(levels=20)
    forced = ckks.CKKSParams.from_options(levels=20, insecure=True)
    assert rep["ckks"]["poly_modulus"] == forced.poly_modulus == 32768 and forced.security == "INSECURE"
    for L in (2, 7, 9, 16):  # where both call it secure, they pick the same ring and chain
        rep = build_report(m, level_budget=L)
        p = ckks.CKKSParams.from_options(levels=L)
        assert rep["ckks"]["secure_128"] and (rep["ckks"]["poly_modulus"], rep["ckks"]["coeff_bits"]) == \
            (p.poly_modulus, list(p.coeff_bits))


def test_refresh_counts_are_named_for_what_they_count():
    m = chain(8)
    rep = build_report(m, level_budget=3)
    assert rep["refreshes_total"] == rep["bootstraps_total"] == 2  # old key kept as an alias
    assert rep["refresh_kind"] == "client-aided" and "decrypt + re-encrypt" in rep["refresh_description"]
    assert rep["refreshes_per_layer"] == rep["bootstraps_per_layer"]
    md = to_markdown(rep)
    assert "bootstrap" not in md.lower() and "client-aided refresh" in md and "refreshes" in md
    table = json.loads(json.dumps(costs.DEFAULT_TABLE))
    for e in table["entries"]:
        e["ms"]["bootstrap"] = 500.0
    rep_b = build_report(m, level_budget=3, cost_table=table)
    assert rep_b["refresh_kind"] == "bootstrap" and rep_b["refreshes_total"] == 2
    assert "bootstrap (on the server" in to_markdown(rep_b)


def test_packing_names_and_their_former_aliases():
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    m = make([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", (2, 4))], [vi("y", (2, 3))], [w])
    for new, old in (("element", "slots"), ("packed", "row")):
        a, b = build_report(m, packing=new), build_report(m, packing=old)
        assert a["packing"] == b["packing"] == new and a["nodes"] == b["nodes"]
    assert build_report(m, packing="packed")["examples_per_pass"] == 1
    with pytest.raises(Exception, match="element, packed"):
        build_report(m, packing="diagonal")


def test_report_and_interpreter_read_only_the_op_table(monkeypatch):
    """The op table is the executable spec: change an entry's cost formula or exec and report / simulate follow."""
    from collections import Counter

    from cgf_fhe.simulate import Interpreter, make_backend

    assert all(spec.exec is not None for spec in fhe_ops.OP_TABLE.values() if spec.ct_allowed)
    for op in ("Add", "Sub", "Sum", "Mul", "Div", "MatMul", "Gemm", "Pow", "ReduceSum", "ReduceMean"):
        assert set(fhe_ops.OP_TABLE[op].costs) == set(fhe_ops.PACKINGS), op
    m = make([h.make_node("Neg", ["x"], ["n"], name="neg"), h.make_node("Mul", ["n", "n"], ["y"], name="sq")],
             [vi("x", ("batch", 4))], [vi("y", ("batch", 4))])
    x = np.arange(8, dtype=np.float64).reshape(2, 4)
    assert build_report(m)["nodes"][0]["rotations"] == 0
    np.testing.assert_allclose(Interpreter(m, make_backend("plain")).run({"x": x}).outputs["y"], x * x)
    spec = fhe_ops.OP_TABLE["Neg"]
    changed = dataclasses.replace(spec, exec=lambda e: [e.backend.add(e.args[0], np.array(1.0))],
                                  costs={"element": lambda ctx: Counter(rotations=7)})
    monkeypatch.setitem(fhe_ops.OP_TABLE, "Neg", changed)
    assert build_report(m)["nodes"][0]["rotations"] == 7
    np.testing.assert_allclose(Interpreter(m, make_backend("plain")).run({"x": x}).outputs["y"], (x + 1) ** 2)
