"""THE table of FHE op semantics -- the executable spec -- and the one graph walk that applies it.

Every ONNX op the project emits or meets has one :class:`OpSpec` in :data:`OP_TABLE` saying whether it may touch
a ciphertext, with which operands, how many multiplicative levels it consumes, **what the interpreter does** for it
(``exec``: a function of the backend, the node and its arguments) and **what it costs** under each packing a
backend uses (``costs[packing]``: ct x pt and ct x ct multiplications, additions, rotations, as formulas of the
node's shapes). :func:`analyze` walks a graph once: it propagates *encryption taint* from the inputs declared
encrypted, checks each tainted node against the table (including the batch-axis rule below), and computes each
value's multiplicative depth and each node's costs. ``cgf-fhe check``, ``cgf-fhe report``, the simulator's
interpreter and its backends read only this table; nothing else states op semantics.

Level model (CKKS with rescaling after every multiplication):
* ``Mul``/``MatMul``/``Gemm``/``Div``-by-plaintext with a ciphertext operand consume one level, whether the
  other operand is a ciphertext (ct-ct, with relinearisation) or a plaintext (ct-pt, incl. a scalar).
* ``Pow`` with constant natural exponent k: ``ceil(log2 k)`` levels (repeated squaring).
* ``ReduceMean`` = sum then scalar ``1/n``: one level. Additions, sums, negation and data movement: none.
* A node's output depth = max depth of its encrypted inputs + its levels.

Batch axis: the examples of a batch sit on axis 0 of every encrypted tensor (in the slots, for TenSEAL); a node
that would move, merge, reduce or grow that axis is refused (shapes are inferred with a prime probe batch size,
:data:`BATCH_PROBE`).

Packings (:data:`PACKINGS`; ``report --packing``):

``element`` (what :mod:`cgf_fhe.simulate` executes with TenSEAL's batched ``CKKSTensor``): every tensor element is
one ciphertext and the examples of a batch sit in its slots. Element-wise ops cost one ciphertext op per output
element, a ``MatMul`` [M,K]x[K,N] costs M*N*K multiplications and M*N*(K-1) additions, reductions cost additions,
and no rotation is ever needed. Data movement only re-indexes ciphertexts.

``packed``: one example per pass; the last axis of every tensor is packed in the slots (a token's hidden vector is
one ciphertext, a row of attention scores is one ciphertext), every other index is a separate ciphertext:

* element-wise op: one ciphertext op per output ciphertext; an encrypted operand broadcast along the last axis
  (last dim 1) is first replicated by rotate-and-add: ``ceil(log2 d)`` rotations + additions per ciphertext;
* reduction over the last axis: rotate-and-sum, ``ceil(log2 d)`` rotations and additions per input ciphertext;
  reductions over other axes are ciphertext additions; ReduceMean adds one ct-pt mult per output ciphertext;
* MatMul/Gemm ciphertext x plaintext matrix ``[K, N]``: diagonal method with baby-step/giant-step per input
  ciphertext: ``d = max(K, N)`` diagonals, ``n1 = ceil(sqrt d)``, ``n2 = ceil(d/n1)``: ``(n1-1)+(n2-1)``
  rotations, ``d`` ct-pt mults, ``d-1`` additions;
* MatMul ciphertext x ciphertext ``[.., M, K] x [.., K, N]``: for each output row and each ``k`` the scalar
  ``a[m,k]`` is isolated (one ct-pt mask) and replicated (``ceil(log2 N)`` rotations + additions), multiplied
  with row ``k`` of the second operand (one ct-ct mult) and accumulated;
* data movement that changes the packed axis (a Transpose moving the last axis, a Reshape changing the last dim,
  Gather/Slice/Concat/Split on the last axis): one mask (ct-pt) and one rotation per element moved for a
  Transpose, per output (or input, whichever is larger) ciphertext otherwise; other data movement is free.

It is a deliberately simple, documented model (not an optimised layout); use it to compare graphs, not as an
absolute prediction.
"""
from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import GraphError, UserError
from .graph import attr as graph_attr
from .graph import input_names, numel, output_names

PACKINGS = ("element", "packed")
PACKING_ALIASES = {"slots": "element", "row": "packed"}  # the report's former names
COUNT_KEYS = ("ct_ct_mults", "ct_pt_mults", "additions", "rotations")


def packing_name(packing: str) -> str:
    """The canonical packing name (``slots`` -> ``element``, ``row`` -> ``packed``); refuses unknown ones."""
    p = PACKING_ALIASES.get(packing, packing)
    if p not in PACKINGS:
        raise UserError(f"unknown packing {packing!r}: choose one of {', '.join(PACKINGS)}")
    return p


def ciphertexts(shape, packing: str) -> int | None:
    """Ciphertexts holding a tensor of ``shape`` (batch dim 1) under ``packing``; None when the shape is unknown."""
    n = numel(shape)
    if n is None or packing == "element":
        return n
    return n // shape[-1] if shape and shape[-1] else 1


