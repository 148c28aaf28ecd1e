"""FHE verifier (`cgf-fhe check`) on hand-built graphs and on stock transformers BERT exports."""
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from cgf_fhe.cli import main
from cgf_fhe.export.verify import check
from cgf_fhe.fhe_ops import GraphError


def vi(name, shape=(4,), dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, list(shape))


def const(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def make(nodes, inputs, outputs, inits=(), encrypted=None, opset=18):
    g = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    if encrypted is not None:
        h.set_model_props(m, {"cgf_fhe.encrypted_inputs": json.dumps(encrypted)})
    onnx.checker.check_model(m)
    return m


def save(tmp_path, m, name="m.onnx"):
    p = tmp_path / name
    onnx.save(m, str(p))
    return str(p)


def run_cli(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- each refused op, fed by the encrypted input x; and the same op on the plaintext input p -------------------

def _unary(op):
    return lambda a, out: [h.make_node(op, [a], [out], name=f"the_{op.lower()}")]


def _div_by(a, out):  # x / something: refused when the *divisor* is encrypted
    return [h.make_node("Div", ["one", a], [out], name="the_div")]


def _where(a, out):
    return [h.make_node("Greater", ["p", "zero"], ["cond"], name="cmp_plain"),
            h.make_node("Where", ["cond", a, "p"], [out], name="the_where")]


def _if(a, out):
    then_g = h.make_graph([h.make_node("Identity", [a], ["t_out"])], "then", [], [vi("t_out")])
    else_g = h.make_graph([h.make_node("Neg", [a], ["e_out"])], "else", [], [vi("e_out")])
    return [h.make_node("ReduceSum", ["p"], ["psum"], keepdims=0, name="sum_plain"),
            h.make_node("Cast", ["psum"], ["pbool"], to=T.BOOL, name="cast_plain"),
            h.make_node("If", ["pbool"], [out], then_branch=then_g, else_branch=else_g, name="the_if")]


CASES = {"Exp": _unary("Exp"), "Sqrt": _unary("Sqrt"), "Div": _div_by, "Where": _where, "If": _if}


def _op_graph(case, operand):
    """y = x * f(operand): f applied to the encrypted x or to the plaintext p."""
    nodes = CASES[case](operand, "f")
    nodes.append(h.make_node("Mul", ["x", "f"], ["y"], name="final_mul"))
    return make(nodes, [vi("x"), vi("p")], [vi("y")], [const("one", np.ones(4)), const("zero", 0.0)],
                encrypted=["x"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_on_ciphertext(case, tmp_path, capsys):
    m = _op_graph(case, "x")
    res = check(m)
    assert not res.ok
    v = res.violations()
    node = f"the_{case.lower()}"
    assert [x["node"] for x in v] == [node]
    assert v[0]["op_type"] == case
    assert v[0]["encrypted_inputs"] == ["x"]
    assert v[0]["reason"]
    rc, out, _ = run_cli(["check", save(tmp_path, m)], capsys)
    assert rc == 1
    assert node in out and case in out and "x" in out and "FAIL" in out


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_op_on_plaintext_passes(case, tmp_path, capsys):
    m = _op_graph(case, "p")
    res = check(m)
    assert res.ok, res.violations()
    s = res.summary()
    assert s["depth"] == 1  # only the final x * f(p)
    assert s["encrypted_nodes"] == 1
    rc, out, _ = run_cli(["check", save(tmp_path, m)], capsys)
    assert rc == 0 and "OK" in out


def test_if_capturing_a_ciphertext_in_its_branch_is_refused():
    # plaintext condition, but a branch reads the encrypted x from the outer scope
    then_g = h.make_graph([h.make_node("Exp", ["x"], ["t_out"])], "then", [], [vi("t_out")])
    else_g = h.make_graph([h.make_node("Neg", ["x"], ["e_out"])], "else", [], [vi("e_out")])
    nodes = [h.make_node("ReduceSum", ["p"], ["psum"], keepdims=0),
             h.make_node("Cast", ["psum"], ["pbool"], to=T.BOOL),
             h.make_node("If", ["pbool"], ["y"], then_branch=then_g, else_branch=else_g, name="branchy")]
    res = check(make(nodes, [vi("x"), vi("p")], [vi("y")], encrypted=["x"]))
    assert [v["node"] for v in res.violations()] == ["branchy"]
    assert res.violations()[0]["encrypted_inputs"] == ["x"]


def test_div_by_plaintext_passes_and_costs_a_level():
    nodes = [h.make_node("Div", ["x", "p"], ["y"], name="x_over_p")]
    res = check(make(nodes, [vi("x"), vi("p")], [vi("y")], encrypted=["x"]))
    assert res.ok
    assert res.summary()["depth"] == 1


@pytest.mark.parametrize("exponent,ok,depth", [(2.0, True, 1), (3.0, True, 2), (4.0, True, 2), (0.5, False, None),
                                               (-1.0, False, None)])
def test_pow_constant_exponent(exponent, ok, depth):
    nodes = [h.make_node("Pow", ["x", "e"], ["y"], name="pow")]
    res = check(make(nodes, [vi("x")], [vi("y")], [const("e", exponent)], encrypted=["x"]))
    assert res.ok is ok
    if ok:
        assert res.summary()["depth"] == depth
    else:
        assert "exponent" in res.violations()[0]["reason"]


def test_pow_non_constant_exponent_fails():
    nodes = [h.make_node("Pow", ["x", "p"], ["y"], name="pow")]
    res = check(make(nodes, [vi("x"), vi("p")], [vi("y")], encrypted=["x"]))
    assert not res.ok
    assert "not a constant" in res.violations()[0]["reason"]


def test_pow_with_constant_node_exponent_passes():
    nodes = [h.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
             h.make_node("Pow", ["x", "two"], ["y"], name="pow")]
    assert check(make(nodes, [vi("x")], [vi("y")], encrypted=["x"])).ok


def test_unknown_custom_op_is_refused():
    nodes = [h.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft", name="fg")]
    g = h.make_graph(nodes, "g", [vi("x")], [vi("y")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])
    res = check(m, ["x"])
    assert "unknown op com.microsoft::FastGelu" in res.violations()[0]["reason"]


def test_encrypted_flag_overrides_metadata(capsys, tmp_path):
    # metadata says x is encrypted (clean); --encrypted p makes Exp(p) a violation
    nodes = [h.make_node("Exp", ["p"], ["e"], name="exp_p"), h.make_node("Mul", ["x", "e"], ["y"], name="mul")]
    path = save(tmp_path, make(nodes, [vi("x"), vi("p")], [vi("y")], encrypted=["x"]))
    assert run_cli(["check", path], capsys)[0] == 0
    rc, out, _ = run_cli(["check", path, "--encrypted", "p", "--format", "json"], capsys)
    assert rc == 1
    s = json.loads(out)
    assert s["encrypted_inputs"] == ["p"] and [v["node"] for v in s["violations"]] == ["exp_p"]
    # repeatable
    rc, out, _ = run_cli(["check", path, "--encrypted", "p", "--encrypted", "x", "--format", "json"], capsys)
    assert json.loads(out)["encrypted_inputs"] == ["p", "x"]


def test_json_summary_of_clean_graph(capsys, tmp_path):
    nodes = [h.make_node("MatMul", ["x", "w"], ["a"], name="mm"), h.make_node("Mul", ["a", "a"], ["b"], name="sq"),
             h.make_node("Add", ["b", "x2"], ["y"], name="add")]
    m = make(nodes, [vi("x", (2, 4)), vi("x2", (2, 3))], [vi("y", (2, 3))], [const("w", np.ones((4, 3)))],
             encrypted=["x"])
    rc, out, _ = run_cli(["check", save(tmp_path, m), "--format", "json"], capsys)
    s = json.loads(out)
    assert rc == 0 and s["ok"] and s["depth"] == 2
    assert s["nodes"] == 3 and s["encrypted_nodes"] == 3
    assert s["encrypted_op_types"] == {"Add": 1, "MatMul": 1, "Mul": 1}


def test_unreadable_files_exit_2(tmp_path, capsys):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf at all\xff\xff")
    rc, _, err = run_cli(["check", str(bad), "--encrypted", "x"], capsys)
    assert rc == 2 and "corrupt.onnx" in err
    rc, _, err = run_cli(["check", str(tmp_path / "missing.onnx")], capsys)
    assert rc == 2 and "missing.onnx" in err
    # no encrypted input declared, or a wrong name
    m = make([h.make_node("Neg", ["x"], ["y"])], [vi("x")], [vi("y")])
    path = save(tmp_path, m)
    rc, _, err = run_cli(["check", path], capsys)
    assert rc == 2 and "no encrypted input" in err
    rc, _, err = run_cli(["check", path, "--encrypted", "nope"], capsys)
    assert rc == 2 and "nope" in err
    with pytest.raises(GraphError):
        check(str(bad), ["x"])


# --- a stock transformers BERT must fail with a readable list -------------------------------------------------

def _stock_bert(tmp_path, impl):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    cfg._attn_implementation = impl
    model = BertForSequenceClassification(cfg).eval()

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, inputs_embeds, attention_mask):
            return self.m(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits

    path = tmp_path / f"bert_{impl}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(Wrap(model), (torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.long)),
                                 dynamo=True, opset_version=18, input_names=["inputs_embeds", "attention_mask"],
                                 output_names=["logits"], verbose=False)
    prog.save(str(path))
    return str(path)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_stock_bert_fails_with_readable_list(impl, tmp_path, capsys):
    path = _stock_bert(tmp_path, impl)
    rc, out, _ = run_cli(["check", path, "--encrypted", "inputs_embeds"], capsys)
    assert rc == 1
    for op in ("Softmax", "Erf", "Tanh"):
        assert f"({op})" in out, out
    assert "(LayerNormalization)" in out or "(Sqrt)" in out
    assert "refused:" in out and "encrypted input(s):" in out
    # every violation line names a node, and the encoder layers show up in the scopes
    assert "encoder.layer.0" in out and "encoder.layer.1" in out
    res = check(path, ["inputs_embeds"])
    kinds = {v["op_type"] for v in res.violations()}
    assert {"Softmax", "Erf", "Tanh"} <= kinds
    # the public mask alone is harmless: the mask preprocessing is plaintext
    assert all("attention_mask" not in v["encrypted_inputs"] for v in res.violations())


# --- the batch (slot) axis, Gemm operand rules, Where messages --------------------------------------------------

def _plain_interpreter_error(m):
    from cgf_fhe.simulate import Interpreter, make_backend

    with pytest.raises(GraphError) as exc:
        Interpreter(m, make_backend("plain"))
    return str(exc.value)


def test_moving_the_batch_axis_is_refused_naming_the_node():
    """Transpose -> ReduceSum(axis 1) -> Transpose sums across the examples of a batch: refused by check at the
    first Transpose (it used to pass with depth 0 and the plain/emulate backends mixed examples)."""
    nodes = [h.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2], name="move_batch"),
             h.make_node("ReduceSum", ["t", "ax"], ["s"], keepdims=1, name="sum_examples"),
             h.make_node("Transpose", ["s"], ["y"], perm=[1, 0, 2], name="move_back")]
    ax = numpy_helper.from_array(np.array([1], dtype=np.int64), "ax")
    m = make(nodes, [vi("x", ("batch", 3, 4))], [vi("y", ("batch", 3, 4))], [ax], encrypted=["x"])
    v = check(m).violations()
    assert [x["node"] for x in v] == ["move_batch"]
    assert "batch" in v[0]["reason"] and "[3, B, 4]" in v[0]["reason"]
    msg = _plain_interpreter_error(m)
    assert "move_batch" in msg and "sum_examples" not in msg


RANK = {"flatten0": 2, "reshape_merge": 2, "concat0": 3, "slice0": 3, "unsqueeze0": 4, "broadcast_up": 4}


@pytest.mark.parametrize("case", sorted(RANK))
def test_other_batch_axis_moves_are_refused(case):
    i64 = lambda n, v: numpy_helper.from_array(np.asarray(v, dtype=np.int64), n)  # noqa: E731
    inits = [i64("shape", [-1, 4]), i64("s0", [0]), i64("s1", [1]), i64("ax0", [0])]
    node = {"flatten0": h.make_node("Flatten", ["x"], ["y"], axis=0, name="bad"),
            "reshape_merge": h.make_node("Reshape", ["x", "shape"], ["y"], name="bad"),
            "concat0": h.make_node("Concat", ["x", "x"], ["y"], axis=0, name="bad"),
            "slice0": h.make_node("Slice", ["x", "s0", "s1", "ax0"], ["y"], name="bad"),
            "unsqueeze0": h.make_node("Unsqueeze", ["x", "ax0"], ["y"], name="bad"),
            "broadcast_up": h.make_node("Add", ["x", "p"], ["y"], name="bad")}[case]
    inits.append(const("p", np.ones((2, 1, 3, 4))))
    m = make([node], [vi("x", ("batch", 3, 4))], [h.make_tensor_value_info("y", T.FLOAT, ["d0", "d1", "d2", "d3"][:RANK[case]])], inits,
             encrypted=["x"])
    assert [x["node"] for x in check(m).violations()] == ["bad"]
    assert "bad" in _plain_interpreter_error(m)


GEMM_CASES = {  # name: (inputs, attributes, encrypted inputs)
    "encrypted_B": (["w", "x2", "c"], {}, ["x2"]),
    "transA_on_ct": (["x2", "w", "c"], {"transA": 1}, ["x2"]),
    "encrypted_C_beta": (["p", "w", "x2"], {"beta": 2.0}, ["x2"]),
}


@pytest.mark.parametrize("case", sorted(GEMM_CASES))
def test_gemm_operands_simulate_cannot_run_are_refused_by_check(case):
    ins, attrs, enc = GEMM_CASES[case]
    node = h.make_node("Gemm", ins, ["y"], name="the_gemm", **attrs)
    m = make([node], [vi("x2", (4, 4)), vi("p", (4, 4))], [vi("y", (4, 4))],
             [const("w", np.eye(4)), const("c", np.ones(4))], encrypted=enc)
    v = check(m).violations()
    assert [x["node"] for x in v] == ["the_gemm"]
    assert {"encrypted_B": "encrypted B", "transA_on_ct": "transA", "encrypted_C_beta": "beta"}[case] in v[0]["reason"]
    assert "the_gemm" in _plain_interpreter_error(m)


def test_gemm_with_an_encrypted_bias_and_beta_1_runs():
    from cgf_fhe.simulate import Interpreter, make_backend

    rng = np.random.default_rng(0)
    w, p = rng.normal(size=(4, 3)), rng.normal(size=(2, 4))
    node = h.make_node("Gemm", ["p", "w", "x"], ["y"], name="the_gemm", alpha=0.5)
    m = make([node], [vi("x", ("batch", 3)), vi("p", ("batch", 4))], [vi("y", ("batch", 3))], [const("w", w)],
             encrypted=["x"])
    assert check(m).ok
    x, pv = rng.normal(size=(2, 3)), p.astype(np.float32)
    out = Interpreter(m, make_backend("plain")).run({"x": x, "p": pv}).outputs["y"]
    np.testing.assert_allclose(out, 0.5 * pv @ w.astype(np.float32) + x, rtol=1e-5)


def test_where_messages_name_what_is_really_refused():
    nodes = [h.make_node("Greater", ["p", "zero"], ["cond"], name="cmp_plain"),
             h.make_node("Where", ["cond", "x", "p"], ["y"], name="select_plain_cond")]
    m = make(nodes, [vi("x"), vi("p")], [vi("y")], [const("zero", 0.0)], encrypted=["x"])
    reason = check(m).violations()[0]["reason"]
    assert "comparison" not in reason and "plaintext condition" in reason and "cond * x" in reason
    nodes = [h.make_node("Greater", ["x", "zero"], ["cond"], name="cmp_ct"),
             h.make_node("Where", ["cond", "p", "p"], ["y"], name="select_ct_cond")]
    m = make(nodes, [vi("x"), vi("p")], [vi("y")], [const("zero", 0.0)], encrypted=["x"])
    v = {x["node"]: x["reason"] for x in check(m).violations()}
    assert "comparison" in v["cmp_ct"] and "encrypted condition" in v["select_ct_cond"]
