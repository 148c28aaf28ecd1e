"""The packed real-CKKS backend (``--backend seal``) on the lean FHE profile's export features (issue #22):

* ``--ln-cls-scale``: a Newton LayerNorm with a position-0 variance scale is exported with the dense layer before
  it split on the token axis (:class:`cgf_fhe.fold.CentringDense`: row 0 and the other rows multiply their own
  weights, a Concat joins them);
* the CGF statistics fold (:func:`cgf_fhe.fold.cgf_stats_core`, ``cgf-fhe export`` default, off with
  ``--no-fold-stats``): the key mean ``kbar`` (a sum over the tokens) times the queries.

Tiny random-weight students (hidden 8, 2 layers, <= 6 tokens); the position-0 scale is forced (a random student's
[CLS] variance is not a massive activation, so calibration would not choose one).
"""
import json
from contextlib import contextmanager
from unittest import mock

import numpy as np
import onnx
import pytest

from cgf_fhe import fhe_ops
from cgf_fhe.simulate import CKKSParams, Interpreter, make_backend
from cgf_fhe.simulate.backends.seal_packed import NumpyEngine, PackedBackend
from cgf_fhe.simulate.packed_runner import PackedInterpreter

SMALL = CKKSParams(8192, (60, 40, 40, 60), 40)
POS_SCALE0 = 0.25


@contextmanager
def _forced_pos_scale0(value: float):
    """Calibration that reports a position-0 scale for every Newton LayerNorm (surgery.cls_scaled takes it)."""
    from cgf_fhe import surgery

    real = surgery.calibrate

    def calibrate(*a, **kw):
        ranges = real(*a, **kw)
        for lay in ranges["layers"]:
            for key in ("ln_attn", "ln_ffn"):
                lay[key]["pos_scale0"] = value
        return ranges

    with mock.patch.object(surgery, "calibrate", calibrate):
        yield


def _lean_student(tmp_path_factory, mrpc_dir, tiny_tokenizer, name, *, pos_scale0=POS_SCALE0, fold_stats=True,
                  **kw):
    from conftest import build_student

    with _forced_pos_scale0(pos_scale0):
        return build_student(tmp_path_factory.mktemp(name), tiny_tokenizer, mrpc_dir, layers=2, **kw,
                             fold_stats=fold_stats)


@pytest.fixture(scope="module")
def cls_scaled_student(tmp_path_factory, mrpc_dir, tiny_tokenizer):
    """--ln-cls-scale alone (statistics not folded)."""
    return _lean_student(tmp_path_factory, mrpc_dir, tiny_tokenizer, "lean_cls", fold_stats=False)


def _feeds(student, mrpc_dir, limit=2, max_length=6):
    from cgf_fhe.simulate.runner import SimConfig, client_batches

    m = onnx.load(str(student / "student.onnx"))
    batches, _ = client_batches(m, SimConfig(backend="seal", limit=limit, max_length=max_length, batch_size=1,
                                             data_dir=str(mrpc_dir)))
    return m, batches


def _dry(m, feeds, params=SMALL):
    be = PackedBackend(params, NumpyEngine(params))
    got = PackedInterpreter(m, be).run(feeds).outputs["logits"]
    return got, be


def _token_concats(m) -> int:
    return sum(1 for n in m.graph.node if n.op_type == "Concat"
               and onnx.helper.get_attribute_value(n.attribute[0]) in (1, -2))


def test_dry_run_packs_the_cls_scaled_layernorm_split(cls_scaled_student, mrpc_dir):
    """Row 0 and rows 1.. of the dense layer before each scaled LayerNorm come from their own linear maps; the
    Concat adds the two pieces' ciphertexts (each is zero at the other's token slots): the result is hidden-major
    again and the next linear map packs it. Logits equal plain's to float64 rounding."""
    m, batches = _feeds(cls_scaled_student, mrpc_dir)
    settings = json.loads((cls_scaled_student / "ckpt" / "cgf_fhe.json").read_text())
    mods = settings["fhe"]["modules"]
    assert sum(v.get("pos_scale0") == POS_SCALE0 for v in mods.values()) == 4  # every LayerNorm of the 2 layers
    # the split joined back: layer 0's two LayerNorms (layer 1 runs its dense layers on the [CLS] row only)
    assert _token_concats(m) == 2
    for feeds, _ in batches:
        plain = Interpreter(m, make_backend("plain")).run(feeds).outputs["logits"]
        got, be = _dry(m, feeds)
        assert np.abs(got - plain).max() < 1e-9 * max(1.0, np.abs(plain).max())
        assert be.counts["concat_merge"] == 2
