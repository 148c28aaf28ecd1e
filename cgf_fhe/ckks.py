"""THE CKKS module: security table, ring choice, modulus chain and primes, parameters, per-operation costs.

``report`` (:mod:`cgf_fhe.export.report`) and ``simulate`` (:mod:`cgf_fhe.simulate`) both read this module; nothing
else states a security bound, a chain layout or an op cost. :mod:`cgf_fhe.simulate.params` and
:mod:`cgf_fhe.export.costs` re-export from here.

Parameters: ring size N, coefficient-modulus chain, scale; the 128-bit security check; the primes.

A chain ``[q0, q1, ..., qL, P]`` (bit sizes) has ``L`` *levels*: ``q0`` holds the final value, ``q1..qL`` are
dropped one per rescale (one per multiplication), ``P`` is the special prime used by key switching. A fresh
ciphertext therefore affords ``L = len(chain) - 2`` multiplicative levels (the level budget of
:func:`cgf_fhe.bootstrap.plan_bootstraps`). Examples: ``N=8192, [60,40,40,60]`` -> 2 levels;
``N=16384, [60]+[40]*7+[60]`` -> 7 levels.

Security: the total ``log2 Q`` (all primes including ``P``) must not exceed the HomomorphicEncryption.org
standard's bound for 128-bit classical security with ternary secrets (the table SEAL enforces):
``N=1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881``. The standard stops at N=32768 (and so does
SEAL's 128-bit check), so a chain longer than 881 bits has no 128-bit secure ring here: ``report`` marks it
insecure and ``simulate`` refuses it. Weaker parameters are refused with :class:`InsecureParamsError` unless
``insecure=True`` (``--insecure``).

Primes are chosen exactly as SEAL's ``CoeffModulus::Create`` does (for every bit size, the largest primes
``p = 1 mod 2N`` below ``2^bits``, assigned from the smallest upwards in chain order), so the emulator knows the
real moduli: TenSEAL re-sets the scale to ``2^scale_bits`` after each rescale while the true scale is
``scale^2 / q_i``, which multiplies every product by ``2^scale_bits / q_i`` -- a deterministic bias the emulator
reproduces.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .errors import UserError

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


def chain_for(level_budget: int, scale_bits: int = DEFAULT_SCALE_BITS) -> list[int]:
    """The chain for ``level_budget`` levels: ``[60] + [scale_bits] * L + [60]``."""
    return [EDGE_BITS] + [scale_bits] * int(level_budget) + [EDGE_BITS]


def ring_for(coeff_bits, min_n: int = 8192) -> int | None:
    """Smallest ring size N (>= ``min_n``) whose 128-bit bound holds the chain; None when no N of the table does."""
    logq = sum(coeff_bits)
    fits = [n for n in sorted(HE_STANDARD_128) if n >= min_n and HE_STANDARD_128[n] >= logq]
    return fits[0] if fits else None


LARGEST_RING = max(HE_STANDARD_128)


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


class CoeffBitsAction(argparse.Action):
    """``--coeff-bits`` for every command (``add_argument("--coeff-bits", action=CoeffBitsAction)``): takes
    ``60,40,40,60``, ``60 40 40 60`` or a mix, stores :func:`parse_bits`' tuple; a bad value is a one-line
    argparse error naming it (exit 2)."""

    def __init__(self, option_strings, dest, nargs="+", metavar="BITS", **kwargs):
        super().__init__(option_strings, dest, nargs=nargs, metavar=metavar, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            bits = parse_bits(values)
        except ParamsError as exc:
            parser.error(str(exc))
        if bits is None:
            parser.error(f"--coeff-bits: no bit sizes in {' '.join(values)!r} (expected e.g. 60,40,40,60)")
        setattr(namespace, self.dest, bits)


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
            poly_modulus = ring_for(bits)
            if poly_modulus is None:
                if not insecure:
                    raise InsecureParamsError(
                        f"coefficient modulus {list(bits)} (log Q = {sum(bits)}) exceeds the 128-bit bound of every "
                        f"ring size (max {HE_STANDARD_128[LARGEST_RING]} at N={LARGEST_RING}): use fewer levels or "
                        "pass --insecure")
                poly_modulus = LARGEST_RING
        return cls(int(poly_modulus), bits, s, insecure)


# ---- per-operation costs (the cost table of ``report --cost-table``; schema in :mod:`cgf_fhe.export.costs`) -------
SCHEMA = "cgf-fhe-costs/1"
REQUIRED = ("ct_ct_mult", "ct_pt_mult", "add", "rotation")
OPTIONAL = ("encrypt", "decrypt", "refresh", "bootstrap")

# Built-in table. N=16384: ct*ct, ct*pt, rotation and refresh are the project's reference measurements (TenSEAL
# 0.3.18 on the project's 2-core CPU machine, chain [60, 40 x 7, 60]); add/encrypt/decrypt are from
# `cgf-fhe calibrate-costs --poly-modulus 16384` on the same machine. N=8192: refresh is the reference figure,
# the rest from `cgf-fhe calibrate-costs --poly-modulus 8192` (chain [60, 40, 40, 60]; the machine is shared, so
# figures from different runs vary by up to ~2x).
DEFAULT_TABLE = {
    "schema": SCHEMA,
    "source": "built-in: TenSEAL 0.3.18 (Microsoft SEAL), 2-core x86-64 CPU, single ciphertext, level-independent",
    "entries": [
        {"poly_modulus": 8192, "coeff_bits": [60, 40, 40, 60], "scale_bits": 40,
         "ms": {"ct_ct_mult": 3.0, "ct_pt_mult": 1.4, "add": 0.053, "rotation": 2.1, "encrypt": 4.5,
                "decrypt": 1.7, "refresh": 17.0, "bootstrap": None}},
        {"poly_modulus": 16384, "coeff_bits": [60, 40, 40, 40, 40, 40, 40, 40, 60], "scale_bits": 40,
         "ms": {"ct_ct_mult": 54.0, "ct_pt_mult": 13.0, "add": 0.27, "rotation": 33.0, "encrypt": 18.6,
                "decrypt": 10.7, "refresh": 26.0, "bootstrap": None}},
    ],
}


def load_cost_table(path: str | Path | None) -> dict:
    """Read and validate a cost table (None = the built-in default)."""
    if path is None:
        return json.loads(json.dumps(DEFAULT_TABLE))
    p = Path(path)
    if not p.is_file():
        raise UserError(f"cost table not found: {p}")
    try:
        table = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: not valid JSON ({exc})") from None
    entries = table.get("entries") if isinstance(table, dict) else None
    if not entries or not isinstance(entries, list):
        raise UserError(f"{p}: a cost table needs a non-empty 'entries' list (see cgf_fhe.export.costs for the schema)")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("poly_modulus"), int) or not isinstance(e.get("ms"), dict):
            raise UserError(f"{p}: entries[{i}] needs an integer 'poly_modulus' and an 'ms' mapping")
        missing = [k for k in REQUIRED if not isinstance(e["ms"].get(k), (int, float))]
        if missing:
            raise UserError(f"{p}: entries[{i}] (N={e['poly_modulus']}) lacks numeric ms for {missing}")
        unknown = sorted(set(e["ms"]) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise UserError(f"{p}: entries[{i}] has unknown ms keys {unknown} (allowed: {REQUIRED + OPTIONAL})")
    table.setdefault("source", str(p))
    return table


def _limbs(entry: dict) -> int:
    bits = entry.get("coeff_bits")
    return max(len(bits) - 1, 1) if bits else 1


def costs_for(table: dict, poly_modulus: int, coeff_bits: list[int]) -> dict:
    """Per-op ms for ring ``poly_modulus`` and chain ``coeff_bits``: ``{"ms": {...}, "entry_n", "scale", "note"}``."""
    entries = table["entries"]
    limbs = max(len(coeff_bits) - 1, 1)
    exact = [e for e in entries if e["poly_modulus"] == poly_modulus]
    entry = exact[0] if exact else min(entries, key=lambda e: abs(math.log2(e["poly_modulus"] / poly_modulus)))
    factor = (poly_modulus / entry["poly_modulus"]) * (limbs / _limbs(entry))
    ms = {}
    for k in REQUIRED + OPTIONAL:
        v = entry["ms"].get(k)
        ms[k] = None if v is None else float(v) * factor
    if ms.get("refresh") is None and ms.get("encrypt") is not None and ms.get("decrypt") is not None:
        ms["refresh"] = ms["encrypt"] + ms["decrypt"]
    note = (f"table entry N={entry['poly_modulus']} ({_limbs(entry)} limbs) used as is" if abs(factor - 1) < 1e-9
            else f"scaled from the N={entry['poly_modulus']}, {_limbs(entry)}-limb entry by {factor:.2f} "
                 f"(N={poly_modulus}, {limbs} limbs; rough first-order extrapolation)")
    return {"ms": ms, "entry_n": entry["poly_modulus"], "scale": factor, "note": note,
            "source": table.get("source", "")}
