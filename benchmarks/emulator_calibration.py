"""Emulator calibration: per-primitive CKKS error of TenSEAL vs the emulator, and TenSEAL latency per op.

For each primitive the same inputs go through the TenSEAL backend (real CKKS, client/server split) and the
emulate backend (same N, chain, scale); the error is ``decrypted - exact`` (float64 on the exact inputs) over
every slot of every ciphertext, and its standard deviation is compared. Primitives:

``encrypt`` (fresh encryption + decryption), ``add`` (ct+ct), ``ct*pt`` (ciphertext times a per-element
constant), ``ct*pt vector`` (times a per-example slot vector), ``ct*ct`` (with relinearisation), ``sum``
(ReduceSum over K ciphertexts), ``matmul ct*pt`` ([B,K] x [K,M]), ``polynomial`` (degree 3, depth 2, through
the backends' Mul/Add) and ``refresh`` (client-aided decrypt + re-encrypt after one multiplication).

Run:  python benchmarks/emulator_calibration.py [--poly-modulus 8192 --coeff-bits 60,40,40,60 --scale-bits 40]
      [-k 16] [-o benchmarks/results/emulator_calibration.json]   (--coeff-bits also as 60 40 40 60)
The test suite calls :func:`measure` with a small configuration and asserts every ratio lies in [1/2, 2], both for
the total error and for its random part (error minus the deterministic bias, from a noise-free emulation).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from cgf_fhe.ckks import CoeffBitsAction
from cgf_fhe.simulate.backends import make_backend
from cgf_fhe.simulate.params import CKKSParams

POLY = (0.05, 0.9, 0.0, -0.25)  # c0 + c1 x + c2 x^2 + c3 x^3 (tanh-like on [-1, 1])


def _primitives(rng, batch: int, k: int, m: int):
    """(name, inputs, exact function, backend function) for every primitive."""
    x = rng.uniform(-1, 1, (batch, k))
    y = rng.uniform(-1, 1, (batch, k))
    w = rng.uniform(-1, 1, (1, k))  # one constant per ciphertext (same for every example)
    v = rng.uniform(0, 1, (batch, 1))  # one value per example (slot vector), like 1/n from a mask
    W = rng.uniform(-1, 1, (k, m)) / np.sqrt(k)

    def poly(be, c):
        c0, c1, c2, c3 = POLY  # depth 2: x^2 and c3*x in parallel, then their product
        x2 = be.mul(c, c)
        t = be.add(be.mul(c, np.array(c1)), be.mul(x2, be.mul(c, np.array(c3))))
        if c2:
            t = be.add(t, be.mul(x2, np.array(c2)))
        return be.add(t, np.array(c0))

    def refresh(be, c):
        return be.refresh(be.mul(c, np.array(0.75)))

    c0, c1, c2, c3 = POLY
    return [
        ("encrypt", (x,), lambda x: x, lambda be, c: c),
        ("add", (x, y), lambda x, y: x + y, lambda be, a, b: be.add(a, b)),
        ("ct*pt", (x,), lambda x: x * w, lambda be, c: be.mul(c, w)),
        ("ct*pt vector", (x,), lambda x: x * v, lambda be, c: be.mul(c, v)),
        ("ct*ct", (x, y), lambda x, y: x * y, lambda be, a, b: be.mul(a, b)),
        ("sum", (x,), lambda x: x.sum(-1, keepdims=True), lambda be, c: be.reduce_sum(c, [1], True)),
        ("matmul ct*pt", (x,), lambda x: x @ W, lambda be, c: be.matmul(c, W)),
        ("polynomial", (x,), lambda x: c0 + c1 * x + c2 * x ** 2 + c3 * x ** 3, poly),
        ("refresh", (x,), lambda x: 0.75 * x, refresh),
    ]


def _errors(backend, rng_seed: int, batch: int, k: int, m: int, reference: dict | None = None) -> dict:
    """Errors vs the exact result; with ``reference`` (noise-free emulator outputs: the deterministic rescale bias
    and constant rounding included) also the *noise* part ``decrypted - reference``."""
    rng = np.random.default_rng(rng_seed)
    out = {}
    for name, inputs, exact, fn in _primitives(rng, batch, k, m):
        cts = [backend.encrypt(a) for a in inputs]
        n0 = dict(backend.counts)
        s0 = dict(backend.seconds)
        t0 = time.perf_counter()
        res = fn(backend, *cts)
        dt = time.perf_counter() - t0
        dec = backend.decrypt(res)
        err = dec - exact(*inputs)
        ops = {kk: backend.counts[kk] - n0.get(kk, 0) for kk in backend.counts if backend.counts[kk] != n0.get(kk, 0)}
        secs = {kk: backend.seconds[kk] - s0.get(kk, 0.0) for kk in ops}
        out[name] = {"std": float(err.std()), "mean": float(err.mean()), "max_abs": float(np.abs(err).max()),
                     "seconds": dt, "ops": ops, "op_seconds": secs, "decrypted": dec}
        if reference is not None:
            out[name]["noise_std"] = float((dec - reference[name]["decrypted"]).std())
    return out


def measure(params: CKKSParams, batch: int | None = None, k: int = 16, m: int = 4, seed: int = 0) -> list[dict]:
    """Per primitive: TenSEAL and emulator error std, their ratio, TenSEAL ms per ciphertext op."""
    batch = batch or params.slots
    ts_backend = make_backend("tenseal", params)
    emu_backend = make_backend("emulate", params, refresh_kind="client", seed=seed)
    ref = _errors(make_backend("emulate", params, refresh_kind="client", noise=False), seed, batch, k, m)
    t = _errors(ts_backend, seed, batch, k, m, ref)
    e = _errors(emu_backend, seed, batch, k, m, ref)
    rows = []
    for name in t:
        ops = t[name]["ops"]
        main = [kk for kk in ops if kk not in ("encrypt", "decrypt")] or list(ops)
        n_ops = sum(ops[kk] for kk in main)
        sec = sum(t[name]["op_seconds"][kk] for kk in main)
        rows.append({"primitive": name, "tenseal_std": t[name]["std"], "emulate_std": e[name]["std"],
                     "ratio": e[name]["std"] / t[name]["std"] if t[name]["std"] > 0 else float("nan"),
                     "tenseal_noise_std": t[name]["noise_std"], "emulate_noise_std": e[name]["noise_std"],
                     "noise_ratio": e[name]["noise_std"] / t[name]["noise_std"] if t[name]["noise_std"] > 0
                     else float("nan"),
                     "tenseal_mean": t[name]["mean"], "emulate_mean": e[name]["mean"],
                     "tenseal_ms_per_op": 1e3 * sec / n_ops if n_ops else None, "tenseal_ops": ops,
                     "rounding_std_theory": params.rounding_std})
    return rows


def markdown(params: CKKSParams, rows: list[dict], batch: int) -> str:
    lines = [f"Emulator vs TenSEAL, {params} ; {batch} slots used per ciphertext", "",
             "| primitive | TenSEAL error std | emulator error std | ratio | TenSEAL noise std | emulator noise std "
             "| ratio | TenSEAL ms / op |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = "n/a" if r["tenseal_ms_per_op"] is None else f"{r['tenseal_ms_per_op']:.3f}"
        lines.append(f"| {r['primitive']} | {r['tenseal_std']:.3e} | {r['emulate_std']:.3e} | {r['ratio']:.3f} | "
                     f"{r['tenseal_noise_std']:.3e} | {r['emulate_noise_std']:.3e} | {r['noise_ratio']:.3f} | {ms} |")
    lines.append("")
    lines.append("error = decrypted - exact (includes TenSEAL's deterministic rescale bias scale/q_i, which the "
                 "emulator reproduces); noise = decrypted - noise-free emulation (bias and constant rounding removed).")
    lines.append(f"theory: one rounding (fresh encryption, rescale) = N/(6*scale) = {params.rounding_std:.3e}; "
                 f"rescale bias factors scale/q_i - 1 = "
                 + ", ".join(f"{params.scale / params.rescale_prime(lv) - 1:.3e}"
                             for lv in range(1, params.level_budget + 1)))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--poly-modulus", type=int, default=8192)
    ap.add_argument("--coeff-bits", action=CoeffBitsAction, default=(60, 40, 40, 60),
                    help="coefficient modulus bit sizes, 60,40,40,60 or 60 40 40 60 (default 60,40,40,60)")
    ap.add_argument("--scale-bits", type=int, default=40)
    ap.add_argument("--batch", type=int, default=None, help="slots used (default: all N/2)")
    ap.add_argument("-k", type=int, default=16, help="ciphertexts per primitive")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default=None, help="JSON output (a .md next to it)")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    params = CKKSParams.from_options(a.poly_modulus, a.coeff_bits, a.scale_bits)
    batch = a.batch or params.slots
    rows = measure(params, batch, a.k, seed=a.seed)
    md = markdown(params, rows, batch)
    print(md)
    if a.output:
        out = Path(a.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"params": params.describe(), "batch": batch, "k": a.k, "rows": rows}, indent=2))
        out.with_suffix(".md").write_text(md + "\n")
    bad = [r["primitive"] for r in rows if not (0.5 <= r["ratio"] <= 2.0 and 0.5 <= r["noise_ratio"] <= 2.0)]
    if bad:
        print(f"emulator std outside [1/2, 2] x TenSEAL for: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
