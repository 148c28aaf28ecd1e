"""The packed real-CKKS backend (``--backend seal``): slot maps, SEAL engines, the dry run, the CLI.

Real SEAL runs use N=8192, chain [60, 40, 40, 60] (2 levels) and the micro exported student (hidden 8, 1 layer,
<= 6 tokens) so the file stays within about a minute on one core.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from _seal_cli import run_seal_cli, seal_cli_args

from cgf_fhe import fhe_ops
from cgf_fhe.cli import main
from cgf_fhe.simulate import CKKSParams, Interpreter, make_backend
from cgf_fhe.simulate.backends.base import SimulationError
from cgf_fhe.simulate.backends.seal_packed import (NumpyEngine, PackedBackend, SealClient, SealEngine,
                                                   _scales, norm_step)
from cgf_fhe.simulate.packed_runner import PackedInterpreter, PackedRunner
from cgf_fhe.simulate.packing import Layout

SMALL = CKKSParams(8192, (60, 40, 40, 60), 40)


@pytest.fixture(scope="session")
def micro_student_folded(tmp_path_factory, mrpc_dir, tiny_tokenizer):
    """The micro student exported as `cgf-fhe export` does by default: LayerNorms folded (cgf_fhe.fold)."""
    from conftest import build_student

    return build_student(tmp_path_factory.mktemp("packed_folded"), tiny_tokenizer, mrpc_dir, fold_layernorms=True,
                         fold_stats=False)


@pytest.fixture(scope="session")
def wide_student_folded(tmp_path_factory, mrpc_dir, tiny_tokenizer):
    """MiniLM-shaped in miniature (FFN 4x hidden, several heads, 2 layers), folded: at N=1024 its activations
    span 2 ciphertexts and the FFN 4, so a LayerNorm's per-token scalar meets rows in several ciphertexts."""
    from conftest import build_student

    return build_student(tmp_path_factory.mktemp("packed_wide"), tiny_tokenizer, mrpc_dir, hidden=64, layers=2,
                         heads=4, intermediate=256, max_length=6, fold_stats=False)


def _feeds(student, mrpc_dir, limit=1, max_length=6):
    from cgf_fhe.simulate.runner import SimConfig, client_batches

    m = onnx.load(str(student / "student.onnx"))
    batches, _ = client_batches(m, SimConfig(backend="seal", limit=limit, max_length=max_length, batch_size=1,
                                             data_dir=str(mrpc_dir)))
    return m, batches


def test_dry_run_packs_the_exported_student_exactly(micro_student_packed, mrpc_dir):
    """The numpy engine runs the packed schedule (diagonal method, token-shift scores, rotate-and-sum) and must
    give plain's numbers to float64 rounding: every slot map and rotation is right."""
    m, batches = _feeds(micro_student_packed, mrpc_dir, limit=2)
    for feeds, _ in batches:
        plain = Interpreter(m, make_backend("plain")).run(feeds).outputs["logits"]
        be = PackedBackend(SMALL, NumpyEngine(SMALL))
        got = PackedInterpreter(m, be).run(feeds).outputs["logits"]
        assert np.abs(got - plain).max() < 1e-12 * max(1.0, np.abs(plain).max())
        c = be.engine.counts
        assert c["mul_pt"] > 0 and c["mul_ct"] > 0 and c["rotate"] > 0 and be.n_refresh > 0


def test_dry_run_packs_folded_layernorms_exactly(micro_student_folded, micro_student_packed, mrpc_dir):
    """A folded LayerNorm hands its per-token scalar y [1, S, 1] to the next linear map (y * (d @ W')): y is the
    total of a cyclic rotate-and-sum, so it is already in every block of its ciphertext and meets rows of any
    width there, without a replication (no rotation more than the reduction's)."""
    m, batches = _feeds(micro_student_folded, mrpc_dir, limit=2)
    m_unfolded = onnx.load(str(micro_student_packed / "student.onnx"))
    assert fhe_ops.analyze(m).total_depth < fhe_ops.analyze(m_unfolded).total_depth  # the graph is folded
    for feeds, _ in batches:
        plain = Interpreter(m, make_backend("plain")).run(feeds).outputs["logits"]
        be = PackedBackend(SMALL, NumpyEngine(SMALL))
        got = PackedInterpreter(m, be).run(feeds).outputs["logits"]
        assert np.abs(got - plain).max() < 1e-12 * max(1.0, np.abs(plain).max())


def test_dry_run_packs_a_wide_folded_student_exactly(wide_student_folded, mrpc_dir):
    """Hidden 64 over 2 ciphertexts, FFN 256 over 8 (N=1024): y meets rows in ciphertexts other than its own,
    including the CLS-only last layer, and the logits are plain's to float64 rounding."""
    P = CKKSParams(1024, (60,) + (40,) * 8 + (60,), 40, insecure=True)
    m, batches = _feeds(wide_student_folded, mrpc_dir, limit=2)
    for feeds, _ in batches:
        plain = Interpreter(m, make_backend("plain")).run(feeds).outputs["logits"]
        be = PackedBackend(P, NumpyEngine(P))
        got = PackedInterpreter(m, be).run(feeds).outputs["logits"]
        assert be.layout.n_ct(64) == 2 and be.layout.n_ct(256) == 8
        assert np.abs(got - plain).max() < 1e-12 * max(1.0, np.abs(plain).max())


