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
from _seal_cli import run_seal_cli

from cgf_fhe import fhe_ops
from cgf_fhe.simulate import CKKSParams, Interpreter, make_backend
from cgf_fhe.simulate.backends.base import SimulationError
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
    """Row 0 and rows 1.. of the dense layer before each scaled LayerNorm multiply their own weights; a Concat
    joins them. Node by node, each slice is a full diagonal-method pass and the Concat adds the two pieces'
    ciphertexts (each is zero at the other's token slots): hidden-major again, so the next linear map packs it.
    As a group (cgf_fhe.simulate.packed_fusion) it is one pass whose diagonals carry each slice's weights at its
    token slots: the same logits (plain's to float64 rounding) with fewer rotations and ct x pt products."""
    m, batches = _feeds(cls_scaled_student, mrpc_dir)
    settings = json.loads((cls_scaled_student / "ckpt" / "cgf_fhe.json").read_text())
    mods = settings["fhe"]["modules"]
    assert sum(v.get("pos_scale0") == POS_SCALE0 for v in mods.values()) == 4  # every LayerNorm of the 2 layers
    # the split joined back: layer 0's two LayerNorms (layer 1 runs its dense layers on the [CLS] row only)
    assert _token_concats(m) == 2
    for feeds, _ in batches:
        plain = Interpreter(m, make_backend("plain")).run(feeds).outputs["logits"]
        got, be = _dry(m, feeds)
        assert np.abs(got - plain).max() < 1e-12 * max(1.0, np.abs(plain).max())
        assert be.counts["token_split_linear"] == 2 and be.counts["concat_merge"] == 0
        sep_be = PackedBackend(SMALL, NumpyEngine(SMALL))
        it = PackedInterpreter(m, sep_be)
        assert len(it.fused) == 2 * 2 + 2 * 2 + 2  # per split: 2 MatMuls, 2 Adds, 1 Concat
        it.fused = {}  # node by node
        sep = it.run(feeds).outputs["logits"]
        assert np.abs(sep - plain).max() < 1e-12 * max(1.0, np.abs(plain).max())
        assert sep_be.counts["concat_merge"] == 2 and sep_be.counts["token_split_linear"] == 0
        fused, split = be.engine.counts, sep_be.engine.counts
        assert fused["mul_pt"] < split["mul_pt"] and fused["rotate"] < split["rotate"]


@pytest.fixture(scope="module")
def lean_student(tmp_path_factory, mrpc_dir, tiny_tokenizer):
    """Both features (the lean profile's export): --ln-cls-scale and the statistics fold, MiniLM-shaped in
    miniature (hidden 64, 4 heads, FFN 256) so that at N=1024 a hidden state spans 2 ciphertexts."""
    return _lean_student(tmp_path_factory, mrpc_dir, tiny_tokenizer, "lean_both", hidden=64, heads=4,
                         intermediate=256)


WIDE = CKKSParams(1024, (60,) + (40,) * 8 + (60,), 40, insecure=True)


@pytest.mark.parametrize("params", [SMALL, WIDE], ids=["one-ct", "multi-ct"])
def test_dry_run_packs_the_lean_student(lean_student, mrpc_dir, params):
    """The statistics fold's key mean kbar = sum_j w_j k_j is a sum over the tokens left in every token slot
    (window rotate-and-sum), so um = q' kbar is one ct x ct product per ciphertext and a rotate-and-sum over the
    head's blocks, landing where the diagonal scores of the same queries sit. With the [CLS]-scaled LayerNorms'
    split dense layers as well: logits equal plain's to float64 rounding, with one and with several ciphertexts
    per hidden state (N=8192: 1; N=1024: 2, blocks of 16 slots: the window reaches the neighbouring blocks'
    zero padding)."""
    m, batches = _feeds(lean_student, mrpc_dir)
    assert fhe_ops.analyze(m).total_depth > 0 and _token_concats(m) == 2
    for feeds, _ in batches:
        plain = Interpreter(m, make_backend("plain")).run(feeds).outputs["logits"]
        got, be = _dry(m, feeds, params)
        assert np.abs(got - plain).max() < 1e-12 * max(1.0, np.abs(plain).max())
        # layer 1 (the first with a folded LayerNorm before it) folds its statistics; layer 0's two LayerNorms
        # are split on the token axis
        assert be.counts["token_sum_replicated"] == 1 and be.counts["token_split_linear"] == 2
        assert be.layout.n_ct(64) == (1 if params is SMALL else 2)


