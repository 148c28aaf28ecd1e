"""``seal`` backend: real CKKS on Microsoft SEAL (``tenseal.sealapi``) with one example per pass, packed.

Roles
-----
* :class:`SealClient` holds the **secret key**: builds the context, the relinearisation key and Galois keys
  *only for the rotation steps the schedule uses*, encrypts, decrypts, and performs client-aided refreshes
  (decrypt + re-encrypt with a full level budget; SEAL has no bootstrapping). Every refresh is counted and labelled
  "client-aided refresh".
* :class:`SealEngine` is the **server**: it loads the public key, relinearisation and Galois keys from bytes
  (no secret key, no decryptor) and evaluates.
* :class:`NumpyEngine` runs the *same* schedule on float64 slot vectors: the dry run before encrypting (packability,
  operation counts, rotation steps, peak memory) and, with ``noise=True``, the emulator's matching mode (exact
  scale; this packing's encryption, rescale, encoding and rotation rounding).

Scale management is exact: every ciphertext at level ``l`` has the scale ``s_l`` with ``s_L = 2^scale_bits`` and
``s_{l-1} = s_l^2 / q_l`` (the real prime dropped by the rescale). A ct x ct product of two level-``l``
ciphertexts therefore lands exactly on ``s_{l-1}``; a plaintext multiplier is encoded at ``s_{l-1} q_l / s_l`` so
the product does too; a ciphertext brought down to a lower level for an addition is multiplied by 1 encoded at
the scale that lands it on that level's ``s``. No scale is ever pinned, so the error is CKKS's own.

:class:`PackedBackend` implements the interpreter's backend interface on :class:`cgf_fhe.simulate.packing.
PackedTensor` (slot maps; see that module for the layouts): data movement re-indexes slot maps, element-wise
operations are slot-wise, linear layers use the diagonal method with baby-step giant-step rotations, attention
scores and probs @ V use the diagonal (token-shift) schedule, reductions add ciphertexts and rotate-and-sum.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
import weakref
from collections import Counter
from typing import Sequence

import numpy as np

from ..packing import (TOKEN_REPLICAS, Layout, PackedTensor, ciphertext_bytes, component_labels, next_pow2, op_ms,
                       plaintext_bytes, reindex_replicas)
from .base import Backend, SimulationError, logical_broadcast, optional_import, require
from .seal_noise import ModelKeys, add_rotation_error, measure_rotation, rotation_error_for

sealapi = optional_import("tenseal.sealapi")  # tenseal is a dependency; None only in a broken install


def _need_seal():
    require(sealapi, "the seal backend needs tenseal (its tenseal.sealapi module): pip install tenseal")


def _scales(params) -> list[float]:
    """Exact scale of a ciphertext at each level 0..L (see the module docstring)."""
    L = params.level_budget
    primes = params.primes
    s = [0.0] * (L + 1)
    s[L] = float(params.scale)
    for lv in range(L, 0, -1):
        s[lv - 1] = s[lv] * s[lv] / float(primes[lv])
    return s


def norm_step(k: int, slots: int) -> int:
    k %= slots
    return k - slots if k > slots // 2 else k


def galois_elt(step: int, poly_modulus: int) -> int:
    """SEAL's Galois element for a left rotation by ``step`` (negative: right)."""
    m = 2 * poly_modulus
    if step < 0:
        step = poly_modulus // 2 + step
    return pow(3, step, m)


# ---------------------------------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------------------------------
class Engine:
    """Operations on single ciphertexts with exact scales; counts and times every operation."""

    name = "engine"

    def __init__(self, params, pt_cache_bytes: int = 4 << 30):
        self.params = params
        self.N = params.poly_modulus
        self.slots = params.slots
        self.top = params.level_budget
        self.s = _scales(params)
        self.primes = params.primes
        self.counts: Counter = Counter()
        self.seconds: Counter = Counter()
        self.steps: set[int] = set()
        self.n_refresh = 0
        self.cache: dict = {}
        self.cache_bytes = 0
        self.cache_cap = int(pt_cache_bytes)
        self.keys_seen: set = set()
        self.pt_bytes_total = 0

    def _t(self, kind, n=1):
        eng = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                eng.seconds[kind] += time.perf_counter() - self.t
                eng.counts[kind] += n

        return _T()

    def decrypt_diagnostic(self, c):
        """Decrypt for a client-side diagnostic (a traced layer value): not part of inference."""
        return self.decrypt(c)

    def pt_scale_mul(self, level: int) -> float:
        return self.s[level - 1] * float(self.primes[level]) / self.s[level]

    # plaintext cache: (key, level, kind) -> encoded plaintext, kept while under the byte cap
    def plain(self, key, vec_fn, level: int, kind: str):
        ck = (key, level, kind) if key is not None else None
        if ck is not None and ck in self.cache:
            self.counts["pt_cache_hit"] += 1
            return self.cache[ck]
        vec = vec_fn()
        scale = self.pt_scale_mul(level) if kind == "mul" else self.s[level]
        with self._t("encode"):
            pt = self._encode(vec, level, scale)
        if hasattr(self, "est_ms"):
            self.est_ms["encode"] += op_ms("encode", self.N, level)
        nb = plaintext_bytes(self.N, level)
        if ck is not None and ck not in self.keys_seen:  # distinct reusable plaintexts of the schedule
            self.keys_seen.add(ck)
            self.pt_bytes_total += nb
        if ck is not None and self.cache_bytes + nb <= self.cache_cap:
            self.cache[ck] = pt
            self.cache_bytes += nb
        return pt


class NumpyEngine(Engine):
    """Float64 slot vectors. ``noise``: add CKKS's rounding errors (the emulator's matching mode)."""

    name = "numpy"

    class Ct:
        __slots__ = ("v", "level", "__weakref__")

        def __init__(self, v, level):
            self.v = v
            self.level = level

    def __init__(self, params, noise: bool = False, seed: int = 0, pt_cache_bytes: int = 4 << 30,
                 rotation_std: dict | None = None):
        super().__init__(params, pt_cache_bytes)
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        # key-switching error of a rotation (absolute, value units) per level or per (level, step); see
        # calibrate_rotation_noise
        self.rotation_std = dict(rotation_std or {})
        self.rot_used: set = set()
        self.log2_bound = [sum(math.log2(q) for q in self.primes[:lv + 1]) - 1 - math.log2(self.s[lv])
                           for lv in range(self.top + 1)]
        self.min_headroom_bits = math.inf
        self.min_headroom_level = None
        self.live_bytes = 0
        self.peak_bytes = 0
        self.window_peak = 0  # peak since start_window() (the interpreter opens one per node)
        # per level: live bytes and their peak (SEAL's memory pools keep a freed buffer per size, i.e. per level)
        self.live_by_level: Counter = Counter()
        self.peak_by_level: Counter = Counter()
        self.est_ms: Counter = Counter()  # estimated SEAL time per operation kind (packing.op_ms at its level)

    def _c(self, kind, level, n=1):
        self.est_ms[kind] += n * op_ms(kind, self.N, level)
        return self._t(kind, n)

    def _new(self, v, level):
        m = float(np.max(np.abs(v))) if v.size else 0.0
        if m > 0 or not math.isfinite(m):  # every slot, garbage included, must stay below Q_l / (2 s_l)
            head = self.log2_bound[level] - math.log2(m) if math.isfinite(m) else -math.inf
            if head < self.min_headroom_bits:
                self.min_headroom_bits = head
                self.min_headroom_level = level
        c = self.Ct(v, level)
        nb = ciphertext_bytes(self.N, level)
        self.live_bytes += nb
        now = self.live_bytes + self.cache_bytes
        if now > self.peak_bytes:
            self.peak_bytes = now
        if now > self.window_peak:
            self.window_peak = now
        self.live_by_level[level] += nb
        if self.live_by_level[level] > self.peak_by_level[level]:
            self.peak_by_level[level] = self.live_by_level[level]
        weakref.finalize(c, self._free, nb, level)
        return c

    def start_window(self) -> int:
        """Start measuring the peak of live ciphertexts + cached plaintexts from now (``window_peak``); returns
        the bytes live now."""
        self.window_peak = self.live_bytes + self.cache_bytes
        return self.window_peak

    def _free(self, nb, level=None):
        self.live_bytes -= nb
        if level is not None:
            self.live_by_level[level] -= nb

    def _round(self, v, std_scale):
        if self.noise:
            return v + self.rng.normal(0.0, self.N / (6.0 * std_scale), v.shape)
        return v

    def _encode(self, vec, level, scale):
        v = np.asarray(vec, dtype=np.float64)
        if self.noise:  # coefficient rounding of the encoding: slot error std sqrt(N/12)/scale
            v = v + self.rng.normal(0.0, math.sqrt(self.N / 12.0) / scale, v.shape)
        return v

    # client side
    def encrypt(self, vec):
        with self._c("encrypt", self.top):
            return self._new(self._round(np.asarray(vec, dtype=np.float64).copy(), self.s[self.top]), self.top)

    def decrypt(self, c):
        with self._c("decrypt", c.level):
            return c.v.copy()

    def decrypt_diagnostic(self, c):  # not charged to the latency estimate (the report's estimate traces nothing)
        with self._t("decrypt_trace"):
            return c.v.copy()

    def refresh(self, c, keep):
        self.counts["refresh"] += 1
        self.est_ms["refresh"] += op_ms("refresh", self.N, self.top)
        v = np.where(keep, c.v, 0.0)
        return self._new(self._round(v, self.s[self.top]), self.top)

    # server side
    def level(self, c):
        return c.level

    def add(self, a, b):
        self._same(a, b)
        with self._c("add", a.level):
            return self._new(a.v + b.v, a.level)

    def sub(self, a, b):
        self._same(a, b)
        with self._c("add", a.level):
            return self._new(a.v - b.v, a.level)

    def add_many(self, cts):
        for c in cts[1:]:
            self._same(cts[0], c)
        with self._c("add", cts[0].level, max(len(cts) - 1, 0)):
            return self._new(np.sum([c.v for c in cts], axis=0), cts[0].level)

    def neg(self, a):
        with self._c("add", a.level):
            return self._new(-a.v, a.level)

    def add_plain(self, a, pt):
        with self._c("add", a.level):
            return self._new(a.v + pt, a.level)

    def mul_plain_raw(self, a, pt):
        """Product without rescale (sum several, rescale once)."""
        self._need_level(a)
        with self._c("mul_pt", a.level):
            return self._new(a.v * pt, a.level)

    def zeros(self, level):
        """A fresh encryption of zero at ``level`` (a product with an all-zero plaintext)."""
        with self._c("encrypt_zero", level):
            return self._new(self._round(np.zeros(self.slots), self.s[level]), level)

    def rescale(self, a):
        with self._c("rescale", a.level):
            return self._new(self._round(a.v, self.s[a.level - 1]), a.level - 1)

    def mul(self, a, b):
        self._same(a, b)
        self._need_level(a)
        with self._c("mul_ct", a.level):
            return self._new(self._round(a.v * b.v, self.s[a.level - 1]), a.level - 1)

    def rotate(self, a, k):
        k = norm_step(k, self.slots)
        if k == 0:
            return a
        self.steps.add(k)
        with self._c("rotate", a.level):
            v = np.roll(a.v, -k)
            self.rot_used.add((a.level, k))
            if self.noise:  # the key's fixed part and a random part (seal_noise)
                err = rotation_error_for(self.rotation_std, a.level, k, self.N / (6.0 * self.s[a.level]))
                v = add_rotation_error(v, err, self.rng)
            return self._new(v, a.level)

    def level_down(self, a, level):
        if a.level == level:
            return a
        if a.level < level:
            raise SimulationError(f"cannot raise a ciphertext from level {a.level} to {level}")
        with self._c("level_match", a.level):
            return self._new(self._round(a.v, self.s[level]), level)

    def _same(self, a, b):
        if a.level != b.level:
            raise SimulationError(f"internal: operands at levels {a.level} and {b.level}")

    def _need_level(self, a):
        if a.level < 1:
            raise SimulationError("internal: multiplication at level 0")