def test_per_token_scalar_meets_rows_of_any_width():
    """Hidden 96 over 3 ciphertexts of 32 blocks (N=8192, 40 tokens): the sum over hidden is in all 32 blocks
    (period S_blk). Sliced to the CLS token (the slot map re-indexed, the broadcast alias gone), a plaintext
    multiple and a refresh keep every replica, and the scalar then multiplies a [1, 1, 160] row whose units sit
    in every block of 5 ciphertexts."""
    rng = np.random.default_rng(5)
    X, W = rng.normal(size=(1, 40, 96)), rng.normal(size=(96, 160))
    be = PackedBackend(SMALL, NumpyEngine(SMALL))
    x = be.encrypt(X)
    y = be.reduce_sum(be.mul(x, x), [-1], True)
    assert y.shape == (1, 40, 1) and y.period == be.layout.S_blk == 128 and be.layout.hp == 32
    y_cls = be.rearrange(lambda t: [t[:, :1]], [y], [0])[0]
    assert y_cls.alias is None and y_cls.period == 128
    z = be.refresh(be.mul(y_cls, np.array(0.5)))
    row = be.matmul(x, W)
    row_cls = be.rearrange(lambda t: [t[:, :1]], [row], [0])[0]
    assert len(row_cls.cts) == 5
    got = be.decrypt(be.mul(z, row_cls))
    want = 0.5 * (X * X).sum(-1, keepdims=True) * (X @ W)
    np.testing.assert_allclose(got, want[:, :1], rtol=1e-12, atol=1e-12)


def test_seal_runs_the_folded_student(micro_student_folded, mrpc_dir, tmp_path):
    """Real CKKS on the folded micro student: same tolerance and agreement as the unfolded one."""
    run_seal_cli(micro_student_folded / "student.onnx", mrpc_dir, tmp_path / "seal_folded", limit=2,
                 max_logit_error=1e-4)


def test_layouts_and_rotation_steps():
    L = Layout.choose(8192, 32, 64)
    assert (L.S_blk, L.hp) == (128, 64) and L.S_blk >= 2 * L.S and L.hp * L.S_blk == 8192
    L = Layout.choose(8192, 60, 384)
    assert (L.S_blk, L.hp, L.n_ct(384), L.n_ct(1536)) == (128, 64, 6, 24)
    with pytest.raises(SimulationError, match="tokens need blocks"):
        Layout.choose(4096, 3000, 8, "double")  # compact blocks (the default above 64 tokens) fit: 4096 slots
    # a linear layer costs (n1 - 1) baby + (n2 - 1) giant rotations and one ct x pt per non-zero diagonal
    P = CKKSParams(8192, (60, 40, 40, 60), 40)
    rng = np.random.default_rng(0)
    X, W = rng.normal(size=(1, 16, 64)), rng.normal(size=(64, 64))
    be = PackedBackend(P, NumpyEngine(P))
    y = be.matmul(be.encrypt(X), W)
    np.testing.assert_allclose(be.decrypt(y), X @ W, atol=1e-12)
    assert be.engine.counts["mul_pt"] == 64 and be.engine.counts["rotate"] == (8 - 1) + (8 - 1)
    want = {norm_step(k * 64, P.slots) for k in range(1, 8)} | {norm_step(g * 8 * 64, P.slots) for g in range(1, 8)}
    assert be.engine.steps == want and len(want) == 14


def test_diagonal_sets_are_paired_onto_free_slots():
    """Sets r and r + D share one product in scores and probs @ V: D = the queries' span, so the shifted copy
    lands on free slots. 44 tokens in blocks of 128: 43 pairs (r, r + 44) and r = 0 alone; the CLS query alone:
    D = 1, 22 pairs; 64 tokens in blocks of exactly 2S: D = 64, 63 pairs."""
    be = PackedBackend(CKKSParams(16384), NumpyEngine(CKKSParams(16384)), Layout.choose(8192, 44, 384))
    sets = be.layout.diag_sets(range(44))
    D, groups = be._pairs(range(44), sets)
    assert D == 44 and len(groups) == 44 and sorted(r for g in groups for r in g) == sets
    assert all(g[1] - g[0] == 44 for g in groups if len(g) == 2) and [0] in groups
    D, groups = be._pairs((0,), be.layout.diag_sets((0,)))
    assert D == 1 and len(groups) == 22
    be = PackedBackend(SMALL, NumpyEngine(SMALL), Layout.choose(4096, 64, 32))
    D, groups = be._pairs(range(64), be.layout.diag_sets(range(64)))
    assert be.layout.S_blk == 128 and D == 64 and len(groups) == 64


def test_seal_exact_scales_levels_and_public_server():
    """Exact scale per level (s_{l-1} = s_l^2 / q_l), level matching before adding, and a server holding only
    public material: Galois keys for exactly the requested steps."""
    client = SealClient(SMALL, steps=[1, -3])
    blobs = client.public_blobs()
    assert set(blobs) == {"public_key", "relin_keys", "galois_keys", "steps"} and blobs["steps"] == [-3, 1]
    server = SealEngine(SMALL, client, blobs)
    assert not server.has_secret_key and not hasattr(server, "decryptor")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=SMALL.slots), rng.normal(size=SMALL.slots)
    a, b = server.encrypt(x), server.encrypt(y)
    s = _scales(SMALL)
    prod = server.mul(a, b)  # level 1
    assert server.level(prod) == 1 and prod.scale == s[1] and s[1] != 2.0 ** 40
    low = server.level_down(a, 1)  # a brought to level 1 at exactly s_1 (costs a ct x pt, no extra level)
    assert low.scale == s[1]
    tot = server.add(prod, low)
    np.testing.assert_allclose(server.decrypt(tot), x * y + x, atol=1e-6)
    r = server.rotate(a, -3)
    np.testing.assert_allclose(server.decrypt(r), np.roll(x, 3), atol=1e-6)
    with pytest.raises(SimulationError, match="no Galois key for rotation step 2"):
        server.rotate(a, 2)
    pt = server.plain(None, lambda: np.full(SMALL.slots, 0.5), 1, "mul")
    half = server.rescale(server.mul_plain_raw(prod, pt))
    assert server.level(half) == 0 and half.scale == s[0]
    np.testing.assert_allclose(server.decrypt(half), 0.5 * x * y, atol=1e-5)