@dataclass
class NodeCtx:
    node: onnx.NodeProto
    enc: list[bool]  # per input: is it a ciphertext
    consts: list[np.ndarray | None]  # per input: constant value when known
    in_shapes: list[tuple | None]
    out_shapes: list[tuple | None]

    def attr(self, name, default=None):
        return graph_attr(self.node, name, default)


class OpExecError(UserError):
    """An op cannot be executed on these arguments (the interpreter adds the node's name)."""


@dataclass
class Exec:
    """What an op's ``exec`` receives: the backend, the node, its arguments (ciphertexts are the backend's
    objects, plaintexts numpy arrays) and ``run``, the ONNX reference implementation of the node (data movement
    and shape ops take their semantics from it)."""
    backend: object
    node: onnx.NodeProto
    args: list
    run: Callable

    def attr(self, name, default=None):
        return graph_attr(self.node, name, default)


@dataclass(frozen=True)
class OpSpec:
    op_type: str
    ct_allowed: bool
    why: str = ""  # why it is refused on a ciphertext / what it computes
    # which inputs may be ciphertexts (None = any); others must be plaintext
    ct_inputs: tuple[int, ...] | None = None
    check: Callable[[NodeCtx], str | None] | None = None  # extra condition: return a reason to refuse
    levels: Callable[[NodeCtx], int] | int = 0
    exec: Callable[[Exec], list] | None = None  # what the interpreter does on ciphertexts
    costs: dict = field(default_factory=dict)  # packing -> (NodeCtx -> Counter of COUNT_KEYS); absent = free


# ---- costs --------------------------------------------------------------------------------------------------------

def _out_numel(ctx: NodeCtx) -> int:
    n = numel(ctx.out_shapes[0] if ctx.out_shapes else None)
    return n if n is not None else 1


def _log2(d) -> int:
    return max(math.ceil(math.log2(d)), 0) if d and d > 1 else 0


def _rows(shape) -> int | None:
    return ciphertexts(shape, "packed")


def _axes(ctx: NodeCtx, rank: int) -> list[int]:
    """Reduction axes of a ReduceSum/ReduceMean (input or attribute), normalised."""
    axes = None
    if len(ctx.consts) > 1 and ctx.consts[1] is not None:
        axes = [int(a) for a in np.asarray(ctx.consts[1]).reshape(-1)]
    elif ctx.attr("axes") is not None:
        axes = list(ctx.attr("axes"))
    if not axes:
        return [] if ctx.attr("noop_with_empty_axes", 0) else list(range(rank))
    return sorted({a % rank for a in axes}) if rank else axes


def _elementwise_element(kind: str):
    def f(ctx: NodeCtx) -> Counter:
        n = _out_numel(ctx)
        if kind == "mul":
            return Counter({"ct_ct_mults" if sum(ctx.enc[:2]) == 2 else "ct_pt_mults": n})
        return Counter({"additions": n * max(sum(1 for x in ctx.node.input if x) - 1, 1)})

    return f


def _replicate_packed(ctx: NodeCtx, c: Counter) -> Counter:
    """Encrypted operands broadcast along the packed (last) axis are replicated by rotate-and-add first."""
    out = ctx.out_shapes[0] if ctx.out_shapes else None
    d_out = out[-1] if out else 1
    for s, e in zip(ctx.in_shapes, ctx.enc):
        if e and s is not None and len(s) and s[-1] == 1 and isinstance(d_out, int) and d_out > 1:
            k = (_rows(s) or 1) * _log2(d_out)
            c["rotations"] += k
            c["additions"] += k
    return c


def _elementwise_packed(kind: str):
    def f(ctx: NodeCtx) -> Counter:
        n = _rows(ctx.out_shapes[0] if ctx.out_shapes else None) or 1
        if kind == "mul":
            c = Counter({"ct_ct_mults" if sum(ctx.enc[:2]) == 2 else "ct_pt_mults": n})
        else:
            c = Counter({"additions": n * max(sum(1 for x in ctx.node.input if x) - 1, 1)})
        return _replicate_packed(ctx, c)

    return f


def _gemm_shapes(ctx: NodeCtx):
    a, b = (list(ctx.in_shapes) + [None, None])[:2]
    if ctx.node.op_type == "Gemm":
        a = a[::-1] if a is not None and ctx.attr("transA", 0) else a
        b = b[::-1] if b is not None and ctx.attr("transB", 0) else b
    return a, b


def _has_bias(ctx: NodeCtx) -> bool:
    return ctx.node.op_type == "Gemm" and len(ctx.node.input) > 2 and bool(ctx.node.input[2])


def _matmul_element(ctx: NodeCtx) -> Counter:
    a, _ = _gemm_shapes(ctx)
    out = _out_numel(ctx)
    k = a[-1] if a is not None and len(a) >= 1 and isinstance(a[-1], int) else 1
    both = sum(ctx.enc[:2]) == 2
    c = Counter({"ct_ct_mults" if both else "ct_pt_mults": out * k, "additions": out * (k - 1)})
    if _has_bias(ctx):
        c["additions"] += out
    return c


