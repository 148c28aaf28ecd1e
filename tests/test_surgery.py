"""Calibration, polynomialization, client/server split, interval accounting, checkpoints, depth."""
import copy
import json
import warnings

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from cgf_fhe import fhe_ops
from cgf_fhe import poly as P
from cgf_fhe.data import load_mrpc, make_loader, tokenize_split
from cgf_fhe.models import build_model, load_checkpoint, save_checkpoint
from cgf_fhe.softmax import set_softmax
from cgf_fhe.split import ServerModel, client_embed, fold_for_export
from cgf_fhe import surgery
from cgf_fhe.surgery import (LN_CHOICES, FheOptions, apply_fhe_settings, calibrate, depth_table, fhe_settings,
                             interval_penalty, interval_report, layer_depth, model_depth, named_approx_modules, polynomialize,
                             ln_cells, reset_interval_counters, set_frozen_blend, set_guard, shrink_layers)


@pytest.fixture(scope="module")
def data(mrpc_dir, tiny_tokenizer):
    ds = tokenize_split(load_mrpc(mrpc_dir)["train"], tiny_tokenizer, max_length=48, max_samples=32)
    return make_loader(ds, tiny_tokenizer, batch_size=8, shuffle=False)


@pytest.fixture(scope="module")
def ranges(data):
    model, _ = build_model("tiny", "cgf", 0.5, seed=0)
    return calibrate(model, data, progress=False)


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def _poly_model(ranges, **kw):
    model, tok = build_model("tiny", "cgf", 0.5, seed=0)
    model.eval()
    settings = polynomialize(model, FheOptions(poly="all", **kw), ranges)
    return model, tok, settings


def test_calibration_stores_intervals(ranges, data):
    assert ranges["n_examples"] == 32 and len(ranges["layers"]) == 2
    json.dumps(ranges)  # JSON-serialisable
    heads = 2
    want_exp = sum(heads * int(b["attention_mask"].shape[1]) * int(b["attention_mask"].sum()) for b in data)
    want_tokens = sum(int(b["attention_mask"].numel()) for b in data)
    for layer in ranges["layers"]:
        assert set(layer) == {"exp", "gelu", "ln_attn", "ln_ffn"}
        for key, st in layer.items():
            assert st["min"] <= st["quantiles"]["0.5"] <= st["max"], key
        assert layer["exp"]["count"] == want_exp  # exp argument over valid keys only
        assert layer["ln_attn"]["count"] == want_tokens  # one variance per token
        assert layer["ln_attn"]["min"] > 0
        assert layer["ln_attn"]["valid_tokens"] == sum(int(b["attention_mask"].sum()) for b in data)
    assert ranges["pooler"]["tanh"]["count"] == 32 * 64
    # calibration must leave the model untouched
    model, _ = build_model("tiny", "cgf", 0.5, seed=0)
    before = [type(m) for m in model.modules()]
    calibrate(model, data, max_batches=1, progress=False)
    assert [type(m) for m in model.modules()] == before
    assert not hasattr(model.bert.encoder.layer[0].attention.self, "cgf_exp")


def test_calibrate_polynomial_model_measures_its_current_functions(ranges, data):
    model, _, _ = _poly_model(ranges, ln="newton")
    before = [(k, m) for k, m in named_approx_modules(model)]
    r2 = calibrate(model, data, max_batches=2, progress=False)
    assert [(k, m) for k, m in named_approx_modules(model)] == before  # modules restored
    n = sum(int(b["attention_mask"].numel()) for b in list(data)[:2])
    assert all(layer["ln_attn"]["count"] == n for layer in r2["layers"])
    # layer 0's exp sees the same inputs as before polynomialization, later ops see approximated inputs
    assert r2["layers"][0]["exp"]["min"] >= ranges["layers"][0]["exp"]["min"]
    assert r2["layers"][0]["exp"]["max"] <= ranges["layers"][0]["exp"]["max"]


def test_polynomialize_installs_modules_with_margin(ranges):
    model, _, settings = _poly_model(ranges, margin=0.1, ln="frozen")
    json.dumps(settings)
    mods = dict(named_approx_modules(model))
    assert len(mods) == 2 * 4 + 1
    gelu = mods["layers.0.gelu"]
    st = ranges["layers"][0]["gelu"]
    w = st["max"] - st["min"]
    assert gelu.interval == pytest.approx((st["min"] - 0.1 * w, st["max"] + 0.1 * w))
    assert isinstance(model.bert.encoder.layer[1].attention.self.cgf_exp, P.PolyExp)
    assert isinstance(model.bert.pooler.activation, P.PolyTanh)
    assert isinstance(model.bert.encoder.layer[0].output.LayerNorm, P.FrozenLayerNorm)
    assert isinstance(model.bert.embeddings.LayerNorm, nn.LayerNorm)  # client side stays exact
    assert set(settings["modules"]) == set(mods)
    for key, d in settings["modules"].items():
        if "approx" in d:
            assert d["approx"]["max_error"] == pytest.approx(mods[key].approx.max_error)
    with pytest.raises(ValueError, match="CGF softmax"):
        m2, _ = build_model("tiny", "exact", seed=0)
        polynomialize(m2, FheOptions(poly="all"), ranges)
    with pytest.raises(ValueError, match="no data for layers.0"):
        _poly_model({"layers": [{}, {}], "pooler": {}})


