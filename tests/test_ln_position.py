"""Per-position variance scale of Newton LayerNorms (issue #22: the [CLS] massive activation of MiniLM's
FFN-output LayerNorms). A tiny student whose position-0 hidden state is scaled 10x (variance 100x) before the
first LayerNorm: with the scale, that LayerNorm's interval stays narrow and its 1/sqrt is accurate."""
import copy

import pytest
import torch

from cgf_fhe import poly as P
from cgf_fhe import surgery
from cgf_fhe.data import load_mrpc, make_loader, tokenize_split
from cgf_fhe.models import build_model
from conftest import server_export_depth

KEY = "layers.0.ln_attn"  # its input's residual is the (scaled) embedding output


def _cls_hook(module, inputs, out):
    s = torch.ones(out.shape[1], 1, dtype=out.dtype)
    s[0] = 10.0  # position 0's variance 100x the others'
    return out * s


def _student(loader, ranges, **kw):
    model, _ = build_model("tiny", "cgf", 0.5, seed=0)
    model.eval()
    model.bert.embeddings.register_forward_hook(_cls_hook)
    surgery.polynomialize(model, surgery.FheOptions.from_profile("lean", **kw), ranges)
    return model


@pytest.fixture(scope="module")
def setup(mrpc_dir, tiny_tokenizer):
    ds = tokenize_split(load_mrpc(mrpc_dir)["train"], tiny_tokenizer, max_length=32, max_samples=32)
    loader = make_loader(ds, tiny_tokenizer, 8, False)
    exact, _ = build_model("tiny", "cgf", 0.5, seed=0)
    exact.eval()
    exact.bert.embeddings.register_forward_hook(_cls_hook)
    ranges = surgery.calibrate(exact, loader, progress=False)
    return loader, ranges, exact


def _mods(model):
    return dict(surgery.named_approx_modules(model))


def test_calibration_measures_position_zero(setup):
    _, ranges, _ = setup
    cls = ranges["layers"][0]["ln_attn"]["cls"]
    assert 90 < cls["ratio"] < 110  # 10x the hidden state: 100x the variance
    assert ranges["layers"][0]["ln_ffn"]["cls"]["ratio"] < 2
    scaled = cls["scaled"]
    assert scaled["max"] / scaled["min"] < 2 and ranges["layers"][0]["ln_attn"]["max"] > 50 * scaled["max"]
    assert scaled["count"] == ranges["layers"][0]["ln_attn"]["count"]


