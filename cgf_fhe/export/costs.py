"""CKKS cost tables (kept in :mod:`cgf_fhe.ckks`): their JSON schema, and ``cgf-fhe calibrate-costs``.

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

Parameter selection for a level budget L (:mod:`cgf_fhe.ckks`, shared with ``simulate``): ``coeff_bits = [60] +
[scale_bits] * L + [60]`` and the smallest N >= 8192 whose 128-bit HE-standard bound on log Q holds (218, 438, 881
bits for N = 8192, 16384, 32768; the standard stops at 32768, so a longer chain is not 128-bit secure).
"""
from __future__ import annotations

import platform
import statistics
import time

from ..errors import UserError

# the cost table, the security table and the ring choice live in cgf_fhe.ckks (one CKKS module); re-exported here
from ..ckks import (DEFAULT_TABLE, EDGE_BITS, HE_STANDARD_128, OPTIONAL, REQUIRED, SCHEMA,  # noqa: F401
                    chain_for, costs_for, load_cost_table, ring_for)


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
    if int(reps) < 1:
        raise UserError(f"reps must be >= 1, got {reps}")
    import numpy as np
    import tenseal as ts
    import tenseal.sealapi as sa

    if coeff_bits is None:
        max_levels = (HE_STANDARD_128.get(poly_modulus, 0) - 2 * EDGE_BITS) // scale_bits
        if max_levels < 1:
            raise UserError(f"N={poly_modulus} cannot hold even one {scale_bits}-bit level at 128-bit security")
        coeff_bits = chain_for(min(max_levels, 7), scale_bits)
    if sum(coeff_bits) > HE_STANDARD_128.get(poly_modulus, 0):
        raise UserError(f"coefficient chain {coeff_bits} (log Q = {sum(coeff_bits)}) exceeds the 128-bit bound "
                        f"{HE_STANDARD_128.get(poly_modulus)} for N={poly_modulus}")
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