def test_measured_op_costs_and_the_cost_model():
    """measure_op_ms times the packed operations on SEAL (the source of packing.MS_AT_16384): key switching
    (rotation, ct x ct) costs an order of magnitude more than a plaintext product, and op_ms shrinks with the
    primes left (rotations ~ primes^1.5) but keeps the encoding's fixed part."""
    from cgf_fhe.simulate.backends.seal_packed import measure_op_ms
    from cgf_fhe.simulate.packing import MS_FIXED_AT_16384, op_ms

    got = measure_op_ms(SMALL, levels=(2,), reps=2)[2]
    assert set(got) >= {"encode", "mul_pt", "rotate", "mul_ct", "refresh", "rescale"}
    assert all(v > 0 for v in got.values())
    assert got["rotate"] > 4 * got["mul_pt"] and got["mul_ct"] > 4 * got["mul_pt"]
    assert op_ms("rotate", 16384, 1) == pytest.approx(op_ms("rotate", 16384, 7) * (2 / 8) ** 1.5)
    assert op_ms("mul_pt", 16384, 3) == pytest.approx(op_ms("mul_pt", 16384, 7) / 2)
    assert MS_FIXED_AT_16384["encode"] < op_ms("encode", 16384, 0) < op_ms("encode", 16384, 7) / 2


def test_hand_built_attention_packs_and_unpackable_node_is_refused():
    """The hand-built attention graph of test_simulate packs (scores, centring, Pow, ct x ct context) and
    matches plain; a graph concatenating a plaintext with a ciphertext is refused by the dry run, naming the
    node, before anything is encrypted with SEAL."""
    from test_simulate import attention_graph, ops_zoo_graph

    rng = np.random.default_rng(0)
    m = attention_graph(H=8, heads=2)
    feeds = {"embeddings": rng.normal(size=(1, 4, 8)), "attention_mask": np.ones((1, 4), np.float32)}
    plain = Interpreter(m, make_backend("plain")).run(feeds).outputs["logits"]
    got = PackedInterpreter(m, PackedBackend(SMALL, NumpyEngine(SMALL))).run(feeds).outputs["logits"]
    np.testing.assert_allclose(got, plain, rtol=1e-10, atol=1e-12)
    m = ops_zoo_graph(H=4)
    feeds = {"embeddings": rng.normal(size=(1, 4, 4)), "attention_mask": np.ones((1, 4), np.float32)}
    eng = NumpyEngine(SMALL)
    with pytest.raises(SimulationError, match=r"node concat \(Concat\).*plaintext with a packed ciphertext"):
        PackedInterpreter(m, PackedBackend(SMALL, eng)).run(feeds)
    assert eng.counts["encrypt"] == 1  # the numpy engine only: no SEAL object was made


def test_runner_refuses_what_cannot_fit_memory(micro_student_packed, mrpc_dir, monkeypatch):
    import psutil

    from cgf_fhe.simulate.runner import SimConfig

    cfg = SimConfig(backend="seal", poly_modulus=8192, coeff_bits=(60, 40, 40, 60), max_length=6,
                    data_dir=str(mrpc_dir), progress=False)
    runner = PackedRunner(str(micro_student_packed / "student.onnx"), cfg)
    _, batches = _feeds(micro_student_packed, mrpc_dir)
    feeds, labels = batches[0]
    dry = runner.dry_run(feeds)
    need = dry["estimated_peak_bytes"]
    assert need > dry["galois_key_bytes"] > 0 and dry["galois_keys"] == len(dry["steps"]) > 0

    class Tight:
        available = need // 2

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight)
    with pytest.raises(SimulationError, match=r"not enough memory for the seal backend.*GiB"):
        runner.run_example(0, feeds, labels, dry=dry)
    assert runner.client is None  # refused before any key or ciphertext existed


def test_cli_seal_agrees_with_plain_and_resumes(micro_student_packed, mrpc_dir, tmp_path):
    out = tmp_path / "seal"
    s = run_seal_cli(micro_student_packed / "student.onnx", mrpc_dir, out, limit=2, max_logit_error=1e-4,
                     extra=["--compare-emulator"])
    assert s["backend"] == "seal"
    assert s["refresh_label"] == "client-aided refresh" and s["refreshes"] > 0
    se = s["seal"]
    rows = {r["layer"]: r for r in se["layers_last_example"]}
    assert rows[0]["mul_pt"] > 0 and rows[0]["mul_ct"] > 0 and rows[0]["rotate"] > 0
    assert 0 < rows[0]["cpu_seconds"] <= 1.1 * rows[0]["seconds"] + 0.05  # one core's time, next to the estimate
    assert se["galois_keys"] > 0 and s["backend_info"]["server_has_secret_key"] is False
    cmp = se["compare_emulator"][0]
    assert {r["layer"] for r in cmp} >= {"input", 0} and all(r["seal_std"] > 0 for r in cmp)
    md = (out / "seal_packed.md").read_text()
    assert "client-aided refreshes" in md and "| layer | seconds |" in md
    # resumable: a rerun skips the examples already written; a missing one is recomputed
    files = sorted((out / "examples").glob("*.json"))
    assert [f.name for f in files] == ["00000.json", "00001.json"]
    stamp = files[0].stat().st_mtime_ns
    files[1].unlink()
    assert main(seal_cli_args(micro_student_packed / "student.onnx", mrpc_dir, out, 2)) == 0
    assert files[0].stat().st_mtime_ns == stamp and files[1].is_file()
    s2 = json.loads((out / "simulation.json").read_text())
    assert s2["n_examples"] == 2 and s2["logits"][0] == s["logits"][0]