@pytest.mark.parametrize("ln", LN_CHOICES)
def test_split_invariant_and_fold(ranges, data, ln):
    model, _, _ = _poly_model(ranges, ln=ln)
    batch = next(iter(data))
    with torch.no_grad():
        ref = model(**_inputs(batch)).logits
        emb = client_embed(model, batch["input_ids"], batch["token_type_ids"])
        mask = batch["attention_mask"].float()
        server = ServerModel(model)(emb, mask)
        folded = fold_for_export(model)
        server_f = ServerModel(folded)(emb, mask)
    torch.testing.assert_close(server, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(server_f, ref, rtol=1e-4, atol=1e-5)
    layer = folded.bert.encoder.layer[0]
    assert layer.attention.self.scaling == 1.0 and layer.attention.self.cgf_exp.prescaled
    assert layer.intermediate.intermediate_act_fn.prescaled and folded.bert.pooler.activation.prescaled
    assert model.bert.encoder.layer[0].attention.self.scaling != 1.0  # original untouched


def test_per_head_coefficients_fold_export_and_reload(ranges, data, tmp_path):
    """Per-head CGF coefficients change the logits, survive fold_for_export (c/alpha per head, like the
    single c) and a checkpoint round trip."""
    from cgf_fhe.softmax import set_head_coeffs

    model, tok = build_model("tiny", "cgf", 0.5, seed=0)
    model.eval()
    with torch.no_grad():  # spread the scores (random-init ones are ~0, where c hardly matters), then calibrate
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(6.0)
            layer.attention.self.key.weight.mul_(6.0)
    settings = polynomialize(model, FheOptions(poly="all", ln="newton"), calibrate(model, data, progress=False))
    batch = next(iter(data))
    with torch.no_grad():
        uniform = model(**_inputs(batch)).logits
        set_head_coeffs(model, [[0.35, 0.8], [0.6, 0.45]])
        ref = model(**_inputs(batch)).logits
        emb = client_embed(model, batch["input_ids"], batch["token_type_ids"])
        mask = batch["attention_mask"].float()
        folded = fold_for_export(model)
        server_f = ServerModel(folded)(emb, mask)
    assert (ref - uniform).abs().max() > 1e-5  # the coefficients are used
    torch.testing.assert_close(server_f, ref, rtol=1e-4, atol=1e-5)
    alpha = float(folded.bert.encoder.layer[0].attention.self.cgf_exp.alpha)
    torch.testing.assert_close(folded.bert.encoder.layer[0].attention.self.cgf_coeff_heads,
                               torch.tensor([0.35, 0.8]) / alpha)
    torch.testing.assert_close(model.bert.encoder.layer[0].attention.self.cgf_coeff_heads, torch.tensor([0.35, 0.8]))
    save_checkpoint(model, tok, tmp_path / "ck", {"softmax": "cgf", "coeff": 0.5, "fhe": settings})
    again, _, _ = load_checkpoint(tmp_path / "ck")
    assert again.config.cgf_coeff_heads == [[0.35, 0.8], [0.6, 0.45]]
    with torch.no_grad():
        torch.testing.assert_close(again(**_inputs(batch)).logits, ref, rtol=0, atol=1e-6)


def test_last_layer_runs_on_the_first_token_only(ranges, data):
    """The server's last layer computes one query row and runs its LN/FFN on [CLS] only; same logits."""
    model, _, _ = _poly_model(ranges, ln="newton")
    keys = set(model.state_dict())
    batch = next(iter(data))
    seq = batch["input_ids"].shape[1]
    assert seq > 4 and (batch["attention_mask"] == 0).any()  # padded batch
    shapes = {}
    hooks = [layer.intermediate.dense.register_forward_hook(
        lambda mod, inp, out, i=i: shapes.__setitem__(i, tuple(inp[0].shape)))
        for i, layer in enumerate(model.bert.encoder.layer)]
    with torch.no_grad():
        emb = client_embed(model, batch["input_ids"], batch["token_type_ids"])
        mask = batch["attention_mask"].float()
        full = ServerModel(model, first_token_last_layer=False)(emb, mask)
        assert shapes[1][1] == seq
        first = ServerModel(model)(emb, mask)
    for h in hooks:
        h.remove()
    assert shapes[0][1] == seq and shapes[1][1] == 1  # layer 0 on every token, the last on [CLS] only
    torch.testing.assert_close(first, full, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == keys  # the attached attention core has no parameters (checkpoints unchanged)


def test_exact_model_split_invariant(data):
    for softmax in ("exact", "cgf"):
        model, _ = build_model("tiny", softmax, 0.5, seed=1)
        model.eval()
        batch = next(iter(data))
        with torch.no_grad():
            ref = model(**_inputs(batch)).logits
            emb = client_embed(model, batch["input_ids"], batch["token_type_ids"])
            got = ServerModel(model)(emb, batch["attention_mask"].float())
            got_f = ServerModel(fold_for_export(model))(emb, batch["attention_mask"].float())
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_f, ref, rtol=1e-4, atol=1e-5)


# --- the server path has no non-polynomial op on encrypted values -----------------------------------------
FORBIDDEN = {"exp", "erf", "tanh", "sqrt", "rsqrt", "softmax", "_softmax", "log", "reciprocal", "gelu", "layer_norm",
             "native_layer_norm", "pow", "sigmoid", "where", "maximum", "minimum", "clamp", "abs", "sign", "amax",
             "amin", "max", "min", "gt", "lt", "ge", "le", "eq", "ne", "relu", "scaled_dot_product_attention"}


# ops whose trailing operands only contribute their (public) shape: number of data operands
SHAPE_ONLY = {"expand_as": 1, "zeros_like": 0, "ones_like": 0, "empty_like": 0, "full_like": 0, "sym_size": 0,
              "size": 0}


def _encrypted_violations(model, emb, mask):
    """Taint walk over the torch.export graph of ServerModel: ops refused on values derived from the
    (encrypted) embeddings. Division is allowed only by a plaintext divisor."""
    ep = torch.export.export(ServerModel(model), (emb, mask))
    graph = ep.graph_module.graph
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    tainted = {user[0]}  # embeddings; user[1] is the public mask
    bad, ops_seen = [], set()

    def names(a):
        out = []
        torch.fx.node.map_arg(a, lambda n: out.append(n.name))
        return out

    for node in graph.nodes:
        if node.op != "call_function":
            continue
        op = str(node.target).split(".")[1] if str(node.target).startswith("aten.") else str(node.target)
        if op in SHAPE_ONLY:  # a ciphertext's shape is public: only the data operand carries taint
            ins = names(node.args[:SHAPE_ONLY[op]])
        else:
            ins = names(node.args) + names(node.kwargs)
        if not any(i in tainted for i in ins):
            continue
        tainted.add(node.name)
        ops_seen.add(op)
        if op in FORBIDDEN:
            bad.append((node.name, op))
        elif op.startswith("div"):
            divisor = names(node.args[1:2])
            if any(d in tainted for d in divisor):
                bad.append((node.name, op))
    return bad, ops_seen


def _server_modules_ok(model):
    bad = []
    for i, layer in enumerate(model.bert.encoder.layer):
        for name, m in layer.named_modules():
            if isinstance(m, (nn.LayerNorm, nn.Tanh, nn.Softmax, nn.GELU)) or "Activation" in type(m).__name__:
                bad.append((i, name, type(m).__name__))
        if not isinstance(getattr(layer.attention.self, "cgf_exp", None), P.PolyExp):
            bad.append((i, "attention.self.cgf_exp", "missing"))
    for name, m in list(model.bert.pooler.named_modules()) + list(model.classifier.named_modules()):
        if isinstance(m, (nn.Tanh, nn.LayerNorm)):
            bad.append(("head", name, type(m).__name__))
    if model.config._attn_implementation != "cgf":
        bad.append(("config", "attn", model.config._attn_implementation))
    return bad


@pytest.mark.parametrize("ln", LN_CHOICES)
def test_server_path_is_polynomial(ranges, data, ln):
    model, _, _ = _poly_model(ranges, ln=ln)
    batch = next(iter(data))
    emb = client_embed(model, batch["input_ids"], batch["token_type_ids"]).detach()
    mask = batch["attention_mask"].float()
    assert _server_modules_ok(model) == []
    bad, ops = _encrypted_violations(fold_for_export(model), emb, mask)
    assert bad == [], bad
    assert {"mul", "add", "sub"} <= {o.split("_")[0] for o in ops}
    # negative control: the same walk flags the exact functions of the unpolynomialized model
    plain, _ = build_model("tiny", "cgf", 0.5, seed=0)
    assert {k[2] for k in _server_modules_ok(plain)} >= {"LayerNorm", "GELUActivation", "missing"}
    bad_plain, _ = _encrypted_violations(fold_for_export(plain), emb, mask)
    assert {op for _, op in bad_plain} >= {"exp", "gelu", "tanh"}


def _onnx(model, emb, mask):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(ServerModel(fold_for_export(model)), (emb, mask), dynamo=True, opset_version=18,
                                 input_names=["embeddings", "attention_mask"], output_names=["logits"], verbose=False)
    return prog.model_proto


@pytest.mark.parametrize("ln", LN_CHOICES)
def test_onnx_export_passes_verifier_with_stated_depth(ranges, data, ln):
    model, _, settings = _poly_model(ranges, ln=ln)
    batch = next(iter(data))
    emb = client_embed(model, batch["input_ids"], batch["token_type_ids"]).detach()
    an = fhe_ops.analyze(_onnx(model, emb, batch["attention_mask"].float()), ["embeddings"])
    assert an.violations == []
    stated = model_depth(model)
    assert settings["depth"] == stated
    assert an.total_depth == stated["total"], (an.total_depth, stated)
    mods = dict(named_approx_modules(model))
    for i in range(2):
        e = mods[f"layers.{i}.exp"].approx.depth(prescaled=True)
        g = mods[f"layers.{i}.gelu"].approx.depth(prescaled=True)
        assert stated["per_layer"][i] == layer_depth(e, g, mods[f"layers.{i}.ln_attn"].depth,
                                                     mods[f"layers.{i}.ln_ffn"].depth) - (
            surgery.FOLD_SAVING + (surgery.STATS_FOLD_SAVING if i else 0) if ln == "newton"
            else surgery.V_FOLD_SAVING)  # export folds (cgf_fhe.fold; the statistics' after the first layer)


def test_frozen_attn_freezes_only_the_attention_output_layernorms(ranges, data):
    """--ln frozen-attn: every ln_attn is a FrozenLayerNorm (depth 1, its calibrated constant), every ln_ffn a
    NewtonLayerNorm identical to the all-Newton model's; each layer is 1 + Newton depth cheaper than all-Newton
    at the same exp/GELU; the blend reaches only the frozen ones; the CLI accepts exactly LN_CHOICES."""
    from cgf_fhe.cli import build_parser

    mixed, _, settings = _poly_model(ranges, ln="frozen-attn")
    newton, _, _ = _poly_model(ranges, ln="newton")
    frozen, _, _ = _poly_model(ranges, ln="frozen")
    m, n, f = (dict(named_approx_modules(x)) for x in (mixed, newton, frozen))
    for i in range(2):
        a, b = m[f"layers.{i}.ln_attn"], m[f"layers.{i}.ln_ffn"]
        assert isinstance(a, P.FrozenLayerNorm) and a.inv_sigma == f[f"layers.{i}.ln_attn"].inv_sigma
        assert isinstance(b, P.NewtonLayerNorm) and b.depth == n[f"layers.{i}.ln_ffn"].depth > 1
        assert b.to_settings() == n[f"layers.{i}.ln_ffn"].to_settings()
    dm, dn = model_depth(mixed), model_depth(newton)
    for i in range(2):
        # (the all-Newton student's export folds save FOLD_SAVING levels a layer; the mixed one is not folded)
        assert dn["per_layer"][i] - dm["per_layer"][i] == (n[f"layers.{i}.ln_attn"].depth - 1 - surgery.LN_FOLD_SAVING
                                                           - (surgery.STATS_FOLD_SAVING if i else 0))
    assert settings["options"]["ln"] == "frozen-attn"
    assert set_frozen_blend(mixed, 0.0) == 2 and set_frozen_blend(newton, 0.0) == 0
    batch = next(iter(data))
    with torch.no_grad():  # blend 0 = exact LayerNorm where frozen: the model moves towards all-Newton
        b0 = mixed(**_inputs(batch)).logits
        set_frozen_blend(mixed, 1.0)
        b1 = mixed(**_inputs(batch)).logits
        ref = newton(**_inputs(batch)).logits
    assert (b0 - ref).abs().max() < (b1 - ref).abs().max()
    parser = build_parser()
    for ln in LN_CHOICES:  # the CLI's literal choices (it does not import torch) are the surgery's
        assert parser.parse_args(["distill", "-o", "x", "--ln", ln]).ln == ln
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "-o", "x", "--ln", "mixed"])