def _matmul_packed(ctx: NodeCtx) -> Counter:
    a, b = _gemm_shapes(ctx)
    c = Counter()
    if numel(a) is None or numel(b) is None or not a or not b:  # unknown (symbolic) dims: not counted
        return c
    out = ctx.out_shapes[0] if ctx.out_shapes else None
    k_dim, n_dim = a[-1], b[-1]
    if sum(ctx.enc[:2]) == 2:  # ct x ct
        lead = (numel(out[:-2]) if out is not None and len(out) > 2 else 1) or 1
        m_dim = a[-2] if len(a) >= 2 else 1
        pairs = lead * m_dim * k_dim
        c["ct_pt_mults"] += pairs
        c["rotations"] += pairs * _log2(n_dim)
        c["additions"] += pairs * _log2(n_dim) + lead * m_dim * (k_dim - 1)
        c["ct_ct_mults"] += pairs
    else:  # ct x pt: BSGS diagonal method per input ciphertext
        ct_shape = a if ctx.enc[0] else b[::-1]
        n_in = _rows(ct_shape) or 1
        d = max(k_dim, n_dim)
        n1 = math.ceil(math.sqrt(d))
        n2 = math.ceil(d / n1)
        c["rotations"] += n_in * ((n1 - 1) + (n2 - 1))
        c["ct_pt_mults"] += n_in * d
        c["additions"] += n_in * (d - 1 + (1 if _has_bias(ctx) else 0))
    return c


def _reduce_element(ctx: NodeCtx) -> Counter:
    nin = numel(ctx.in_shapes[0]) or 1
    nout = _out_numel(ctx)
    c = Counter({"additions": max(nin - nout, 0)})
    if ctx.node.op_type == "ReduceMean":
        c["ct_pt_mults"] = nout
    return c


def _reduce_packed(ctx: NodeCtx) -> Counter:
    s = ctx.in_shapes[0]
    c = Counter()
    if s is None:
        return c
    rank = len(s)
    n_in = _rows(s) or 1
    n_out = _rows(ctx.out_shapes[0] if ctx.out_shapes else None) or 1
    if rank and (rank - 1) in _axes(ctx, rank):
        k = n_in * _log2(s[-1])
        c["rotations"] += k
        c["additions"] += k
    c["additions"] += max(n_in - n_out, 0)
    if ctx.node.op_type == "ReduceMean":
        c["ct_pt_mults"] += n_out
    return c


def _pow_exponent(ctx: NodeCtx) -> int | None:
    e = ctx.consts[1] if len(ctx.consts) > 1 else None
    if e is None or e.size != 1:
        return None
    v = float(e.reshape(-1)[0])
    return int(v) if v.is_integer() and v >= 1 else None


def _pow_costs(packing: str):
    def f(ctx: NodeCtx) -> Counter:
        k = _pow_exponent(ctx) or 1
        mults = (k.bit_length() - 1) + (bin(k).count("1") - 1)  # square-and-multiply
        n = _out_numel(ctx) if packing == "element" else (_rows(ctx.out_shapes[0]) or 1)
        return Counter({"ct_ct_mults": mults * n})

    return f


def _transpose_packed(ctx: NodeCtx) -> Counter:
    s = ctx.in_shapes[0]
    perm = ctx.attr("perm") or (list(range(len(s)))[::-1] if s is not None else None)
    if s is not None and perm is not None and len(s) and perm[-1] != len(s) - 1:
        n = numel(s) or 0
        return Counter({"rotations": n, "ct_pt_mults": n, "additions": n})
    return Counter()


def _reshape_packed(ctx: NodeCtx) -> Counter:
    s, out = ctx.in_shapes[0], ctx.out_shapes[0] if ctx.out_shapes else None
    if s is not None and out is not None and (s[-1] if s else 1) != (out[-1] if out else 1):
        k = max(_rows(s) or 1, _rows(out) or 1)
        return Counter({"rotations": k, "ct_pt_mults": k})
    return Counter()


def _axis_move_packed(ctx: NodeCtx) -> Counter:
    s = ctx.in_shapes[0]
    rank = len(s) if s is not None else 0
    if ctx.node.op_type == "Slice":
        ax = ([int(a) % rank for a in np.asarray(ctx.consts[3]).reshape(-1)]
              if len(ctx.consts) > 3 and ctx.consts[3] is not None and rank else list(range(rank)))
    else:
        ax = [int(ctx.attr("axis", 0)) % rank] if rank else []
    if rank and (rank - 1) in ax:
        n_out = _rows(ctx.out_shapes[0] if ctx.out_shapes else None) or 1
        return Counter({"rotations": n_out, "ct_pt_mults": n_out})
    return Counter()


def _replicate_only(ctx: NodeCtx) -> Counter:
    return _replicate_packed(ctx, Counter())


# ---- checks and levels ----------------------------------------------------------------------------------------------

def _pow_check(ctx: NodeCtx) -> str | None:
    if len(ctx.enc) > 1 and ctx.enc[1]:
        return "the exponent is encrypted"
    e = ctx.consts[1] if len(ctx.consts) > 1 else None
    if e is None:
        return "the exponent is not a constant (only constant natural exponents are polynomial)"
    if _pow_exponent(ctx) is None:
        return f"exponent {e.reshape(-1).tolist()} is not a natural number >= 1"
    return None


