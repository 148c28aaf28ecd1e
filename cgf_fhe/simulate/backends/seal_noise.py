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

    def at_scale(self, scale: float) -> "RotationError":
        f = self.scale / scale
        return RotationError(self.std * f, None if self.det is None else self.det * f, scale)


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
    """The calibrated error of a (level, step) rotation; else the level's (a throwaway key's); else
    ``default_std``."""
    err = table.get((level, step))
    if err is None:
        err = table.get(level)
    return default_std if err is None else err


__all__ = ["RotationError", "add_rotation_error", "measure_rotation", "calibrate_rotations", "rotation_error_for"]
