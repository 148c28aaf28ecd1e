"""Simulation backends behind one switch: ``plain`` | ``emulate`` | ``tenseal`` (see :mod:`.base`); every backend
lives in this package (:mod:`.plain`, :mod:`.emulate`, :mod:`.tenseal`)."""
from __future__ import annotations

from .base import (Backend, BootstrapRangeError, LevelError, ModulusOverflowError, SimulationError)

BACKENDS = ("plain", "emulate", "tenseal", "seal")


def make_backend(name: str, params=None, **options) -> Backend:
    """Build a backend. ``params``: :class:`cgf_fhe.ckks.CKKSParams` (needed by emulate/tenseal).

    emulate options: refresh_kind, bootstrap_bits, bootstrap_bound, on_overflow, on_exhausted, pinned_scale,
    noise, seed, device, noise_pool. tenseal options: client, public_context, n_threads. plain options: device."""
    if name == "plain":
        from .plain import PlainBackend

        return PlainBackend(params, device=options.get("device"))
    if params is None:
        from ...ckks import CKKSParams

        params = CKKSParams()
    if name == "emulate":
        from .emulate import EmulateBackend

        keys = ("refresh_kind", "bootstrap_bits", "bootstrap_bound", "on_overflow", "on_exhausted", "pinned_scale",
                "noise", "seed", "device", "noise_pool")
        return EmulateBackend(params, **{k: v for k, v in options.items() if k in keys and v is not None})
    if name == "tenseal":
        from .tenseal import TenSEALBackend

        keys = ("client", "public_context", "n_threads")
        return TenSEALBackend(params, **{k: v for k, v in options.items() if k in keys and v is not None})
    if name == "seal":  # packed; an engine is built by cgf_fhe.simulate.packed_runner (keys follow the dry run)
        from .seal_packed import NumpyEngine, PackedBackend

        return PackedBackend(params, options.get("engine") or NumpyEngine(params))
    raise SimulationError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


__all__ = ["Backend", "BACKENDS", "make_backend", "SimulationError", "LevelError", "ModulusOverflowError",
           "BootstrapRangeError"]
