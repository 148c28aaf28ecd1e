"""``tenseal`` backend: real CKKS with TenSEAL (Microsoft SEAL).

Roles
-----
* :class:`TenSEALClient` holds the **secret key**: it builds the context (relinearisation keys; no Galois keys --
  slot batching never rotates), encrypts the client's embeddings, decrypts the logits and performs
  **client-aided refreshes** (TenSEAL has no bootstrapping: the server sends a ciphertext back, the client decrypts
  and re-encrypts it with a full level budget). Every refresh is counted and labelled "client-aided refresh".
* :class:`TenSEALBackend` is the **server**: it evaluates with a *public* copy of the context (serialized without
  the secret key and deserialized into a new context), so it cannot decrypt. Everything crossing the boundary is
  serialized bytes, as on a network.

Packing (slot batching): the ``B`` examples of a batch sit in the slots; every element of a ``[B, ...]`` tensor is
one ``CKKSVector`` of size ``B`` and a tensor is a numpy object array of them. Element-wise operations run per
ciphertext; MatMul uses numpy's object ``matmul`` (ciphertext x float or ciphertext x ciphertext, each product
rescaled by TenSEAL's auto-rescale, then summed); data movement moves ciphertext objects. A plaintext that is the
same for every example multiplies as a constant (exact encoding); one that differs per example (e.g. ``1/n``
from each example's attention mask) is encoded as a slot vector.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import (Backend, LevelError, SimulationError, batch_varying, check_matmul,
                            logical_broadcast, optional_import, require)
from ...ckks import CKKSParams

ts = optional_import("tenseal")  # a dependency; None only in a broken install


def _need_tenseal():
    require(ts, "the tenseal backend needs the tenseal package (pip install tenseal)")


@dataclass
class Wire:
    """Serialized ciphertexts crossing the client/server boundary: element shape, batch, one blob per element."""

    shape: tuple[int, ...]  # element shape (without the batch)
    batch: int
    blobs: list[bytes]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.blobs)


class TenSEALClient:
    """The key holder. ``secret_context`` (bytes) re-creates a client with the same keys (e.g. in a worker)."""

    def __init__(self, params: CKKSParams, secret_context: bytes | None = None, n_threads: int = 1):
        _need_tenseal()
        self.params = params
        if secret_context is not None:
            self.ctx = ts.context_from(secret_context, n_threads=n_threads)
        else:
            self.ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus,
                                  coeff_mod_bit_sizes=list(params.coeff_bits), n_threads=n_threads)
            self.ctx.global_scale = params.scale
            self.ctx.generate_relin_keys()
        self.n_refresh = 0
        self.refreshed_ciphertexts = 0

    def secret_context(self) -> bytes:
        return self.ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False,
                                  save_relin_keys=True)

    def public_context(self) -> bytes:
        """What the server gets: public + relinearisation keys, NO secret key."""
        return self.ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                                  save_relin_keys=True)

    def encrypt(self, x: np.ndarray) -> Wire:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim < 1:
            raise SimulationError("encrypt needs a [batch, ...] array")
        b = x.shape[0]
        if b > self.params.slots:
            raise SimulationError(f"batch of {b} examples exceeds the {self.params.slots} slots of N="
                                  f"{self.params.poly_modulus}; use a smaller --batch-size")
        flat = x.reshape(b, -1)
        blobs = [ts.ckks_vector(self.ctx, flat[:, j].tolist()).serialize() for j in range(flat.shape[1])]
        return Wire(tuple(x.shape[1:]), b, blobs)

    def decrypt(self, wire: Wire) -> np.ndarray:
        cols = [ts.ckks_vector_from(self.ctx, blob).decrypt() for blob in wire.blobs]
        arr = np.array(cols, dtype=np.float64).reshape(len(wire.blobs), wire.batch) if cols else \
            np.zeros((0, wire.batch))
        return arr.T.reshape((wire.batch,) + tuple(wire.shape))

    def refresh(self, wire: Wire) -> Wire:
        """Client-aided refresh: decrypt and re-encrypt (full level budget)."""
        self.n_refresh += 1
        self.refreshed_ciphertexts += len(wire.blobs)
        return self.encrypt(self.decrypt(wire))


@dataclass(eq=False)
class TSArray:
    """A ``[B, ...]`` encrypted tensor: object array (element shape) of CKKSVectors of size B."""

    obj: np.ndarray
    batch: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch,) + tuple(self.obj.shape)


def _objarr(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    a = np.empty((), dtype=object)
    a[()] = x
    return a


def _map(f, *arrays) -> np.ndarray:
    return _objarr(np.frompyfunc(f, len(arrays), 1)(*arrays))


class TenSEALBackend(Backend):
    name = "tenseal"
    leveled = True
    refresh_label = "client-aided refresh"
    batch_in_slots = True

    def __init__(self, params: CKKSParams, client: TenSEALClient | None = None, public_context: bytes | None = None,
                 n_threads: int = 1):
        _need_tenseal()
        super().__init__(params)
        self.client = client if client is not None else TenSEALClient(params, n_threads=n_threads)
        blob = public_context if public_context is not None else self.client.public_context()
        self.ctx = ts.context_from(blob, n_threads=n_threads)  # the evaluator's context: no secret key
        if self.ctx.is_private():
            raise SimulationError("the server context holds a secret key; refusing to evaluate with it")
        self.bytes_in = 0
        self.bytes_out = 0

    # ---- wire --------------------------------------------------------------------------------------------------
    def _load(self, wire: Wire) -> TSArray:
        self.bytes_in += wire.nbytes
        obj = np.empty(len(wire.blobs), dtype=object)
        for i, blob in enumerate(wire.blobs):
            obj[i] = ts.ckks_vector_from(self.ctx, blob)
        return TSArray(obj.reshape(wire.shape), wire.batch)

    def _dump(self, ct: TSArray) -> Wire:
        blobs = [v.serialize() for v in ct.obj.reshape(-1)]
        w = Wire(tuple(ct.obj.shape), ct.batch, blobs)
        self.bytes_out += w.nbytes
        return w

    # ---- client round trips ------------------------------------------------------------------------------------
    def encrypt(self, x: np.ndarray) -> TSArray:
        with self.timed("encrypt", int(np.prod(np.shape(x)[1:], dtype=np.int64))):
            return self._load(self.client.encrypt(x))

    def decrypt(self, ct: TSArray, kind: str = "decrypt") -> np.ndarray:
        with self.timed(kind, ct.obj.size):
            return self.client.decrypt(self._dump(ct))

    def refresh(self, ct: TSArray) -> TSArray:
        self.n_refresh += 1
        with self.timed("refresh", ct.obj.size):
            return self._load(self.client.refresh(self._dump(ct)))

    def encrypt_public(self, x: np.ndarray) -> TSArray:
        x = np.asarray(x, dtype=np.float64)
        b = x.shape[0]
        flat = x.reshape(b, -1)
        obj = np.empty(flat.shape[1], dtype=object)
        with self.timed("encrypt_public", flat.shape[1]):
            for j in range(flat.shape[1]):
                obj[j] = ts.ckks_vector(self.ctx, flat[:, j].tolist())
        return TSArray(obj.reshape(x.shape[1:]), b)

    # ---- introspection -----------------------------------------------------------------------------------------
    def is_ct(self, v) -> bool:
        return isinstance(v, TSArray)

    def shape(self, ct: TSArray) -> tuple[int, ...]:
        return ct.shape

    def level(self, ct: TSArray) -> int | None:
        if ct.obj.size == 0:
            return self.params.level_budget
        return min(v.data.ciphertext()[0].coeff_modulus_size() for v in ct.obj.reshape(-1)) - 1

    # ---- operands ----------------------------------------------------------------------------------------------
    def _pt_objects(self, pt: np.ndarray, out: tuple[int, ...]) -> np.ndarray:
        """Plaintext aligned to the logical result shape ``out`` -> object array over the element shape holding a
        float (same for every example) or a list of B floats (one per slot)."""
        pt = np.asarray(pt, dtype=np.float64)
        rank = len(out)
        if batch_varying(pt, rank):
            full = np.broadcast_to(pt, (out[0],) + tuple(pt.shape[1:]))
            moved = np.moveaxis(full, 0, -1)
            obj = np.empty(moved.shape[:-1], dtype=object)
            for idx in np.ndindex(obj.shape):
                obj[idx] = moved[idx].tolist()
            return obj
        if pt.ndim == rank:
            pt = pt[0]
        return _objarr(pt.astype(object))

    def _binary(self, a: TSArray, b, f, name: str) -> TSArray:
        if self.is_ct(b):
            out = logical_broadcast(a.shape, b.shape, "encrypted operand")
            if len(b.shape) != len(a.shape):
                raise SimulationError(f"encrypted operands of ranks {len(a.shape)} and {len(b.shape)}: both carry "
                                      "the batch on axis 0, ranks must match")
            other = b.obj
        else:
            out = logical_broadcast(a.shape, np.shape(b), "plaintext")
            other = self._pt_objects(b, out)
        n = int(np.prod(out[1:], dtype=np.int64))
        with self.timed(name, n):
            try:
                res = _map(f, a.obj, other)
            except (ValueError, RuntimeError) as exc:
                raise self._translate(exc, name) from exc
        return TSArray(np.broadcast_to(res, out[1:]).copy() if res.shape != tuple(out[1:]) else res, a.batch)

    def _translate(self, exc: Exception, what: str) -> SimulationError:
        msg = str(exc)
        if "scale out of bounds" in msg or "end of modulus switching chain" in msg:
            return LevelError(f"{what}: TenSEAL ran out of levels ({msg})")
        return SimulationError(f"{what}: TenSEAL error: {msg}")

    # ---- arithmetic --------------------------------------------------------------------------------------------
    def add(self, a, b):
        if not self.is_ct(a):
            a, b = b, a
        return self._binary(a, b, lambda x, y: x + y, "add")

    def sub(self, a, b):
        if not self.is_ct(a):
            return self.add(self.neg(b), a)
        return self._binary(a, b, lambda x, y: x - y, "add")

    def neg(self, a):
        with self.timed("neg", a.obj.size):
            return TSArray(_map(lambda x: x.neg(), a.obj), a.batch)

    def mul(self, a, b):
        if not self.is_ct(a):
            a, b = b, a
        kind = "mul_ct" if self.is_ct(b) else "mul_pt"
        return self._binary(a, b, lambda x, y: x * y, kind)

    def matmul(self, a, b):
        a_ct, b_ct = self.is_ct(a), self.is_ct(b)
        sa = tuple(a.shape if a_ct else np.shape(a))
        sb = tuple(b.shape if b_ct else np.shape(b))
        check_matmul(sa, a_ct, sb, b_ct)
        if a_ct and b_ct:
            lhs, rhs = a.obj, b.obj
            batch = a.batch
        elif a_ct:
            lhs, batch = a.obj, a.batch
            rhs = self._pt_matrix(b, len(sa), a.batch)
        else:
            rhs, batch = b.obj, b.batch
            lhs = self._pt_matrix(a, len(sb), b.batch)
        k = int(sa[-1]) if len(sa) else 1
        t0 = time.perf_counter()
        try:
            res = _objarr(np.matmul(lhs, rhs))
        except (ValueError, RuntimeError) as exc:
            raise self._translate(exc, "MatMul") from exc
        kind = "matmul_ct" if (a_ct and b_ct) else "matmul_pt"
        self.seconds[kind] += time.perf_counter() - t0
        self.counts[kind] += res.size * k
        return TSArray(res, batch)

    def _pt_matrix(self, pt, ct_rank: int, batch: int) -> np.ndarray:
        pt = np.asarray(pt, dtype=np.float64)
        if ct_rank >= 3 and pt.ndim == ct_rank and pt.shape[0] != 1:  # one matrix per example -> slot vectors
            moved = np.moveaxis(np.broadcast_to(pt, (batch,) + pt.shape[1:]), 0, -1)
            obj = np.empty(moved.shape[:-1], dtype=object)
            for idx in np.ndindex(obj.shape):
                obj[idx] = moved[idx].tolist()
            return obj
        if ct_rank >= 3 and pt.ndim == ct_rank:
            pt = pt[0]
        return pt.astype(object)  # python floats: float * CKKSVector dispatches to CKKSVector.__rmul__

    def reduce_sum(self, a: TSArray, axes: Sequence[int], keepdims: bool):
        if not axes:
            return a
        if 0 in axes:
            raise SimulationError("a reduction over axis 0 would add different examples (batch in the slots)")
        with self.timed("sum", a.obj.size):
            res = a.obj.sum(axis=tuple(ax - 1 for ax in axes), keepdims=bool(keepdims))
        return TSArray(_objarr(res), a.batch)

    # ---- data movement -----------------------------------------------------------------------------------------
    def rearrange(self, fn, args, ct_positions):
        """Run ``fn`` on arrays of element indices (batch included) and move ciphertexts accordingly."""
        vals = list(args)
        pools, offset = [], 0
        for i in ct_positions:
            ct = args[i]
            n = int(np.prod(ct.shape, dtype=np.int64))
            vals[i] = np.arange(offset, offset + n, dtype=np.int64).reshape(ct.shape)
            pools.append((offset, ct))
            offset += n
        outs = fn(*vals)
        flat_pool = np.empty(sum(ct.obj.size for _, ct in pools), dtype=object)
        starts, pos = [], 0
        for _, ct in pools:
            starts.append(pos)
            flat_pool[pos:pos + ct.obj.size] = ct.obj.reshape(-1)
            pos += ct.obj.size
        results = []
        batch = args[ct_positions[0]].batch
        with self.timed("move"):
            for o in outs:
                o = np.asarray(o)
                if o.ndim == 0 or o.shape[0] != batch:
                    raise SimulationError(f"data movement produced shape {list(o.shape)}: the batch axis 0 (size "
                                          f"{batch}) must stay axis 0")
                elem = np.empty(o.shape, dtype=np.int64)
                for (off, ct), st in zip(pools, starts):
                    per = ct.obj.size
                    sel = (o >= off) & (o < off + per * ct.batch)
                    local = o[sel] - off
                    b_src, e_src = np.divmod(local, per) if per else (local, local)
                    bidx = np.broadcast_to(np.arange(batch).reshape((batch,) + (1,) * (o.ndim - 1)), o.shape)[sel]
                    if np.any(b_src != bidx):
                        raise SimulationError("data movement mixes examples across the batch axis (slot batching "
                                              "keeps examples independent)")
                    elem[sel] = e_src + st
                first = elem[0]
                if batch > 1 and np.any(elem != first[None]):
                    raise SimulationError("data movement differs between examples; cannot be done by moving "
                                          "ciphertexts")
                res = flat_pool[first.reshape(-1)].reshape(first.shape) if first.size else \
                    np.empty(first.shape, dtype=object)
                results.append(TSArray(_objarr(res), batch))
        return results

    def describe(self) -> dict:
        d = super().describe()
        d.update({"server_context_private": self.ctx.is_private(), "bytes_to_server": self.bytes_in,
                  "bytes_from_server": self.bytes_out})
        return d


__all__ = ["TenSEALClient", "TenSEALBackend", "TSArray", "Wire"]
