"""CKKS parameters: ring size N, coefficient-modulus chain, scale; the 128-bit security check; the primes.

A chain ``[q0, q1, ..., qL, P]`` (bit sizes) has ``L`` *levels*: ``q0`` holds the final value, ``q1..qL`` are
dropped one per rescale (one per multiplication), ``P`` is the special prime used by key switching. A fresh
ciphertext therefore affords ``L = len(chain) - 2`` multiplicative levels (the level budget of
:func:`cgf_fhe.bootstrap.plan_bootstraps`). Examples: ``N=8192, [60,40,40,60]`` -> 2 levels;
``N=16384, [60]+[40]*7+[60]`` -> 7 levels.

Security: the total ``log2 Q`` (all primes including ``P``) must not exceed the HomomorphicEncryption.org
standard's bound for 128-bit classical security with ternary secrets (the table SEAL enforces):
``N=1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881``. Weaker parameters are refused with
:class:`InsecureParamsError` unless ``insecure=True`` (``--insecure``).

Primes are chosen exactly as SEAL's ``CoeffModulus::Create`` does (for every bit size, the largest primes
``p = 1 mod 2N`` below ``2^bits``, assigned from the smallest upwards in chain order), so the emulator knows the
real moduli: TenSEAL re-sets the scale to ``2^scale_bits`` after each rescale while the true scale is
``scale^2 / q_i``, which multiplies every product by ``2^scale_bits / q_i`` -- a deterministic bias the emulator
reproduces.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

from ..errors import UserError

# HomomorphicEncryption.org standard, 128-bit classical security, ternary secret: max log2(Q) per ring size N.
HE_STANDARD_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAX_PRIME_BITS = 60
DEFAULT_SCALE_BITS = 40
EDGE_BITS = 60  # q0 and the special prime when the chain is built from --levels


class ParamsError(UserError):
    """Malformed CKKS parameters (not a power-of-two N, prime sizes, scale vs chain...)."""


class InsecureParamsError(ParamsError):
    """Parameters below 128-bit security (log Q too large for N)."""


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (enough for <= 61-bit moduli)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def seal_primes(poly_modulus: int, bit_sizes) -> list[int]:
    """The primes SEAL's ``CoeffModulus::Create(N, bit_sizes)`` returns (same order)."""
    factor = 2 * poly_modulus
    need = Counter(bit_sizes)
    table: dict[int, list[int]] = {}
    for bits, count in need.items():
        found, v = [], (1 << bits) - factor + 1
        while len(found) < count:
            if v < (1 << (bits - 1)):
                raise ParamsError(f"not enough {bits}-bit primes = 1 mod {factor} for N={poly_modulus}")
            if _is_prime(v):
                found.append(v)
            v -= factor
        table[bits] = found  # descending; SEAL pops from the back (smallest first)
    return [table[b].pop() for b in bit_sizes]