def test_resume_refuses_examples_of_another_model(micro_student_packed, mrpc_dir, tmp_path, capsys):
    """Issue #23: example files carried into a new run folder (a later session, the student re-exported) are
    reused only with the same ONNX bytes and CKKS parameters; otherwise the run stops naming the file and both
    hashes, and the file is kept as it was. Files from before the hash was recorded are reused with a warning."""
    import hashlib
    import shutil

    onnx_file = micro_student_packed / "student.onnx"
    want = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    out = tmp_path / "first"
    run_seal_cli(onnx_file, mrpc_dir, out, limit=1, max_logit_error=1e-4)
    ex = json.loads((out / "examples" / "00000.json").read_text())
    assert ex["model_sha256"] == want and ex["ckks"] == {"poly_modulus": 8192, "coeff_bits": [60, 40, 40, 60],
                                                         "scale_bits": 40}
    # a new session: the same bytes at another path, the example copied into a fresh run folder -> reused as is
    (tmp_path / "s2").mkdir()
    same = shutil.copy(onnx_file, tmp_path / "s2" / "student.onnx")
    out2 = tmp_path / "second"
    (out2 / "examples").mkdir(parents=True)
    f = Path(shutil.copy(out / "examples" / "00000.json", out2 / "examples" / "00000.json"))
    stamp, body = f.stat().st_mtime_ns, f.read_bytes()
    capsys.readouterr()
    assert main(seal_cli_args(same, mrpc_dir, out2, 1)) == 0
    assert f.stat().st_mtime_ns == stamp and "no model hash" not in capsys.readouterr().err
    s2 = json.loads((out2 / "simulation.json").read_text())
    assert s2["logits"] == json.loads((out / "simulation.json").read_text())["logits"]
    assert s2["model_sha256"] == want
    # a different student (one weight changed, as a retrain that did not reproduce): refused, file untouched
    m = onnx.load(str(onnx_file))
    init = next(t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1)
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 1e-3
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    (tmp_path / "s3").mkdir()
    other = tmp_path / "s3" / "student.onnx"
    onnx.save(m, str(other))
    other_hash = hashlib.sha256(other.read_bytes()).hexdigest()
    assert main(seal_cli_args(other, mrpc_dir, out2, 1)) == 2
    err = _error_line(capsys)
    assert str(f) in err and want in err and other_hash in err, err
    # other CKKS parameters: refused the same way, naming both chains
    args = seal_cli_args(same, mrpc_dir, out2, 1)
    args[args.index("--poly-modulus") + 1] = "16384"
    assert main(args) == 2
    err = _error_line(capsys)
    assert str(f) in err and "N=8192" in err and "N=16384" in err, err
    assert f.read_bytes() == body and f.stat().st_mtime_ns == stamp
    # a file written before hashes were recorded: reused with a warning when its run fingerprint matches ...
    for k in ("model_sha256", "ckks", "max_length"):
        ex.pop(k)
    f.write_text(json.dumps(ex))
    assert main(seal_cli_args(same, mrpc_dir, out2, 1)) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "no model hash" in err and "00000.json" in err
    assert json.loads(f.read_text()) == ex  # reused, not rewritten
    # ... refused when its fingerprint says another model
    assert main(seal_cli_args(other, mrpc_dir, out2, 1)) == 2
    err = _error_line(capsys)
    assert str(f) in err and ex["fingerprint"] in err, err


def _error_line(capsys) -> str:
    """The CLI's error: exactly one line (other stderr lines are progress bars and warnings)."""
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 1, lines
    return lines[0]


def test_report_side_cost_estimate_matches_the_dry_run(micro_student_packed, mrpc_dir):
    """Counts for report need no data: random embeddings of the same length give the dry run's counts."""
    from cgf_fhe.simulate.packed_runner import cost_markdown, packed_cost_estimate
    from cgf_fhe.simulate.runner import SimConfig

    m, batches = _feeds(micro_student_packed, mrpc_dir)
    feeds, _ = batches[0]
    S = feeds["embeddings"].shape[1]
    est = packed_cost_estimate(m, SMALL, S)
    cfg = SimConfig(backend="seal", poly_modulus=8192, coeff_bits=(60, 40, 40, 60), progress=False)
    dry = PackedRunner(str(micro_student_packed / "student.onnx"), cfg).dry_run(feeds)
    assert [(r["layer"], r["rotate"], r["mul_pt"], r["mul_ct"]) for r in est["layers"]] == \
        [(r["layer"], r["rotate"], r["mul_pt"], r["mul_ct"]) for r in dry["layers"]]
    assert est["totals"]["rotate"] == dry["counts"]["rotate"] > 0 and est["galois_keys"] == dry["galois_keys"]
    # the same time per operation kind; the dry run also decrypts the traced layers
    assert est["estimated_ms_by_kind"].keys() == dry["estimated_ms_by_kind"].keys()
    for kind, ms in est["estimated_ms_by_kind"].items():
        if kind != "decrypt":
            assert ms == pytest.approx(dry["estimated_ms_by_kind"][kind], rel=1e-9)
    assert 0 < est["estimated_ms_by_kind"]["decrypt"] == dry["estimated_ms_by_kind"]["decrypt"]  # trace decryptions are not charged
    assert "| layer | ct x pt | ct x ct | rotations |" in cost_markdown(est)
    # more tokens: more shifts of the scores, more rotations
    assert packed_cost_estimate(m, SMALL, S + 2)["totals"]["rotate"] > est["totals"]["rotate"]