def test_exact_model_fails_verifier(data):
    model, _ = build_model("tiny", "cgf", 0.5, seed=0)
    model.eval()
    batch = next(iter(data))
    emb = client_embed(model, batch["input_ids"], batch["token_type_ids"]).detach()
    an = fhe_ops.analyze(_onnx(model, emb, batch["attention_mask"].float()), ["embeddings"])
    assert {v.op_type for v in an.violations} >= {"Exp", "Tanh"}


# --- interval accounting --------------------------------------------------------------------------------------
def test_out_of_interval_counter_counts_planted_outliers(ranges, data):
    model, _, _ = _poly_model(ranges, margin=0.0, ln="frozen")
    reset_interval_counters(model)
    with torch.no_grad():
        for batch in data:
            model(**_inputs(batch))
    rep = interval_report(model)
    # margin 0: the first approximated op sees exactly its calibration inputs, so none is outside; later ops
    # see inputs shifted by upstream approximation errors
    assert rep["ops"]["layers.0.exp"]["n_out"] == 0 and rep["ops"]["layers.0.exp"]["n_seen"] > 0
    model, _, _ = _poly_model(ranges, ln="frozen")  # default margin: the calibration data is inside everywhere
    reset_interval_counters(model)
    with torch.no_grad():
        for batch in data:
            model(**_inputs(batch))
    rep = interval_report(model)
    # (frozen LayerNorms change the statistics downstream, so later LN variances may leave their calibrated
    # range: that is what their counter is for)
    assert {k: t["n_out"] for k, t in rep["totals"].items() if k != "ln_frozen"} == {"exp": 0, "gelu": 0, "tanh": 0}
    assert rep["ops"]["layers.0.ln_attn"]["n_out"] == 0  # upstream of any approximation error but exp's
    assert rep["n_seen"] > 0
    model(**_inputs(next(iter(data))))
    pen = float(interval_penalty(model).detach())
    assert pen == pytest.approx(sum(float(m.last_penalty.detach()) for _, m in named_approx_modules(model)
                                    if m.last_penalty is not None))
    reset_interval_counters(model)
    planted = 5
    dense = model.bert.encoder.layer[0].intermediate.dense
    lo, hi = model.bert.encoder.layer[0].intermediate.intermediate_act_fn.interval

    def plant(mod, inp, out):  # every pre-activation lies in [lo, hi]; + (hi - lo) puts it strictly above
        out = out.clone()
        out[0, 0, :planted] = out[0, 0, :planted] + (hi - lo)
        return out

    h = dense.register_forward_hook(plant)
    try:
        batch = next(iter(data))
        out = model(**_inputs(batch))
    finally:
        h.remove()
    rep = interval_report(model)
    assert rep["ops"]["layers.0.gelu"]["n_out"] == planted
    assert rep["ops"]["layers.0.gelu"]["n_seen"] == batch["attention_mask"].numel() * 128
    assert rep["ops"]["layers.0.exp"]["n_out"] == 0
    for key in ("layers.0.exp", "layers.0.ln_attn", "layers.0.gelu"):
        assert rep["ops"][key]["n_seen"] > 0
    assert rep["totals"]["gelu"]["n_out"] >= planted
    pen = interval_penalty(model)
    assert torch.isfinite(pen) and float(pen.detach()) > 0  # finite even if later polynomials blew up
    gelu0 = model.bert.encoder.layer[0].intermediate.intermediate_act_fn
    gelu0.last_penalty.backward()
    assert torch.isfinite(dense.weight.grad).all() and dense.weight.grad.abs().sum() > 0
    reset_interval_counters(model)
    assert interval_report(model)["n_out"] == 0


