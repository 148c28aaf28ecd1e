"""``plain`` backend: float64 reference evaluation in torch (GPU when available) -- the plaintext baseline.

:class:`TorchBackend` holds the op semantics shared with the emulator (:mod:`cgf_fhe.simulate.backends.emulate`), which
only overrides the two hooks that wrap a result (:meth:`TorchBackend._linear` for level-free operations,
:meth:`TorchBackend._product` for rescaled multiplications).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .base import Backend, SimulationError, batch_varying, check_matmul, logical_broadcast


@dataclass(eq=False)
class TorchCT:
    """An 'encrypted' tensor of the torch backends: data ``[B, ...]`` (float64) plus its CKKS level."""

    data: torch.Tensor
    level: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


class TorchBackend(Backend):
    """Shared torch implementation (no noise, no levels)."""

    name = "torch"

    def __init__(self, params=None, device: str | torch.device | None = None):
        super().__init__(params)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = torch.float64
        self._pt_cache: OrderedDict = OrderedDict()

    # ---- conversions -------------------------------------------------------------------------------------------
    def _t(self, x) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.to(self.device, self.dtype)
        return torch.as_tensor(np.asarray(x, dtype=np.float64), device=self.device)

    def _pt(self, x, slot_vector: bool) -> torch.Tensor:
        """A plaintext operand, converted and encoded; cached per array object (weights are reused every batch)."""
        if not isinstance(x, np.ndarray) or x.size < 64:
            return self._encode(self._t(x), slot_vector)
        hit = self._pt_cache.get(id(x))
        if hit is not None and hit[0] is x and hit[1] == slot_vector:
            self._pt_cache.move_to_end(id(x))
            return hit[2]
        t = self._encode(self._t(x), slot_vector)
        self._pt_cache[id(x)] = (x, slot_vector, t)  # holding x keeps its id from being reused
        while len(self._pt_cache) > 1024:
            self._pt_cache.popitem(last=False)
        return t

    def is_ct(self, v) -> bool:
        return isinstance(v, TorchCT)

    def shape(self, ct) -> tuple[int, ...]:
        return ct.shape

    def level(self, ct) -> int | None:
        return ct.level

    # ---- hooks (overridden by the emulator) -----------------------------------------------------------------------
    def _fresh(self, data: torch.Tensor) -> TorchCT:
        return TorchCT(data, None)

    def _linear(self, data: torch.Tensor, parents: Sequence[TorchCT], pt_vector: bool = False) -> TorchCT:
        """Result of a level-free operation (add/sub/neg/sum/re-indexing)."""
        return TorchCT(data, None)

    def _product(self, data: torch.Tensor, parents: Sequence[TorchCT], terms: int = 1,
                 vector_factor: torch.Tensor | None = None) -> TorchCT:
        """Result of a multiplication followed by one rescale. ``terms``: products summed per output element
        (each rescaled separately, as TenSEAL does); ``vector_factor``: the ciphertext operand of an elementwise
        product with a slot-varying plaintext (its encoding error scales with it)."""
        return TorchCT(data, None)

    def _encode(self, pt: torch.Tensor, slot_vector: bool) -> torch.Tensor:
        """A plaintext operand as the evaluator sees it after encoding (exact here)."""
        return pt

    # ---- client side -------------------------------------------------------------------------------------------
    def encrypt(self, x: np.ndarray) -> TorchCT:
        with self.timed("encrypt"):
            return self._fresh(self._t(x))

    def encrypt_public(self, x: np.ndarray) -> TorchCT:
        return self.encrypt(x)

    def decrypt(self, ct: TorchCT, kind: str = "decrypt") -> np.ndarray:
        return ct.data.detach().cpu().numpy().copy()

    # ---- arithmetic --------------------------------------------------------------------------------------------
    def _operand(self, a: TorchCT, b):
        """(tensor of b, is b a ciphertext, does b vary per example)."""
        if self.is_ct(b):
            logical_broadcast(a.shape, b.shape, "encrypted operand")
            if len(b.shape) != len(a.shape):
                raise SimulationError(f"encrypted operands of ranks {len(a.shape)} and {len(b.shape)}: both carry "
                                      "the batch on axis 0, ranks must match")
            return b.data, True, False
        shape = tuple(np.shape(b))
        out = logical_broadcast(a.shape, shape, "plaintext")
        vary = batch_varying(shape, len(out))
        return self._pt(b, vary), False, vary

    def add(self, a, b):
        if not self.is_ct(a):
            a, b = b, a
        bt, is_ct, vary = self._operand(a, b)
        with self.timed("add"):
            return self._linear(a.data + bt, [a, b] if is_ct else [a], pt_vector=vary and not is_ct)

    def sub(self, a, b):
        if not self.is_ct(a):  # pt - ct = -(ct) + pt
            return self.add(self.neg(b), a)
        bt, is_ct, vary = self._operand(a, b)
        with self.timed("add"):
            return self._linear(a.data - bt, [a, b] if is_ct else [a], pt_vector=vary and not is_ct)

    def neg(self, a):
        with self.timed("neg"):
            return self._linear(-a.data, [a])

    def mul(self, a, b):
        if not self.is_ct(a):
            a, b = b, a
        bt, is_ct, vary = self._operand(a, b)
        vf = torch.broadcast_to(a.data, torch.broadcast_shapes(a.data.shape, bt.shape)) if vary else None
        with self.timed("mul_ct" if is_ct else "mul_pt"):
            return self._product(a.data * bt, [a, b] if is_ct else [a], 1, vector_factor=vf)

    def matmul(self, a, b):
        a_ct, b_ct = self.is_ct(a), self.is_ct(b)
        sa = a.shape if a_ct else tuple(np.shape(a))
        sb = b.shape if b_ct else tuple(np.shape(b))
        check_matmul(sa, a_ct, sb, b_ct)
        ct_rank = len(sa) if a_ct else len(sb)
        at = a.data if a_ct else self._pt(a, ct_rank >= 3 and len(sa) == ct_rank and sa[0] != 1)
        bt = b.data if b_ct else self._pt(b, ct_rank >= 3 and len(sb) == ct_rank and sb[0] != 1)
        k = at.shape[-1]
        with self.timed("matmul_ct" if (a_ct and b_ct) else "matmul_pt", 1):
            out = torch.matmul(at, bt)
            return self._product(out, [x for x in (a, b) if self.is_ct(x)], terms=int(k))

    def reduce_sum(self, a, axes: Sequence[int], keepdims: bool):
        with self.timed("sum"):
            if not axes:
                return self._linear(a.data, [a])
            return self._linear(a.data.sum(dim=tuple(axes), keepdim=bool(keepdims)), [a])

    # ---- data movement -----------------------------------------------------------------------------------------
    def rearrange(self, fn, args, ct_positions):
        cts = [args[i] for i in ct_positions]
        vals = list(args)
        for i in ct_positions:
            vals[i] = args[i].data.detach().cpu().numpy()
        with self.timed("move"):
            outs = fn(*vals)
            return [self._linear(self._t(o), cts) for o in outs]


class PlainBackend(TorchBackend):
    """Plaintext float64 reference (the baseline of every simulation)."""

    name = "plain"
    refresh_label = "none"

    def refresh(self, ct):
        self.n_refresh += 1
        return ct