def test_python_api_seal_matches_plain():
    """FHEModel.predict(fhe="seal"): each example packed and encrypted on SEAL; keys reused across calls."""
    from cgf_fhe.simulate import FHEModel
    from test_simulate import attention_graph

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(2, 4, 8))
    mask = np.ones((2, 4), np.float32)
    fm = FHEModel(attention_graph(H=8, heads=2), params=SMALL)
    plain = fm.predict(emb, mask, fhe="plain")
    got = fm.predict(emb, mask, fhe="seal")
    assert got.shape == plain.shape and 0 < np.abs(got - plain).max() < 1e-4
    keys = fm._seal_state["keys"]
    client = keys.client
    fm.predict(emb[:1], mask[:1], fhe="seal")
    assert keys.client is client  # same keys: no new key generation
    # a longer example rotates by steps the held set lacks: the set is replaced by exactly its own steps, as the CLI
    # runner does (PackedRunner.ensure_keys), not grown into the union of every length seen
    emb6 = rng.normal(size=(1, 6, 8))
    mask6 = np.ones((1, 6), np.float32)
    eng = NumpyEngine(SMALL)
    PackedInterpreter(fm.model, PackedBackend(SMALL, eng)).run({"embeddings": emb6, "attention_mask": mask6})
    assert not set(eng.steps) <= set(client.steps) and set(client.steps) - set(eng.steps)
    got6 = fm.predict(emb6, mask6, fhe="seal")
    assert keys.client is not client and sorted(keys.client.steps) == sorted(eng.steps)
    assert keys.engine.client is keys.client
    plain6 = fm.predict(emb6, mask6, fhe="plain")
    assert 0 < np.abs(got6 - plain6).max() < 1e-4


def test_dry_run_reports_modulus_headroom_and_refuses_overflow(micro_student_packed, mrpc_dir):
    from cgf_fhe.simulate.runner import SimConfig

    cfg = SimConfig(backend="seal", poly_modulus=8192, coeff_bits=(60, 40, 40, 60), progress=False)
    runner = PackedRunner(str(micro_student_packed / "student.onnx"), cfg)
    _, batches = _feeds(micro_student_packed, mrpc_dir)
    feeds, _ = batches[0]
    dry = runner.dry_run(feeds)
    assert 0 < dry["min_headroom_bits"] < 60
    big = {**feeds, "embeddings": feeds["embeddings"] * 2.0 ** 21}  # beyond 2^19 at level 0
    with pytest.raises(SimulationError, match="exceeds the modulus at level"):
        runner.check_memory(runner.dry_run(big))


def test_dry_run_packs_the_statistics_folded_attention(tmp_path, tiny_tokenizer, mrpc_dir):
    """The CGF statistics fold (cgf_fhe.fold.cgf_stats_core, layers after the first, `cgf-fhe export`'s default)
    multiplies the queries by the key mean, a [1, heads, dh, 1] sum over the tokens. It used to be refused (no
    packed layout for it; exports needed --no-fold-stats); the token sum is now left in every token slot and
    the product packs like the scores (tests/test_seal_packed_lean.py has the wider cases): plain's logits to
    float64 rounding."""
    from conftest import build_student

    d = build_student(tmp_path, tiny_tokenizer, mrpc_dir, layers=2)
    m, batches = _feeds(d, mrpc_dir, limit=1)
    feeds = batches[0][0]
    plain = Interpreter(m, make_backend("plain")).run(feeds).outputs["logits"]
    be = PackedBackend(SMALL, NumpyEngine(SMALL))
    got = PackedInterpreter(m, be).run(feeds).outputs["logits"]
    assert be.counts["token_sum_replicated"] == 1  # layer 1's key mean
    assert np.abs(got - plain).max() < 1e-12 * max(1.0, np.abs(plain).max())


def test_dry_run_reports_the_live_ciphertext_peak_by_node(wide_student_folded, mrpc_dir):
    """The dry run names the nodes where live ciphertexts peak and the values live there: the highest node's
    peak is the run's ciphertext peak, and the values live at it (each ciphertext once) fit inside it."""
    from cgf_fhe.simulate.runner import SimConfig

    cfg = SimConfig(backend="seal", poly_modulus=1024, coeff_bits=(60,) + (40,) * 8 + (60,), insecure=True,
                    max_length=6, data_dir=str(mrpc_dir), progress=False)
    runner = PackedRunner(str(wide_student_folded / "student.onnx"), cfg)
    _, batches = _feeds(wide_student_folded, mrpc_dir)
    dry = runner.dry_run(batches[0][0])
    mb = dry["memory_by_node"]
    top = mb["top_nodes"]
    assert len(top) == 10 and top[0]["node"] == mb["peak_node"]
    assert top[0]["peak_bytes"] == dry["ciphertext_peak_bytes"] > 0
    assert all(a["peak_bytes"] >= b["peak_bytes"] for a, b in zip(top, top[1:]))
    names = {n.name for n in runner.model.graph.node}
    assert all(t["node"] in names for t in top)
    live = sum(v["bytes"] for v in mb["live_at_peak"])
    assert 0 < live <= dry["ciphertext_peak_bytes"]
    by_layer = mb["peak_bytes_by_layer"]  # per node, not cumulative: the classifier head holds little
    assert set(by_layer) == {"0", "1", "head"} and max(by_layer.values()) == dry["ciphertext_peak_bytes"]
    assert by_layer["head"] < 0.5 * dry["ciphertext_peak_bytes"]


