"""The rotation error of the emulator's matching mode (``simulate --backend seal --compare-emulator``).

A SEAL rotation is an automorphism followed by a key switch. The key switch multiplies the RNS digits of the
ciphertext's second component, ``d_j = c1 mod q_j``, by the Galois key's error ``e_j`` and divides by the special
prime ``P`` (with a rounding). SEAL keeps the digits in ``[0, q_j)``, not centred: ``d_j = q_j / 2 + u_j`` with
``u_j`` centred. The error therefore has two parts:

* a **fixed part** ``sum_j (q_j / 2P) (1 + X + ... + X^(N-1)) e_j``, the same for every ciphertext rotated with that
  Galois key, at every level (the first prime, as wide as ``P``, dominates it; the 40-bit primes add ~2^-21 of
  it). In the slots it is ``e(z) / (1 - z)``: concentrated in the few slots whose root ``z`` lies near 1
  (kurtosis ~1000-2000 at N=8192) and with a non-zero mean. Rotations with the same key add it coherently:
  a sum over 2S-1 score diagonals that each went through the same head-sum rotations carries 2S-1 times it,
  not sqrt(2S-1) times;
* a **random part** ``sum_j u_j e_j / P`` plus the mod-down rounding, independent between ciphertexts; about the
  same for every key and level (N=8192, 40-bit scale: 5.1e-9 per slot).

Measured at N=8192 (chain 60, 40, 40, 60): the errors of rotations of different fresh ciphertexts under one key
correlate 0.33-0.96 (the fixed part's size varies from key to key), and subtracting the fixed part leaves 5.1e-9
for every key at levels 2 and 0.

Both parts are measured with the run's own keys by the client (who holds the secret key) from one ciphertext
``c`` and its negation: the digits of ``-c`` are ``q_j - d_j``, so ``rot(c) + rot(-c)`` decrypts to twice the
fixed part (plus two roundings) and ``rot(c) - rot(-c)`` to twice ``rot``'s message plus twice the random part.

Without the run's keys (:func:`cgf_fhe.simulate.backends.seal_packed.calibrate_rotation_noise`, a throwaway key)
a key's fixed part cannot be measured, but its law is known: :class:`ModelKeys` draws, per rotation step, a key
error ``e_j`` with SEAL's error law (std 3.2 per coefficient, independent per digit) and forms the fixed part
above exactly (a negacyclic prefix sum and an FFT at SEAL's slot roots ``zeta^(3^i)``). Measured at N=8192 (chain
60, 40, 40, 60; level 2), per-slot std of a key's fixed part: median over 16 keys 4.8e-9 to 6.3e-9 (4 sets of
real keys), 4.6e-9 to 8.8e-9 (20 sets of model keys; 6.2e-9 over 400 model keys); kurtosis 340 to 3500 (real)
and 2100 to 3600 (model). Coherent sums of 16 rotations with one key: emulator / SEAL error std, median over 16
keys, 0.87 to 1.39 with model keys, 0.20 to 0.26 with the random part alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RotationError:
    """The error one rotation adds, in value units at the scale of the level it was measured at."""

    std: float  # random part, per slot
    det: np.ndarray | None = None  # fixed part of this Galois key (a slot vector), None when unknown
    scale: float = 1.0  # the ciphertext scale it was measured at (value errors scale with 1 / scale)
    keys: "ModelKeys | None" = None  # det unknown: model keys give each step's fixed part (rotation_error_for)

    def at_scale(self, scale: float) -> "RotationError":
        f = self.scale / scale
        return RotationError(self.std * f, None if self.det is None else self.det * f, scale, self.keys)


SEAL_ERROR_STD = 3.2  # std of SEAL's error distribution per coefficient (its noise_standard_deviation)


class ModelKeys:
    """Stand-in Galois keys of a parameter set: one key error per rotation step, drawn with SEAL's error law
    (module doc), so each step has a fixed part of the right law, the same at every level and for every
    ciphertext rotated with that step. ``seed`` makes the keys reproducible (a run uses one set of keys)."""

    def __init__(self, params, seed: int = 0):
        self.n = int(params.poly_modulus)
        primes = [float(q) for q in params.primes]
        self.weights = np.array(primes[:-1]) / (2.0 * primes[-1])  # q_j / 2P per data prime
        # slot i of SEAL's CKKS encoder is the value at the root zeta^(3^i mod 2N), zeta = exp(i pi / N)
        self.roots = np.array([pow(3, i, 2 * self.n) for i in range(self.n // 2)], dtype=np.int64)
        self.seed = int(seed)
        self._raw: dict = {}  # (level, step) -> fixed part in raw units (value units times the scale)

    def raw_fixed_part(self, level: int, step: int) -> np.ndarray:
        key = (int(level), int(step))
        if key not in self._raw:
            rng = np.random.default_rng([self.seed, int(step) % (self.n // 2)])
            e = rng.normal(0.0, SEAL_ERROR_STD, (len(self.weights), self.n))  # e_j for every data prime
            e = self.weights[: level + 1] @ e[: level + 1]  # a level-l ciphertext has the digits j <= l
            c = np.cumsum(e)
            # (1 + X + ... + X^(N-1)) e mod X^N + 1: coefficient k is sum_{m <= k} e_m - sum_{m > k} e_m
            poly = np.zeros(2 * self.n)
            poly[: self.n] = 2.0 * c - c[-1]
            self._raw[key] = (np.fft.ifft(poly) * (2 * self.n))[self.roots].real
        return self._raw[key]


def add_rotation_error(v: np.ndarray, err, rng: np.random.Generator) -> np.ndarray:
    """``v`` (already rotated) plus one rotation's error: the key's fixed part and a fresh random part.
    ``err``: a :class:`RotationError` or a plain std (random part only)."""
    if not isinstance(err, RotationError):
        return v + rng.normal(0.0, float(err), v.shape)
    out = v + rng.normal(0.0, err.std, v.shape)
    if err.det is not None:
        out = out + err.det
    return out


def measure_rotation(engine, level: int, step: int, rng: np.random.Generator) -> RotationError:
    """Both parts of the error of a rotation by ``step`` at ``level`` with ``engine``'s Galois key (a SEAL engine
    whose client can decrypt): one random ciphertext and its negation (module doc)."""
    x = rng.normal(size=engine.slots)
    c = engine.level_down(engine.encrypt(x), level)
    plus = engine.decrypt(engine.rotate(c, step))
    minus = engine.decrypt(engine.rotate(engine.neg(c), step))
    base = np.roll(engine.decrypt(c), -step)
    rand = (plus - minus) / 2 - base
    # the fixed part's estimate carries two mod-down roundings (std/sqrt 2 each way): negligible next to it
    return RotationError(float(np.std(rand)), (plus + minus) / 2, float(engine.s[level]))


def calibrate_rotations(engine, pairs) -> dict:
    """``{(level, step): RotationError}`` for the (level, step) rotations a run used, with the run's own keys:
    each key measured once, at the highest level it is used at (both parts are the same at every level up to
    the scale, module doc), then brought to the other levels' scales."""
    rng = np.random.default_rng(54321)
    top: dict[int, int] = {}
    for lv, k in pairs:
        top[k] = max(top.get(k, -1), lv)
    measured = {k: measure_rotation(engine, lv, k, rng) for k, lv in sorted(top.items())}
    return {(lv, k): measured[k].at_scale(float(engine.s[lv])) for lv, k in pairs}


def rotation_error_for(table: dict, level: int, step: int, default_std: float):
    """The calibrated error of a (level, step) rotation; else the level's (a throwaway key's random part, with
    the fixed part of the step's model key when it carries :class:`ModelKeys`); else ``default_std``."""
    err = table.get((level, step))
    if err is None:
        err = table.get(level)
        if isinstance(err, RotationError) and err.det is None and err.keys is not None:
            err = RotationError(err.std, err.keys.raw_fixed_part(level, step) / err.scale, err.scale, err.keys)
    return default_std if err is None else err


__all__ = ["RotationError", "ModelKeys", "SEAL_ERROR_STD", "add_rotation_error", "measure_rotation", "calibrate_rotations", "rotation_error_for"]