def test_guard_and_blend_training_aids(ranges, data):
    model, _, _ = _poly_model(ranges, ln="frozen")
    batch = next(iter(data))
    gelu0 = model.bert.encoder.layer[0].intermediate.intermediate_act_fn
    lo, hi = gelu0.interval

    def plant(mod, inp, out):
        out = out.clone()
        out[0, 0, :3] = hi + 100 * (hi - lo)
        return out

    h = model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(plant)
    try:
        with torch.no_grad():
            wild = gelu0(torch.full((3,), hi + 100 * (hi - lo)))
            reset_interval_counters(model)
            assert set_guard(model, True) == 2 * 2 + 1 + 0  # exp, gelu per layer + tanh (frozen LN has no poly)
            guarded = model(**_inputs(batch)).logits
            assert interval_report(model)["ops"]["layers.0.gelu"]["n_out"] == 3  # still counted
            set_guard(model, False)
    finally:
        h.remove()
    assert not torch.isfinite(wild).all() or wild.abs().min() > 1e6  # the polynomial far outside ...
    assert torch.isfinite(guarded).all()  # ... but the guarded model stays finite
    # blend 0 is the exact LayerNorm, blend < 1 cannot be exported
    ln = model.bert.encoder.layer[0].output.LayerNorm
    x = torch.randn(2, 5, 64) * 3 + 1
    assert set_frozen_blend(model, 0.0) == 4
    ref = torch.nn.functional.layer_norm(x, (64,), ln.weight, ln.bias, ln.eps)
    torch.testing.assert_close(ln(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="blend"):
        fold_for_export(model)
    set_frozen_blend(model, 1.0)
    assert not fold_for_export(model).bert.encoder.layer[0].intermediate.intermediate_act_fn.guard


# --- checkpoints ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ln", LN_CHOICES)
def test_checkpoint_round_trip(ranges, data, tmp_path, ln):
    model, tok, settings = _poly_model(ranges, ln=ln)
    with torch.no_grad():  # pretend distillation changed the LayerNorm parameters
        for m in model.modules():
            if isinstance(m, (P.FrozenLayerNorm, P.NewtonLayerNorm)):
                m.weight.mul_(1.02).add_(0.01)
                m.bias.add_(0.01)
    batch = next(iter(data))
    with torch.no_grad():
        ref = model(**_inputs(batch)).logits
        plain = build_model("tiny", "cgf", 0.5, seed=0)[0].eval()(**_inputs(batch)).logits
    assert torch.isfinite(ref).all() and not torch.equal(ref, plain)
    save_checkpoint(model, tok, tmp_path / "ck", {"softmax": "cgf", "coeff": 0.5, "fhe": fhe_settings(model, ranges)})
    loaded, _, st = load_checkpoint(tmp_path / "ck")
    assert st["fhe"]["options"]["ln"] == ln
    with torch.no_grad():
        got = loaded(**_inputs(batch)).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert [k for k, _ in named_approx_modules(loaded)] == [k for k, _ in named_approx_modules(model)]
    # applying the settings twice is idempotent
    apply_fhe_settings(loaded, st["fhe"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_inputs(batch)).logits, ref, rtol=0, atol=0)


def test_options_round_trip():
    o = FheOptions(poly="all", ln="newton", exp_degree=7, newton_steps=2, margin=0.2)
    assert FheOptions.from_dict(json.loads(json.dumps(o.to_dict()))) == o
    with pytest.raises(ValueError):
        FheOptions(ln="exact")


# --- smaller students and depth tables ------------------------------------------------------------------------
def test_shrink_layers():
    def fresh():
        return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=6,
                                                        num_attention_heads=2, intermediate_size=32, num_labels=2))

    torch.manual_seed(0)
    model = fresh()
    set_softmax(model, "cgf", 0.5)
    orig = [copy.deepcopy(layer.state_dict()) for layer in model.bert.encoder.layer]
    kept = shrink_layers(model, 3)
    assert kept == [1, 3, 5]
    assert model.config.num_hidden_layers == 3 and len(model.bert.encoder.layer) == 3
    for j, i in enumerate(kept):
        for k, v in model.bert.encoder.layer[j].state_dict().items():
            assert torch.equal(v, orig[i][k])
    ids = torch.randint(0, 100, (2, 7))
    assert model(input_ids=ids).logits.shape == (2, 2)
    assert shrink_layers(fresh(), 1) == [5] and shrink_layers(fresh(), 6) == list(range(6))
    assert shrink_layers(fresh(), 2) == [2, 5]
    with pytest.raises(ValueError):
        shrink_layers(fresh(), 7)