_ROTATION_STD: dict = {}


def calibrate_rotation_noise(params) -> dict:
    """Per level, the random part of a rotation's error measured once per parameter set on a throwaway SEAL key;
    each step's fixed part comes from a model key (seal_noise.ModelKeys: the law of the run's keys, not their
    values; calibrate_rotations with the run's engine measures the values)."""
    key = (params.poly_modulus, tuple(params.coeff_bits), params.scale_bits)
    if key in _ROTATION_STD:
        return _ROTATION_STD[key]
    eng = SealEngine(params, SealClient(params, [1]))
    rng = np.random.default_rng(12345)
    out = {}
    for lv in range(params.level_budget, -1, -1):
        m = measure_rotation(eng, lv, 1, rng)
        m.det, m.keys = None, ModelKeys(params)
        out[lv] = m
    _ROTATION_STD[key] = out
    return out


def measure_op_ms(params, levels=None, reps: int = 10) -> dict:
    """CPU ms (``time.process_time``: what one core spends, whatever else the machine runs) of each packed
    operation on SEAL at each of ``levels`` (default: the top, the middle and level 1) -> ``{level: {kind: ms}}``;
    the source of ``packing.MS_AT_16384``."""
    cl = SealClient(params, [params.slots // 64])
    eng = SealEngine(params, cl)
    rng = np.random.default_rng(7)
    x = rng.normal(size=params.slots)
    top = eng.encrypt(x)
    L = params.level_budget
    levels = sorted({L, max(1, L // 2), 1} if levels is None else set(levels), reverse=True)

    def ms(fn):
        fn()
        c0 = time.process_time()
        for _ in range(reps):
            fn()
        return (time.process_time() - c0) / reps * 1e3

    out = {}
    for lv in levels:
        c = eng.level_down(top, lv)
        pt = eng._encode(x, lv, eng.pt_scale_mul(lv))
        keep = np.ones(params.slots, dtype=bool)
        row = {"encode": ms(lambda: eng._encode(x, lv, eng.pt_scale_mul(lv))),
               "mul_pt": ms(lambda: eng.mul_plain_raw(c, pt)),
               "rescale": ms(lambda: eng.rescale(eng.mul_plain_raw(c, pt))),
               "rotate": ms(lambda: eng.rotate(c, params.slots // 64)),
               "mul_ct": ms(lambda: eng.mul(c, c)),
               "add": ms(lambda: eng.add(c, c)),
               "refresh": ms(lambda: eng.refresh(c, keep)),
               "decrypt": ms(lambda: eng.decrypt(c)),
               "encrypt_zero": ms(lambda: eng.zeros(lv))}
        row["rescale"] -= row["mul_pt"]
        if lv < L:
            row["level_match"] = ms(lambda: eng.level_down(top, lv))
        else:
            row["encrypt"] = ms(lambda: eng.encrypt(x))
        out[lv] = {k: round(v, 3) for k, v in row.items()}
    return out


class SealClient:
    """Key holder (secret key). ``steps``: rotation steps to make Galois keys for."""

    def __init__(self, params, steps: Sequence[int] = ()):
        _need_seal()
        self.params = params
        t0 = time.perf_counter()
        self.ctx = _seal_context(params)
        self.kg = sealapi.KeyGenerator(self.ctx)
        self.pk = sealapi.PublicKey()
        self.kg.create_public_key(self.pk)
        self.rk = sealapi.RelinKeys()
        self.kg.create_relin_keys(self.rk)
        self.steps = sorted({norm_step(int(k), params.slots) for k in steps} - {0})
        self.gk = sealapi.GaloisKeys()
        if self.steps:
            self.kg.create_galois_keys([galois_elt(k, params.poly_modulus) for k in self.steps], self.gk)
        self.keygen_seconds = time.perf_counter() - t0
        self.encoder = sealapi.CKKSEncoder(self.ctx)
        self.encryptor = sealapi.Encryptor(self.ctx, self.pk)
        self.decryptor = sealapi.Decryptor(self.ctx, self.kg.secret_key())
        self.scale = float(params.scale)
        self.n_refresh = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="cgf_seal_")

    def public_blobs(self) -> dict:
        """What the server gets: public key, relinearisation key, Galois keys -- NO secret key."""
        if self.gk is None:
            raise SimulationError("the client's Galois keys were handed over to a server (hand_over_public) and "
                                  "freed: make a new SealClient for another server")
        return {"public_key": _dump(self.pk, self._tmp.name), "relin_keys": _dump(self.rk, self._tmp.name),
                "galois_keys": _dump(self.gk, self._tmp.name) if self.steps else None, "steps": list(self.steps)}

    def hand_over_public(self) -> dict:
        """:meth:`public_blobs`, then the client's own Galois keys are freed: the client never rotates, and in one
        process the server's copy would double the largest object of a run (MiniLM at 44 tokens: ~200 keys,
        1.6 GiB each copy). Freed before the server loads its copy, SEAL's memory pool gives the server the
        client's buffers (the same sizes), so the keys cost one copy instead of two. ``steps`` stays (what the keys
        cover)."""
        blobs = self.public_blobs()
        self.gk = None
        return blobs

    def encrypt(self, vec) -> bytes:
        pt = sealapi.Plaintext()
        self.encoder.encode(np.asarray(vec, dtype=np.float64).tolist(), self.scale, pt)
        ct = sealapi.Ciphertext()
        self.encryptor.encrypt(pt, ct)
        return _dump(ct, self._tmp.name)

    def decrypt(self, blob: bytes) -> np.ndarray:
        ct = _load(sealapi.Ciphertext(), self.ctx, blob, self._tmp.name)
        pt = sealapi.Plaintext()
        self.decryptor.decrypt(ct, pt)
        return np.array(self.encoder.decode_double(pt), dtype=np.float64)

    def refresh(self, blob: bytes, keep: np.ndarray) -> bytes:
        """Client-aided refresh: decrypt, zero the slots the server marks unused, re-encrypt (full levels)."""
        self.n_refresh += 1
        return self.encrypt(np.where(keep, self.decrypt(blob), 0.0))


def _seal_context(params):
    """The SEAL context of ``params`` (the client's and the server's are built alike; the server gets no key)."""
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus)
    parms.set_coeff_modulus(sealapi.CoeffModulus.Create(params.poly_modulus, list(params.coeff_bits)))
    ctx = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.NONE if params.insecure
                              else sealapi.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise SimulationError(f"SEAL refused the parameters: {ctx.parameters_error_message()}")
    return ctx


def _dump(obj, tmp) -> bytes:
    fd, path = tempfile.mkstemp(dir=tmp)
    os.close(fd)
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def _load(obj, ctx, blob: bytes, tmp):
    fd, path = tempfile.mkstemp(dir=tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        obj.load(ctx, path)
        return obj
    finally:
        os.unlink(path)


class SealEngine(Engine):
    """The server: a SEAL context with public material only; talks to the client through bytes."""

    name = "seal"

    def __init__(self, params, client: SealClient, public: dict | None = None, pt_cache_bytes: int = 4 << 30):
        _need_seal()
        super().__init__(params, pt_cache_bytes)
        self.client = client
        public = public if public is not None else client.hand_over_public()
        self._tmp = tempfile.TemporaryDirectory(prefix="cgf_seal_srv_")
        self.ctx = _seal_context(params)
        self.pk = _load(sealapi.PublicKey(), self.ctx, public["public_key"], self._tmp.name)
        self.rk = _load(sealapi.RelinKeys(), self.ctx, public["relin_keys"], self._tmp.name)
        self.gk = (_load(sealapi.GaloisKeys(), self.ctx, public["galois_keys"], self._tmp.name)
                   if public.get("galois_keys") else None)
        self.key_steps = set(public.get("steps") or ())
        self.encoder = sealapi.CKKSEncoder(self.ctx)
        self.encryptor = sealapi.Encryptor(self.ctx, self.pk)  # public-key encryption only
        self.ev = sealapi.Evaluator(self.ctx)
        self.parms_at = {}
        cd = self.ctx.first_context_data()
        while cd is not None:
            self.parms_at[cd.chain_index()] = cd.parms_id()
            cd = cd.next_context_data()
        self.bytes_in = self.bytes_out = 0

    @property
    def has_secret_key(self) -> bool:
        return any(hasattr(self, a) for a in ("decryptor", "sk", "secret_key"))

    def _recv(self, blob):
        self.bytes_in += len(blob)
        return _load(sealapi.Ciphertext(), self.ctx, blob, self._tmp.name)

    def _send(self, c):
        blob = _dump(c, self._tmp.name)
        self.bytes_out += len(blob)
        return blob

    def _encode(self, vec, level, scale):
        pt = sealapi.Plaintext()
        self.encoder.encode(np.asarray(vec, dtype=np.float64).tolist(), self.parms_at[level], scale, pt)
        return pt

    def _fix(self, c, level):
        """Pin the bookkeeping scale to the exact table value (they agree to a few ulp)."""
        want = self.s[level]
        if abs(c.scale / want - 1.0) > 1e-9:
            raise SimulationError(f"internal: scale {c.scale} at level {level}, expected {want}")
        c.scale = want
        return c

    def encrypt(self, vec):
        with self._t("encrypt"):
            return self._recv(self.client.encrypt(vec))

    def decrypt(self, c):
        with self._t("decrypt"):
            return self.client.decrypt(self._send(c))

    def refresh(self, c, keep):
        self.counts["refresh"] += 1
        with self._t("refresh_seconds", 0):
            return self._recv(self.client.refresh(self._send(c), keep))

    def level(self, c):
        return self.ctx.get_context_data(c.parms_id()).chain_index()

    def _ev(self, kind, method: str, *args, n: int = 1):
        """``Evaluator.method(*args, out)`` into a new ciphertext, timed and counted as ``kind``."""
        with self._t(kind, n):
            out = sealapi.Ciphertext()
            getattr(self.ev, method)(*args, out)
            return out

    def add(self, a, b):
        return self._ev("add", "add", a, b)

    def sub(self, a, b):
        return self._ev("add", "sub", a, b)

    def add_many(self, cts):
        if len(cts) == 1:
            return cts[0]
        return self._ev("add", "add_many", list(cts), n=len(cts) - 1)

    def neg(self, a):
        return self._ev("add", "negate", a)

    def add_plain(self, a, pt):
        return self._ev("add", "add_plain", a, pt)

    def mul_plain_raw(self, a, pt):
        if pt.is_zero():  # every multiplier rounded to 0 at this scale (e.g. a 1e-14 coefficient): SEAL refuses
            with self._t("encrypt_zero"):  # the transparent product; an encryption of 0 at its scale instead
                z = sealapi.Plaintext()
                self.encoder.encode(0.0, a.parms_id(), a.scale * pt.scale, z)
                out = sealapi.Ciphertext()
                self.encryptor.encrypt(z, out)
                return out
        return self._ev("mul_pt", "multiply_plain", a, pt)

    def zeros(self, level):
        """A fresh encryption of zero at ``level`` with the public key (a product with an all-zero plaintext:
        SEAL refuses to produce a transparent ciphertext)."""
        with self._t("encrypt_zero"):
            pt = sealapi.Plaintext()
            self.encoder.encode(0.0, self.parms_at[level], self.s[level], pt)
            c = sealapi.Ciphertext()
            self.encryptor.encrypt(pt, c)
        return self._fix(c, level)

    def rescale(self, a):
        lv = self.level(a)
        with self._t("rescale"):
            out = sealapi.Ciphertext()
            self.ev.rescale_to_next(a, out)
        return self._fix(out, lv - 1)

    def mul(self, a, b):
        lv = self.level(a)
        with self._t("mul_ct"):
            out = sealapi.Ciphertext()
            self.ev.multiply(a, b, out)
            self.ev.relinearize_inplace(out, self.rk)
            self.ev.rescale_to_next_inplace(out)
        return self._fix(out, lv - 1)

    def rotate(self, a, k):
        k = norm_step(k, self.slots)
        if k == 0:
            return a
        if k not in self.key_steps:
            raise SimulationError(f"no Galois key for rotation step {k} (keys were made for the dry run's steps)")
        self.steps.add(k)
        return self._ev("rotate", "rotate_vector", a, k, self.gk)

    def level_down(self, a, level):
        lv = self.level(a)
        if lv == level:
            return a
        with self._t("level_match"):
            c = sealapi.Ciphertext()
            self.ev.mod_switch_to(a, self.parms_at[level + 1], c)
            c.scale = self.s[lv]
            pt = sealapi.Plaintext()
            scale = self.s[level] * float(self.primes[level + 1]) / self.s[lv]
            self.encoder.encode(1.0, self.parms_at[level + 1], scale, pt)
            self.ev.multiply_plain_inplace(c, pt)
            self.ev.rescale_to_next_inplace(c)
        return self._fix(c, level)


# ---------------------------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------------------------


def _fingerprint(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class PackedBackend(Backend):
    """The interpreter's backend on packed tensors (one example per pass). ``engine``: :class:`SealEngine`
    (real CKKS) or :class:`NumpyEngine` (dry run / matching emulator)."""

    name = "seal"
    leveled = True
    refresh_label = "client-aided refresh"

    def __init__(self, params, engine: Engine, layout: Layout | None = None, blocks: str = "auto",
                 compact_scores: bool = True):
        super().__init__(params)
        self.engine = engine
        self.layout = layout
        self.blocks = blocks  # Layout.choose's block choice for a new input
        self.slots = params.slots
        self.refreshed_ciphertexts = 0
        # attention scores in the compact diagonal layout (packing.Layout.compact_map: every block holds a set)
        # rather than one set per ciphertext set (diag_map): see _scores_compact
        self.compact_scores = compact_scores

    # ---- client side -------------------------------------------------------------------------------------------
    def encrypt(self, x):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 3 or x.shape[0] != 1:
            raise SimulationError(f"the seal backend packs one example [1, tokens, hidden]; got {list(x.shape)}")
        _, S, H = x.shape
        if self.layout is None or (self.layout.S, self.layout.H) != (S, H):
            self.layout = Layout.choose(self.slots, S, H, self.blocks)
        smap = self.layout.hidden_major(np.arange(S)[None], H)
        n_ct = int(smap.max()) // self.slots + 1
        vecs = np.zeros((n_ct, self.slots))
        vecs.reshape(-1)[smap.reshape(-1)] = x.reshape(-1)
        with self.timed("encrypt", n_ct):
            cts = [self.engine.encrypt(v) for v in vecs]
        t = PackedTensor(cts, smap, None)
        t.support = self._keep(t)
        return t

    def decrypt(self, t: PackedTensor, kind: str = "decrypt"):
        used = sorted(set((t.smap.reshape(-1) // self.slots).tolist()))
        flat = np.zeros(len(t.cts) * self.slots)
        with self.timed(kind, len(used)):
            for c in used:
                flat[c * self.slots:(c + 1) * self.slots] = (self.engine.decrypt(t.cts[c]) if kind == "decrypt"
                                                             else self.engine.decrypt_diagnostic(t.cts[c]))
        return flat[t.smap]

    def encrypt_public(self, x):
        raise SimulationError("concatenating a plaintext with a packed ciphertext is not packable by the seal "
                              "backend")

    # ---- introspection -----------------------------------------------------------------------------------------
    def is_ct(self, v) -> bool:
        return isinstance(v, PackedTensor)

    def shape(self, t):
        return t.shape

    def level(self, t):
        return min(self.engine.level(c) for c in t.cts) if t.cts else self.params.level_budget

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _keep(self, t: PackedTensor) -> np.ndarray:
        """Slots holding an element (main map or alias)."""
        keep = np.zeros((len(t.cts), self.slots), dtype=bool)
        keep.reshape(-1)[t.smap.reshape(-1)] = True
        if t.alias is not None:
            keep.reshape(-1)[t.alias.reshape(-1)] = True
        if t.period:  # every replica of a kept slot is kept
            P = t.period
            keep = np.broadcast_to(keep.reshape(len(t.cts), self.slots // P, P).any(1)[:, None, :],
                                   (len(t.cts), self.slots // P, P)).reshape(len(t.cts), self.slots).copy()
        return keep

    def _meet(self, m: np.ndarray, period: int, want: np.ndarray) -> np.ndarray:
        """Slot map ``m`` of a ``period``-ic operand moved to the replicas at the slots ``want`` where there is one."""
        if not period:
            return m
        s = m % self.slots
        move = (s != want) & ((s - want) % period == 0)
        return np.where(move, m - s + want, m)

    def _replicate(self, vec: np.ndarray, period: int) -> np.ndarray:
        """``[n_ct, slots]`` plaintext values written at some slots -> the same at every slot congruent mod
        ``period`` (what a periodic operand needs to stay periodic)."""
        if not period:
            return vec
        n = vec.shape[0]
        v = vec.reshape(n, self.slots // period, period)
        nz = v != 0
        folded = v.sum(1) / np.maximum(nz.sum(1), 1)
        if np.any(nz & (v != folded[:, None, :])):
            raise SimulationError("a plaintext operand differs between the replicas of a periodic packed value")
        return np.broadcast_to(folded[:, None, :], v.shape).reshape(n, self.slots).copy()

    def is_clean(self, t: PackedTensor) -> bool:
        return not np.any(t.support & ~self._keep(t))

    def refresh(self, t: PackedTensor) -> PackedTensor:
        """Client-aided refresh (in place, so every consumer of the value sees it): decrypt, zero the unused
        slots, re-encrypt with the full level budget."""
        keep = self._keep(t)
        for i, slots in t.meta.get(TOKEN_REPLICAS, {}).items():  # the client keeps every replica of a kept slot
            S_blk = self.layout.S_blk
            blocks = keep[i].reshape(-1, S_blk)
            blocks[blocks.any(1)[:, None] & np.isin(np.arange(S_blk), slots)[None, :]] = True
        with self.timed("refresh", len(t.cts)):
            t.cts = [self.engine.refresh(c, keep[i]) for i, c in enumerate(t.cts)]
        t.support = keep
        self.n_refresh += 1
        self.refreshed_ciphertexts += len(t.cts)
        return t

    def _ensure(self, t: PackedTensor, need: int = 1) -> PackedTensor:
        """Align t's ciphertexts to one level; refresh (client-aided) when fewer than ``need`` levels are left."""
        if self.level(t) < need:
            self.refresh(t)
        lv = self.level(t)
        t.cts = [self.engine.level_down(c, lv) for c in t.cts]
        return t

    def _align(self, a, b):
        la, lb = self.engine.level(a), self.engine.level(b)
        if la > lb:
            a = self.engine.level_down(a, lb)
        elif lb > la:
            b = self.engine.level_down(b, la)
        return a, b

    def _eff_map(self, t: PackedTensor, out_shape) -> np.ndarray:
        if tuple(t.shape) == tuple(out_shape):
            return t.smap
        if t.alias is not None:
            try:
                return np.broadcast_to(t.alias, out_shape)
            except ValueError:
                pass
        try:
            return np.broadcast_to(t.smap, out_shape)
        except ValueError:
            raise SimulationError(f"shapes {list(t.shape)} and {list(out_shape)} do not broadcast") from None

    # ---- element-wise ------------------------------------------------------------------------------------------
    def _with_plain(self, a: PackedTensor, b, kind: str) -> PackedTensor:
        b = np.asarray(b, dtype=np.float64)
        out = logical_broadcast(a.shape, b.shape, "plaintext")
        m = self._eff_map(a, out)
        if out != a.shape and a.alias is None:
            raise SimulationError(f"broadcasting packed {list(a.shape)} with a plaintext {list(b.shape)} to "
                                  f"{list(out)} would need the ciphertext replicated")
        targets = [(m, np.broadcast_to(b, out))]
        keep_alias = a.alias if out == a.shape else None
        if keep_alias is not None:
            try:
                targets.append((keep_alias, np.broadcast_to(b, np.broadcast_shapes(keep_alias.shape, b.shape))))
            except ValueError:
                keep_alias = None
        vec = np.zeros(len(a.cts) * self.slots)
        seen = np.zeros(vec.shape, dtype=bool)
        for mm, vv in targets:
            mm, vv = mm.reshape(-1), vv.reshape(-1)
            prev = seen[mm]
            if prev.any() and not np.array_equal(vec[mm][prev], vv[prev]):
                raise SimulationError("a plaintext operand differs between elements packed in the same slot")
            vec[mm] = vv
            seen[mm] = True
        vec = self._replicate(vec.reshape(len(a.cts), self.slots), a.period)
        key = _fingerprint(vec)
        e = self.engine
        if kind == "mul":
            self._ensure(a)
            lv = self.level(a)
            cts = [e.rescale(e.mul_plain_raw(c, e.plain((key, i), lambda i=i: vec[i], lv, "mul")))
                   if vec[i].any() else e.zeros(lv - 1) for i, c in enumerate(a.cts)]
            support = a.support & (vec != 0)
        else:
            cts = [e.add_plain(c, e.plain((key, i), lambda i=i: vec[i], e.level(c), "add"))
                   for i, c in enumerate(a.cts)]
            support = a.support | (vec != 0)
        smap = a.smap if out == a.shape else np.ascontiguousarray(m)
        meta = {k: v for k, v in a.meta.items() if k != TOKEN_REPLICAS}
        return PackedTensor(cts, smap, support, alias=keep_alias, meta=meta, period=a.period)

    def _with_ct(self, a: PackedTensor, b: PackedTensor, op: str) -> PackedTensor:
        try:
            out = tuple(np.broadcast_shapes(a.shape, b.shape))
        except ValueError:
            raise SimulationError(f"encrypted operands {list(a.shape)} and {list(b.shape)} do not broadcast") from None
        ma, mb = self._eff_map(a, out), self._eff_map(b, out)
        # a periodic operand meets the other one at its replica in the other's slot
        ma = self._meet(ma, a.period, mb % self.slots)
        mb = self._meet(mb, b.period, ma % self.slots)
        sa = ma % self.slots
        if not np.array_equal(sa, mb % self.slots):
            raise SimulationError(f"encrypted operands {list(a.shape)} and {list(b.shape)} are packed at different "
                                  "slots (an element-wise op needs them aligned)")
        ca, cb = (ma // self.slots).reshape(-1), (mb // self.slots).reshape(-1)
        pairs, inv = np.unique(np.stack([ca, cb], 1), axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        if op == "mul":
            self._ensure(a)
            self._ensure(b)
        e = self.engine
        cts, sup = [], []
        for i, j in pairs:
            x, y = self._align(a.cts[i], b.cts[j])
            if op == "mul":
                cts.append(e.mul(x, y))
                sup.append(a.support[i] & b.support[j])
            else:
                cts.append(e.add(x, y) if op == "add" else e.sub(x, y))
                sup.append(a.support[i] | b.support[j])
        smap = (inv.reshape(out) * self.slots + sa).astype(np.int64)
        alias = None
        if a.alias is not None and b.alias is not None and a.alias.shape == b.alias.shape and out == a.shape \
                and out == b.shape:
            # both replicated the same way: keep the replication when it uses the same ciphertext pairs
            xa, xb = a.alias // self.slots, b.alias // self.slots
            if np.array_equal(a.alias % self.slots, b.alias % self.slots):
                lookup = {(int(i), int(j)): k for k, (i, j) in enumerate(pairs)}
                try:
                    ks = np.vectorize(lambda i, j: lookup[(int(i), int(j))])(xa, xb)
                    alias = (ks * self.slots + a.alias % self.slots).astype(np.int64)
                except KeyError:
                    alias = None
        period = a.period if a.period and a.period == b.period else 0
        return PackedTensor(cts, smap, np.array(sup), alias=alias, period=period)

    def add(self, a, b):
        if not self.is_ct(a):
            a, b = b, a
        return self._with_ct(a, b, "add") if self.is_ct(b) else self._with_plain(a, b, "add")

    def sub(self, a, b):
        if not self.is_ct(a):
            return self.add(self.neg(b), a)
        if self.is_ct(b):
            return self._with_ct(a, b, "sub")
        return self._with_plain(a, -np.asarray(b, dtype=np.float64), "add")

    def neg(self, a):
        return PackedTensor([self.engine.neg(c) for c in a.cts], a.smap, a.support, alias=a.alias,
                            meta=dict(a.meta), period=a.period)

    def mul(self, a, b):
        if not self.is_ct(a):
            a, b = b, a
        return self._with_ct(a, b, "mul") if self.is_ct(b) else self._with_plain(a, b, "mul")

    # ---- reductions --------------------------------------------------------------------------------------------
    def reduce_sum(self, a: PackedTensor, axes: Sequence[int], keepdims: bool):
        """Sum over ``axes``: add the ciphertexts an output's elements sit in (plus any that are known zero at
        its slots, so outputs share sums), then rotate-and-sum over the slot grid left."""
        if not axes:
            return a
        rank = len(a.shape)
        axes = sorted({ax % rank for ax in axes})
        rep = self._token_sum_replicated(a, axes, keepdims)
        if rep is not None:
            return rep
        rep = self._reduce_blocks_cyclic(a, axes, keepdims)
        if rep is not None:
            return rep
        keep_axes = [i for i in range(rank) if i not in axes]
        perm = keep_axes + axes
        inv_perm = np.argsort(perm)
        kept_shape = [a.shape[i] for i in keep_axes]
        G = np.transpose(a.smap, perm).reshape(int(np.prod(kept_shape, dtype=np.int64)), -1)
        n_out, n_red = G.shape
        n_cts = len(a.cts)
        cts_of, slots_of = G // self.slots, G % self.slots
        p0 = slots_of.min(1)
        rel = slots_of - p0[:, None]
        offs = np.unique(rel)
        stride = int(np.gcd.reduce(offs[1:])) if len(offs) > 1 else 1
        n = int(offs.max() // stride) + 1
        if np.any(rel % stride):
            raise SimulationError("a reduction's slots are not evenly spaced (cannot rotate-and-sum)")
        k_of = rel // stride
        member = np.zeros((n_cts, n_out, n), dtype=bool)
        member[cts_of.reshape(-1), np.repeat(np.arange(n_out), n_red), k_of.reshape(-1)] = True
        if member.sum() != n_out * n_red:
            raise SimulationError("a reduction adds one slot twice (aliased elements)")
        grid = p0[:, None] + stride * np.arange(n)[None, :]  # [n_out, n]
        nonzero = a.support[:, grid]  # [n_cts, n_out, n]
        ok = np.all(member | ~nonzero, axis=2)  # [n_cts, n_out]: adding this ciphertext is exact for o
        mem_any = member.any(2)
        if np.any(mem_any & ~ok):
            raise SimulationError("a reduction's operand has unknown values inside its slot grid (cannot "
                                  "rotate-and-sum)")
        # outputs whose ciphertexts overlap form one component; each output adds every ciphertext of its
        # component that is exact for it (members, or zero on its grid): outputs then share their sums
        pairs = []
        for o in range(n_out):
            ms = np.nonzero(mem_any[:, o])[0]
            pairs += [(int(ms[0]), int(c)) for c in ms[1:]]
        comp = np.array(component_labels(n_cts, pairs))
        groups: dict[tuple, int] = {}
        o_group = np.empty(n_out, dtype=np.int64)
        for o in range(n_out):
            root = comp[np.nonzero(mem_any[:, o])[0][0]]
            use = ok[:, o] & (comp == root)
            o_group[o] = groups.setdefault(tuple(np.nonzero(use)[0].tolist()), len(groups))
        self._ensure(a, 0)
        e = self.engine
        res_cts, res_sup = [], []
        for cset in groups:
            c = e.add_many([a.cts[i] for i in cset])
            sup = np.any(a.support[list(cset)], axis=0)
            if n > 1:
                c, sup = self._rotsum(c, sup, stride, n)
            res_cts.append(c)
            res_sup.append(sup)
        smap = (o_group * self.slots + p0).reshape(kept_shape + [1] * len(axes))
        gi = o_group.reshape(kept_shape + [1] * len(axes))
        smap = np.transpose(smap, inv_perm)
        out_shape = tuple(smap.shape)
        if not keepdims:
            smap = smap.reshape([s for i, s in enumerate(out_shape) if i not in axes])
        alias = None
        cyclic = n > 1 and n * stride == self.slots and (n & (n - 1)) == 0
        if keepdims and cyclic:
            # a cyclic rotate-and-sum leaves the total in every slot of the grid: the input's own slots
            gi = np.broadcast_to(np.transpose(gi, inv_perm), a.shape)
            alias = (gi * self.slots + a.smap % self.slots).astype(np.int64)
        return PackedTensor(res_cts, smap.astype(np.int64), np.array(res_sup), alias=alias,
                            period=stride if cyclic else 0)

    def _rotsum(self, c, sup, stride: int, n: int):
        """Sum of the slots p, p + stride, ..., p + (n-1) stride into p (into every slot of the grid when it is
        the whole ciphertext): power-of-two partial sums combined by the bits of n."""
        e = self.engine
        if n * stride == self.slots and (n & (n - 1)) == 0:
            return self._doubling(c, stride, n, sup=sup)
        acc = acc_sup = None
        offset, T, T_sup, j = 0, c, sup, 0
        while (1 << j) <= n:
            if n >> j & 1:
                part = e.rotate(T, offset * stride) if offset else T
                part_sup = np.roll(T_sup, -offset * stride)
                acc = part if acc is None else e.add(acc, part)
                acc_sup = part_sup if acc_sup is None else acc_sup | part_sup
                offset += 1 << j
            if (1 << (j + 1)) <= n:
                T = e.add(T, e.rotate(T, (1 << j) * stride))
                T_sup = T_sup | np.roll(T_sup, -(1 << j) * stride)
            j += 1
        return acc, acc_sup

    def reduce_mean(self, a, axes, keepdims):
        shape = self.shape(a)
        n = int(np.prod([shape[ax] for ax in axes])) if axes else 1
        return self.mul(self.reduce_sum(a, axes, keepdims), np.array(1.0 / n))

    # ---- matmul ------------------------------------------------------------------------------------------------
    def matmul(self, a, b):
        if not self.is_ct(a):
            raise SimulationError("a plaintext x ciphertext MatMul is not packable by the seal backend")
        if not self.is_ct(b):
            return self._linear_shared(a, np.asarray(b, dtype=np.float64))
        L = self.layout
        qh = L.heads_hm(a.smap)
        kh = L.heads_hm(b.smap, transposed=True)
        if qh is not None and kh is not None and kh[:2] == qh[:2] and kh[2] == tuple(range(L.S)):
            if self._compact_ok(qh[1]):
                return self._scores_compact(a, b, *qh)
            return self._scores(a, b, *qh)
        if qh is not None and kh is not None and kh[:2] == qh[:2] and len(kh[2]) == 1:
            if self._compact_ok(qh[1]):
                return self._query_times_vector_compact(a, b, *qh)
            return self._query_times_vector(a, b, *qh)
        vh = L.heads_hm(b.smap)
        if vh is not None and vh[2] == tuple(range(L.S)):
            cq = self._compact_queries(a, vh[0], vh[1])
            if cq is not None:
                return self._probs_v_compact(a, b, vh[0], vh[1], *cq)
            tq = self._diag_queries(a, vh[0], vh[1])
            if tq is not None:
                return self._probs_v(a, b, vh[0], vh[1], tq)
        raise SimulationError(f"encrypted MatMul {list(a.shape)} x {list(b.shape)}: operands are not in a packed "
                              "attention layout (Q x K^T of hidden-major tensors, or diagonal scores x V)")

    def _linear_shared(self, a: PackedTensor, W: np.ndarray) -> PackedTensor:
        """:meth:`_linear`, computed once for repeated MatMuls of the same ciphertexts by the same weights (the
        exported statistics fold can project the keys twice, once per row scaling: ``keep_j`` for the scores,
        ``w_j`` for the key mean): the second node gets the first's result, as a value with two consumers
        would. Only the linear maps of the current input are remembered (a new input forgets them)."""
        if self.layout is None or self.layout.hm_tokens(a.smap) is None:
            return self._linear(a, W)
        self._ensure(a)
        memo = getattr(self, "_lin_memo", None)
        if memo is None or len(memo["cts"]) != len(a.cts) or any(c is not d for c, d in zip(memo["cts"], a.cts)):
            memo = self._lin_memo = {"cts": list(a.cts), "out": {}}
        key = _fingerprint(a.smap, W)
        if key in memo["out"]:
            self.counts["linear_shared"] += 1
            return memo["out"][key]
        res = memo["out"][key] = self._linear(a, W)
        return res

    def _token_sum_replicated(self, a: PackedTensor, axes, keepdims: bool) -> PackedTensor | None:
        """Sum over the token axis of a hidden-major ``[1, S, H]`` tensor (keepdims) with its total in *every*
        token slot of each block, or None when it does not apply (then :meth:`reduce_sum` as usual).

        With the tokens at slots ``[t0, t1]`` of each block (span ``m = t1 - t0``) and zeros elsewhere (a clean
        tensor; blocks are >= 2 S slots), the window sum ``W(p) = sum_{|j| <= m} x(p + j)`` is the block's total
        at every token slot ``p``: the window covers all tokens and reaches only zero padding of this block and
        of its neighbours (``2 m < S_blk``). A rotate-and-sum of width ``2 m + 1`` and one rotation by ``m``: no
        level, about two rotations more than the plain reduction. The CGF statistics fold's key mean
        ``kbar = sum_j w_j k_j`` (:func:`cgf_fhe.fold.cgf_stats_core`) then meets every query token in
        :meth:`_query_times_vector` without a mask (a mask would cost a level on the critical path). The slot
        map points at token ``t0``; ``meta[TOKEN_REPLICAS]`` lists, per ciphertext, the token slots holding the
        total (kept through data movement)."""
        L = self.layout
        if (L is None or len(a.shape) != 3 or list(axes) != [1] or not keepdims or a.shape[1] < 2 or a.period
                or a.alias is not None):
            return None
        tok = L.hm_tokens(a.smap)
        if tok is None or len(set(tok[0].tolist())) != tok.shape[1] or not self.is_clean(a):
            return None
        t0, t1 = int(tok.min()), int(tok.max())
        m = t1 - t0
        if 2 * m >= L.S_blk:
            return self._token_sum_masked(a, t0, t1) if m < L.S_blk else None
        self._ensure(a, 0)
        e = self.engine
        cts, sup = [], []
        for c, s in zip(a.cts, a.support):
            w, ws = self._rotsum(c, s, 1, 2 * m + 1)
            cts.append(e.rotate(w, -m))
            sup.append(np.roll(ws, m))
        H = a.shape[2]
        res = PackedTensor(cts, L.hidden_major(np.full((1, 1), t0), H), np.array(sup))
        res.meta[TOKEN_REPLICAS] = {i: tuple(range(t0, t1 + 1)) for i in range(len(cts))}
        self.counts["token_sum_replicated"] += 1
        return res

    def _query_times_vector(self, q: PackedTensor, v: PackedTensor, heads: int, dh: int, tq) -> PackedTensor:
        """``q [1, heads, Sq, dh] @ v [1, heads, dh, 1]`` with ``v`` one row per head replicated over the query
        tokens (:meth:`_token_sum_replicated`; the statistics fold's ``um = q' kbar``): one ct x ct product per
        ciphertext and a rotate-and-sum over each head's ``dh`` blocks, as the scores do. The result ``[1,
        heads, Sq, 1]`` sits where the diagonal scores of the same queries sit (head's first block, query
        token slots), so it meets them (``t - um``) and their sum over the keys without data movement."""
        L = self.layout
        if dh & (dh - 1) or L.hp % dh:
            raise SimulationError(f"attention head size {dh} must be a power of two dividing the {L.hp} blocks "
                                  "per ciphertext")
        n_ct = L.n_ct(heads * dh)
        reps = v.meta.get(TOKEN_REPLICAS, {})
        if len(v.cts) != n_ct or any(not set(tq) <= set(reps.get(i, ())) for i in range(n_ct)):
            raise SimulationError(f"encrypted MatMul {list(q.shape)} x {list(v.shape)}: the vector is not "
                                  "replicated over the query tokens (only a sum over the tokens of a hidden-major "
                                  "tensor is)")
        if not self.is_clean(q):
            raise SimulationError("a query x vector product needs the queries with zero padding slots")
        self._ensure(q)
        self._ensure(v)
        e = self.engine
        cts, sup = [], []
        for c in range(n_ct):
            p = e.mul(*self._align(q.cts[c], v.cts[c]))
            p, s = self._head_blocks(p, dh, 1, q.support[c] & v.support[c])
            cts.append(p)
            sup.append(s)
        h = np.arange(heads)[:, None, None]
        slot = ((h * dh) % L.hp) * L.S_blk + np.asarray(tq)[None, :, None]
        smap = (((h * dh) // L.hp) * self.slots + slot)[None].astype(np.int64)
        self.counts["matmul_ct"] += 1
        return PackedTensor(cts, smap, np.array(sup))

    def _diagonal_pass(self, cts, Ws, masks, n_in: int, n_out: int) -> list:
        """Diagonal method with baby-step giant-step rotations (rotations by whole blocks) over the hidden-major
        ciphertexts ``cts``: ``out_b = sum_g rot(sum_{a,i} rot(X_a, i) * D'_{a,b,g,i}, g n1)``, where a
        diagonal's plaintext holds ``W_k``'s diagonal at the token slots of ``masks[k]`` (one weight and the
        token mask for :meth:`_linear`; one per token slice for :meth:`linear_token_split`); plaintext diagonals
        are encoded once per level and cached. Returns the output ciphertexts (one level down)."""
        L, e = self.layout, self.engine
        hp, S_blk = L.hp, L.S_blk
        K, M = Ws[0].shape
        n1 = next_pow2(math.ceil(math.sqrt(hp)))
        n2 = math.ceil(hp / n1)
        lv = e.level(cts[0])
        key = _fingerprint(*Ws, *masks)
        Wps = []
        for W in Ws:
            Wp = np.zeros((n_in * hp, n_out * hp))
            Wp[:K, :M] = W
            Wps.append(Wp)
        j = np.arange(hp)
        baby = {}
        outs = []
        for bi in range(n_out):
            acc = None
            for g in range(n2):
                terms = []
                for ai in range(n_in):
                    for i in range(n1):
                        d = g * n1 + i
                        if d >= hp:
                            break
                        vals = [Wp[ai * hp:(ai + 1) * hp, bi * hp:(bi + 1) * hp][(j + d) % hp, j] for Wp in Wps]
                        if not any(np.any(v) for v in vals):
                            continue
                        if (ai, i) not in baby:
                            baby[ai, i] = e.rotate(cts[ai], i * S_blk) if i else cts[ai]

                        def diag(vals=vals, g=g):
                            blk = sum(v[:, None] * tm[None, :] for v, tm in zip(vals, masks))
                            return np.roll(blk.reshape(-1), g * n1 * S_blk)

                        terms.append(e.mul_plain_raw(baby[ai, i], e.plain((key, ai, bi, d), diag, lv, "mul")))
                if not terms:
                    continue
                y = e.rescale(e.add_many(terms))
                y = e.rotate(y, g * n1 * S_blk) if g else y
                acc = y if acc is None else e.add(acc, y)
            if acc is None:  # an all-zero block of W
                acc = e.zeros(lv - 1)
            outs.append(acc)
        return outs

    def _linear(self, a: PackedTensor, W: np.ndarray) -> PackedTensor:
        """``a @ W`` by the diagonal method with baby-step giant-step rotations (:meth:`_diagonal_pass`)."""
        L = self.layout
        while W.ndim > 2 and W.shape[0] == 1:
            W = W[0]
        if W.ndim != 2:
            raise SimulationError(f"MatMul with a plaintext of shape {list(W.shape)}: only one weight matrix "
                                  "[K, M] is packable")
        K, M = W.shape
        if a.shape[-1] != K:
            raise SimulationError(f"MatMul shapes {list(a.shape)} x {list(W.shape)}")
        tok = L.hm_tokens(a.smap)
        if tok is None:
            raise SimulationError(f"MatMul input {list(a.shape)} is not packed hidden-major (the diagonal method "
                                  "needs hidden units in blocks of tokens)")
        self._ensure(a)
        n_in, n_out = L.n_ct(K), L.n_ct(M)
        tokmask = np.zeros(L.S_blk)
        tokmask[np.unique(tok)] = 1.0
        outs = self._diagonal_pass(a.cts, [W], [tokmask], n_in, n_out)
        self.counts["matmul_pt"] += 1
        res = PackedTensor(outs, L.hidden_major(tok, M), None)
        res.support = self._keep(res)
        return res

    def linear_token_split(self, parts) -> PackedTensor | None:
        """``Concat_token([x[rows_i] @ W_i + b_i])`` for token slices ``x[rows_i]`` of one hidden-major tensor
        (``--ln-cls-scale``'s split dense layer, :class:`cgf_fhe.fold.CentringDense`: row 0 with its own
        weights) as **one** diagonal-method pass: a diagonal's plaintext holds ``W_i``'s diagonal at the token
        slots of ``rows_i`` (the token mask of :meth:`_linear` generalised), so the slices cost what one linear
        map costs (the separate maps plus the Concat's addition cost one map per slice). ``parts``: ``[(x_i,
        W_i, b_i or None)]``. None when the parts are not slices of the same ciphertexts (the caller then runs
        the nodes one by one)."""
        L = self.layout
        if L is None or len(parts) < 2 or not all(self.is_ct(x) for x, _, _ in parts):
            return None
        x0 = parts[0][0]
        Ws, toks = [], []
        for x, W, _ in parts:
            W = np.asarray(W, dtype=np.float64)
            while W.ndim > 2 and W.shape[0] == 1:
                W = W[0]
            tok = L.hm_tokens(x.smap)
            if (W.ndim != 2 or tok is None or tok.ndim != 2 or x.shape[-1] != W.shape[0]
                    or len(x.cts) != len(x0.cts) or any(c is not d for c, d in zip(x.cts, x0.cts))):
                return None
            Ws.append(W)
            toks.append(tok)
        K, M = Ws[0].shape
        if any(W.shape != (K, M) for W in Ws):
            return None
        alltok = np.concatenate(toks, axis=1)
        if len(set(alltok.reshape(-1).tolist())) != alltok.size:
            return None
        # the slices' ciphertexts as one tensor with all their tokens (a refresh must keep every slice's slots)
        whole = PackedTensor(list(x0.cts), L.hidden_major(alltok, K), x0.support.copy())
        self._ensure(whole)
        cts = whole.cts
        n_in, n_out = L.n_ct(K), L.n_ct(M)
        masks = []
        for tok in toks:
            tm = np.zeros(L.S_blk)
            tm[np.unique(tok)] = 1.0
            masks.append(tm)
        outs = self._diagonal_pass(cts, Ws, masks, n_in, n_out)
        self.counts["matmul_pt"] += 1
        self.counts["token_split_linear"] += 1
        res = PackedTensor(outs, L.hidden_major(alltok, M), None)
        res.support = self._keep(res)
        if any(b is not None for _, _, b in parts):
            bias = np.concatenate([np.broadcast_to(np.zeros(M) if b is None else np.asarray(b, dtype=np.float64),
                                                   (1, tok.shape[1], M)) for (_, _, b), tok in zip(parts, toks)],
                                  axis=1)
            res = self._with_plain(res, bias, "add")
        return res

    def _pairs(self, tq, sets):
        """Pair diagonal sets r and r + D: with the queries at block slots ``tq``, a copy shifted by D tokens
        lands on free slots (``tq + D`` misses ``tq`` and stays in the block, ``tq - D`` misses ``tq``), so one
        product serves both sets (see :meth:`_scores`). Returns (D, groups of one or two sets)."""
        L = self.layout
        tq = np.asarray(tq)
        D = int(tq.max() - tq.min()) + 1
        A, B, C = set(tq.tolist()), set((tq + D).tolist()), set(((tq - D) % L.S_blk).tolist())
        if max(B) >= L.S_blk or A & B or A & C:
            return 0, [[r] for r in sets]
        have, done, groups = set(sets), set(), []
        for r in sets:
            if r in done:
                continue
            if r + D in have and r + D not in done:
                groups.append([r, r + D])
                done |= {r, r + D}
            else:
                groups.append([r])
                done.add(r)
        return D, groups

    def _scores(self, q: PackedTensor, k: PackedTensor, heads: int, dh: int, tq) -> PackedTensor:
        """Scores by token shifts: for every shift r, Q * rot(K, r tokens) summed over each head's dh blocks
        (rotate-and-sum) -> diagonal set r at the head's first block, query token slots.

        Sets r and r + D share one product: with Q' = Q + Q shifted D slots up (free slots: padding or other
        queries' places, see :meth:`_pairs`), Q' * rot(K, r) holds set r at the query slots and set r + D
        D slots up; one rotate-and-sum, then set r + D is moved down. Each result also holds the other set's scores
        on the free slots (marked in the support)."""
        L = self.layout
        if dh & (dh - 1) or L.hp % dh:
            raise SimulationError(f"attention head size {dh} must be a power of two dividing the {L.hp} blocks "
                                  "per ciphertext")
        if not (self.is_clean(q) and self.is_clean(k)):
            raise SimulationError("attention scores need Q and K with zero padding slots")
        if any(L.shift_reads_neighbour(tq, r) for r in L.diag_sets(tq)):  # compact blocks
            return self._scores_masked(q, k, heads, dh, tq)
        self._ensure(q)
        self._ensure(k)
        e = self.engine
        n_ct = L.n_ct(heads * dh)
        S, S_blk = L.S, L.S_blk
        tok = np.arange(self.slots) % S_blk
        qmask = np.isin(tok, np.asarray(tq))
        sets = L.diag_sets(tq)
        valid = {r: qmask & (tok + r >= 0) & (tok + r < S) for r in sets}
        D, groups = self._pairs(tq, sets)
        out = {}
        for c in range(n_ct):
            q2 = e.add(q.cts[c], e.rotate(q.cts[c], -D)) if any(len(g) == 2 for g in groups) else None
            for g in groups:
                p = e.mul(*self._align(q.cts[c] if len(g) == 1 else q2, e.rotate(k.cts[c], g[0])))
                p, _ = self._head_blocks(p, dh)
                if len(g) == 1:
                    out[g[0], c] = (p, valid[g[0]])
                else:
                    both = valid[g[0]] | np.roll(valid[g[1]], D)
                    out[g[0], c] = (p, both)
                    out[g[1], c] = (e.rotate(p, D), np.roll(both, -D))
        cts = [out[r, c][0] for r in sets for c in range(n_ct)]
        sup = [out[r, c][1] for r in sets for c in range(n_ct)]
        self.counts["matmul_ct"] += 1
        return PackedTensor(cts, L.diag_map(heads, dh, tq), np.array(sup))

    def _token_sum_masked(self, a: PackedTensor, t0: int, t1: int) -> PackedTensor:
        """:meth:`_token_sum_replicated` for blocks shorter than the centred window (compact blocks,
        ``2 (t1 - t0) >= S_blk``), where any window sum that covers a block's tokens from every token slot also
        reaches a neighbour block's tokens: a one-sided rotate-and-sum over ``[t0, t1]`` leaves the block's total
        exact at slot ``t0`` only, a plaintext mask keeps that slot (one level: the price of the compact blocks
        on this path), and a rotate-and-sum the other way copies it to the slots ``t0..t1`` of its own block (the
        previous block's total is ``S_blk > t1 - t0`` slots away). Same result, replicas and support as the
        centred window: clean outside the token slots."""
        L, e = self.layout, self.engine
        n = t1 - t0 + 1
        self._ensure(a, 1)
        lv = self.level(a)
        mask = np.tile(np.arange(L.S_blk) == t0, self.slots // L.S_blk).astype(np.float64)
        key = ("token_sum_mask", L.S_blk, t0)
        cts, sup = [], []
        for c, s in zip(a.cts, a.support):
            w, ws = self._rotsum(e.level_down(c, lv), s, 1, n)  # x(p) + ... + x(p + n - 1): the total at t0
            w = e.rescale(e.mul_plain_raw(w, e.plain(key, lambda: mask, lv, "mul")))
            w, ws = self._rotsum(w, ws & (mask != 0), -1, n)  # x(p) + x(p - 1) + ... + x(p - n + 1)
            cts.append(w)
            sup.append(ws)
        H = a.shape[2]
        res = PackedTensor(cts, L.hidden_major(np.full((1, 1), t0), H), np.array(sup))
        res.meta[TOKEN_REPLICAS] = {i: tuple(range(t0, t1 + 1)) for i in range(len(cts))}
        self.counts["token_sum_replicated"] += 1
        self.counts["token_sum_masked"] += 1
        return res

    def _scores_masked(self, q: PackedTensor, k: PackedTensor, heads: int, dh: int, tq) -> PackedTensor:
        """:meth:`_scores` for compact blocks (``S <= S_blk < 2 S - 1``), where K shifted by ``r`` tokens reads a
        neighbour block's tokens at some query slots: each shifted key is multiplied by the plaintext mask of
        set ``r``'s valid (query, key) slots before the product (one ct x pt and one level on K; Q is brought to
        that level once per ciphertext, so the products and the head sums run one level lower). Every set gets
        its own product (no pairing: a shifted copy of Q has no free slots in a compact block). The result is
        exact and zero outside the valid slots, as :meth:`_scores`' (the supports are derived, not assumed)."""
        L, e = self.layout, self.engine
        self._ensure(k, 2)
        self._ensure(q, 1)
        lk = self.level(k) - 1  # the masked keys' level
        lv = min(self.level(q), lk)
        n_ct = L.n_ct(heads * dh)
        S, S_blk = L.S, L.S_blk
        tok = np.arange(self.slots) % S_blk
        qmask = np.isin(tok, np.asarray(tq))
        sets = L.diag_sets(tq)
        key = ("scores_mask", S, S_blk, tuple(int(t) for t in tq))
        cts, sup = {}, {}
        for c in range(n_ct):
            qc = e.level_down(q.cts[c], lv)
            for r in sets:
                valid = qmask & (tok + r >= 0) & (tok + r < S)
                kr = e.rotate(k.cts[c], r)
                kr = e.rescale(e.mul_plain_raw(kr, e.plain((key, r), lambda v=valid: v.astype(np.float64), lk + 1,
                                                           "mul")))
                p = e.mul(qc, e.level_down(kr, lv))
                p, s = self._head_blocks(p, dh, 1, q.support[c] & np.roll(k.support[c], -r) & valid)
                cts[r, c], sup[r, c] = p, s
        self.counts["matmul_ct"] += 1
        self.counts["scores_masked"] += 1
        return PackedTensor([cts[r, c] for r in sets for c in range(n_ct)], L.diag_map(heads, dh, tq),
                            np.array([sup[r, c] for r in sets for c in range(n_ct)]))

    def _diag_queries(self, p: PackedTensor, heads: int, dh: int):
        """Query token offsets of a diagonal-layout ``[1, heads, Sq, S]`` tensor, or None."""
        L = self.layout
        if p.smap.ndim != 4 or p.smap.shape[:2] != (1, heads) or p.smap.shape[3] != L.S:
            return None
        tq = tuple(int(x) for x in (p.smap[0, 0, :, 0] % self.slots) % L.S_blk)
        if not np.array_equal(p.smap % self.slots, L.diag_map(heads, dh, tq) % self.slots):
            return None
        return tq

    def _head_blocks(self, c, dh: int, direction: int = 1, sup=None):
        """Doubling rotate-and-sum over a head's ``dh`` blocks (log2 dh rotations). ``direction`` 1 sums blocks
        b .. b + dh - 1 into block b (a head's partial products into its first block); -1 copies block b into
        blocks b .. b + dh - 1 when they hold zeros (a replication over the head). ``sup``, if given, is the
        support, moved by the same steps; returns ``(ciphertext, support)``."""
        return self._doubling(c, direction * self.layout.S_blk, dh, sup=sup)

    def _doubling(self, c, unit: int, n: int, sup=None):
        """``c + rot(c, unit) + rot(c, 2 unit) + ...`` by doubling: ceil(log2 n) rotations by ``unit``, ``2 unit``,
        ``4 unit``, ... (n a power of two: every slot p gets the sum of p, p + unit, ..., p + (n-1) unit).
        ``sup``, if given, is the support, moved by the same steps; returns ``(ciphertext, support)``."""
        e, step = self.engine, 1
        while step < n:
            c = e.add(c, e.rotate(c, step * unit))
            if sup is not None:
                sup = sup | np.roll(sup, -step * unit)
            step *= 2
        return c, sup

    def _probs_v_result(self, acc, folded, D: int, tqa, heads: int, dh: int) -> PackedTensor:
        """The tail of probs @ V (both score layouts): a paired ciphertext's partner sums folded down D slots, the
        hidden-major context tensor, its support widened by +-D where partial sums were left on free slots."""
        e, L = self.engine, self.layout
        acc = [e.add(a, e.rotate(a, D)) if f else a for a, f in zip(acc, folded)]
        self.counts["matmul_ct"] += 1
        full = L.hidden_major(tqa, heads * dh).reshape(len(tqa), heads, dh).transpose(1, 0, 2)[None]
        res = PackedTensor(acc, np.ascontiguousarray(full), None)
        res.support = self._keep(res)
        for c, f in enumerate(folded):
            if f:  # partial sums on the free slots tq + D and tq - D of every block
                res.support[c] |= np.roll(res.support[c], D) | np.roll(res.support[c], -D)
        return res

    def _probs_v(self, p: PackedTensor, v: PackedTensor, heads: int, dh: int, tq) -> PackedTensor:
        """ctx = sum_r rep(P_r) * rot(V, r tokens); rep copies each head's first block to its dh blocks.

        Sets r and r + D (:meth:`_pairs`) share one rep and one product: P_{r+D} moved D slots up (free slots)
        next to P_r, times rot(V, r), holds set r + D's products D slots up (V shifted by r there is V shifted
        by r + D at the queries); the sum is folded down once per ciphertext at the end. The free slots of the
        result then hold partial sums (marked in the support; the next linear map's diagonals zero them)."""
        L = self.layout
        if not (self.is_clean(p) and self.is_clean(v)):
            raise SimulationError("probs @ V needs the probabilities masked (zero outside their slots; the "
                                  "graph's mask multiplication does it) and V with zero padding")
        self._ensure(p)
        self._ensure(v)
        e = self.engine
        n_ct = L.n_ct(heads * dh)
        ct_of = p.smap[0] // self.slots  # [heads, Sq, S]
        tqa = np.asarray(tq)
        sets = L.diag_sets(tq)
        D, groups = self._pairs(tq, sets)
        acc = [None] * n_ct
        folded = [False] * n_ct
        for c in range(n_ct):
            hs = [h for h in range(heads) if (h * dh) // L.hp == c]
            if not hs:
                continue
            where = {}
            for r in sets:
                qi = [i for i, t in enumerate(tqa) if 0 <= t + r < L.S]
                if not qi:
                    continue
                which = {int(ct_of[h, i, tqa[i] + r]) for h in hs for i in qi}
                if len(which) != 1:
                    raise SimulationError("probs @ V: a diagonal of the probabilities is spread over several "
                                          "ciphertexts")
                where[r] = which.pop()
            for g in groups:
                g = [r for r in g if r in where]
                if not g:
                    continue
                if len(g) == 2:
                    rep = e.add(p.cts[where[g[0]]], e.rotate(p.cts[where[g[1]]], -D))
                    folded[c] = True
                else:
                    rep = p.cts[where[g[0]]]
                rep, _ = self._head_blocks(rep, dh, -1)
                t = e.mul(*self._align(rep, e.rotate(v.cts[c], g[0])))
                acc[c] = t if acc[c] is None else e.add(*self._align(acc[c], t))
        return self._probs_v_result(acc, folded, D, tqa, heads, dh)

    # ---- compact diagonal scores (every block of a ciphertext holds a score set) -------------------------------
    # The diagonal layout (diag_map) keeps set r of a head in the head's first block of a ciphertext set: for
    # MiniLM (64 blocks, 2 heads per ciphertext) 2 of 64 blocks are used, and the attention's element-wise run
    # (CGF statistics, exp polynomial, squarings: ~9 ct x ct per set) pays ~30x the ct x ct it needs. The compact
    # layout (Layout.compact_map) puts one head's sets in all hp blocks of its own ciphertexts: 87 sets x 12 heads
    # in 24 ciphertexts instead of 87 x 6 = 522 at 44 tokens. It costs one plaintext mask (a level) where the
    # scores and the statistics' q' kbar are compacted and one where probs @ V takes a set out again, plus a
    # rotation per set and ciphertext; a sum over the keys becomes a cyclic rotate-and-sum over the blocks that
    # leaves the total in every block (period S_blk), which meets every set without a replication.
    def _compact_ok(self, dh: int) -> bool:
        L = self.layout
        return bool(self.compact_scores and L is not None and L.hp >= 2 and dh >= 1 and not dh & (dh - 1)
                    and L.hp % dh == 0)

    def _mask_pt(self, m: np.ndarray, level: int):
        return self.engine.plain(("mask", _fingerprint(m)), lambda: m, level, "mul")

    def _scores_compact(self, q: PackedTensor, k: PackedTensor, heads: int, dh: int, tq) -> PackedTensor:
        """:meth:`_scores` (the same paired products and head sums), then every set is moved to its compact block
        (one rotation per set and ciphertext, the same for all heads of the ciphertext) and masked to its valid
        query slots (a ct x pt per set and head: one level), the masked products of a compact ciphertext summed
        before one rescale. Exact zeros outside the valid (query, key) slots."""
        L = self.layout
        if not (self.is_clean(q) and self.is_clean(k)):
            raise SimulationError("attention scores need Q and K with zero padding slots")
        self._ensure(q, 2)
        self._ensure(k, 2)
        e = self.engine
        n_ct = L.n_ct(heads * dh)
        S, S_blk, hp = L.S, L.S_blk, L.hp
        tqa = np.asarray(tq)
        sets = L.diag_sets(tq)
        i0 = int(tqa.max())
        n_g = L.compact_groups(tq)
        D, groups = self._pairs(tq, sets)
        acc: dict = {}
        sup = np.zeros((heads * n_g, self.slots), dtype=bool)
        for c in range(n_ct):
            hs = [h for h in range(heads) if (h * dh) // hp == c]
            q2 = e.add(q.cts[c], e.rotate(q.cts[c], -D)) if any(len(g) == 2 for g in groups) else None
            for g in groups:
                p = e.mul(*self._align(q.cts[c] if len(g) == 1 else q2, e.rotate(k.cts[c], g[0])))
                p, _ = self._head_blocks(p, dh)
                for j, r in enumerate(g):
                    i = r + i0
                    vs = tqa[(tqa + r >= 0) & (tqa + r < S)]
                    if not len(vs):
                        continue
                    move = (i % hp) * S_blk - j * D  # set j of the pair sits j * D slots up
                    pr = e.rotate(p, -move)
                    for h in hs:
                        ci, b = L.compact_pos(h, dh, i, n_g)
                        m = np.zeros(self.slots)
                        m[b * S_blk + vs] = 1.0
                        term = e.mul_plain_raw(pr, self._mask_pt(m, e.level(pr)))
                        acc[ci] = term if ci not in acc else e.add(acc[ci], term)
                        sup[ci] |= m != 0
        lv = e.level(next(iter(acc.values())))
        cts = [e.rescale(acc[ci]) if ci in acc else e.zeros(lv - 1) for ci in range(heads * n_g)]
        self.counts["matmul_ct"] += 1
        self.counts["compact_scores"] += 1
        return PackedTensor(cts, L.compact_map(heads, dh, tq), sup)

    def _query_times_vector_compact(self, q: PackedTensor, v: PackedTensor, heads: int, dh: int,
                                    tq) -> PackedTensor:
        """:meth:`_query_times_vector` for compact scores: each head's sum masked out of its ciphertext (one
        level, as the compact scores) and summed cyclically over the blocks, so every block holds it
        (``period = S_blk``) and it meets every compact set slot-wise."""
        L = self.layout
        n_ct = L.n_ct(heads * dh)
        reps = v.meta.get(TOKEN_REPLICAS, {})
        if len(v.cts) != n_ct or any(not set(tq) <= set(reps.get(i, ())) for i in range(n_ct)):
            raise SimulationError(f"encrypted MatMul {list(q.shape)} x {list(v.shape)}: the vector is not "
                                  "replicated over the query tokens (only a sum over the tokens of a hidden-major "
                                  "tensor is)")
        if not self.is_clean(q):
            raise SimulationError("a query x vector product needs the queries with zero padding slots")
        self._ensure(q, 2)
        self._ensure(v, 2)
        e = self.engine
        S_blk, hp = L.S_blk, L.hp
        tqa = np.asarray(tq)
        cts, sup = [None] * heads, [None] * heads
        for c in range(n_ct):
            hs = [h for h in range(heads) if (h * dh) // hp == c]
            if not hs:
                continue
            p = e.mul(*self._align(q.cts[c], v.cts[c]))
            p, _ = self._head_blocks(p, dh)
            for h in hs:
                m = np.zeros(self.slots)
                m[((h * dh) % hp) * S_blk + tqa] = 1.0
                x = e.rescale(e.mul_plain_raw(p, self._mask_pt(m, e.level(p))))
                cts[h], sup[h] = self._rotsum(x, m != 0, S_blk, hp)
        h = np.arange(heads)[:, None, None]
        smap = (h * self.slots + ((h * dh) % hp) * S_blk + tqa[None, :, None])[None].astype(np.int64)
        self.counts["matmul_ct"] += 1
        return PackedTensor(cts, smap, np.array(sup), period=S_blk)

    def _reduce_blocks_cyclic(self, a: PackedTensor, axes, keepdims: bool) -> PackedTensor | None:
        """Sum over the last axis of a ``[1, heads, Sq, S]`` tensor whose elements of an output all sit at one
        slot offset inside the blocks (compact scores): add the output's ciphertexts, then a cyclic
        rotate-and-sum over all ``hp`` blocks, which leaves the total in every block (``period = S_blk``). Exact
        when every other slot of that offset in those ciphertexts is known zero (the support); else None."""
        L = self.layout
        if (L is None or L.hp < 2 or a.smap.ndim != 4 or list(axes) != [3] or a.alias is not None or a.period
                or a.shape[3] < 2):
            return None
        S_blk, hp = L.S_blk, L.hp
        G = a.smap[0].reshape(-1, a.shape[3])
        off = (G % self.slots) % S_blk
        if np.any(off != off[:, :1]):
            return None
        blocks = (G % self.slots) // S_blk
        if np.all(blocks == blocks[:, :1]):
            return None  # one block per output (the diagonal layout): adding ciphertexts is the whole sum
        cts_of = G // self.slots
        # outputs whose ciphertexts overlap add the union of them (each must be zero at the others' slots)
        pairs = [(int(row[0]), int(c)) for row in cts_of for c in row[1:]]
        comp = component_labels(len(a.cts), pairs)
        members: dict = {}
        for c in range(len(a.cts)):
            members.setdefault(comp[c], []).append(c)
        csets = [tuple(members[comp[int(row[0])]]) for row in cts_of]
        grid = np.arange(hp) * S_blk
        for o, cs in enumerate(csets):
            if len(set(G[o].tolist())) != G.shape[1]:
                return None
            for c in cs:
                g = c * self.slots + off[o, 0] + grid
                if np.any(a.support[c, g % self.slots] & ~np.isin(g, G[o])):
                    return None
        self._ensure(a, 0)
        e = self.engine
        index: dict = {}
        res_cts, res_sup = [], []
        o_group = np.empty(len(csets), dtype=np.int64)
        for o, cs in enumerate(csets):
            if cs not in index:
                index[cs] = len(res_cts)
                c = e.add_many([a.cts[j] for j in cs])
                cc, ss = self._rotsum(c, np.any(a.support[list(cs)], axis=0), S_blk, hp)
                res_cts.append(cc)
                res_sup.append(ss)
            o_group[o] = index[cs]
        H, Sq = a.shape[1], a.shape[2]
        smap = (o_group * self.slots + G[:, 0] % self.slots).reshape(1, H, Sq, 1)
        alias = None
        if keepdims:
            alias = (np.broadcast_to(o_group.reshape(1, H, Sq, 1), a.shape) * self.slots
                     + a.smap % self.slots).astype(np.int64)
        else:
            smap = smap.reshape(1, H, Sq)
        self.counts["reduce_blocks_cyclic"] += 1
        return PackedTensor(res_cts, smap.astype(np.int64), np.array(res_sup), alias=alias, period=S_blk)

    def _compact_queries(self, p: PackedTensor, heads: int, dh: int):
        """(query token offsets, ciphertext of each (head, group)) of compact diagonal scores, or None."""
        L = self.layout
        if not self._compact_ok(dh) or p.smap.ndim != 4 or p.smap.shape[:2] != (1, heads) or p.smap.shape[3] != L.S:
            return None
        tq = tuple(int(x) for x in (p.smap[0, 0, :, 0] % self.slots) % L.S_blk)
        want = L.compact_map(heads, dh, tq)
        if not np.array_equal(p.smap % self.slots, want % self.slots):
            return None
        n_g = L.compact_groups(tq)
        ct_of = p.smap[0] // self.slots
        want_ct = want[0] // self.slots
        where = np.full(heads * n_g, -1, dtype=np.int64)
        for w, c in zip(want_ct.reshape(-1).tolist(), ct_of.reshape(-1).tolist()):
            if where[w] not in (-1, c):
                return None
            where[w] = c
        return tq, where

    def _probs_v_compact(self, p: PackedTensor, v: PackedTensor, heads: int, dh: int, tq,
                         where: np.ndarray) -> PackedTensor:
        """ctx = sum_r rep(P_r) * rot(V, r tokens) on compact probabilities: set r of each head of a V ciphertext
        masked out of its compact block (a ct x pt per set and head: one level; the mask also drops whatever
        the element-wise run left on unused slots), the heads' sets added, replicated over ``dh`` blocks from
        the set's block, rotated back to the heads' own blocks (one rotation by whole blocks) and multiplied by V
        rotated by r tokens (the scores' rotation steps: no Galois key of its own). Sets r and r + D are paired as
        in :meth:`_probs_v` (one replication and product for both). (Rotating V by r tokens and the block offset
        at once and the products back once per offset costs as many rotations and ~one Galois key per set
        more.)"""
        L = self.layout
        if not self.is_clean(v):
            raise SimulationError("probs @ V needs V with zero padding slots")
        self._ensure(p, 2)
        self._ensure(v)
        e = self.engine
        n_ct = L.n_ct(heads * dh)
        S, S_blk, hp = L.S, L.S_blk, L.hp
        tqa = np.asarray(tq)
        sets = L.diag_sets(tq)
        i0 = int(tqa.max())
        n_g = L.compact_groups(tq)
        D, groups = self._pairs(tq, sets)
        acc = [None] * n_ct
        folded = [False] * n_ct
        for c in range(n_ct):
            hs = [h for h in range(heads) if (h * dh) // hp == c]
            if not hs:
                continue
            for g in groups:
                parts = []
                for j, r in enumerate(g):
                    i = r + i0
                    vs = tqa[(tqa + r >= 0) & (tqa + r < S)]
                    if not len(vs):
                        continue
                    terms = []
                    for h in hs:
                        ci, b = L.compact_pos(h, dh, i, n_g)
                        m = np.zeros(self.slots)
                        m[b * S_blk + vs] = 1.0
                        pc = p.cts[where[ci]]
                        terms.append(e.mul_plain_raw(pc, self._mask_pt(m, e.level(pc))))
                    parts.append((j, i, e.rescale(e.add_many(terms))))
                if not parts:
                    continue
                j0, ib, rep = parts[0]
                for j, i, x in parts[1:]:  # the partner: to the first set's block, j * D slots up
                    rep = e.add(rep, e.rotate(x, -(((ib - i) % hp) * S_blk + (j - j0) * D)))
                    folded[c] = True
                rep, _ = self._head_blocks(rep, dh, -1)
                b = ib % hp
                rep = e.rotate(rep, b * S_blk) if b else rep  # back to the heads' own blocks
                t = e.mul(*self._align(rep, e.rotate(v.cts[c], g[j0])))  # rot(V, r): the scores' Galois key
                acc[c] = t if acc[c] is None else e.add(*self._align(acc[c], t))
        return self._probs_v_result(acc, folded, D, tqa, heads, dh)

    # ---- data movement -----------------------------------------------------------------------------------------
    def rearrange(self, fn, args, ct_positions):
        vals = list(args)
        cts, sups = [], []
        periods = {args[i].period for i in ct_positions}
        reps = {}  # by the index in the concatenated ciphertext list
        period = periods.pop() if len(periods) == 1 else 0  # a per-ciphertext property: kept by re-indexing
        for i in ct_positions:
            t = args[i]
            vals[i] = t.smap + len(cts) * self.slots
            reps.update({len(cts) + k: r for k, r in t.meta.get(TOKEN_REPLICAS, {}).items()})
            cts.extend(t.cts)
            sups.append(t.support)
        support = np.concatenate(sups, 0)
        outs = fn(*vals)
        res = []
        for o in outs:
            o = np.asarray(o).astype(np.int64)
            if o.ndim == 0 or o.shape[0] != 1:
                raise SimulationError(f"data movement produced shape {list(o.shape)}: axis 0 (the example) must "
                                      "stay")
            used = np.unique(o // self.slots)
            remap = np.full(len(cts), -1, dtype=np.int64)
            remap[used] = np.arange(len(used))
            smap = remap[o // self.slots] * self.slots + o % self.slots
            t = PackedTensor([cts[i] for i in used], smap, support[used], period=period)
            if reps:  # per-ciphertext facts: kept by re-indexing
                t.meta = reindex_replicas({TOKEN_REPLICAS: reps}, used)
            if len(ct_positions) > 1:  # a Concat: token pieces of one hidden-major tensor are merged
                t = self._merge_token_pieces(t)
            res.append(t)
        return res

    def _merge_token_pieces(self, t: PackedTensor) -> PackedTensor:
        """A Concat on the token axis of hidden-major pieces (e.g. a LayerNorm's row 0 and the other rows, each
        from its own linear map: ``--ln-cls-scale``, :class:`cgf_fhe.fold.CentringDense`): every element already
        sits at its hidden-major slot, only in different ciphertexts. Adding the pieces' ciphertexts of each
        hidden group gives the hidden-major tensor (one addition per extra piece, no rotation, no level) when no
        piece holds a possibly non-zero value at another piece's element slots (the support says so); otherwise
        the tensor is left as it is."""
        L = self.layout
        if L is None or t.smap.ndim < 2 or t.smap.shape[-1] == 0:
            return t
        slot = t.smap % self.slots
        tok = slot[..., 0]
        if np.any(tok >= L.S_blk):
            return t
        want = L.hidden_major(tok, t.smap.shape[-1])
        if np.array_equal(t.smap, want) or not np.array_equal(slot, want % self.slots):
            return t
        src, dst = (t.smap // self.slots).reshape(-1), (want // self.slots).reshape(-1)
        flat = slot.reshape(-1)
        n_dst = int(dst.max()) + 1
        groups = [sorted(set(src[dst == k].tolist())) for k in range(n_dst)]
        for k, g in enumerate(groups):
            for j in g:
                others = flat[(dst == k) & (src != j)]
                if np.any(t.support[j, others]):
                    return t
        e = self.engine
        cts, sup = [], []
        for g in groups:
            lv = min(e.level(t.cts[j]) for j in g)
            parts = [e.level_down(t.cts[j], lv) for j in g]
            cts.append(e.add_many(parts) if len(parts) > 1 else parts[0])
            sup.append(np.any(t.support[g], axis=0))
        self.counts["concat_merge"] += 1
        return PackedTensor(cts, want.astype(np.int64), np.array(sup))

    def describe(self) -> dict:
        d = super().describe()
        e = self.engine
        d.update({"engine": e.name, "layout": None if self.layout is None else vars(self.layout),
                  "rotation_steps": len(e.steps), "refreshed_ciphertexts": self.refreshed_ciphertexts})
        if isinstance(e, SealEngine):
            d.update({"server_has_secret_key": e.has_secret_key, "bytes_to_server": e.bytes_in,
                      "bytes_from_server": e.bytes_out, "galois_keys": len(e.key_steps)})
        return d


__all__ = ["PackedBackend", "NumpyEngine", "SealEngine", "SealClient", "galois_elt", "norm_step", 
           "calibrate_rotation_noise", "measure_op_ms"]