def test_lean_packing_needs_no_level_beyond_the_graph_depth(lean_student, mrpc_dir):
    """The packed schedule of both features spends exactly the exported graph's depth: a chain of that many
    levels runs without a refresh, one level fewer needs one (the row scalings of the statistics fold are
    plaintext products off the critical path, as in the graph; the token-sum replication and the Concat cost no
    level) -- with the diagonal score layout. The compact score layout (seal_packed._scores_compact, the default)
    spends two mask levels per attention beyond it (the scores and q' kbar compacted; each set taken out again for
    probs @ V): 2 layers, depth + 4 levels run without a refresh, depth + 3 need one."""
    m, batches = _feeds(lean_student, mrpc_dir, limit=1)
    feeds = batches[0][0]
    depth = fhe_ops.analyze(m).total_depth
    for compact, extra in ((False, 0), (True, 4)):
        for levels, refreshes in ((depth + extra, 0), (depth + extra - 1, 1)):
            P = CKKSParams(8192, (60,) + (40,) * levels + (60,), 40, insecure=True)
            be = PackedBackend(P, NumpyEngine(P), compact_scores=compact)
            PackedInterpreter(m, be).run(feeds)
            assert be.n_refresh == refreshes, (compact, levels, be.n_refresh)


def test_seal_runs_the_lean_student(cls_scaled_student, mrpc_dir, tmp_path):
    """Real CKKS (SEAL, N=8192, 2 levels, client-aided refreshes) on a student with both features (hidden 8: the
    lean fixture's 64 would take minutes): agreement with plain, logits within 1e-3."""
    student = cls_scaled_student.parent / "lean_seal"
    if not (student / "student.onnx").is_file():
        from cgf_fhe.export.onnx_export import export_checkpoint

        export_checkpoint(cls_scaled_student / "ckpt", student / "student.onnx", fold_layernorms=True,
                          fold_stats=True)
    unfolded = onnx.load(str(cls_scaled_student / "student.onnx"))
    assert fhe_ops.analyze(onnx.load(str(student / "student.onnx"))).total_depth \
        == fhe_ops.analyze(unfolded).total_depth - 1  # the statistics fold: one level less in layer 1
    s = run_seal_cli(student / "student.onnx", mrpc_dir, tmp_path / "seal_lean", limit=1, max_logit_error=1e-3)
    assert s["refreshes"] > 0


@pytest.mark.parametrize("params,S,H", [(SMALL, 6, 8), (WIDE, 7, 64), (SMALL, 70, 32)],
                         ids=["one-ct", "multi-ct", "compact-blocks"])