def max_secure_levels(poly_modulus: int, scale_bits: int = DEFAULT_SCALE_BITS, edge_bits: int = EDGE_BITS) -> int:
    """Most levels a ``[edge, scale x L, edge]`` chain can have at 128-bit security for ring size N."""
    if poly_modulus not in HE_STANDARD_128:
        raise ParamsError(f"N={poly_modulus} is not one of {sorted(HE_STANDARD_128)}")
    return max((HE_STANDARD_128[poly_modulus] - 2 * edge_bits) // scale_bits, 0)


def parse_bits(value) -> tuple[int, ...] | None:
    """``"60,40,40,60"`` / ``["60", "40,40", "60"]`` / ``[60, 40]`` -> ``(60, 40, 40, 60)``."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for it in items:
        for part in str(it).replace(" ", ",").split(","):
            if part.strip():
                try:
                    out.append(int(part))
                except ValueError:
                    raise ParamsError(f"--coeff-bits: {part!r} is not an integer (expected e.g. 60,40,40,60)") from None
    return tuple(out) or None


@dataclass(frozen=True)
class CKKSParams:
    """Validated CKKS parameters. Construct directly or with :meth:`from_options`."""

    poly_modulus: int = 16384
    coeff_bits: tuple[int, ...] = (60,) + (40,) * 7 + (60,)
    scale_bits: int = DEFAULT_SCALE_BITS
    insecure: bool = False
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        object.__setattr__(self, "coeff_bits", tuple(int(b) for b in self.coeff_bits))
        n, bits, s = self.poly_modulus, self.coeff_bits, self.scale_bits
        if n not in HE_STANDARD_128:
            raise ParamsError(f"poly modulus degree N={n} must be a power of two in {sorted(HE_STANDARD_128)}")
        if len(bits) < 2:
            raise ParamsError(f"coefficient modulus {list(bits)} needs at least 2 primes (q0 and the special prime)")
        bad = [b for b in bits if not 20 <= b <= MAX_PRIME_BITS]
        if bad:
            raise ParamsError(f"coefficient modulus {list(bits)}: prime sizes {bad} outside "
                              f"[20, {MAX_PRIME_BITS}] bits")
        if not 10 <= s < bits[0]:
            raise ParamsError(f"scale 2^{s} must be below the first prime (q0 = {bits[0]} bits) and >= 2^10; the "
                              f"integer part of the final value gets {bits[0] - s} bits")
        mid = bits[1:-1]
        if any(b != s for b in mid):
            raise ParamsError(f"coefficient modulus {list(bits)}: the middle primes {list(mid)} must all have "
                              f"scale-bits = {s} bits (every rescale divides by one of them; TenSEAL re-sets the scale "
                              f"to 2^{s} afterwards, so a prime of another size would distort every product)")
        limit = HE_STANDARD_128[n]
        if self.log_q > limit:
            msg = (f"N={n} with coefficient modulus {list(bits)} (log Q = {self.log_q}) is below 128-bit security: "
                   f"the HE standard allows log Q <= {limit} for N={n}")
            bigger = [m for m in sorted(HE_STANDARD_128) if HE_STANDARD_128[m] >= self.log_q]
            hint = f"use --poly-modulus {bigger[0]}" if bigger else "shorten the chain"
            if not self.insecure:
                raise InsecureParamsError(f"{msg}; {hint}, fewer levels, or pass --insecure to run anyway")
            object.__setattr__(self, "warnings", self.warnings + (f"INSECURE: {msg}",))

    # ---- derived quantities -------------------------------------------------------------------------------------
    @property
    def log_q(self) -> int:
        return sum(self.coeff_bits)

    @property
    def level_budget(self) -> int:
        """Multiplicative levels of a fresh ciphertext."""
        return len(self.coeff_bits) - 2

    @property
    def slots(self) -> int:
        return self.poly_modulus // 2

    @property
    def scale(self) -> float:
        return float(2 ** self.scale_bits)

    @property
    def security(self) -> str:
        return "128-bit (HE standard)" if self.log_q <= HE_STANDARD_128[self.poly_modulus] else "INSECURE"

    @cached_property
    def primes(self) -> tuple[int, ...]:
        """The actual primes (SEAL's choice), chain order: q0, q1..qL, P."""
        return tuple(seal_primes(self.poly_modulus, self.coeff_bits))

    def rescale_prime(self, level: int) -> int:
        """Prime dropped by a rescale of a ciphertext at ``level`` (levels left), i.e. q_level."""
        return self.primes[level]

    def log2_modulus(self, level: int) -> float:
        """log2 of Q_level = q0 * ... * q_level (the modulus of a ciphertext with ``level`` levels left)."""
        return sum(math.log2(q) for q in self.primes[: level + 1])

    def value_bound(self, level: int = 0) -> float:
        """|value| beyond which a ciphertext at ``level`` wraps around the modulus: Q_level / (2 * scale)."""
        return 2.0 ** (self.log2_modulus(level) - 1 - self.scale_bits)

    @property
    def max_rescale_bias(self) -> float:
        """Largest relative distortion ``|scale / q_l - 1|`` one rescale adds when the scale is pinned (TenSEAL)."""
        return max((abs(self.scale / self.primes[lv] - 1.0) for lv in range(1, self.level_budget + 1)), default=0.0)

    def logit_error_bound(self, depth: int, magnitude: float = 1.0, safety: float = 4.0) -> float:
        """A first-order bound on the absolute error after ``depth`` levels for values of size ``magnitude``:
        each level distorts by at most the rescale bias plus a few rounding errors; ``safety`` covers the
        amplification by the graph's constants."""
        return safety * depth * (self.max_rescale_bias + 6.0 * self.rounding_std) * max(1.0, magnitude)

    @property
    def rounding_std(self) -> float:
        """Std of the per-slot error one rounding (fresh encryption, rescale) adds: N / (6 * scale).

        Theory: rounding a ciphertext adds ``tau0 + tau1 * s`` with uniform tau (variance 1/12) and a ternary
        secret (variance 2/3), i.e. coefficient variance ~ N/18; the canonical embedding's real part has
        variance N/2 times that. Measured with TenSEAL (benchmarks/emulator_calibration.py): ratio 0.99-1.02."""
        return self.poly_modulus / (6.0 * self.scale)

    @property
    def encode_std(self) -> float:
        """Std of the per-slot error of encoding a slot-varying plaintext vector: sqrt(N / 12) / scale."""
        return math.sqrt(self.poly_modulus / 12.0) / self.scale

    def describe(self) -> dict:
        return {"poly_modulus": self.poly_modulus, "coeff_bits": list(self.coeff_bits), "scale_bits": self.scale_bits,
                "log_q": self.log_q, "level_budget": self.level_budget, "slots": self.slots,
                "security": self.security, "max_log_q_128": HE_STANDARD_128[self.poly_modulus],
                "value_bound_last_level": self.value_bound(0)}

    def __str__(self) -> str:
        return (f"N={self.poly_modulus}, chain {list(self.coeff_bits)} (log Q {self.log_q}, "
                f"{self.level_budget} levels), "
                f"scale 2^{self.scale_bits}, {self.security}")

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_options(cls, poly_modulus: int | None = None, coeff_bits=None, scale_bits: int | None = None,
                     levels: int | None = None, insecure: bool = False) -> "CKKSParams":
        """Fill in what is not given.

        * ``coeff_bits`` given: used as is (``levels``, if also given, must match).
        * else ``levels`` L given: chain ``[60] + [scale_bits] * L + [60]``.
        * else: the most levels 128-bit security allows for ``poly_modulus`` (default N=16384 -> 7).
        * ``poly_modulus`` not given: the smallest N (>= 8192) whose 128-bit bound holds the chain.
        """
        s = int(scale_bits or DEFAULT_SCALE_BITS)
        bits = parse_bits(coeff_bits)
        if bits is not None:
            if levels is not None and levels != len(bits) - 2:
                raise ParamsError(f"--levels {levels} contradicts --coeff-bits {','.join(map(str, bits))} "
                                  f"({len(bits) - 2} levels)")
        else:
            if levels is None:
                n = poly_modulus or 16384
                levels = max_secure_levels(n, s)
            if levels < 0:
                raise ParamsError(f"--levels must be >= 0, got {levels}")
            bits = (EDGE_BITS,) + (s,) * int(levels) + (EDGE_BITS,)
        if poly_modulus is None:
            logq = sum(bits)
            fits = [n for n in sorted(HE_STANDARD_128) if n >= 8192 and HE_STANDARD_128[n] >= logq]
            if not fits:
                if not insecure:
                    raise InsecureParamsError(
                        f"coefficient modulus {list(bits)} (log Q = {logq}) exceeds the 128-bit bound of every ring "
                        f"size (max {HE_STANDARD_128[32768]} at N=32768): use fewer levels or pass --insecure")
                fits = [32768]
            poly_modulus = fits[0]
        return cls(int(poly_modulus), bits, s, insecure)
