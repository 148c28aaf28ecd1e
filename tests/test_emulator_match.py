"""The emulator's matching mode against SEAL: a rotation's key-switching error has a fixed part per Galois key
(SEAL's digits are not centred), so rotations with one key add up coherently (cgf_fhe.simulate.backends.seal_noise).

N=8192, chain [60, 40, 40, 60]: a few seconds on one core."""
import numpy as np
import pytest

from cgf_fhe.simulate import CKKSParams
from cgf_fhe.simulate.backends.seal_noise import RotationError, calibrate_rotations, rotation_error_for
from cgf_fhe.simulate.backends.seal_packed import (NumpyEngine, SealClient, SealEngine,
                                                  calibrate_rotation_noise)

SMALL = CKKSParams(8192, (60, 40, 40, 60), 40)
STEPS = (1, 64, 128)


@pytest.fixture(scope="module")
def seal():
    return SealEngine(SMALL, SealClient(SMALL, STEPS))


def _rotate_sum_error(engine, xs, steps):
    """Error of sum_i rotsum(x_i) over ``steps`` (each x_i encrypted on its own) against the exact value."""
    acc = want = None
    for x in xs:
        c, w = engine.encrypt(x), x
        for k in steps:
            c, w = engine.add(c, engine.rotate(c, k)), w + np.roll(w, -k)
        acc = c if acc is None else engine.add(acc, c)
        want = w if want is None else want + w
    return engine.decrypt(acc) - want


def test_rotation_error_parts_are_measured_with_the_runs_keys(seal):
    rng = np.random.default_rng(1)
    cal = calibrate_rotations(seal, [(2, k) for k in STEPS] + [(0, 1)])
    shares = []
    for k in STEPS:
        err = cal[(2, k)]
        assert isinstance(err, RotationError) and err.det is not None and err.det.shape == (SMALL.slots,)
        assert 2e-9 < err.std < 2e-8  # the random part: about N / (6 scale) times a small factor
        # a fresh rotation's error minus the key's fixed part is the random part (same key, any ciphertext)
        c = seal.level_down(seal.encrypt(rng.normal(size=SMALL.slots)), 2)
        e = seal.decrypt(seal.rotate(c, k)) - np.roll(seal.decrypt(c), -k)
        assert np.std(e - err.det) == pytest.approx(err.std, rel=0.15)
        shares.append(np.std(e) / np.std(e - err.det))
    # the fixed parts are a real share of each key's error. The share depends on the key (SEAL draws keys
    # unseeded): 1.10-5.34 per key over 21 keys (7 fresh key sets, measured 2026-12-03; the mean of 3 went as
    # low as 1.16, which failed the old "mean > 1.2" bar in CI);
    # a wrong or unrelated det gives <= 1.0
    assert min(shares) > 1.03, shares
    # the same key at another level: the same parts at that level's scale (ratio of the exact scales)
    assert np.allclose(cal[(0, 1)].det * seal.s[0], cal[(2, 1)].det * seal.s[2])


def test_coherent_rotation_sums_match_seal_within_2x(seal):
    """16 ciphertexts, each rotate-and-summed over steps 64 and 128 (as the score diagonals' head sums), then
    added: SEAL's error std and the emulator's (with the run's keys calibrated) agree within 2x; without the
    keys' fixed parts the emulator is low (by 1.4-4x, depending on the keys)."""
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=SMALL.slots) for _ in range(16)]
    steps = (64, 128)
    s_seal = np.std(_rotate_sum_error(seal, xs, steps))
    cal = calibrate_rotations(seal, [(2, k) for k in steps])
    emu = np.std(_rotate_sum_error(NumpyEngine(SMALL, noise=True, seed=3, rotation_std=cal), xs, steps))
    assert 0.5 < emu / s_seal < 2.0
    total_only = {key: float(np.sqrt(e.std ** 2 + np.var(e.det))) for key, e in cal.items()}
    old = np.std(_rotate_sum_error(NumpyEngine(SMALL, noise=True, seed=3, rotation_std=total_only), xs, steps))
    # keys are unseeded: with a key's fixed/random variance ratio r, the old emulator sits at about
    # sqrt(16 (1 + r) / (256 r + 16)) of SEAL: 0.53 at the lowest r measured (0.21), 0.65 at r = 0.1
    assert old / s_seal < 0.7


def _coherent_error(engine, xs, k):
    """Error std of sum_i rot_k(x_i), each x_i encrypted on its own: the key's fixed part adds up len(xs) times."""
    acc, want = None, 0.0
    for x in xs:
        c = engine.rotate(engine.encrypt(x), k)
        acc = c if acc is None else engine.add(acc, c)
        want = want + np.roll(x, -k)
    return float(np.std(engine.decrypt(acc) - want))


def test_fallback_without_the_runs_keys_models_each_keys_fixed_part():
    """calibrate_rotation_noise (no measurement with the run's keys) gives each step a model key's fixed part
    (seal_noise.ModelKeys): over 16 keys the median ratio of the emulator's coherent-sum error to SEAL's is
    0.87-1.39 (4 sets of real keys); with the random part alone (the old fallback) it was 0.20-0.26."""
    steps = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597]
    seal = SealEngine(SMALL, SealClient(SMALL, steps))
    fallback = calibrate_rotation_noise(SMALL)
    assert all(e.det is None and e.keys is not None for e in fallback.values())
    random_only = {lv: RotationError(e.std, None, e.scale) for lv, e in fallback.items()}
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=SMALL.slots) for _ in range(16)]
    new, old = [], []
    for k in steps:
        s = _coherent_error(seal, xs, k)
        new.append(_coherent_error(NumpyEngine(SMALL, noise=True, seed=3, rotation_std=fallback), xs, k) / s)
        old.append(_coherent_error(NumpyEngine(SMALL, noise=True, seed=3, rotation_std=random_only), xs, k) / s)
    assert 0.5 < np.median(new) < 2.0, new
    assert np.median(old) < 0.5, old
    # the model keys' fixed parts have the law of the real ones: per-slot std (median over keys) and heavy tails
    real = calibrate_rotations(seal, [(2, k) for k in steps])
    model = [rotation_error_for(fallback, 2, k, 0.0).det for k in steps]
    ratio = np.median([np.std(d) for d in model]) / np.median([np.std(real[(2, k)].det) for k in steps])
    assert 0.5 < ratio < 2.0
    kurt = [float(np.mean((d - d.mean()) ** 4) / np.var(d) ** 2) for d in model]
    assert min(kurt) > 50  # concentrated in the slots whose root lies near 1, as measured (340-3500)
    # one key: the same fixed part at every level up to the scale, the same for every engine
    top = rotation_error_for(fallback, SMALL.level_budget, 5, 0.0)
    assert np.allclose(rotation_error_for(fallback, 0, 5, 0.0).det * seal.s[0], top.det * seal.s[SMALL.level_budget],
                       rtol=1e-4, atol=1e-6 * np.abs(top.det * seal.s[SMALL.level_budget]).max())