def _pow_levels(ctx: NodeCtx) -> int:
    k = _pow_exponent(ctx) or 1
    return math.ceil(math.log2(k)) if k > 1 else 0


def _div_check(ctx: NodeCtx) -> str | None:
    if ctx.enc[1]:
        return "division by a ciphertext (needs an input-dependent reciprocal)"
    return None



def _gemm_check(ctx: NodeCtx) -> str | None:
    enc = ctx.enc + [False] * 3
    if enc[1]:
        return ("Gemm with an encrypted B operand: B's axis 0 (the batch of examples) would be contracted; "
                "use MatMul with a [batch, ..., K, N] right operand")
    if enc[0] and ctx.attr("transA", 0):
        return "Gemm with transA on an encrypted A would move the batch axis (examples must stay on axis 0)"
    if enc[2] and float(ctx.attr("beta", 1.0)) != 1.0:
        return (f"Gemm with an encrypted C and beta = {ctx.attr('beta', 1.0)} != 1 would cost an extra level "
                "(fold beta into C before encryption, or into the graph)")
    return None


def _where_check(ctx: NodeCtx) -> str | None:
    if ctx.enc and ctx.enc[0]:
        return ("Where with an encrypted condition: selecting by a secret condition needs a comparison, which "
                "CKKS cannot evaluate on ciphertexts")
    return ("Where selects between encrypted values by a plaintext condition, which the FHE op table does not "
            "implement: rewrite it as cond * x + (1 - cond) * y (Mul/Add/Sub are allowed)")


def _cast_check(ctx: NodeCtx) -> str | None:
    to = ctx.attr("to")
    if to not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        return f"cast of a ciphertext to non-float type {onnx.TensorProto.DataType.Name(to)}"
    return None

# ---- what the interpreter does (exec) ------------------------------------------------------------------------------

def _x_pass(x: Exec) -> list:
    return [x.args[0]] + [None] * (len(x.node.output) - 1)


def _x_shape(x: Exec) -> list:
    """Shape/Size of a ciphertext: public, computed from its logical shape."""
    fake = np.broadcast_to(np.zeros((), dtype=np.float32), x.backend.shape(x.args[0]))
    return list(x.run(fake, *x.args[1:]))


def _x_move(x: Exec) -> list:
    """Data movement: the ONNX reference implementation applied by the backend (to data, or to element indices)."""
    B, args = x.backend, list(x.args)
    ct = [a is not None and B.is_ct(a) for a in args]
    if x.node.op_type == "Concat" and not all(ct):
        args = [a if c else B.encrypt_public(np.asarray(a, dtype=np.float64)) for a, c in zip(args, ct)]
        ct = [True] * len(args)
    return B.rearrange(lambda *a: x.run(*a), args, [j for j, c in enumerate(ct) if c])


def _x_binary(method: str):
    def f(x: Exec) -> list:
        return [getattr(x.backend, method)(x.args[0], x.args[1])]

    return f


def _x_neg(x: Exec) -> list:
    return [x.backend.neg(x.args[0])]


def _x_sum(x: Exec) -> list:
    B = x.backend
    acc = x.args[0]
    for v in x.args[1:]:
        acc = B.add(acc, v) if B.is_ct(acc) else B.add(v, acc)
    return [acc]


def _x_div(x: Exec) -> list:
    den = np.asarray(x.args[1], dtype=np.float64)
    if np.any(den == 0):
        raise OpExecError("division of a ciphertext by a plaintext containing 0")
    return [x.backend.mul(x.args[0], 1.0 / den)]


def _x_matmul(x: Exec) -> list:
    return [x.backend.matmul(x.args[0], x.args[1])]


def _x_gemm(x: Exec) -> list:
    B = x.backend
    A, W = x.args[0], x.args[1]
    C = x.args[2] if len(x.args) > 2 else None
    alpha, beta = float(x.attr("alpha", 1.0)), float(x.attr("beta", 1.0))
    if B.is_ct(W) or (x.attr("transA", 0) and B.is_ct(A)) or (C is not None and B.is_ct(C) and beta != 1.0):
        raise OpExecError("Gemm operands refused by the op table (run `cgf-fhe check`)")
    W = np.asarray(W, dtype=np.float64)
    W = (W.T if x.attr("transB", 0) else W) * alpha
    if not B.is_ct(A):  # only C is encrypted: the product is plaintext
        A = np.asarray(A, dtype=np.float64)
        return [B.add(C, (A.T if x.attr("transA", 0) else A) @ W)]
    y = B.matmul(A, W)
    if C is not None:
        y = B.add(y, C) if B.is_ct(C) else B.add(y, beta * np.asarray(C, dtype=np.float64))
    return [y]