def test_token_sum_is_replicated_and_meets_every_query(params, S, H):
    """Hand-built: the sum over the tokens of a hidden-major X holds the total in every token slot of every
    block (checked slot by slot), survives the head split (Reshape + Transpose), and ``Q @ kbar`` per head equals
    numpy's; a vector that is not a token sum is refused with a clear message."""
    heads = 4
    dh = H // heads
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(1, S, H)), rng.normal(size=(1, S, H))
    be = PackedBackend(params, NumpyEngine(params))
    x, y = be.encrypt(X), be.encrypt(Y)
    kbar = be.reduce_sum(x, [1], True)
    L = be.layout
    assert kbar.shape == (1, 1, H) and be.counts["token_sum_replicated"] == 1
    assert be.counts["token_sum_masked"] == (1 if S > 64 else 0) and L.wraps == (S > 64)  # compact blocks
    total = X.sum(1)[0]
    for c, ct in enumerate(kbar.cts):  # the total at every token slot of each block
        v = ct.v.reshape(L.hp, L.S_blk)
        for b in range(L.hp):
            k = c * L.hp + b
            if k < H:
                np.testing.assert_allclose(v[b, :S], total[k], rtol=1e-12, atol=1e-12)
    kt = be.rearrange(lambda t: [t.reshape(1, 1, heads, dh).transpose(0, 2, 3, 1)], [kbar], [0])[0]
    q = be.rearrange(lambda t: [t.reshape(1, S, heads, dh).transpose(0, 2, 1, 3)], [y], [0])[0]
    got = be.decrypt(be.matmul(q, kt))
    want = Y.reshape(1, S, heads, dh).transpose(0, 2, 1, 3) @ total.reshape(1, heads, dh, 1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # the key mean with no level left (as on MiniLM's 4-level chain): the product refreshes it first, and the
    # client keeps every replica (it used to keep the slot map's token only: every other query got 0)
    k0 = be.rearrange(lambda t: [t.reshape(1, 1, heads, dh).transpose(0, 2, 3, 1)], [kbar], [0])[0]
    k0.cts = [be.engine.level_down(c, 0) for c in k0.cts]
    n = be.n_refresh
    got = be.decrypt(be.matmul(q, k0))
    assert be.n_refresh == n + 1
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # a [1, heads, dh, 1] vector that is one token of X, not a sum over the tokens: refused, saying why
    one = be.rearrange(lambda t: [t[:, :1].reshape(1, 1, heads, dh).transpose(0, 2, 3, 1)], [x], [0])[0]
    with pytest.raises(SimulationError, match="not replicated over the query tokens"):
        be.matmul(q, one)


def test_report_packed_seal_counts_the_lean_packing(lean_student, mrpc_dir, capsys):
    """``report --packed-seal`` runs the same packed schedule as the dry run (the token-split pass, the
    replicated token sum): equal per-layer ct x pt, ct x ct, rotation, level-match and refresh counts."""
    from cgf_fhe.cli import main
    from cgf_fhe.simulate.batch import SimConfig, client_batches
    from cgf_fhe.simulate.packed_runner import PackedRunner

    onnx_path = str(lean_student / "student.onnx")
    cfg = SimConfig(backend="seal", poly_modulus=8192, coeff_bits=(60, 40, 40, 60), limit=1, max_length=6,
                    batch_size=1, data_dir=str(mrpc_dir), progress=False)
    (feeds, _labels), = client_batches(onnx.load(onnx_path), cfg)[0]
    dry = PackedRunner(onnx_path, cfg).dry_run(feeds)
    tokens = feeds["embeddings"].shape[1]
    assert main(["report", onnx_path, "--packed-seal", "--seq-len", str(tokens), "--levels", "2",
                 "--format", "json"]) == 0
    ps = json.loads(capsys.readouterr().out)["packed_seal"]
    got = [(r["layer"], r["ct_pt_mults"], r["ct_ct_mults"], r["rotations"], r["level_matches"], r["refreshes"])
           for r in ps["layers"]]
    want = [(r["layer"], r["mul_pt"], r["mul_ct"], r["rotate"], r["level_match"], r["refreshes"])
            for r in dry["layers"]]
    assert got == want and [g[0] for g in got] == [0, 1, "head"]
    assert abs(ps["latency_seconds"] - dry["estimated_seconds"]) <= 1e-3 * dry["estimated_seconds"]


def test_repeated_projection_of_the_same_ciphertexts_is_computed_once():
    """The exported statistics fold may project the keys twice by the same weights (one MatMul per row
    scaling): the second MatMul of the same ciphertexts by the same plaintext reuses the first pass (no ct x pt,
    no rotation), a different weight or input does not."""
    rng = np.random.default_rng(4)
    X, W, W2 = rng.normal(size=(1, 6, 8)), rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    be = PackedBackend(SMALL, NumpyEngine(SMALL))
    x = be.encrypt(X)
    k1 = be.matmul(x, W)
    n = dict(be.engine.counts)
    k2 = be.matmul(x, W.copy())
    assert k2 is k1 and be.engine.counts["mul_pt"] == n["mul_pt"] and be.engine.counts["rotate"] == n["rotate"]
    v = be.matmul(x, W2)
    assert be.engine.counts["mul_pt"] > n["mul_pt"]
    np.testing.assert_allclose(be.decrypt(k2), X @ W, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(be.decrypt(v), X @ W2, rtol=1e-12, atol=1e-12)
    y = be.encrypt(X)  # another input: computed again
    be.matmul(y, W)
    assert be.counts["linear_shared"] == 1