def test_attention_polynomials_run_by_head_groups_same_numbers_lower_peak(wide_student_folded, mrpc_dir):
    """The attention's CGF statistics and exp polynomial on the diagonal scores run one group of heads at a time:
    the same ciphertext operations (counts, refreshes, logits bit for bit) with a lower peak of live ciphertexts."""
    P = CKKSParams(1024, (60,) + (40,) * 8 + (60,), 40, insecure=True)
    m, batches = _feeds(wide_student_folded, mrpc_dir)
    feeds = batches[0][0]
    runs = {}
    for chunked in (False, True, "compact"):
        # as the dry run: ciphertexts only; the diagonal score layout (one set per ciphertext set), then the
        # compact one (tests/test_seal_compact.py) chunked
        be = PackedBackend(P, NumpyEngine(P, pt_cache_bytes=0), compact_scores=chunked == "compact")
        it = PackedInterpreter(m, be, chunked=bool(chunked))
        runs[chunked] = (it.run(feeds).outputs["logits"], dict(be.engine.counts), be.n_refresh,
                         be.refreshed_ciphertexts, be.engine.peak_bytes, it)
    (lo, co, ro, rco, po, _), (lc, cc, rc, rcc, pc, it) = runs[False], runs[True]
    assert np.array_equal(lo, lc) and ro == rc > 0 and rco == rcc
    assert co == cc and cc["mul_ct"] > 0 and cc["rotate"] > 0  # no plaintext cache: every encoding counted
    assert [c["chunks"] for c in it.chunk_log] == [2, 2]  # one region per layer, 4 heads in 2 ciphertext pairs
    assert it.chunk_log[0]["nodes"] >= 30 and it.chunk_log[0]["first"] == "node_mul_62"
    # by head pairs the region's peak (the exp polynomial's powers of all the scores at once) drops by ~30%; the
    # run's peak never grows. (On this student the run's peak is no longer in the region since the merged last
    # Newton step keeps a few row-sized products alive in the next linear map: region 1.03e7 -> 7.47e6 bytes, run
    # 2.02e7 both ways)
    reg = {i for r in it.regions.values() for i in r["nodes"]}
    peak_in = {c: max(pk for i, _b, pk, _a in runs[c][5].node_mem if i in reg) for c in runs}
    assert peak_in[True] < 0.75 * peak_in[False] and pc <= po
    # compact scores (8 ciphertexts per score tensor instead of 11 sets x 2): the region's peak by head pairs drops
    # again by more than half (7.47e6 -> 3.06e6 bytes)
    assert peak_in["compact"] < 0.5 * peak_in[True]
    assert np.abs(runs["compact"][0] - lc).max() < 1e-12 * max(1.0, np.abs(lc).max())


def test_each_example_gets_the_key_set_of_its_own_steps(micro_student_packed):
    """Examples of other lengths rotate by other steps: a key set covering the steps is reused, otherwise it is
    replaced by one of exactly the example's steps (never the union: on MiniLM 4 examples of 44-74 tokens made
    668 keys, 16.2 GB peak RSS, where one example needs ~200)."""
    from cgf_fhe.simulate.runner import SimConfig

    cfg = SimConfig(backend="seal", poly_modulus=8192, coeff_bits=(60, 40, 40, 60), max_length=6, progress=False)
    runner = PackedRunner(str(micro_student_packed / "student.onnx"), cfg)
    assert runner.ensure_keys({1, 2, 4}) > 0 and sorted(runner.client.steps) == [1, 2, 4]
    first = runner.client
    assert runner.ensure_keys({2, 4}) == 0.0 and runner.client is first  # covered: reused
    assert runner.ensure_keys({4, 8}) > 0 and sorted(runner.client.steps) == [4, 8]  # replaced, not merged
    assert runner.engine is not None and runner.engine.client is runner.client


def test_a_dry_run_that_disagrees_with_plain_is_refused_before_encrypting(micro_student_packed, mrpc_dir,
                                                                           monkeypatch):
    """A packing error (here: every ciphertext addition of the float64 schedule off by 1e-3) must not be paid for
    with a whole encrypted run that then looks like CKKS noise: the example is refused, naming it, before any
    key exists; the correct schedule passes the same check (plain's logits to rounding)."""
    from cgf_fhe.simulate import packed_runner as pr
    from cgf_fhe.simulate.runner import SimConfig

    cfg = SimConfig(backend="seal", poly_modulus=8192, coeff_bits=(60, 40, 40, 60), max_length=6,
                    data_dir=str(mrpc_dir), progress=False)
    runner = PackedRunner(str(micro_student_packed / "student.onnx"), cfg)
    _, batches = _feeds(micro_student_packed, mrpc_dir)
    feeds = batches[0][0]
    assert runner.check_schedule(runner.dry_run(feeds), feeds, 0) < 1e-9
    monkeypatch.setattr(NumpyEngine, "add", lambda self, a, b: self._new(a.v + b.v + 1e-3, a.level))
    with pytest.raises(SimulationError, match=r"example 0: the packed schedule's dry run .* packing error"):
        pr.simulate_packed(str(micro_student_packed / "student.onnx"), dataclasses.replace(cfg, limit=1))
    assert runner.client is None


