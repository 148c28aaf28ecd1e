"""The last Newton step of a Newton LayerNorm absorbs its output product (issue #22: one level less per LayerNorm).

Old schedule (the reference, written out here): Newton ``y <- y*1.5 - (y*hv)*(y*y)`` every step, then
``dg*y + beta``: depth ``3 + P + 2*steps``. New: the last step and the product are ``dg'*y - ((dg'*h)*y)*(y*y)``
(``dg'`` centred with ``1.5*gamma``, ``h = v/3``): ``2 + P + 2*steps``. Checked: the same function (unfolded
module and export fold), two levels less per encoder layer in the exported graph (report machinery), export
parity with torch, and the packed SEAL backend's dry run equal to plain on that graph."""
import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from cgf_fhe import poly as P
from cgf_fhe.fold import CentringDense, FoldedNewtonLN, FoldLinear, LNForm, materialize


# --- the old schedule (reference) ------------------------------------------------------------------------------
@P.fp32_island
def _old_forward(self, x):
    """NewtonLayerNorm.forward before the merge (encrypted branch)."""
    ps = self.position_scale(x)
    ps_col = ps[:, None] if ps is not None else None
    H, a = self.hidden, self.approx.alpha
    if ps_col is None:
        ds = P.centred_scaled(x, math.sqrt(a / H))
        dh = P.centred_scaled(x, math.sqrt(0.5 / H))
        dg = P.centred_scaled(x, self.weight)
        t = (ds * ds).sum(-1, keepdim=True) + a * self.eps
        hv = (dh * dh).sum(-1, keepdim=True) + 0.5 * self.eps
    else:
        root = ps_col.sqrt()
        ds = P.centred_scaled(x, root * math.sqrt(a / H))
        dh = P.centred_scaled(x, root * math.sqrt(0.5 / H))
        dg = P.centred_scaled(x, self.weight * root)
        t = (ds * ds).sum(-1, keepdim=True) + ps_col * (a * self.eps)
        hv = (dh * dh).sum(-1, keepdim=True) + ps_col * (0.5 * self.eps)
    y = self.approx.evaluate(t, prescaled=True)
    for _ in range(self.newton_steps):
        y = y * 1.5 - (y * hv) * (y * y)
    return dg * y + self.bias


def _old_folded_forward(self, ds_lin, residual):
    """FoldedNewtonLN.forward before the merge: every step here, the product ``y * ...`` on the next map."""
    a = self.approx.alpha
    ps = None if self.pos_scale0 == 1.0 else self.pos_scale[:ds_lin.shape[-2]].to(ds_lin.dtype)
    if ps is None:
        ds = ds_lin + P.centred_scaled(materialize(residual), self.s)
        eps = self.eps
    else:
        ds = ds_lin + P.centred_scaled(materialize(residual), ps.sqrt()[:, None] * self.s)
        eps = ps[:, None] * self.eps
    t = (ds * ds).sum(-1, keepdim=True) + a * eps
    y = self.approx.evaluate(t, prescaled=True)
    if self.newton_steps:
        hv = (t - a * eps) * (0.5 / a) + 0.5 * eps
        for _ in range(self.newton_steps):
            y = y * 1.5 - (y * hv) * (y * y)
    return LNForm(ds, y, self.weight / self.s, self.bias)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# --- 1. same function -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [0, 1, 2])
@pytest.mark.parametrize("pos_scale0", [1.0, 0.05])
def test_merged_step_computes_the_old_function(steps, pos_scale0):
    """Random LayerNorm weights and inputs whose variance lies in the interval (position 0 at 20x the others'
    variance when it is scaled by 0.05): unfolded module and export fold equal the old schedule to ~1e-6."""
    H, S = 16, 5
    g = torch.Generator().manual_seed(7 + steps)
    ln = nn.LayerNorm(H, eps=1e-12).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5, generator=g)
        ln.bias.uniform_(-0.2, 0.2, generator=g)
    approx = P.fit("invsqrt", 0.3, 8.0, degree=7, method="lsq", relative=True)
    mod = P.NewtonLayerNorm(approx, steps, ln=ln, pos_scale0=pos_scale0, max_len=S).double().eval()
    mod.track = False
    spread = torch.linspace(0.7, 2.5, S, dtype=torch.float64)[:, None]
    x = torch.randn(3, S, H, dtype=torch.float64, generator=g) * spread
    if pos_scale0 != 1.0:
        x[:, 0] *= math.sqrt(1.0 / pos_scale0)
    with torch.no_grad():
        ref = _old_forward(mod, x)
        got = mod(x)
        assert _rel(got, ref) < 1e-6
        assert _rel(got, ln(x)) < 0.2  # and it is a LayerNorm (the guess's error on this interval)
        # the export fold: a dense layer's centred rows + a residual, the LN form materialised and fed to a map
        dense, lin = nn.Linear(H, H).double(), nn.Linear(H, 6).double()
        cd = CentringDense(dense, mod)
        ctx, res = torch.randn(3, S, H, dtype=torch.float64, generator=g), x
        folded = FoldedNewtonLN(mod, cd.s)
        new_form = folded(cd(ctx), res)
        old_form = _old_folded_forward(folded, cd(ctx), res)
        assert (new_form.h is None) == (steps == 0)
        want = _old_forward(mod, dense(ctx) + res)
        assert _rel(materialize(old_form), want) < 1e-6  # the reference fold is the old module
        assert _rel(materialize(new_form), want) < 1e-6
        assert _rel(FoldLinear(lin)(new_form), lin(want)) < 1e-6
        assert _rel(FoldLinear(lin)(new_form[:, :1]), lin(want[:, :1])) < 1e-6  # first-token indexing
    assert mod.depth == approx.depth(prescaled=True) + 2 * steps + (3 if steps == 0 else 2)


