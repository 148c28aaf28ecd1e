"""Mixed precision: ``auto`` picks bf16 on GPUs that support it and never fp16 for polynomial students; the
polynomials and LayerNorm statistics of a polynomial student run in float32 inside bf16 autocast."""
import pytest
import torch

from cgf_fhe import surgery
from cgf_fhe.errors import UserError
from cgf_fhe.models import build_model
from cgf_fhe.training import api, engine
from cgf_fhe.training.evaluate import model_inputs
from cgf_fhe.training.recipes import get_recipe

# bf16 keeps 8 mantissa bits (relative step 2^-8 = 3.9e-3); float32 24 (6e-8). A module evaluated in float32 on
# the same input stays within MODULE_RTOL of the float64 reference; evaluated in bf16 it is ~1e-2 off.
MODULE_RTOL = 1e-4
# the tiny student's logits under bf16 autocast (its linear layers in bf16) vs float32
LOGIT_ATOL = 0.05


@pytest.fixture(scope="module")
def poly_student(mrpc_dir):
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model, tok = build_model("tiny", "cgf", coeff=0.5, seed=0)
    opts = api.RunOptions(data_dir=str(mrpc_dir), max_length=64, max_train_samples=32, max_eval_samples=16,
                          progress=False)
    train, _ = api.load_data(tok, opts, get_recipe("reference", max_length=64))
    loader = DataLoader(train, batch_size=16, collate_fn=api.collator(tok))
    ranges = surgery.calibrate(model, loader, progress=False)
    surgery.polynomialize(model, surgery.FheOptions(poly="all", ln="newton"), ranges)
    model.eval()
    return model, next(iter(loader))


def _approx_calls(model, batch):
    """(module, inputs, output) of every polynomial / LayerNorm stand-in in one bf16-autocast forward."""
    calls = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp, out)))
             for _, m in surgery.named_approx_modules(model)]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**model_inputs(batch)).logits
    finally:
        for h in hooks:
            h.remove()
    return calls, logits


def test_polynomials_and_layernorm_statistics_run_in_float32_under_bf16_autocast(poly_student):
    model, batch = poly_student
    calls, _ = _approx_calls(model, batch)
    kinds = {mod.kind for mod, _, _ in calls}
    assert {"exp", "gelu", "tanh", "ln_newton"} <= kinds, kinds
    for mod, inp, out in calls:
        assert out.dtype == torch.float32, (mod.kind, out.dtype)
        # the same input, float64 without autocast: only the module's own arithmetic differs
        ref_in = [i.double() if torch.is_tensor(i) and i.is_floating_point() else i for i in inp]
        with torch.no_grad():
            ref = mod(*ref_in)
        err = float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        assert err < MODULE_RTOL, (mod.kind, err)


def test_polynomial_student_logits_under_bf16_autocast_match_float32(poly_student):
    model, batch = poly_student
    with torch.no_grad():
        want = model(**model_inputs(batch)).logits
    _, got = _approx_calls(model, batch)
    assert torch.isfinite(got).all()
    diff = float((got.float() - want).abs().max())
    assert diff < LOGIT_ATOL, diff
    # and the predictions agree
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_auto_precision_is_bf16_where_supported_and_never_fp16_for_polynomials(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert engine.resolve_precision("auto") == "bf16"
    assert engine.resolve_precision("auto", polynomial=True) == "bf16"
    assert engine.resolve_precision("auto", "cpu") == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert engine.resolve_precision("auto") == "fp16"
    assert engine.resolve_precision("auto", polynomial=True) == "no"
    with pytest.raises(UserError, match="fp16 cannot train a polynomial student"):
        engine.resolve_precision("fp16", polynomial=True)
    with pytest.raises(UserError, match="choose one of"):
        engine.resolve_precision("fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine.resolve_precision("auto") == "no"


def test_fit_refuses_fp16_for_a_polynomial_student(poly_student):
    model, _ = poly_student
    assert engine.has_polynomials(model)
    with pytest.raises(UserError, match="fp16"):
        engine.fit(model, engine.CEStep(), [], [], None, get_recipe("reference", epochs=1), mixed_precision="fp16",
                   progress=False)