def test_depth_table():
    t = depth_table(FheOptions(poly="all", ln="newton", exp_degree=15, exp_squarings=2, newton_steps=2,
                               invsqrt_degree=31, gelu_degree=31))
    json.dumps(t)
    rows = t["rows"]
    frozen = [r for r in rows if r["ln"] == "frozen"]
    newton = [r for r in rows if r["ln"] == "newton" and r["newton_steps"] == 2]
    assert len(frozen) == len(newton) > 0
    for r in frozen + newton:
        assert r["layer_depth"] == 9 + r["exp_depth"] + r["gelu_depth"] + 2 * r["ln_depth"]
    assert all(r["ln_depth"] == 1 for r in frozen)
    assert {r["ln_depth"] for r in newton} == {2 + 5 + 4}  # degree 31 PS (5) + 2 Newton steps (the last absorbs dg*y)
    ps15 = [r for r in frozen if r["exp_form"] == "ps" and r["exp_degree"] == 15]
    assert [r["exp_depth"] for r in ps15 if r["gelu_degree"] == 31] == [4, 5, 6, 7, 8]  # 4 + squarings
    cur = t["current"]
    assert cur["exp_depth"] == 6 and cur["ln_depth"] == 11 and cur["gelu_depth"] == 5
    assert cur["layer_depth"] == 9 + 6 + 5 + 22
    mixed = [r for r in rows if r["ln"] == "frozen-attn" and r["newton_steps"] == 2]
    assert len(mixed) == len(newton) and all(r["ln_depth"] is None for r in mixed)
    for r in rows:
        assert r["layer_depth"] == 9 + r["exp_depth"] + r["gelu_depth"] + r["ln_attn_depth"] + r["ln_ffn_depth"]
    assert {(r["ln_attn_depth"], r["ln_ffn_depth"]) for r in mixed} == {(1, 11)}
    assert {r["layer_depth"] for r in newton} == {r["layer_depth"] + 10 for r in mixed}
    assert ln_cells(mixed[0]) == ("frozen after attention, Newton, 2 steps after the FFN", "1 + 11")
    assert ln_cells(newton[0]) == ("Newton, 2 steps", "11") and ln_cells(frozen[0]) == ("frozen", "1")
    cur = depth_table(FheOptions(poly="all", ln="frozen-attn", exp_degree=15, exp_squarings=2, newton_steps=2,
                                 invsqrt_degree=31, gelu_degree=31))["current"]
    assert (cur["ln_attn_depth"], cur["ln_ffn_depth"], cur["ln_depth"]) == (1, 11, None)
    assert cur["layer_depth"] == 9 + 6 + 5 + 1 + 11