def test_scale_narrows_interval_and_error(setup):
    loader, ranges, exact = setup
    off, on = _student(loader, ranges, ln_cls_scale=False), _student(loader, ranges)
    assert on.cgf_fhe_options.ln_cls_scale and not off.cgf_fhe_options.ln_cls_scale
    m_off, m_on = _mods(off)[KEY], _mods(on)[KEY]
    assert m_off.pos_scale0 == 1.0 and 0.009 < m_on.pos_scale0 < 0.011
    assert m_off.interval[1] / m_off.interval[0] > 50 and m_on.interval[1] / m_on.interval[0] < 2
    assert m_off.rel_error() > 0.05 and m_on.rel_error() < 1e-3 * m_off.rel_error()
    # below the threshold nothing changes: the other LayerNorms are the unscaled ones
    for key, m in _mods(on).items():
        if m.kind == "ln_newton" and key != KEY:
            assert m.pos_scale0 == 1.0 and m.interval == _mods(off)[key].interval
    # the scaled LayerNorm computes LayerNorm on the real input (the position-0 token included)
    captured = {}
    h = exact.bert.encoder.layer[0].attention.output.LayerNorm.register_forward_hook(
        lambda mod, i, o: captured.update(x=i[0].detach(), y=o.detach()))
    batch = next(iter(loader))
    with torch.no_grad():
        exact(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
    h.remove()
    x, y = captured["x"], captured["y"]
    assert float(x[:, 0].var(-1).median() / x[:, 1:].var(-1).median()) > 50
    with torch.no_grad():
        err_on = float((m_on(x) - y).abs().max())
        err_off = float((m_off(x) - y).abs().max())
        m_on.guard = True  # the training aid clamps v' (in the interval here): same values
        err_guard = float((m_on(x) - y).abs().max())
        m_on.guard = False
    assert err_on < 1e-3 and err_guard < 1e-3 and err_off > 0.05


def test_interval_counts_and_penalty_on_scaled_variance(setup):
    loader, ranges, _ = setup
    on = _student(loader, ranges)
    m = _mods(on)[KEY]
    batch = next(iter(loader))
    on.train()  # the penalty is a training quantity; dropout off so the variances are the calibrated ones
    for mod in on.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    surgery.reset_interval_counters(on)
    on(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
    assert m.n_seen == batch["input_ids"].numel() and m.n_out == 0  # [CLS] inside once scaled
    assert float(m.last_penalty.detach()) == 0.0
    out = on(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
    (out.logits.square().mean() + surgery.interval_penalty(on)).backward()  # the training step's backward
    assert m.weight.grad is not None and bool(torch.isfinite(m.weight.grad).all()) and float(m.weight.grad.abs().sum()) > 0
    m.pos_scale[0] = 1.0  # without the scale the [CLS] token is far above the interval and pays
    on(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
    assert m.n_out == batch["input_ids"].shape[0] and float(m.last_penalty.detach()) > 0.1


def test_settings_round_trip_and_old_settings(setup, tmp_path):
    loader, ranges, _ = setup
    on = _student(loader, ranges)
    settings = surgery.fhe_settings(on)
    assert settings["modules"][KEY]["pos_scale0"] == _mods(on)[KEY].pos_scale0
    assert "pos_scale0" not in settings["modules"]["layers.0.ln_ffn"]  # unscaled modules: settings as before
    fresh, _ = build_model("tiny", "cgf", 0.5, seed=0)
    surgery.apply_fhe_settings(fresh, settings)
    assert _mods(fresh)[KEY].pos_scale0 == _mods(on)[KEY].pos_scale0 and fresh.cgf_fhe_options.ln_cls_scale
    assert "pos_scale" not in fresh.state_dict().__repr__()  # a settings value, not a state-dict entry
    old = copy.deepcopy(settings)
    del old["modules"][KEY]["pos_scale0"], old["modules"][KEY]["max_len"], old["options"]["ln_cls_scale"]
    surgery.apply_fhe_settings(fresh, old)
    assert _mods(fresh)[KEY].pos_scale0 == 1.0 and not fresh.cgf_fhe_options.ln_cls_scale


def test_cover_and_recalibration_keep_the_scale(setup):
    loader, ranges, _ = setup
    on = _student(loader, ranges)
    m = _mods(on)[KEY]
    s0, (lo, hi) = m.pos_scale0, m.interval
    r2 = surgery.calibrate(on, loader, progress=False)  # measured in the module's scaled units
    st = r2["layers"][0]["ln_attn"]
    assert st["pos_scale0"] == s0 and st["max"] < 2 * hi
    wide = copy.deepcopy(r2)
    wide["layers"][0]["ln_attn"]["min"] = lo / 2  # the cover must widen the bottom and keep the scale
    changed = surgery.cover_ranges(on, wide)
    assert KEY in changed
    m2 = _mods(on)[KEY]
    assert m2.pos_scale0 == s0 and m2.interval[0] < lo and m2.interval[1] / m2.interval[0] < 5


def test_bad_scale_refused():
    approx = P.fit("invsqrt", 0.5, 2.0, degree=7, method="lsq", relative=True)
    with pytest.raises(ValueError, match="pos_scale0"):
        P.NewtonLayerNorm(approx, 0, hidden=4, pos_scale0=0.0)
    m = P.NewtonLayerNorm(approx, 0, hidden=4, pos_scale0=0.5, max_len=3)
    with pytest.raises(ValueError, match="longer"):
        m(torch.randn(1, 4, 4))
    with pytest.raises(ValueError, match="ln_cls_threshold"):
        surgery.FheOptions(ln_cls_threshold=0.5)


@pytest.mark.parametrize("fold", [True, False])
def test_export_parity_and_depth_unchanged(setup, fold):
    """Folded (CentringDense's row 0 with its own plaintext, the residual's [S,1] centring scale) and unfolded
    (the [S,1]/[S,H] centring constants): logits of the exact-function torch model, no extra level."""
    from cgf_fhe.split import ServerModel, client_embed, fold_for_export

    loader, ranges, _ = setup
    on, off = _student(loader, ranges), _student(loader, ranges, ln_cls_scale=False)
    assert _mods(on)[KEY].pos_scale0 < 0.02
    batch = next(iter(loader))
    emb = client_embed(on, batch["input_ids"], batch["token_type_ids"]).detach()
    mask = batch["attention_mask"].float()
    assert float(emb[:, 0].var(-1).mean() / emb[:, 1:].var(-1).mean()) > 50
    with torch.no_grad():
        ref = ServerModel(on.eval())(emb, mask)
        got = ServerModel(fold_for_export(on, fold_layernorms=fold))(emb, mask)
    assert float((got - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
    d_on = server_export_depth(ServerModel(fold_for_export(on, fold_layernorms=fold)), emb, mask)
    d_off = server_export_depth(ServerModel(fold_for_export(off, fold_layernorms=fold)), emb, mask)
    assert d_on == d_off
    if fold:
        assert d_on == surgery.model_depth(on)["total"]


def _micro_student(out, tokenizer, mrpc_dir, cls_scale: bool):
    """Hidden 8, 2 layers, <= 6 tokens; position 0 gets a massive FFN output in layer 0 (its position embedding
    along one direction that layer 0's FFN amplifies), so layer 0's ln_ffn sees [CLS] ~300x the others."""
    from transformers import BertConfig, BertForSequenceClassification

    from cgf_fhe.export.onnx_export import export_checkpoint
    from cgf_fhe.models import save_checkpoint
    from cgf_fhe.softmax import set_softmax

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=2, hidden_size=8, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=16)
    model = BertForSequenceClassification(cfg)
    set_softmax(model, "cgf", None)
    model.eval()
    with torch.no_grad():
        model.bert.embeddings.position_embeddings.weight[0] += 30.0 * torch.eye(8)[0]
        ffn = model.bert.encoder.layer[0]
        ffn.intermediate.dense.weight[:, 0] = 3.0
        ffn.intermediate.dense.bias[:] = -4.0
        ffn.output.dense.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    ds = tokenize_split(load_mrpc(mrpc_dir)["train"], tokenizer, max_length=6, max_samples=32)
    ranges = surgery.calibrate(model, make_loader(ds, tokenizer, 16, False), progress=False)
    opts = surgery.FheOptions(poly="all", ln="newton", exp_degree=7, gelu_degree=7, tanh_degree=7, invsqrt_degree=7,
                              newton_steps=2, margin=0.5, ln_cls_scale=cls_scale)
    fhe = surgery.polynomialize(model, opts, ranges)
    save_checkpoint(model, tokenizer, out / "ckpt", {"softmax": "cgf", "coeff": 0.5, "fhe": fhe, "max_length": 6})
    export_checkpoint(out / "ckpt", out / "student.onnx")
    return model, out / "student.onnx"


def test_exported_scaled_student_runs_in_the_simulator(tmp_path, mrpc_dir, tiny_tokenizer):
    """check passes, same depth as the unscaled student, and the emulated CKKS run agrees with plain; the
    simulator's LayerNorm monitor reads the scaled variance (inside the narrow interval)."""
    import json

    from cgf_fhe import fhe_ops
    from cgf_fhe.cli import main

    model, path = _micro_student(tmp_path / "on", tiny_tokenizer, mrpc_dir, True)
    _, path0 = _micro_student(tmp_path / "off", tiny_tokenizer, mrpc_dir, False)
    key = "layers.0.ln_ffn"
    m = _mods(model)[key]
    assert m.pos_scale0 < 0.01 and m.interval[1] / m.interval[0] < 200
    assert main(["check", str(path)]) == 0
    d_on = fhe_ops.analyze(fhe_ops.load_model(path)).total_depth
    assert d_on == fhe_ops.analyze(fhe_ops.load_model(path0)).total_depth == surgery.model_depth(model)["total"]
    out = tmp_path / "sim"
    assert main(["simulate", str(path), "--backend", "emulate", "--no-progress", "-o", str(out), "--data-dir",
                 str(mrpc_dir), "--limit", "16", "--batch-size", "8", "--max-length", "6", "--emulate-refresh",
                 "client"]) == 0
    s = json.loads((out / "simulation.json").read_text())
    assert s["agreement"] == 1.0 and s["max_logit_error"] < 1e-4 and s["n_level_mismatches"] == 0
    ln = s["poly_out_of_interval_plain"]["bert.encoder.layer.0.output.LayerNorm"]
    assert ln["n_out"] == 0 and ln["max"] < m.interval[1] and ln["max"] > 2 * ln["min"]


def test_epoch_cover_keeps_the_scale(setup):
    """The epoch cover (tracked_ranges -> cover_ranges, run at every scored point of a distillation) widens a
    position-scaled LayerNorm and keeps its scale: it used to rebuild the module with pos_scale0 = 1, so the
    [CLS] token's unscaled variance left the interval and the exported student gave NaN on every dev example."""
    loader, ranges, _ = setup
    on = _student(loader, ranges)
    m = _mods(on)[KEY]
    s0, (lo, hi) = m.pos_scale0, m.interval
    assert s0 < 1.0
    batch = next(iter(loader))
    with torch.no_grad():  # the counters run on every forward (as during training)
        on(**{k: v for k, v in batch.items() if k != "labels"})
    assert m.n_seen > 0
    m.out_min = lo / 2  # an input below the interval, as the counters record it during training
    tr = surgery.tracked_ranges(on)
    assert tr["layers"][0]["ln_attn"]["pos_scale0"] == s0
    changed = surgery.cover_ranges(on, tr)
    assert KEY in changed
    m2 = _mods(on)[KEY]
    assert m2.pos_scale0 == s0 and m2.interval[0] < lo
