"""Compact diagonal scores in the packed SEAL backend (issue #23): every block of a score ciphertext holds a score
set (``packing.Layout.compact_map``) instead of one block in hp (``diag_map``)."""
import numpy as np
import onnx
import pytest

from cgf_fhe.simulate import CKKSParams, Interpreter, make_backend
from cgf_fhe.simulate.backends.seal_packed import NumpyEngine, PackedBackend
from cgf_fhe.simulate.packed_runner import PackedInterpreter

P4 = CKKSParams(8192, (60, 40, 40, 40, 40, 60), 40, insecure=True)  # numpy engine only


def _heads(be, t, S, heads, dh, transposed=False):
    def f(m):
        m = m.reshape(1, m.shape[1], heads, dh).transpose(0, 2, 1, 3)
        return [m.transpose(0, 1, 3, 2) if transposed else m]

    return be.rearrange(f, [t], [0])[0]


def _attention(compact: bool, cls_only: bool = False):
    """Scores, their square summed over the keys (the CGF variance's shape), a centred argument, its square as the
    'probabilities', times V: packed vs numpy, and the ct x ct count of the element-wise square on the scores."""
    rng = np.random.default_rng(3)
    S, H, heads = 44, 64, 4  # N=8192: blocks of 128 slots, 32 per ciphertext, 2 heads of 16 units per ciphertext
    dh = H // heads
    Xq, Xk, Xv = (rng.normal(size=(1, S, H)) * 0.3 for _ in range(3))
    be = PackedBackend(P4, NumpyEngine(P4, pt_cache_bytes=0), compact_scores=compact)
    k, v = (_heads(be, be.encrypt(x), S, heads, dh) for x in (Xk, Xv))
    kt = _heads(be, be.encrypt(Xk), S, heads, dh, transposed=True)
    xq = be.encrypt(Xq)
    if cls_only:  # the CLS row alone, through a linear map (its token mask clears the other tokens' slots)
        xq = be.matmul(be.rearrange(lambda m: [m[:, :1]], [xq], [0])[0], np.eye(H))
    q = _heads(be, xq, S, heads, dh)
    s = be.matmul(q, kt)
    n0 = be.engine.counts["mul_ct"]
    sq = be.mul(s, s)
    n_square = be.engine.counts["mul_ct"] - n0
    var = be.reduce_sum(sq, [3], True)
    arg = be.sub(be.mul(s, np.array(0.5)), var)
    p = be.mul(be.mul(arg, arg), np.ones((1, 1, 1, S)))  # the key mask (the diagonal layout needs it)
    ctx = be.matmul(p, v)
    Q, K, V = (x.reshape(1, S, heads, dh).transpose(0, 2, 1, 3) for x in (Xq, Xk, Xv))
    if cls_only:
        Q = Q[:, :, :1]
    Sc = Q @ K.transpose(0, 1, 3, 2)
    A = 0.5 * Sc - (Sc * Sc).sum(-1, keepdims=True)
    want = (A * A) @ V
    return be, be.decrypt(ctx), want, n_square, len(s.cts)


@pytest.mark.parametrize("cls_only", [False, True])
def test_compact_scores_are_exact_and_cut_the_element_wise_products(cls_only):
    """44 tokens: 87 score sets (44 for the CLS query alone) x 4 heads. The diagonal layout keeps a set of 2 heads
    per ciphertext (87 x 2 = 174 ciphertexts, 44 x 2 = 88); the compact one fills the 32 blocks of a ciphertext
    with one head's sets (4 heads x ceil(87 / 32) = 12, 4 x 2 = 8): the square of the scores costs that many
    ct x ct. probs @ V and the sum over the keys give numpy's numbers to float64 rounding either way."""
    old = _attention(False, cls_only)
    new = _attention(True, cls_only)
    for be, got, want, _, _ in (old, new):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    assert (old[3], old[4]) == ((88, 88) if cls_only else (174, 174))
    assert (new[3], new[4]) == ((8, 8) if cls_only else (12, 12))
    assert new[0].counts["compact_scores"] == 1 and new[0].counts["reduce_blocks_cyclic"] == 1
    assert old[0].counts["compact_scores"] == 0


def test_compact_scores_on_the_statistics_folded_student(tmp_path, tiny_tokenizer, mrpc_dir):
    """A 2-layer student with the CGF statistics fold (its layer 1 multiplies the queries by the key mean, which
    then meets every compact set): the dry run equals plain with and without the compaction, and the compaction
    cuts the ct x ct products and the refreshed ciphertexts (measured: 219 -> 166 ct x ct, 175 -> 121 refreshed
    ciphertexts at N=8192, 2 levels, 6 tokens; the masks add a rotation per set and ciphertext)."""
    from conftest import build_student
    from cgf_fhe.simulate.runner import SimConfig, client_batches

    d = build_student(tmp_path, tiny_tokenizer, mrpc_dir, layers=2)
    m = onnx.load(str(d / "student.onnx"))
    batches, _ = client_batches(m, SimConfig(backend="seal", limit=1, max_length=6, batch_size=1,
                                             data_dir=str(mrpc_dir)))
    feeds = batches[0][0]
    P = CKKSParams(8192, (60, 40, 40, 60), 40)
    plain = Interpreter(m, make_backend("plain")).run(feeds).outputs["logits"]
    runs = {}
    for compact in (False, True):
        be = PackedBackend(P, NumpyEngine(P, pt_cache_bytes=0), compact_scores=compact)
        got = PackedInterpreter(m, be).run(feeds).outputs["logits"]
        assert np.abs(got - plain).max() < 1e-12 * max(1.0, np.abs(plain).max())
        runs[compact] = (dict(be.engine.counts), be.refreshed_ciphertexts, dict(be.counts))
    (c0, r0, b0), (c1, r1, b1) = runs[False], runs[True]
    assert b1["compact_scores"] == 2 and b1["reduce_blocks_cyclic"] == 5 and "compact_scores" not in b0
    assert (c0["mul_ct"], c1["mul_ct"]) == (219, 166)
    assert (r0, r1) == (175, 121)