# --- 2./3. an exported tiny student with one Newton step ---------------------------------------------------------
@pytest.fixture(scope="module")
def student1(tmp_path_factory, mrpc_dir, tiny_tokenizer):
    """Hidden 8, 2 layers, one Newton step, exported folded without the statistics fold (the packed backend's
    form, as `cgf-fhe export --no-fold-stats`)."""
    from conftest import build_student

    from cgf_fhe.models import load_checkpoint

    d = build_student(tmp_path_factory.mktemp("merge1"), tiny_tokenizer, mrpc_dir, layers=2, newton_steps=1,
                      fold_stats=False)
    model, tok, settings = load_checkpoint(d / "ckpt")
    return d, model.float().eval(), tok, settings


def _per_layer(rep):
    """Levels each encoder layer adds on the critical path: differences of the layers' output depths (the report's
    ``levels_per_layer`` is the longest chain inside a layer's own nodes, and the merged step sits in the next
    layer's projections / the pooler, so that local figure moves between groups)."""
    outs = [lay["depth_out"] for lay in rep["layers"]]
    return [b - a for a, b in zip([0] + outs[:-1], outs)]


def test_exported_layers_are_two_levels_shallower(student1, tmp_path, monkeypatch):
    """The report on `cgf-fhe export --no-fold-stats`'s graph vs the same student exported with the old schedule
    (the reference forwards patched in): every layer two levels shallower, the total four."""
    from cgf_fhe import surgery
    from cgf_fhe.export.onnx_export import export_model
    from cgf_fhe.export.report import build_report

    d, model, _, settings = student1
    mods = dict(surgery.named_approx_modules(model))
    assert {m.newton_steps for k, m in mods.items() if k.endswith(("ln_attn", "ln_ffn"))} == {1}
    new = build_report(str(d / "student.onnx"), level_budget=9)
    monkeypatch.setattr(P.NewtonLayerNorm, "forward", _old_forward)
    monkeypatch.setattr(FoldedNewtonLN, "forward", _old_folded_forward)
    export_model(model, tmp_path / "old.onnx", settings=settings, extra_metadata={"max_length": 6}, fold_stats=False)
    monkeypatch.undo()
    old = build_report(str(tmp_path / "old.onnx"), level_budget=9)
    assert len(new["layers"]) == 2 and _per_layer(new) == [o - 2 for o in _per_layer(old)], (
        _per_layer(new), _per_layer(old))
    assert new["total_depth"] == old["total_depth"] - 4
    # the stated depth (model_depth assumes the statistics fold: one level less in the second layer)
    assert new["total_depth"] == surgery.model_depth(model)["total"] + 1


def test_unfolded_module_measured_depth(monkeypatch):
    """The unfolded module as exported alone (position scale on, one step): one level less than the old schedule,
    and the stated depth."""
    from test_poly import _export_depth

    approx = P.fit("invsqrt", 0.3, 8.0, degree=7, method="lsq", relative=True)
    mod = P.NewtonLayerNorm(approx, 1, hidden=8, pos_scale0=0.05, max_len=4).eval()
    mod.track = False
    x = torch.randn(2, 4, 8)
    an, _ = _export_depth(mod, x)
    monkeypatch.setattr(P.NewtonLayerNorm, "forward", _old_forward)
    an_old, _ = _export_depth(mod, x)
    assert not an.violations and an.total_depth == mod.depth == an_old.total_depth - 1


def test_export_parity_with_torch(student1, mrpc_dir):
    from cgf_fhe.export.onnx_export import parity

    d, model, tok, _ = student1
    par = parity(d / "student.onnx", model, tok, n=8, data_dir=mrpc_dir, max_length=6, batch_size=8, progress=False)
    assert par["n_compared"] == 8 and par["max_abs_logit_diff"] <= 1e-4


def test_packed_dry_run_equals_plain(student1, mrpc_dir):
    """The merged step's broadcast products ([S, M] x [S, 1] on the next linear map's rows) in the packed SEAL
    backend's dry run: plain's logits to float64 rounding."""
    from test_seal_packed import SMALL, _feeds

    from cgf_fhe.simulate import Interpreter, make_backend
    from cgf_fhe.simulate.backends.seal_packed import NumpyEngine, PackedBackend
    from cgf_fhe.simulate.packed_runner import PackedInterpreter

    d = student1[0]
    m, batches = _feeds(d, mrpc_dir, limit=2)
    assert isinstance(m, onnx.ModelProto)
    for feeds, _ in batches:
        plain = Interpreter(m, make_backend("plain")).run(feeds).outputs["logits"]
        be = PackedBackend(SMALL, NumpyEngine(SMALL))
        got = PackedInterpreter(m, be).run(feeds).outputs["logits"]
        assert np.abs(got - plain).max() < 1e-12 * max(1.0, np.abs(plain).max())
        assert be.engine.counts["mul_ct"] > 0