def test_cover_ranges_refits_only_the_op_whose_inputs_drift(ranges, data):
    """A Newton LayerNorm whose interval the data leaves (as after training under the guard): cover_ranges
    refits that op on the union of its interval and the measured range, leaves the others as they were,
    and the unclamped model then matches the exact one again."""
    from cgf_fhe.surgery import cover_ranges

    exact, _ = build_model("tiny", "cgf", 0.5, seed=0)
    exact.eval()
    drifted = copy.deepcopy(ranges)
    st = drifted["layers"][0]["ln_ffn"]
    st["min"], st["max"] = 0.2 * st["min"], 0.2 * st["max"]  # the interval misses every input (5x above it)
    model, _, _ = _poly_model(drifted, ln="newton")
    key = "layers.0.ln_ffn"
    before_mods = {k: json.dumps(m.to_settings(), sort_keys=True) for k, m in named_approx_modules(model)}

    def logit_err():
        reset_interval_counters(model)
        with torch.no_grad():
            errs = [float((model(**_inputs(b)).logits - exact(**_inputs(b)).logits).abs().nan_to_num(1e9).max())
                    for b in data]
        return max(errs), interval_report(model)["ops"]

    err_before, ops_before = logit_err()
    assert ops_before[key]["n_out"] > 0
    set_guard(model, True)
    measured = calibrate(model, data, progress=False)
    set_guard(model, False)
    changed = cover_ranges(model, measured)
    assert key in changed
    c = changed[key]
    assert c["new"][0] <= c["measured"][0] and c["new"][1] >= c["measured"][1]  # covers what was measured
    assert c["new"][0] <= c["old"][0] and c["new"][1] >= c["old"][1]  # and what it covered before
    assert c["depth_new"] >= c["depth_old"]
    after_mods = {k: json.dumps(m.to_settings(), sort_keys=True) for k, m in named_approx_modules(model)}
    assert {k for k in after_mods if after_mods[k] != before_mods[k]} == set(changed)  # nothing else refitted
    err_after, ops_after = logit_err()
    assert ops_after[key]["n_out"] == 0
    assert err_after < 0.05 and err_after < err_before, (err_before, err_after)
    # a second pass finds nothing left to cover
    set_guard(model, True)
    again = calibrate(model, data, progress=False)
    set_guard(model, False)
    assert cover_ranges(model, again) == {}


