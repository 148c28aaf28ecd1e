"""CKKS cost tables: per-operation latencies, CKKS parameter selection, and ``cgf-fhe calibrate-costs``.

Cost table JSON schema (``report --cost-table FILE``; ``calibrate-costs -o FILE`` writes one)::

    {
      "schema": "cgf-fhe-costs/1",
      "source": "free text: library, machine, date",
      "entries": [
        {
          "poly_modulus": 16384,              # ring size N (slots = N/2)
          "coeff_bits": [60, 40, ..., 60],    # coefficient modulus chain (first, scale primes, special prime)
          "scale_bits": 40,
          "ms": {                             # milliseconds per operation on ONE ciphertext
            "ct_ct_mult": 54.0,               # ciphertext x ciphertext, incl. relinearisation and rescale (required)
            "ct_pt_mult": 13.0,               # ciphertext x plaintext, incl. rescale (required)
            "add": 0.5,                       # ciphertext + ciphertext (required)
            "rotation": 33.0,                 # slot rotation (Galois key switch) (required)
            "encrypt": 10.0, "decrypt": 2.0,  # client side (optional)
            "refresh": 26.0,                  # client-aided refresh = decrypt + re-encrypt (optional)
            "bootstrap": null                 # a real bootstrap, e.g. a GPU library's published figure (optional;
          }                                   #   when given it prices the refresh points instead of "refresh")
        }
      ]
    }

An entry matching the required N is used as is; otherwise the entry with the nearest N is scaled by
``(N'/N) * (limbs'/limbs)`` (limbs = chain length without the special prime): every CKKS primitive is linear in N
times the number of RNS limbs up to log factors, so this is a rough first-order extrapolation and the report says so.
Costs are taken as level-independent (a fresh ciphertext's cost), which overestimates deep levels.

Parameter selection for a level budget L: ``coeff_bits = [60] + [scale_bits] * L + [60]`` and the smallest N whose
128-bit HE-standard bound on log Q holds (27, 54, 109, 218, 438, 881, 1761 bits for N = 1024 ... 65536).
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path

from ..errors import UserError

SCHEMA = "cgf-fhe-costs/1"
REQUIRED = ("ct_ct_mult", "ct_pt_mult", "add", "rotation")
OPTIONAL = ("encrypt", "decrypt", "refresh", "bootstrap")
HE_STD_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881, 65536: 1761}
EDGE_BITS = 60  # first and special primes

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


def chain_for(level_budget: int, scale_bits: int = 40) -> list[int]:
    return [EDGE_BITS] + [scale_bits] * level_budget + [EDGE_BITS]


def ring_for(coeff_bits: list[int]) -> int | None:
    """Smallest N meeting 128-bit security for this chain (None if even N=65536 is too small)."""
    logq = sum(coeff_bits)
    for n, bound in sorted(HE_STD_128.items()):
        if logq <= bound and n // 2 >= 1:
            return n
    return None


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


# --- calibration with TenSEAL ------------------------------------------------------------------------------------

def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def calibrate(poly_modulus: int = 16384, coeff_bits: list[int] | None = None, scale_bits: int = 40,
              reps: int = 5) -> dict:
    """Measure one cost-table entry with TenSEAL on this machine (single ciphertext, full slots)."""
    import numpy as np
    import tenseal as ts
    import tenseal.sealapi as sa

    if coeff_bits is None:
        max_levels = (HE_STD_128.get(poly_modulus, 0) - 2 * EDGE_BITS) // scale_bits
        if max_levels < 1:
            raise UserError(f"N={poly_modulus} cannot hold even one {scale_bits}-bit level at 128-bit security")
        coeff_bits = chain_for(min(max_levels, 7), scale_bits)
    if sum(coeff_bits) > HE_STD_128.get(poly_modulus, 0):
        raise UserError(f"coefficient chain {coeff_bits} (log Q = {sum(coeff_bits)}) exceeds the 128-bit bound "
                        f"{HE_STD_128.get(poly_modulus)} for N={poly_modulus}")
    if len(coeff_bits) < 3:
        raise UserError("--coeff-bits needs at least 3 primes (first, one level, special)")
    try:
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus, coeff_mod_bit_sizes=list(coeff_bits))
    except Exception as exc:
        raise UserError(f"TenSEAL rejects N={poly_modulus}, chain {coeff_bits}: {exc}") from None
    ctx.global_scale = 2.0 ** scale_bits
    ctx.generate_galois_keys()
    ctx.generate_relin_keys()
    slots = poly_modulus // 2
    rng = np.random.default_rng(0)
    xs = rng.uniform(-1, 1, slots).tolist()
    ys = rng.uniform(-1, 1, slots).tolist()
    a = ts.ckks_vector(ctx, xs)
    b = ts.ckks_vector(ctx, ys)
    ev = sa.Evaluator(ctx.seal_context().data)
    gk = ctx.galois_keys().data
    ct = a.ciphertext()[0]
    out = sa.Ciphertext()

    def refresh():
        ts.ckks_vector(ctx, a.decrypt())

    ms = {
        "ct_ct_mult": _median_ms(lambda: a * b, reps),
        "ct_pt_mult": _median_ms(lambda: a * ys, reps),
        "add": _median_ms(lambda: a + b, reps),
        "rotation": _median_ms(lambda: ev.rotate_vector(ct, 1, gk, out), reps),
        "encrypt": _median_ms(lambda: ts.ckks_vector(ctx, xs), reps),
        "decrypt": _median_ms(lambda: a.decrypt(), reps),
        "refresh": _median_ms(refresh, reps),
        "bootstrap": None,
    }
    return {"poly_modulus": poly_modulus, "coeff_bits": list(coeff_bits), "scale_bits": scale_bits, "ms": ms,
            "reps": reps}


def run_calibrate(args) -> int:
    from tqdm.auto import tqdm

    with tqdm(total=1, desc=f"calibrating N={args.poly_modulus}", leave=False) as bar:
        entry = calibrate(args.poly_modulus, args.coeff_bits, args.scale_bits, args.reps)
        bar.update()
    import tenseal

    table = {"schema": SCHEMA,
             "source": f"cgf-fhe calibrate-costs: TenSEAL {tenseal.__version__}, {platform.processor() or platform.machine()}"
                       f", {time.strftime('%Y-%m-%d')}, median of {args.reps} reps",
             "entries": [entry]}
    from ..io import write_json

    out = write_json(args.output, table)
    print(f"N={entry['poly_modulus']} chain={entry['coeff_bits']} scale=2^{entry['scale_bits']} (ms per op, median):")
    for k, v in entry["ms"].items():
        if v is not None:
            print(f"  {k:11s} {v:9.3f}")
    print(f"wrote {out}")
    return 0
