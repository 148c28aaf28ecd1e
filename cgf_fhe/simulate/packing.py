"""Slot maps for the packed (``seal``) backend: one example per pass, its tokens x hidden in as few ciphertexts as
the slots allow.

A packed tensor is a list of ciphertexts plus a **slot map**: an int64 array of the tensor's logical shape
(``[1, ...]``, axis 0 is the single example) holding the *global slot* ``ct * slots + slot`` of every element.
Data movement (Reshape, Transpose, Gather, Slice, ...) only re-indexes the slot map: no ciphertext operation.
Two elements may share a slot (the same value, e.g. after a broadcast).

Layouts used by the arithmetic (checked against the slot map before every packed op; a node whose operands are
not in a layout the op can handle is refused, naming the node):

* **hidden-major** ``[1, S, H]`` (the embeddings, every linear layer's output): hidden unit ``k`` sits in
  ciphertext ``k // hp``, block ``k % hp``; a block is ``S_blk`` consecutive slots holding the tokens. ``S_blk``
  is a power of two >= 2 S (the second half of a block is zero padding, so a token shift by +-r < S reads zeros
  outside the sequence) or, above :data:`COMPACT_ABOVE` tokens, the power of two >= S (compact blocks: half the
  ciphertexts; a shift may then read a neighbour block's tokens, which the scores mask) and ``hp * S_blk =
  slots``: rotating a ciphertext by ``d * S_blk`` moves hidden units cyclically inside it (the diagonal method).
* **diagonal scores** ``[1, heads, S, S]``: score ``(h, s, t)`` is in the *diagonal set* ``r = t - s`` (2S - 1
  sets), at the slot of token ``s`` of head ``h``'s first hidden block. Reducing over keys adds ciphertexts of
  different sets (no rotation), probs @ V multiplies each set with V shifted by r tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import SimulationError


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Layout.choose("auto"): compact blocks (S_blk >= S, masked wrap-around) above this many tokens, doubled blocks
# (S_blk >= 2 S) up to it. Set from dry-run estimates of the MiniLM-shaped lean-b export (docs/seal_packed.md).
COMPACT_ABOVE = 64


@dataclass(frozen=True)
class Layout:
    """Geometry of one example's packing: ``S`` tokens, ``H`` hidden units, ``slots`` per ciphertext."""

    slots: int
    S: int
    H: int
    S_blk: int
    hp: int  # hidden units (blocks) per ciphertext

    @classmethod
    def choose(cls, slots: int, S: int, H: int, blocks: str = "auto") -> "Layout":
        """``blocks``: "double" -- ``S_blk`` the power of two >= 2 S (token shifts never wrap into a neighbour
        block); "compact" -- the power of two >= S (half the ciphertexts per activation; shifts that wrap are
        masked, see :attr:`wraps`); "auto" -- compact above :data:`COMPACT_ABOVE` tokens (where the dry-run
        estimate says it wins), else double. Never fewer slots per block than ``slots / next_pow2(H)``."""
        if blocks not in ("auto", "double", "compact"):
            raise SimulationError(f"unknown block choice {blocks!r}: auto, double or compact")
        floor = slots // next_pow2(H) if H <= slots else 1
        double, compact = max(next_pow2(2 * S), floor), max(next_pow2(S), floor)
        if blocks == "auto":
            blocks = "compact" if S > COMPACT_ABOVE or double > slots else "double"
        s_blk = compact if blocks == "compact" else double
        if s_blk > slots:
            raise SimulationError(f"{S} tokens need blocks of {s_blk} slots but a ciphertext has "
                                  f"{slots}: use a larger --poly-modulus or a shorter --max-length")
        return cls(slots, S, H, s_blk, slots // s_blk)

    @property
    def wraps(self) -> bool:
        """Blocks shorter than 2 S - 1 slots: a token shift by +-r < S can read a neighbour block's tokens (the
        compact blocks), so the scores mask each shifted key and a token sum replicated over the tokens costs a
        mask level (seal_packed.PackedBackend._scores_masked, _token_sum_masked)."""
        return self.S_blk < 2 * self.S - 1

    def shift_reads_neighbour(self, tq, r: int) -> bool:
        """Whether shifting by ``r`` tokens reads another block's token slot at any query offset in ``tq``."""
        o = np.asarray(tq) + int(r)
        return bool(np.any(((o < 0) | (o >= self.S)) & (o % self.S_blk < self.S)))

    def n_ct(self, width: int) -> int:
        return math.ceil(width / self.hp)

    def hidden_major(self, tokens: np.ndarray, width: int) -> np.ndarray:
        """Slot map ``tokens.shape + (width,)`` of a hidden-major tensor whose token positions are ``tokens``
        (slot offsets inside a block)."""
        k = np.arange(width)
        off = (k // self.hp) * self.slots + (k % self.hp) * self.S_blk
        return np.asarray(tokens, dtype=np.int64)[..., None] + off

    def hm_tokens(self, smap: np.ndarray) -> np.ndarray | None:
        """Token offsets of a hidden-major slot map (last axis = hidden), or None when ``smap`` is not one."""
        if smap.ndim < 1 or smap.shape[-1] == 0:
            return None
        tok = smap[..., 0]
        if np.any(tok < 0) or np.any(tok >= self.S_blk):
            return None
        if not np.array_equal(smap, self.hidden_major(tok, smap.shape[-1])):
            return None
        return tok

    def heads_hm(self, smap: np.ndarray, transposed: bool = False):
        """``[1, heads, Sq, dh]`` (or ``[1, heads, dh, Sq]`` when ``transposed``) slot map of a head split of a
        hidden-major tensor -> ``(heads, dh, token offsets)``, else None."""
        if smap.ndim != 4 or smap.shape[0] != 1:
            return None
        m = np.swapaxes(smap, 2, 3) if transposed else smap
        _, h, Sq, dh = m.shape
        tok = m[0, 0, :, 0] % self.slots
        if np.any(tok >= self.S_blk):
            return None
        full = self.hidden_major(tok, h * dh)  # [Sq, H]
        want = full.reshape(Sq, h, dh).transpose(1, 0, 2)[None]
        return (h, dh, tuple(int(t) for t in tok)) if np.array_equal(m, want) else None

    def diag_sets(self, tq) -> list[int]:
        """Token shifts r = t - s of queries at offsets ``tq`` against all S keys."""
        return list(range(-max(tq), self.S - min(tq)))

    def diag_map(self, heads: int, dh: int, tq) -> np.ndarray:
        """Slot map ``[1, heads, Sq, S]`` of diagonal scores: set of ``r = t - s`` times the ciphertexts per set,
        plus the head's ciphertext; slot = head's first block + the query's token offset."""
        tq = np.asarray(tq)
        n_ct = self.n_ct(heads * dh)
        h = np.arange(heads)[:, None, None]
        s = tq[None, :, None]
        t = np.arange(self.S)[None, None, :]
        r_idx = (t - s) + max(tq)
        ct = r_idx * n_ct + (h * dh) // self.hp
        slot = ((h * dh) % self.hp) * self.S_blk + s
        return (ct * self.slots + slot)[None].astype(np.int64)

    def compact_groups(self, tq) -> int:
        """Ciphertexts per head of compact diagonal scores (:meth:`compact_map`): ``hp`` sets per ciphertext."""
        return math.ceil(len(self.diag_sets(tq)) / self.hp)

    def compact_pos(self, h: int, dh: int, i: int, n_g: int) -> tuple[int, int]:
        """(ciphertext, block) of head ``h``'s diagonal set number ``i`` (``r = i - max(tq)``) in the compact
        layout: one ciphertext per (head, group of ``hp`` sets), set ``i`` in block ``(i + off_h) % hp`` where
        ``off_h`` is the head's first block in the hidden-major layout (so moving a score set from its head-sum
        block to its compact block is the same rotation for every head of a ciphertext)."""
        return h * n_g + i // self.hp, (i % self.hp + (h * dh) % self.hp) % self.hp

    def compact_map(self, heads: int, dh: int, tq) -> np.ndarray:
        """Slot map ``[1, heads, Sq, S]`` of **compact** diagonal scores: score ``(h, s, t)`` (set ``r = t - s``,
        number ``i = r + max(tq)``) in ciphertext ``h * n_g + i // hp``, block ``(i + off_h) % hp``, slot of query
        token ``s``: every block of a ciphertext holds one set of one head (``diag_map`` uses one block of
        ``hp``)."""
        tq = np.asarray(tq)
        n_g = self.compact_groups(tq)
        h = np.arange(heads)[:, None, None]
        s = tq[None, :, None]
        t = np.arange(self.S)[None, None, :]
        i = (t - s) + max(tq)
        ct = h * n_g + i // self.hp
        block = (i % self.hp + (h * dh) % self.hp) % self.hp
        return (ct * self.slots + block * self.S_blk + s)[None].astype(np.int64)


# PackedTensor.meta key: {ciphertext index: token slots} where each block of that ciphertext holds the same value
# at those slots (a token sum replicated over the tokens, seal_packed.PackedBackend._token_sum_replicated). Keyed
# by the index in ``cts``, not the handle: a level match or a refresh makes new handles, and a freed handle's id
# can be reused. Kept by refresh (the client keeps the replicas) and by data movement (re-indexed with
# :func:`reindex_replicas`); dropped by arithmetic except negation (a plaintext factor is written at the slot map
# only).
TOKEN_REPLICAS = "token_replicas"


def reindex_replicas(meta: dict, old_of_new) -> dict:
    """``meta`` for a tensor whose ciphertext ``k`` is ciphertext ``old_of_new[k]`` of the tensor ``meta`` came
    from (replicas of ciphertexts that are not taken are dropped)."""
    out = dict(meta)
    reps = meta.get(TOKEN_REPLICAS)
    if reps is not None:
        out[TOKEN_REPLICAS] = {k: reps[int(o)] for k, o in enumerate(old_of_new) if int(o) in reps}
    return out


@dataclass(eq=False)
class PackedTensor:
    """Ciphertexts (engine handles) + slot map. ``alias``: an expanded slot map where every position holds the
    value of the element it broadcasts from (a reduction replicated along the reduced axis). ``support``:
    ``[len(cts), slots]`` booleans, False where a slot is known to hold (approximately) zero -- derived from the
    operations alone, never from the data, so the dry run and the encrypted run decide identically. ``period``:
    when non-zero, every ciphertext holds the same value at slots ``p`` and ``p + j * period`` for all ``j``
    (a cyclic rotate-and-sum leaves its total in every slot of the grid): an element may meet another operand at
    any of those slots, e.g. a LayerNorm's per-token scalar ``[1, S, 1]`` times a row ``[1, S, M]`` of any width
    in the hidden-major layout (``period = S_blk``: the scalar is already in every block)."""

    cts: list
    smap: np.ndarray
    support: np.ndarray
    alias: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    period: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.smap.shape)


# ---------------------------------------------------------------------------------------------------------------
# chunks along an axis (evaluating a run of element-wise nodes one group of heads at a time)
# ---------------------------------------------------------------------------------------------------------------
def component_labels(n: int, pairs) -> list[int]:
    """Connected components of ``n`` items joined by ``pairs`` (union-find): each item's label is the smallest
    index of its component."""
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(n)]