def test_examples_split_a_run_across_processes(micro_student_packed, mrpc_dir, tmp_path, capsys):
    """`--examples SPEC`: two runs with disjoint selections (two cores, two folders) compute exactly their
    examples; their files together are the whole `--limit` run, which then only rebuilds the summary."""
    import shutil

    onnx_file = micro_student_packed / "student.onnx"
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(seal_cli_args(onnx_file, mrpc_dir, a, 3) + ["--examples", "0,2"]) == 0
    assert main(seal_cli_args(onnx_file, mrpc_dir, b, 3) + ["--examples", "1-1"]) == 0
    assert sorted(f.name for f in (a / "examples").glob("*.json")) == ["00000.json", "00002.json"]
    assert sorted(f.name for f in (b / "examples").glob("*.json")) == ["00001.json"]
    sa = json.loads((a / "simulation.json").read_text())
    assert sa["n_examples"] == 2 and [e["index"] for e in sa["seal"]["examples"]] == [0, 2]
    shutil.copy(b / "examples" / "00001.json", a / "examples" / "00001.json")
    stamps = {f.name: f.stat().st_mtime_ns for f in (a / "examples").glob("*.json")}
    assert main(seal_cli_args(onnx_file, mrpc_dir, a, 3)) == 0
    assert {f.name: f.stat().st_mtime_ns for f in (a / "examples").glob("*.json")} == stamps  # nothing recomputed
    s = json.loads((a / "simulation.json").read_text())
    assert s["n_examples"] == 3 and s["agreement"] == 1.0
    assert [e["index"] for e in s["seal"]["examples"]] == [0, 1, 2]
    capsys.readouterr()
    # bad selections: one line naming the cause, nothing written
    assert main(seal_cli_args(onnx_file, mrpc_dir, tmp_path / "c", 3) + ["--examples", "3"]) == 2
    assert "--examples 3 is outside --limit 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(seal_cli_args(onnx_file, mrpc_dir, tmp_path / "d", 3) + ["--examples", "2-1"])
    assert "ranges run upwards" in capsys.readouterr().err
    args = seal_cli_args(onnx_file, mrpc_dir, tmp_path / "e", 3)
    args[args.index("seal")] = "emulate"
    assert main(args + ["--examples", "1"]) == 2
    assert "--limit" in capsys.readouterr().err
    assert not (tmp_path / "c" / "examples").exists() or not any((tmp_path / "c" / "examples").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# compact blocks (S_blk >= S, masked wrap-around) above 64 tokens
# ---------------------------------------------------------------------------------------------------------------
def test_compact_block_layout_and_the_shifts_that_wrap():
    """Above 64 tokens the blocks hold S slots rounded up to a power of two, not 2 S: MiniLM (hidden 384) at
    N=16384 keeps 6 ciphertexts per activation up to 128 tokens instead of 12; a shift reads a neighbour block
    exactly when the key slot s + r leaves [0, S) and lands on another block's token slots."""
    for S, blocks, want in ((44, "auto", (128, 6, False)), (64, "auto", (128, 6, False)),
                            (67, "auto", (128, 6, True)), (74, "auto", (128, 6, True)),
                            (128, "auto", (128, 6, True)), (74, "double", (256, 12, False)),
                            (44, "compact", (64, 3, True))):
        L = Layout.choose(8192, S, 384, blocks)
        assert (L.S_blk, L.n_ct(384), L.wraps) == want, (S, blocks)
    assert Layout.choose(4096, 70, 32).S_blk == 128 and Layout.choose(4096, 3000, 8).S_blk == 4096  # fits compact
    with pytest.raises(SimulationError, match="tokens need blocks"):
        Layout.choose(4096, 5000, 8)
    L = Layout.choose(8192, 74, 384)
    # query token 73, shift +55: key slot 128 = the next block's token 0; +54: padding slot 127 (zero)
    assert L.shift_reads_neighbour([73], 55) and not L.shift_reads_neighbour([73], 54)
    assert L.shift_reads_neighbour([0], -55) and not L.shift_reads_neighbour([0], -54)
    assert not any(L.shift_reads_neighbour([0], r) for r in L.diag_sets([0]))  # the CLS query never wraps


def test_token_sum_replicated_in_compact_blocks_costs_one_mask_level():
    """The key mean's token sum left in every token slot: in blocks of 2 S a centred window (no level); in compact
    blocks (70 tokens in 128 slots) a one-sided sum, a mask of the first token slot and a copy back -- the same
    totals in the same slots, zero elsewhere (the support says so and the values agree), one level lower."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(1, 70, 32))
    got = {}
    for blocks in ("double", "auto"):
        be = PackedBackend(SMALL, NumpyEngine(SMALL), blocks=blocks)
        x = be.encrypt(X)
        t = be.reduce_sum(x, [1], True)
        L = be.layout
        vals = np.stack([c.v for c in t.cts])
        tok = np.arange(SMALL.slots) % L.S_blk
        want = np.zeros_like(vals)
        for k in range(32):  # hidden unit k: ciphertext k // hp, block k % hp; the total in its token slots
            c, b = divmod(k, L.hp)
            want[c, b * L.S_blk:b * L.S_blk + 70] = X[0, :, k].sum()
        tokens = np.broadcast_to(tok < 70, vals.shape)
        np.testing.assert_allclose(vals[tokens], want[tokens], atol=1e-11)
        assert not np.any((np.abs(vals) > 1e-9) & ~t.support)  # what the support calls zero is zero
        assert t.meta["token_replicas"][0] == tuple(range(70))
        got[blocks] = (L.S_blk, be.level(x) - be.level(t), be.counts["token_sum_masked"],
                       bool(np.any(t.support & ~tokens)))
    # the centred window leaves partial sums on the padding (marked); the masked copy leaves nothing there
    assert got == {"double": (256, 0, 0, True), "auto": (128, 1, 1, False)}


def test_compact_scores_are_masked_and_their_squares_sum_over_the_keys():
    """70 tokens in 128-slot blocks: K shifted by up to 69 tokens reads the next or previous block's tokens at
    some query slots; the masked scores hold exactly Q K^T at the valid slots and zero wherever the support
    says so, so a ct x ct function of the raw scores summed over the keys (the CGF variance of the statistics
    fold) is exact."""
    rng = np.random.default_rng(8)
    S, H, heads = 70, 32, 2
    dh = H // heads
    Xq, Xk = rng.normal(size=(1, S, H)), rng.normal(size=(1, S, H))
    # the diagonal score layout with masked shifted keys (compact_scores=False; the compact score layout masks
    # its own sets and is checked in tests/test_seal_compact.py and below)
    be = PackedBackend(SMALL, NumpyEngine(SMALL), compact_scores=False)
    q, k = be.encrypt(Xq), be.encrypt(Xk)
    q4 = be.rearrange(lambda t: [t.reshape(1, S, heads, dh).transpose(0, 2, 1, 3)], [q], [0])[0]
    k4 = be.rearrange(lambda t: [t.reshape(1, S, heads, dh).transpose(0, 2, 3, 1)], [k], [0])[0]
    sc = be.matmul(q4, k4)
    assert be.layout.S_blk == 128 and be.counts["scores_masked"] == 1
    Q4 = Xq.reshape(1, S, heads, dh).transpose(0, 2, 1, 3)
    K4 = Xk.reshape(1, S, heads, dh).transpose(0, 2, 3, 1)
    want = Q4 @ K4
    np.testing.assert_allclose(be.decrypt(sc), want, rtol=1e-12, atol=1e-12)
    vals = np.stack([c.v for c in sc.cts])
    assert not np.any((np.abs(vals) > 1e-9) & ~sc.support)  # what the support calls zero is zero
    var = be.reduce_sum(be.mul(sc, sc), [-1], True)
    np.testing.assert_allclose(be.decrypt(var), (want ** 2).sum(-1, keepdims=True), rtol=1e-12)


def test_attention_in_compact_blocks_equals_plain_with_fewer_products():
    """A hand-built attention (scores, the 1/n-weighted mean over the keys, centring, squares, probs @ Q, head
    merge, residual, LayerNorm-like mean, classifier) at 70 tokens: compact 128-slot blocks with every shifted
    key masked give plain's logits to float64 rounding, as the doubled 256-slot blocks do, with half the ct x pt
    of the linear maps and a lower estimate; the report-side estimate equals the dry run's counts."""
    from test_simulate import attention_graph

    from cgf_fhe.simulate.packed_runner import packed_cost_estimate

    m = attention_graph(H=32, heads=2)
    rng = np.random.default_rng(4)
    feeds = {"embeddings": rng.normal(0, 0.5, size=(1, 70, 32)), "attention_mask": np.ones((1, 70), np.float32)}
    plain = Interpreter(m, make_backend("plain")).run(feeds).outputs["logits"]
    runs = {}
    for blocks in ("auto", "double"):
        be = PackedBackend(SMALL, NumpyEngine(SMALL, pt_cache_bytes=0), blocks=blocks)
        got = PackedInterpreter(m, be).run(feeds).outputs["logits"]
        assert np.abs(got - plain).max() < 1e-12 * max(1.0, np.abs(plain).max()), blocks
        runs[blocks] = (be, dict(be.engine.counts), sum(be.engine.est_ms.values()))
    (be, c, ms), (bd, cd, msd) = runs["auto"], runs["double"]
    assert (be.layout.S_blk, bd.layout.S_blk) == (128, 256) and be.layout.wraps and not bd.layout.wraps
    # the compact score layout (the default) takes the wrapping shifts itself: no diagonal-layout masking
    assert be.counts["compact_scores"] >= 1 and be.counts["scores_masked"] == 0 == bd.counts["scores_masked"]
    assert c["mul_pt"] < cd["mul_pt"] and ms < msd, (c, cd, ms, msd)
    est = packed_cost_estimate(m, SMALL, 70)
    assert {k: est["totals"][k] for k in ("mul_pt", "mul_ct", "rotate")} == \
        {k: c[k] for k in ("mul_pt", "mul_ct", "rotate")}


def test_dry_run_of_a_student_in_compact_blocks_equals_plain(wide_student_folded, mrpc_dir):
    """The wide folded student forced into compact blocks at N=1024 (6 tokens in 8-slot blocks: shifts up to 5
    wrap): masked scores in layer 0, the CLS-only layer 1 unmasked; plain's logits to float64 rounding with
    fewer ciphertext operations than its doubled blocks."""
    P = CKKSParams(1024, (60,) + (40,) * 8 + (60,), 40, insecure=True)
    m, batches = _feeds(wide_student_folded, mrpc_dir, limit=1)
    feeds = batches[0][0]
    plain = Interpreter(m, make_backend("plain")).run(feeds).outputs["logits"]
    est = {}
    for blocks in ("compact", "double"):
        for cs in (False, True):  # the diagonal score layout (masked shifted keys) and the compact one
            be = PackedBackend(P, NumpyEngine(P, pt_cache_bytes=0), blocks=blocks, compact_scores=cs)
            got = PackedInterpreter(m, be).run(feeds).outputs["logits"]
            assert np.abs(got - plain).max() < 1e-12 * max(1.0, np.abs(plain).max()), (blocks, cs)
            if not cs:
                est[blocks] = (be.layout.S_blk, be.counts["scores_masked"], be.engine.counts["mul_pt"])
    assert est["compact"][:2] == (8, 1) and est["double"][:2] == (16, 0) and est["compact"][2] < est["double"][2]


@pytest.mark.slow  # ~60 s on an idle core (keys for 139 shifts), 150 s under a load of 5
def test_seal_runs_attention_in_compact_blocks():
    """Real CKKS (SEAL, N=4096 insecure: a small ring for a fast test) on the hand-built attention at 70 tokens:
    compact blocks chosen by default (doubled ones would be 256 slots, 8 blocks per ciphertext, fewer than a
    head's 16 units), masked shifted keys, agreement with plain (logits ~180: relative error ~1e-6)."""
    from test_simulate import attention_graph

    from cgf_fhe.simulate import FHEModel

    rng = np.random.default_rng(4)
    emb = rng.normal(0, 0.5, size=(1, 70, 32))
    mask = np.ones((1, 70), np.float32)
    P = CKKSParams(4096, (60, 40, 40, 60), 40, insecure=True)
    assert Layout.choose(P.slots, 70, 32).S_blk == 128
    fm = FHEModel(attention_graph(H=32, heads=2), params=P)
    plain = fm.predict(emb, mask, fhe="plain")
    got = fm.predict(emb, mask, fhe="seal")
    assert np.argmax(got) == np.argmax(plain), (got, plain)
    assert 0 < np.abs(got - plain).max() < 1e-5 * np.abs(plain).max(), (got, plain)