def test_lean_profile_depth_band_and_errors(ranges, data):
    """Issue #22: the lean profile's exported depth per layer is 27 (9 + exp 5 + GELU 4 + 2 x LN 7, less the 5
    levels the export folds save), measured on the ONNX graph; each Newton LayerNorm's interval top is the calibrated 99.9% quantile (plus margin), not the
    maximum; unknown profiles and band quantiles are refused."""
    lean = FheOptions.from_profile("lean")
    cur = depth_table(lean)["current"]
    assert cur["layer_depth"] == 32 and cur["layer_depth_exported"] == 27
    model, _ = build_model("tiny", "cgf", 0.5, seed=0)
    model.eval()
    settings = polynomialize(model, lean, ranges)
    batch = next(iter(data))
    emb = client_embed(model, batch["input_ids"], batch["token_type_ids"]).detach()
    an = fhe_ops.analyze(_onnx(model, emb, batch["attention_mask"].float()), ["embeddings"])
    assert an.violations == []
    stated = model_depth(model)
    assert stated["per_layer"] == [27, 26] and an.total_depth  # 26: the CGF statistics on Q/K (cgf_fhe.fold) == stated["total"] == settings["depth"]["total"]
    default_model, _, _ = _poly_model(ranges)
    assert model_depth(default_model)["per_layer"][0] > 27
    mods = dict(named_approx_modules(model))
    for i in range(2):
        for k in ("ln_attn", "ln_ffn"):
            st = ranges["layers"][i][k]
            q = st["quantiles"]["0.999"]
            lo, hi = mods[f"layers.{i}.{k}"].interval
            assert hi == pytest.approx(min(st["max"], q) * (1 + lean.margin) + 1e-9)
            assert mods[f"layers.{i}.{k}"].newton_steps == 0
    with pytest.raises(ValueError, match="unknown FHE profile"):
        FheOptions.from_profile("leaner")
    with pytest.raises(ValueError, match="ln_band"):
        FheOptions(poly="all", ln_band=0.95)