def axis_groups(tensors, axis: int, slots: int) -> list[np.ndarray] | None:
    """Indices along ``axis`` grouped so that no ciphertext of any of ``tensors`` (slot maps and aliases) holds
    elements of two groups (the smallest such groups, in order); None when a tensor has another size there."""
    size = None
    for t in tensors:
        n = t.smap.shape[axis] if t.smap.ndim > axis else -1
        if size is None:
            size = n
        if n != size or n < 1 or (t.alias is not None and (t.alias.ndim != t.smap.ndim
                                                           or t.alias.shape[axis] != size)):
            return None
    pairs = []
    for t in tensors:
        first: dict[int, int] = {}
        for m in (t.smap, t.alias):
            if m is None:
                continue
            ct = np.moveaxis(m // slots, axis, 0).reshape(size, -1)
            for i in range(size):
                for c in np.unique(ct[i]).tolist():
                    pairs.append((i, first.setdefault(c, i)))
    groups: dict[int, list[int]] = {}
    for i, root in enumerate(component_labels(size, pairs)):
        groups.setdefault(root, []).append(i)
    return [np.array(g, dtype=np.int64) for g in groups.values()]


def take_axis(t: "PackedTensor", idx: np.ndarray, axis: int, slots: int):
    """The elements of ``t`` at ``idx`` along ``axis``: a PackedTensor holding only their ciphertexts (the same
    objects, renumbered) -> (tensor, global indices of those ciphertexts in ``t.cts``)."""
    sm = np.take(t.smap, idx, axis=axis)
    al = None if t.alias is None else np.take(t.alias, idx, axis=axis)
    maps = [sm.reshape(-1) // slots] + ([] if al is None else [al.reshape(-1) // slots])
    used = np.unique(np.concatenate(maps))
    remap = np.full(len(t.cts), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))

    def renum(m):
        return (remap[m // slots] * slots + m % slots).astype(np.int64)

    out = PackedTensor([t.cts[j] for j in used], renum(sm), t.support[used],
                       alias=None if al is None else renum(al), meta=reindex_replicas(t.meta, used),
                       period=t.period)
    return out, used


def concat_axis(parts: list, groups: list[np.ndarray], axis: int, slots: int) -> "PackedTensor":
    """Inverse of :func:`take_axis` over disjoint ``groups`` covering the axis: ciphertexts concatenated in part
    order, slot maps (and aliases, when every part has one) put back at their indices."""
    size = sum(len(g) for g in groups)
    shape = list(parts[0].smap.shape)
    shape[axis] = size
    smap = np.empty(shape, dtype=np.int64)
    with_alias = all(p.alias is not None for p in parts)
    alias = None
    if with_alias:
        ashape = list(parts[0].alias.shape)
        ashape[axis] = size
        alias = np.empty(ashape, dtype=np.int64)
    cts, sup, reps = [], [], {}
    for p, g in zip(parts, groups):
        reps.update({len(cts) + k: r for k, r in p.meta.get(TOKEN_REPLICAS, {}).items()})
        off = len(cts) * slots
        idx = [slice(None)] * len(shape)
        idx[axis] = g
        smap[tuple(idx)] = p.smap + off
        if with_alias:
            alias[tuple(idx)] = p.alias + off
        cts.extend(p.cts)
        sup.append(p.support)
    periods = {p.period for p in parts}
    meta = {k: v for k, v in parts[0].meta.items() if k != TOKEN_REPLICAS}
    if reps:
        meta[TOKEN_REPLICAS] = reps
    return PackedTensor(cts, smap, np.concatenate(sup, 0), alias=alias, meta=meta,
                        period=periods.pop() if len(periods) == 1 else 0)


# ---------------------------------------------------------------------------------------------------------------
# costs: CPU ms of one operation at N=16384 and the top of the default chain (8 data primes) on one core of this
# machine, measured with ``seal_packed.measure_op_ms(CKKSParams())`` (see docs/seal_packed.md), and sizes.
# "mul_pt" is the product alone: its plaintext's encoding is counted as "encode"; "mul_ct" includes the
# relinearisation and the rescale; "refresh" the client's decrypt + re-encrypt and both transfers.
# ---------------------------------------------------------------------------------------------------------------
MS_AT_16384 = {"mul_ct": 29.4, "mul_pt": 1.17, "rotate": 23.5, "add": 0.42, "encode": 2.84, "rescale": 4.5,
               "refresh": 50.0, "level_match": 4.5, "encrypt": 41.6, "encrypt_zero": 15.0, "decrypt": 31.0}
# the part of an operation's time that does not shrink with the primes left (encoding: the FFT over the slots;
# an encryption of zero: the public-key sampling)
MS_FIXED_AT_16384 = {"encode": 0.55, "encrypt_zero": 4.0}
TOP_LEVELS_AT_16384 = 8  # data primes of the default N=16384 chain


def op_ms(kind: str, poly_modulus: int, level: int) -> float:
    """Estimated ms of one operation at ``level`` (levels left; primes = level + 1)."""
    scale = poly_modulus / 16384
    fixed = MS_FIXED_AT_16384.get(kind, 0.0) * scale
    base = MS_AT_16384.get(kind, 1.0) * scale - fixed
    frac = (level + 1) / TOP_LEVELS_AT_16384
    if kind in ("rotate", "mul_ct"):  # key switching: ~(primes)^1.5 (measured: 0.48x at 5 primes, 0.14x at 2)
        return fixed + base * max(frac, 0.05) ** 1.5
    return fixed + base * max(frac, 0.05)


def ciphertext_bytes(poly_modulus: int, level: int) -> int:
    return 2 * poly_modulus * (level + 1) * 8


def plaintext_bytes(poly_modulus: int, level: int) -> int:
    return poly_modulus * (level + 1) * 8


def galois_key_bytes(poly_modulus: int, data_primes: int) -> int:
    """One Galois (or relinearisation) key: data_primes decomposition parts x 2 polys x (data primes + special)."""
    return data_primes * 2 * (data_primes + 1) * poly_modulus * 8


__all__ = ["Layout", "PackedTensor", "next_pow2", "COMPACT_ABOVE", "axis_groups", "take_axis", "concat_axis", "op_ms", "ciphertext_bytes", "plaintext_bytes",
           "galois_key_bytes", "MS_AT_16384"]
