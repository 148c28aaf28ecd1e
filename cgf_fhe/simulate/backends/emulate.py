"""``emulate`` backend: CKKS semantics without the cryptography, vectorised in torch.

Every encrypted value is a float64 tensor of the *decoded* values (error included) plus its level. What CKKS
does to those values is reproduced operation by operation, with the magnitudes measured against TenSEAL
(``benchmarks/emulator_calibration.py``; constants in :class:`cgf_fhe.ckks.CKKSParams`):

=====================  ========================================================================================
encryption / encoding  fresh error ~ N(0, s_r^2), ``s_r = N / (6 * scale)`` (rounding with a ternary secret;
                       SEAL encrypts at the key level and divides by the special prime, so the fresh error is a
                       rounding error). A slot-varying plaintext is encoded with error ~ N(0, s_e^2),
                       ``s_e = sqrt(N/12) / scale``; constants (the same value in every slot) encode exactly.
add / sub / neg / sum  exact (operands at different levels are mod-switched down: exact in CKKS).
multiplication         (ct-ct with relinearisation, or ct-pt) then one rescale: the product of the noisy values,
                       times ``scale / q_l`` when the scale is *pinned* (TenSEAL re-sets the scale to 2^scale_bits
                       after dividing by the prime q_l; the true scale is scale^2/q_l), plus one rounding error
                       N(0, s_r^2) per rescaled product: a MatMul/dot over K terms rescales each product (TenSEAL),
                       so its output gets N(0, K s_r^2). Relinearisation/key-switching error is divided by the
                       special prime and the scale^2: measured <2% of s_r, not modelled separately. The rounding
                       errors of different products are independent here; TenSEAL rounds identical products (same
                       ciphertext times the same weight, e.g. a centring matrix -1/H) identically, so sums that
                       cancel such terms come out up to ~1.7x less noisy than emulated (measured per node).
levels                 a fresh ciphertext has ``level_budget`` levels; each rescale drops one; a multiplication
                       at level 0 -> :class:`LevelError` (``on_exhausted="raise"``) or garbage (the product
                       wraps modulo q0 at scale^2, ``"garbage"``).
modulus overflow       a value at level l must satisfy |v| < Q_l / (2 * scale) (Q_l = q0 ... q_l), else it wraps:
                       :class:`ModulusOverflowError` (``on_overflow="raise"``) or the centred residue
                       (``"garbage"``). The smallest headroom (bits) seen at the last level is recorded
                       (higher levels hold ~2^scale_bits times more and are not checked).
refresh                ``refresh_kind="bootstrap"``: needs |v| <= ``bootstrap_bound`` (else error/garbage) and adds
                       N(0, (bootstrap_bound * 2^-bootstrap_bits)^2), i.e. ``bootstrap_bits`` of precision relative
                       to the stated bound; ``"client"``: client-aided decrypt + re-encrypt (fresh error), the
                       TenSEAL behaviour. Either returns a ciphertext with the full level budget (the levels the
                       bootstrapping circuit itself consumes are not part of the budget).
=====================  ========================================================================================

Speed: Gaussian samples are read from a pool drawn once per backend (``noise_pool`` samples; random offset per
operation, offsets reseeded per batch) and products are scaled and noised in place, so an emulated operation
costs a few elementwise passes on top of the plaintext one.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import torch

from .base import BootstrapRangeError, LevelError, ModulusOverflowError, SimulationError
from .plain import TorchBackend, TorchCT
from ...ckks import CKKSParams


class EmulateBackend(TorchBackend):
    name = "emulate"
    leveled = True

    def __init__(self, params: CKKSParams, *, refresh_kind: str = "bootstrap", bootstrap_bits: float = 24.0,
                 bootstrap_bound: float = 1024.0, on_overflow: str = "raise", on_exhausted: str = "raise",
                 pinned_scale: bool = True, noise: bool = True, seed: int = 0, device=None,
                 noise_pool: int = 1 << 23):
        super().__init__(params, device)
        if refresh_kind not in ("bootstrap", "client"):
            raise SimulationError(f"refresh_kind must be 'bootstrap' or 'client', got {refresh_kind!r}")
        for name, v in (("on_overflow", on_overflow), ("on_exhausted", on_exhausted)):
            if v not in ("raise", "garbage"):
                raise SimulationError(f"{name} must be 'raise' or 'garbage', got {v!r}")
        self.refresh_kind = refresh_kind
        self.refresh_label = "bootstrap" if refresh_kind == "bootstrap" else "client-aided refresh"
        self.bootstrap_bits = float(bootstrap_bits)
        self.bootstrap_bound = float(bootstrap_bound)
        self.on_overflow, self.on_exhausted = on_overflow, on_exhausted
        self.pinned_scale, self.noise = bool(pinned_scale), bool(noise)
        self.gen = torch.Generator(device=self.device).manual_seed(int(seed))
        self.seed = int(seed)
        self.noise_pool = noise_pool
        self._pool: torch.Tensor | None = None
        self._offsets = random.Random(self.seed)
        p = params
        self.budget = p.level_budget
        self.s_round = p.rounding_std
        self.s_encode = p.encode_std
        self.bound = [p.value_bound(lv) for lv in range(self.budget + 1)]
        self.factor = [1.0] + [(p.scale / p.rescale_prime(lv)) if self.pinned_scale else 1.0
                               for lv in range(1, self.budget + 1)]
        self.min_headroom_bits = math.inf
        self.overflows = 0
        self.bootstrap_out_of_range = 0

    # ---- noise -------------------------------------------------------------------------------------------------
    def reseed(self, seed: int) -> None:
        """Deterministic noise for one batch (independent of which worker runs it)."""
        self.gen.manual_seed(int(seed))
        self._offsets = random.Random(int(seed))

    def _unit_noise(self, shape) -> torch.Tensor:
        """Standard Gaussian noise of ``shape`` (float64). Drawing Gaussians costs ~10x an elementwise op, so by
        default a pool of ``noise_pool`` samples (drawn once from ``seed``) is read at a random offset per call;
        different calls are independent unless their offsets coincide. Tensors larger than half the pool (and
        ``noise_pool=0``) get fresh samples."""
        shape = tuple(shape)
        n = math.prod(shape)
        if self.noise_pool and n <= self.noise_pool // 2:
            if self._pool is None:
                g = torch.Generator(device=self.device).manual_seed(self.seed + 7919)
                self._pool = torch.randn(self.noise_pool, generator=g, device=self.device,
                                         dtype=torch.float32).to(self.dtype)
            off = self._offsets.randrange(self.noise_pool - n + 1)
            return self._pool[off:off + n].view(shape)
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32).to(self.dtype)

    def _gauss(self, shape, std: float) -> torch.Tensor:
        return self._unit_noise(shape) * std

    def _check(self, data: torch.Tensor, level: int) -> torch.Tensor:
        """Modulus overflow check. Only levels whose bound is below 2^45 are checked (in practice level 0:
        Q_0/(2 scale) = 2^(q0 bits - scale bits - 1); one level up the bound is ~2^(that + scale bits)), which
        catches every overflow a realistic value can reach at a fraction of the cost."""
        if data.numel() == 0 or self.bound[level] >= 2.0 ** 45:
            return data
        lo, hi = torch.aminmax(data)
        m = max(-float(lo), float(hi))
        bound = self.bound[level]
        if m > 0:
            self.min_headroom_bits = min(self.min_headroom_bits, math.log2(bound / m) if m < math.inf else -math.inf)
        if not m < bound:
            self.overflows += 1
            if self.on_overflow == "raise":
                raise ModulusOverflowError(
                    f"|value| reaches {m:.4g} but a ciphertext at level {level} holds |v| < Q_{level}/(2*scale) = "
                    f"{bound:.4g} (log2 Q_{level} = {self.params.log2_modulus(level):.1f}, scale 2^"
                    f"{self.params.scale_bits}): it wraps around the modulus and decrypts to garbage. Keep values "
                    "smaller (e.g. tighter polynomial intervals) or give q0 more bits than the scale")
            w = 2.0 * bound
            data = data - w * torch.round(data / w)
        return data

    # ---- hooks -------------------------------------------------------------------------------------------------
    def _encode(self, pt: torch.Tensor, slot_vector: bool) -> torch.Tensor:
        """A constant plaintext (same value in every slot) encodes exactly to round(p * scale) / scale; a constant
        that rounds to 0 makes TenSEAL return a fresh encryption of 0 (same error magnitude as a rescale). A
        slot-varying plaintext gets its encoding error in the hooks below."""
        if slot_vector:
            return pt
        s = self.params.scale
        return torch.round(pt * s) / s

    def _fresh(self, data: torch.Tensor) -> TorchCT:
        if self.noise:
            data = data + self._gauss(data.shape, math.hypot(self.s_round, self.s_encode))
        return TorchCT(self._check(data, self.budget), self.budget)

    def _linear(self, data, parents: Sequence[TorchCT], pt_vector: bool = False) -> TorchCT:
        level = min(p.level for p in parents)
        if pt_vector and self.noise:
            data = data + self._gauss(data.shape, self.s_encode)
        return TorchCT(self._check(data, level), level)

    def _product(self, data, parents: Sequence[TorchCT], terms: int = 1, vector_factor=None) -> TorchCT:
        level = min(p.level for p in parents)
        if level < 1:
            if self.on_exhausted == "raise":
                raise LevelError(f"multiplication needs 1 level but its ciphertext input has {level} left: "
                                 "1 level missing")
            w = self.params.primes[0] / self.params.scale ** 2  # product wraps modulo q0 at scale^2
            return TorchCT(data - w * torch.round(data / w), 0)
        out = data.mul_(self.factor[level])  # data is the fresh product: update in place
        if self.noise:
            out.add_(self._unit_noise(out.shape), alpha=self.s_round * math.sqrt(max(terms, 1)))
            if vector_factor is not None:
                out.addcmul_(vector_factor, self._unit_noise(out.shape), value=self.s_encode)
        return TorchCT(self._check(out, level - 1), level - 1)

    # ---- refresh -----------------------------------------------------------------------------------------------
    def refresh(self, ct: TorchCT) -> TorchCT:
        self.n_refresh += 1
        with self.timed("refresh"):
            data = ct.data
            if self.refresh_kind == "client":
                return self._fresh(data)
            bound = self.bootstrap_bound
            m = float(data.abs().max()) if data.numel() else 0.0
            if not m <= bound:
                self.bootstrap_out_of_range += 1
                if self.on_overflow == "raise":
                    raise BootstrapRangeError(
                        f"bootstrap input reaches |v| = {m:.4g} > the bootstrap bound {bound:.4g} (--bootstrap-bound); "
                        "bootstrapping evaluates the modular reduction only on that range. Raise the bound (costs "
                        "precision: error ~ bound * 2^-bits) or keep the refreshed values smaller")
                bad = data.abs() > bound
                data = torch.where(bad, (torch.rand(data.shape, generator=self.gen, device=self.device,
                                                    dtype=self.dtype) * 2 - 1) * bound, data)
            if self.noise:
                data = data + self._gauss(data.shape, bound * 2.0 ** (-self.bootstrap_bits))
            return TorchCT(self._check(data, self.budget), self.budget)

    def describe(self) -> dict:
        d = super().describe()
        d.update({"refresh_kind": self.refresh_kind, "bootstrap_bits": self.bootstrap_bits,
                  "bootstrap_bound": self.bootstrap_bound, "on_overflow": self.on_overflow,
                  "on_exhausted": self.on_exhausted, "pinned_scale": self.pinned_scale, "noise": self.noise,
                  "rounding_std": self.s_round, "encode_std": self.s_encode, "noise_pool": self.noise_pool,
                  "rescale_factors": self.factor[1:]})
        return d

    def diagnostics(self) -> dict:
        return {"min_headroom_bits": None if self.min_headroom_bits == math.inf else self.min_headroom_bits,
                "overflows": self.overflows, "bootstrap_out_of_range": self.bootstrap_out_of_range}


__all__ = ["EmulateBackend"]