def test_cover_ranges_widens_a_lean_layernorm_past_its_band(ranges):
    """Epoch cover on a lean student (``ln_band``): the training-time counters (:func:`tracked_ranges`) carry no
    quantiles; cover_ranges must still refit a banded LayerNorm whose tokens left the band (an unclamped
    polynomial explodes there: the untrained lean MiniLM student scored 0.3162 with every logit non-finite), to
    an interval holding what was measured, like any other op. It raised ``ln_band 0.999: ... keep no 0.999
    quantile`` on the first mid-epoch cover of a MiniLM lean run."""
    from cgf_fhe.surgery import cover_ranges, tracked_ranges

    lean = FheOptions.from_profile("lean")
    model, _ = build_model("tiny", "cgf", 0.5, seed=0)
    model.eval()
    polynomialize(model, lean, ranges)
    mods = dict(named_approx_modules(model))
    key, gkey = "layers.0.ln_ffn", "layers.0.gelu"
    (lo, hi), (glo, ghi) = mods[key].interval, mods[gkey].interval
    measured = tracked_ranges(model)  # no excursions yet: every op reports its own interval
    measured["layers"][0]["ln_ffn"].update(min=0.5 * lo, max=10.0 * hi, count=100)  # massive tokens above the band
    measured["layers"][0]["gelu"].update(max=ghi + 2.0, count=100)
    changed = cover_ranges(model, measured)
    assert set(changed) == {key, gkey}
    new_lo, new_hi = changed[key]["new"]
    assert new_lo <= 0.5 * lo and new_hi >= 10.0 * hi, (lo, hi, changed[key])
    assert changed[gkey]["new"][1] >= ghi + 2.0
    assert dict(named_approx_modules(model))[key].newton_steps == 0  # still the lean form
    again = tracked_ranges(model)
    assert key not in cover_ranges(model, again)


def test_distill_flags_override_profile_band_and_exp_squarings():
    """``--ln-band max`` turns a profile's band off (None: the calibrated maximum; a None override would be
    ignored by ``from_profile``), ``--ln-band 0.9999`` picks another quantile, ``--exp-squarings`` reaches the
    options; a band without ``--poly all`` is refused naming the flag."""
    from cgf_fhe.cli import build_parser
    from cgf_fhe.errors import UserError
    from cgf_fhe.training.cli import _fhe_from_args

    def opts(*flags):
        args = build_parser().parse_args(["distill", "--model", "tiny", "-o", "x", *flags])
        return _fhe_from_args(args)

    lean = opts("--fhe-profile", "lean")
    assert lean.ln_band == 0.999 and lean.exp_squarings == 1
    o = opts("--fhe-profile", "lean", "--ln-band", "max", "--exp-squarings", "2", "--exp-degree", "7",
             "--newton-steps", "1")
    assert o.ln_band is None and o.exp_squarings == 2 and o.exp_degree == 7 and o.newton_steps == 1
    assert o.gelu_degree == lean.gelu_degree and o.ln_cls_scale  # the rest of the profile stays
    assert opts("--fhe-profile", "lean", "--ln-band", "0.9999").ln_band == 0.9999
    # lean-b is exactly the lean profile with the overrides that trained on MiniLM (quick-leanb-g31)
    b = opts("--fhe-profile", "lean-b")
    assert b == opts("--fhe-profile", "lean", "--ln-band", "max", "--exp-squarings", "2", "--exp-degree", "7",
                     "--newton-steps", "1", "--gelu-degree", "31")
    with pytest.raises(UserError, match="--ln-band"):
        opts("--ln-band", "max")


def test_gelu_band_fit_uses_calibrated_quantiles_and_cover_keeps_its_core(ranges):
    """``gelu_tail_weight``: every GELU is a band fit on its calibrated 0.01%-99.99% quantiles (widened by the
    margin) over the full calibrated interval (same interval and depth as the plain fit); an epoch-cover refit,
    whose training-time counters keep no quantiles, keeps that core instead of falling back to a plain fit."""
    from cgf_fhe.surgery import cover_ranges, gelu_core, tracked_ranges

    opts = FheOptions(poly="all", gelu_degree=15, gelu_tail_weight=0.1)
    model, _ = build_model("tiny", "cgf", 0.5, seed=0)
    model.eval()
    polynomialize(model, opts, ranges)
    plain_model, _, _ = _poly_model(ranges, gelu_degree=15)
    mods, plain = dict(named_approx_modules(model)), dict(named_approx_modules(plain_model))
    for i in range(2):
        key = f"layers.{i}.gelu"
        st = ranges["layers"][i]["gelu"]
        p = mods[key].approx
        assert p.method == "band" and p.tail_weight == 0.1
        assert p.core == pytest.approx(gelu_core(st, opts.margin))
        lo, hi = st["quantiles"]["0.0001"], st["quantiles"]["0.9999"]
        assert p.core[0] < lo and p.core[1] > hi and p.core[1] - p.core[0] < p.b - p.a
        assert mods[key].interval == plain[key].interval and mods[key].depth == plain[key].depth
    key = "layers.0.gelu"
    core = mods[key].approx.core
    ghi = mods[key].interval[1]
    measured = tracked_ranges(model)
    measured["layers"][0]["gelu"].update(max=ghi + 2.0, count=100)
    assert "quantiles" not in measured["layers"][0]["gelu"]
    assert set(cover_ranges(model, measured)) == {key}
    p = dict(named_approx_modules(model))[key].approx
    assert p.method == "band" and p.core == pytest.approx(core) and p.b >= ghi + 2.0
    with pytest.raises(ValueError, match="gelu_tail_weight"):
        FheOptions(poly="all", gelu_tail_weight=1.5)