def _x_pow(x: Exec) -> list:
    """x^k by repeated squaring, combining the needed powers shallowest-first: depth ceil(log2 k)."""
    B = x.backend
    k = int(np.asarray(x.args[1]).reshape(-1)[0])
    parts, cur, d, n = [], x.args[0], 0, 0
    while k:
        if k & 1:
            parts.append((d, n, cur))
            n += 1
        k >>= 1
        if k:
            cur = B.mul(cur, cur)
            d += 1
    heapq.heapify(parts)
    while len(parts) > 1:
        d1, _, p1 = heapq.heappop(parts)
        d2, _, p2 = heapq.heappop(parts)
        heapq.heappush(parts, (max(d1, d2) + 1, n, B.mul(p1, p2)))
        n += 1
    return [parts[0][2]]


def _x_reduce(x: Exec) -> list:
    B, v = x.backend, x.args[0]
    axes = x.args[1] if len(x.args) > 1 and x.args[1] is not None else x.attr("axes")
    keepdims = bool(x.attr("keepdims", 1))
    rank = len(B.shape(v))
    axes = [] if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    if not axes:
        if x.attr("noop_with_empty_axes", 0):
            return [v]
        axes = list(range(rank))
    axes = sorted({a % rank for a in axes})
    if 0 in axes:
        raise OpExecError(f"{x.node.op_type} over axis 0 would mix the examples of the batch")
    if x.node.op_type == "ReduceSum":
        return [B.reduce_sum(v, axes, keepdims)]
    return [B.reduce_mean(v, axes, keepdims)]


# ---- the table -------------------------------------------------------------------------------------------------------

_NONPOLY = "is not a polynomial: replace it by a polynomial approximation over a calibrated interval"
_COMPARE = "needs a comparison, which CKKS cannot evaluate on ciphertexts"
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Pow"})
_MOVE_WHY = "data movement (re-indexes ciphertexts)"

OP_TABLE: dict[str, OpSpec] = {}


def _add(spec: OpSpec):
    OP_TABLE[spec.op_type] = spec


def _costs(element=None, packed=None) -> dict:
    return {k: v for k, v in (("element", element), ("packed", packed)) if v is not None}


_ADD_COSTS = _costs(_elementwise_element("add"), _elementwise_packed("add"))
_MUL_COSTS = _costs(_elementwise_element("mul"), _elementwise_packed("mul"))
_add(OpSpec("Add", True, "addition", exec=_x_binary("add"), costs=_ADD_COSTS))
_add(OpSpec("Sub", True, "subtraction", exec=_x_binary("sub"), costs=_ADD_COSTS))
_add(OpSpec("Neg", True, "negation", exec=_x_neg))
_add(OpSpec("Sum", True, "n-ary addition", exec=_x_sum, costs=_ADD_COSTS))
_add(OpSpec("Mul", True, "multiplication (ct-ct or ct-pt)", levels=1, exec=_x_binary("mul"), costs=_MUL_COSTS))
_add(OpSpec("Div", True, "division by a plaintext = multiplication by its reciprocal", ct_inputs=(0,),
            check=_div_check, levels=1, exec=_x_div, costs=_MUL_COSTS))
_MATMUL_COSTS = _costs(_matmul_element, _matmul_packed)
_add(OpSpec("MatMul", True, "matrix product (ct-pt or ct-ct)", levels=1, exec=_x_matmul, costs=_MATMUL_COSTS))
_add(OpSpec("Gemm", True, "matrix product plus bias", check=_gemm_check, levels=1, exec=_x_gemm,
            costs=_MATMUL_COSTS))
_add(OpSpec("Pow", True, "power by a constant natural exponent (repeated squaring)", ct_inputs=(0,),
            check=_pow_check, levels=_pow_levels, exec=_x_pow, costs=_costs(_pow_costs("element"),
                                                                             _pow_costs("packed"))))
_REDUCE_COSTS = _costs(_reduce_element, _reduce_packed)
_add(OpSpec("ReduceSum", True, "sum over axes", ct_inputs=(0,), exec=_x_reduce, costs=_REDUCE_COSTS))
_add(OpSpec("ReduceMean", True, "sum over axes times the public constant 1/n", ct_inputs=(0,), levels=1,
            exec=_x_reduce, costs=_REDUCE_COSTS))
for _op, _packed in (("Reshape", _reshape_packed), ("Flatten", _reshape_packed), ("Transpose", _transpose_packed),
                     ("Unsqueeze", None), ("Squeeze", None), ("Expand", _replicate_only), ("Tile", _replicate_only),
                     ("Slice", _axis_move_packed), ("Split", _axis_move_packed), ("Gather", _axis_move_packed),
                     ("GatherElements", _axis_move_packed)):
    _add(OpSpec(_op, True, _MOVE_WHY, ct_inputs=(0,), exec=_x_move, costs=_costs(packed=_packed)))
_add(OpSpec("Concat", True, _MOVE_WHY, exec=_x_move, costs=_costs(packed=_axis_move_packed)))
for _op in ("Identity", "Dropout"):
    _add(OpSpec(_op, True, "passes its input through", ct_inputs=(0,), exec=_x_pass))
_add(OpSpec("Cast", True, "float cast (no-op on ciphertexts)", ct_inputs=(0,), check=_cast_check, exec=_x_pass))
PUBLIC_OUTPUT_OPS = ("Shape", "Size")
for _op in PUBLIC_OUTPUT_OPS:  # the shape of a ciphertext tensor is public: its output is plaintext
    _add(OpSpec(_op, True, "shape (public)", ct_inputs=(0,), exec=_x_shape))

