"""The one small interface every simulation backend implements, and the errors they raise.

Conventions (slot batching, the packing of :mod:`cgf_fhe.fhe_ops`): an encrypted tensor has a *logical* shape
``[B, ...]`` whose axis 0 is the batch of examples. TenSEAL stores one ciphertext per element of ``[...]`` with
the ``B`` examples in its slots; the torch backends store the ``[B, ...]`` array. Plaintext operands are numpy
arrays (any float dtype, converted to float64); they broadcast against the logical shape with numpy rules, and
a plaintext whose axis 0 is ``B`` holds a different value per example (encoded as a slot vector).

Operations (``a`` is always a ciphertext, ``b`` a ciphertext or a plaintext unless stated):

==================  ===========================================================================================
client side         ``encrypt(x)``, ``decrypt(ct)`` (the client holds the secret key)
arithmetic          ``add(a, b)``, ``sub(a, b)`` (either operand may be the plaintext), ``neg(a)``,
                    ``mul(a, b)`` (ct-ct with relinearisation, or ct-pt; one rescale = one level),
                    ``matmul(a, b)`` (numpy ``matmul`` semantics; ct-pt, pt-ct or ct-ct; one level),
                    ``reduce_sum(a, axes, keepdims)``, ``reduce_mean`` (= sum times the public ``1/n``: one level)
data movement       ``rearrange(fn, args, ct_positions)``: reshape / transpose / (un)squeeze / gather / slice /
                    concat / expand / tile / split are all *re-indexings* of ciphertexts; ``fn`` is the ONNX
                    reference implementation of the node (:mod:`onnx.reference`), so their semantics are never
                    restated here. Torch backends apply ``fn`` to the data; TenSEAL applies it to an array of
                    element indices and moves ciphertext objects accordingly.
levels              ``level(ct)`` -> levels left (None when the backend has no levels), ``refresh(ct)``
                    (bootstrap or client-aided decrypt + re-encrypt; returns a ciphertext with the full budget)
==================  ===========================================================================================
"""
from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np

from ...errors import SimulationError


class LevelError(SimulationError):
    """A ciphertext ran out of levels (multiplicative depth exceeds the chain and no refresh was placed)."""


class ModulusOverflowError(SimulationError):
    """A value exceeded what the modulus at its level can hold (it would decrypt to garbage)."""


class BootstrapRangeError(SimulationError):
    """A bootstrap input lies outside the stated bootstrap bound."""


class Backend(ABC):
    """Base class. Subclasses set ``name``, ``leveled`` and ``refresh_label``."""

    name = "base"
    leveled = False  # tracks CKKS levels (emulate, tenseal)
    refresh_label = "refresh"
    batch_in_slots = False  # the batch axis lives in the slots (TenSEAL)

    def __init__(self, params=None):
        self.params = params
        self.counts: Counter = Counter()  # backend operations performed
        self.seconds: Counter = Counter()  # wall time per operation kind
        self.n_refresh = 0

    # ---- client side -------------------------------------------------------------------------------------------
    @abstractmethod
    def encrypt(self, x: np.ndarray) -> Any: ...

    @abstractmethod
    def decrypt(self, ct, kind: str = "decrypt") -> np.ndarray:
        """Client-side decryption; ``kind`` labels the timing ("decrypt_trace" for diagnostic decryptions)."""

    # ---- server side -------------------------------------------------------------------------------------------
    @abstractmethod
    def is_ct(self, v) -> bool: ...

    @abstractmethod
    def shape(self, ct) -> tuple[int, ...]: ...

    def level(self, ct) -> int | None:
        return None

    @abstractmethod
    def add(self, a, b): ...

    @abstractmethod
    def sub(self, a, b): ...

    @abstractmethod
    def neg(self, a): ...

    @abstractmethod
    def mul(self, a, b): ...

    @abstractmethod
    def matmul(self, a, b): ...

    @abstractmethod
    def reduce_sum(self, a, axes: Sequence[int], keepdims: bool): ...

    def reduce_mean(self, a, axes: Sequence[int], keepdims: bool):
        shape = self.shape(a)
        n = int(np.prod([shape[ax] for ax in axes])) if axes else 1
        return self.mul(self.reduce_sum(a, axes, keepdims), np.array(1.0 / n))

    @abstractmethod
    def rearrange(self, fn: Callable[..., Sequence[np.ndarray]], args: list, ct_positions: Sequence[int]) -> list: ...

    @abstractmethod
    def encrypt_public(self, x: np.ndarray):
        """Server-side encryption of a public plaintext (public key), e.g. to concatenate it with ciphertexts."""

    def refresh(self, ct):
        raise SimulationError(f"the {self.name} backend has no refresh")

    def close(self) -> None:
        pass

    # ---- helpers -----------------------------------------------------------------------------------------------
    def timed(self, kind: str, n: int = 1):
        backend = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                backend.seconds[kind] += time.perf_counter() - self.t
                backend.counts[kind] += n

        return _T()

    def describe(self) -> dict:
        return {"backend": self.name, "refresh_label": self.refresh_label,
                "params": self.params.describe() if self.params is not None else None}


def logical_broadcast(ct_shape: tuple, other_shape: tuple, what: str = "operand") -> tuple:
    """Broadcast shape of a ciphertext (axis 0 = batch) with another operand; refuse moving the batch axis."""
    try:
        out = tuple(np.broadcast_shapes(tuple(ct_shape), tuple(other_shape)))
    except ValueError:
        raise SimulationError(f"shapes {list(ct_shape)} (encrypted) and {list(other_shape)} ({what}) do not "
                              "broadcast") from None
    if len(out) != len(ct_shape) or out[0] != ct_shape[0]:
        raise SimulationError(f"broadcasting encrypted {list(ct_shape)} with {what} {list(other_shape)} gives "
                              f"{list(out)}: the batch axis 0 would move or grow (examples must stay independent)")
    return out


def check_matmul(sa: tuple, a_ct: bool, sb: tuple, b_ct: bool) -> None:
    """MatMul shapes that keep the batch axis a batch axis (never contracted, never moved)."""
    if b_ct and len(sb) < 3:
        raise SimulationError(f"MatMul with an encrypted right operand of shape {list(sb)}: its axis 0 (the batch) "
                              "would be contracted; the right operand needs rank >= 3 ([batch, ..., K, N])")
    ct_rank = len(sa) if a_ct else len(sb)
    other = sb if a_ct else sa
    # a plaintext of the same rank with axis 0 = B holds one matrix per example: allowed
    if not (a_ct and b_ct) and len(other) > ct_rank:
        raise SimulationError(f"MatMul of encrypted {list(sa if a_ct else sb)} with plaintext {list(other)}: the "
                              "plaintext has more dims, the batch axis would move")


def batch_varying(pt, out_rank: int) -> bool:
    """Does the plaintext (an array or its shape; aligned right to a rank-``out_rank`` result) differ per example
    (axis 0)?"""
    shape = tuple(pt) if isinstance(pt, (tuple, list)) else np.shape(pt)
    return len(shape) == out_rank and shape[0] != 1


def optional_import(module: str):
    """The module, or None when it (or a package it needs) is not installed; pair with :func:`require`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def require(module, message: str):
    """``module`` (from :func:`optional_import`), or a :class:`SimulationError` with ``message`` (the backend
    that needs it and how to install it) when it is missing."""
    if module is None:
        raise SimulationError(message)
    return module