for _op in ("Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Tanh", "Sigmoid", "Softmax", "LogSoftmax", "Gelu",
            "LayerNormalization", "Sin", "Cos", "HardSigmoid", "Softplus", "Elu", "Selu", "Mish", "Swish",
            "InstanceNormalization", "BatchNormalization", "GroupNormalization", "RMSNormalization", "Rsqrt"):
    _add(OpSpec(_op, False, f"{_op} {_NONPOLY}"))
for _op in ("Max", "Min", "ArgMax", "ArgMin", "ReduceMax", "ReduceMin", "Relu", "LeakyRelu", "PRelu", "Abs",
            "Sign", "Clip", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And",
            "Or", "Xor", "Round", "Floor", "Ceil", "TopK", "IsNaN", "IsInf", "Mod"):
    _add(OpSpec(_op, False, f"{_op} {_COMPARE}"))
_add(OpSpec("Where", False, "Where needs its condition in plaintext and is not implemented on ciphertexts",
            check=_where_check))
for _op in ("If", "Loop", "Scan"):
    _add(OpSpec(_op, False, f"{_op} is data-dependent control flow, impossible on ciphertexts"))

# Ops that only ever appear on plaintext values (mask preprocessing, constants) need no entry: a node none of
# whose inputs is encrypted is plaintext and may use any op.


@dataclass
class NodeResult:
    name: str
    op_type: str
    index: int
    encrypted: bool  # does it touch a ciphertext (any encrypted input)
    depth: int  # multiplicative depth of its (encrypted) output; 0 for plaintext nodes
    levels: int  # levels this node consumes
    operands: str  # "ct-ct", "ct-pt", "ct", "pt"
    costs: dict = field(default_factory=dict)  # packing -> Counter of COUNT_KEYS (empty for plaintext nodes)
    violation: str | None = None
    encrypted_inputs: list[str] = field(default_factory=list)

    @property
    def counts(self) -> Counter:
        """Costs under the ``element`` packing (what the simulator executes)."""
        return self.costs.get("element", Counter())


@dataclass
class Analysis:
    nodes: list[NodeResult]
    encrypted_inputs: list[str]
    depth: dict[str, int]  # value name -> depth, encrypted values only
    outputs: dict[str, int]  # graph output -> depth (encrypted outputs)
    shapes: dict[str, tuple] = field(default_factory=dict)  # value -> static shape (batch dim 1), when inferred

    @property
    def violations(self) -> list[NodeResult]:
        return [n for n in self.nodes if n.violation]

    @property
    def total_depth(self) -> int:
        return max(self.depth.values(), default=0)


def load_model(path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise GraphError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise GraphError(f"{path}: onnx.checker rejects the model: {exc}") from None
    return model


def producers(nodes) -> dict[str, int]:
    """Value name -> index of the node (in ``nodes``) that produces it."""
    return {o: i for i, n in enumerate(nodes) for o in n.output if o}


def resolve_model(model_or_path) -> tuple[onnx.ModelProto, str]:
    """``(model, path)`` from an ``onnx.ModelProto`` (path ``"<model>"``) or a file path (checked)."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, "<model>"
    path = str(model_or_path)
    if not Path(path).is_file():
        raise GraphError(f"{path}: no such file")
    return load_model(path), path


ENCRYPTED_KEY = "cgf_fhe.encrypted_inputs"


def declared_encrypted(model: onnx.ModelProto) -> list[str]:
    """Encrypted inputs declared in metadata_props (comma-separated or JSON list)."""
    import json

    for p in model.metadata_props:
        if p.key == ENCRYPTED_KEY:
            v = p.value.strip()
            return list(json.loads(v)) if v.startswith("[") else [s.strip() for s in v.split(",") if s.strip()]
    return []


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
                elif a.name in ("value_float", "value_int"):
                    consts[node.output[0]] = np.array(onnx.helper.get_attribute_value(a))
                elif a.name in ("value_floats", "value_ints"):
                    consts[node.output[0]] = np.array(onnx.helper.get_attribute_value(a))
        elif node.op_type in ("Identity", "Cast") and node.input and node.input[0] in consts:
            v = consts[node.input[0]]
            if node.op_type == "Cast":
                to = [a.i for a in node.attribute if a.name == "to"][0]
                v = v.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
            consts[node.output[0]] = v
    return consts


def _shapes(model: onnx.ModelProto, input_dims: dict[str, tuple] | None) -> dict[str, tuple]:
    """Static shapes of every value after fixing the graph inputs' symbolic dims (best effort)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if input_dims:
        for inp in m.graph.input:
            if inp.name in input_dims:
                dims = inp.type.tensor_type.shape.dim
                for d, v in zip(dims, input_dims[inp.name]):
                    if v is None:
                        continue
                    d.ClearField("dim_param")
                    d.dim_value = int(v)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:
        pass
    out = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return out


# Slot batching keeps the examples of a batch on axis 0 of every encrypted tensor (TenSEAL puts them in the slots,
# so it cannot move them; the plain and emulated backends could, and would silently mix examples). To see where
# the batch axis goes, shapes are inferred with a symbolic batch dimension set to this prime, which no weight
# dimension equals: an encrypted value whose axis 0 is not this size has had its batch moved, merged or reduced.
BATCH_PROBE = 9973


def infer_shapes(model: onnx.ModelProto, input_dims: dict[str, tuple] | None = None) -> dict[str, tuple]:
    """Static shape of every value (``None`` for an unknown dim; values whose shape cannot be inferred are absent),
    after fixing the graph inputs' dims with ``input_dims`` (``{"embeddings": (1, 16, 64)}``; ``None`` entries
    stay symbolic). Public: the backends and the report read it."""
    return _shapes(model, input_dims)


def _probe_dims(model: onnx.ModelProto, input_dims: dict[str, tuple] | None) -> tuple[dict, dict[str, int]]:
    """Input dims for the batch-axis probe: each non-constant input's axis 0 set to :data:`BATCH_PROBE` when it
    is symbolic (kept when static), its other dims from ``input_dims``. Returns ``(dims, batch size per input)``."""
    inits = {i.name for i in model.graph.initializer}
    dims, batch = {}, {}
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.tensor_type.HasField("shape"):
            continue
        shape = inp.type.tensor_type.shape.dim
        given = list((input_dims or {}).get(inp.name) or [None] * len(shape))
        given += [None] * (len(shape) - len(given))
        out = [d.dim_value if d.HasField("dim_value") else g for d, g in zip(shape, given)]
        if shape:
            out[0] = shape[0].dim_value if shape[0].HasField("dim_value") else BATCH_PROBE
            batch[inp.name] = out[0]
        dims[inp.name] = tuple(out)
    return dims, batch


def _unprobe(shape):
    """A probe shape as the user sees it: the batch dim as 1 (counts are per slot vector)."""
    if shape is None:
        return None
    return tuple(1 if d == BATCH_PROBE else d for d in shape)


def _batch_check(ctx: NodeCtx, batch: set[int]) -> str | None:
    """Refuse a node that moves, merges, reduces or grows the batch axis of an encrypted value (axis 0)."""
    op = ctx.node.op_type
    shown = lambda sh: "[" + ", ".join("B" if d == BATCH_PROBE else str(d) for d in sh) + "]"  # noqa: E731
    ranks = [len(sh) if sh is not None else None for sh in ctx.in_shapes]
    out = ctx.out_shapes[0] if ctx.out_shapes else None
    ct_ranks = [r for r, e in zip(ranks, ctx.enc) if e and r is not None]
    if op in ("MatMul",) and out is not None:
        a_ct, b_ct = (ctx.enc + [False, False])[:2]
        ra, rb = (ranks + [None, None])[:2]
        if a_ct and ra is not None and ra < 2:
            return "MatMul of a rank-1 encrypted left operand would contract its batch axis"
        if b_ct and rb is not None and rb < 3:
            return ("MatMul with an encrypted right operand of rank < 3: its batch axis 0 would be contracted (it "
                    "needs [batch, ..., K, N])")
        if a_ct and b_ct and ra != rb:
            return f"MatMul of encrypted operands of ranks {ra} and {rb}: the batch axes would not line up"
    elif op in _ELEMENTWISE and out is not None and any(r != len(out) for r in ct_ranks):
        return (f"{op} broadcasts an encrypted operand of rank {min(ct_ranks)} to rank {len(out)}: its batch axis "
                "would move off axis 0 (unsqueeze the operand first)")
    elif op == "Expand" and out is not None and ranks and ranks[0] is not None and ranks[0] != len(out):
        return f"Expand raises the rank of an encrypted tensor from {ranks[0]} to {len(out)}: the batch axis would move"
    for o, sh in zip(ctx.node.output, ctx.out_shapes):
        if not o or sh is None:
            continue
        if not sh or sh[0] not in batch:
            return (f"{op} moves or mixes the batch axis: its encrypted output {o!r} has shape {shown(sh)}, the "
                    "examples (B) must stay on axis 0 of every ciphertext tensor")
    return None


def _implicit_inputs(node: onnx.NodeProto) -> list[str]:
    """Outer-scope values read inside a node's subgraphs (If/Loop/Scan bodies), recursively."""
    out: list[str] = []
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {i.name for i in g.initializer}
            for n in g.node:
                for x in list(n.input) + _implicit_inputs(n):
                    if x and x not in defined and x not in out:
                        out.append(x)
                defined.update(o for o in n.output if o)
    return out


def analyze(model: onnx.ModelProto, encrypted: list[str] | None = None,
            input_dims: dict[str, tuple] | None = None) -> Analysis:
    """Propagate encryption taint and depth through ``model`` using :data:`OP_TABLE`.

    ``encrypted``: graph inputs that are ciphertexts (default: the ``cgf_fhe.encrypted_inputs`` metadata).
    ``input_dims``: concrete dims for the inputs (for op counts), e.g. ``{"embeddings": (1, 16, 64)}``.
    """
    graph = model.graph
    names = input_names(model)
    enc_names = list(encrypted) if encrypted else declared_encrypted(model)
    if not enc_names:
        raise GraphError("no encrypted input declared: pass --encrypted NAME or export with cgf-fhe export "
                         f"(graph inputs: {names})")
    unknown = [n for n in enc_names if n not in names]
    if unknown:
        raise GraphError(f"--encrypted names {unknown} that are not graph inputs (graph inputs: {names})")
    consts = _constants(graph)
    probe_dims, batch_of = _probe_dims(model, input_dims)
    pshapes = _shapes(model, probe_dims)  # batch dims = BATCH_PROBE
    shapes = {k: _unprobe(v) for k, v in pshapes.items()}
    batch_sizes = {batch_of[x] for x in enc_names if x in batch_of} or {BATCH_PROBE}
    def shape_of(table, x):
        if x in table:
            return table[x]
        return tuple(consts[x].shape) if x in consts else None

    depth: dict[str, int] = {n: 0 for n in enc_names}
    batch_lost: set[str] = set()
    results = []
    for i, node in enumerate(graph.node):
        enc = [bool(x) and x in depth for x in node.input]
        captured = [x for x in _implicit_inputs(node) if x in depth] if node.attribute else []
        name = node.name or f"{node.op_type}_{i}"
        if not any(enc) and not captured:
            results.append(NodeResult(name, node.op_type, i, False, 0, 0, "pt"))
            continue
        spec = OP_TABLE.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        ctx = NodeCtx(node, enc, [consts.get(x) for x in node.input], [shape_of(shapes, x) for x in node.input],
                      [shapes.get(x) for x in node.output])
        enc_in = [x for x, e in zip(node.input, enc) if e] + [x for x in captured if x not in node.input]
        n_ct = sum(enc)
        operands = "ct-ct" if n_ct >= 2 else ("ct-pt" if len([x for x in node.input if x]) >= 2 else "ct")
        violation = None
        if spec is None:
            dom = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
            violation = f"unknown op {dom}{node.op_type} (not in the FHE op table), refused on ciphertexts"
        elif not spec.ct_allowed:
            violation = (spec.check(ctx) if spec.check is not None else None) or spec.why
        elif captured:
            violation = f"{node.op_type} reads ciphertexts {captured} inside a subgraph, which is not analysed"
        else:
            if spec.ct_inputs is not None:
                bad = [node.input[j] for j, e in enumerate(enc) if e and j not in spec.ct_inputs]
                if bad:
                    violation = f"{node.op_type} input(s) {bad} must be plaintext but are encrypted"
            if violation is None and spec.check is not None:
                violation = spec.check(ctx)
            if any(x in batch_lost for x in enc_in):  # downstream of a refused batch move: reported once
                batch_lost.update(o for o in node.output if o)
            elif violation is None and node.op_type not in PUBLIC_OUTPUT_OPS:
                violation = _batch_check(NodeCtx(node, enc, ctx.consts, [shape_of(pshapes, x) for x in node.input],
                                                 [pshapes.get(x) for x in node.output]), batch_sizes)
                if violation is not None:
                    batch_lost.update(o for o in node.output if o)
        levels = 0
        costs = {}
        if violation is None:
            levels = spec.levels(ctx) if callable(spec.levels) else spec.levels
            costs = {p: Counter(spec.costs[p](ctx)) if p in spec.costs else Counter() for p in PACKINGS}
        d = max(depth[x] for x in enc_in) + levels
        if node.op_type not in PUBLIC_OUTPUT_OPS:  # a ciphertext's shape is public: not tainted
            for o in node.output:
                if o:
                    depth[o] = d
        results.append(NodeResult(name, node.op_type, i, True, d, levels, operands, costs, violation, enc_in))
    outs = {o: depth[o] for o in output_names(model) if o in depth}
    return Analysis(results, enc_names, depth, outs, shapes)


def peak_live_elements(model: onnx.ModelProto, analysis: Analysis,
                       input_dims: dict[str, tuple] | None = None) -> tuple[int, str | None]:
    """The most encrypted tensor elements alive at once, and the node where that peak occurs.

    Nodes run in graph order and a value is dropped after its last consumer (what the simulator's interpreter
    does); a node's inputs and outputs are alive together. With one ciphertext per element (examples in the
    slots, so pass a batch dimension of 1 in ``input_dims``) this is the peak number of ciphertexts in memory."""
    shapes = _shapes(model, input_dims)
    nodes = list(model.graph.node)
    keep = set(output_names(model))
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            if x:
                last[x] = i

    def size(v: str) -> int:
        return numel(shapes.get(v)) or 0

    live = {v: size(v) for v in analysis.encrypted_inputs}
    total = sum(live.values())
    peak, where = total, None
    for i, (n, r) in enumerate(zip(nodes, analysis.nodes)):
        if r.encrypted:
            for o in n.output:
                if o and o not in live:
                    live[o] = size(o)
                    total += live[o]
            if total > peak:
                peak, where = total, n.name
        for x in set(n.input):
            if x in live and last.get(x) == i and x not in keep:
                total -= live.pop(x)
    return peak, where
