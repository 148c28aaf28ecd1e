"""Node groups the packed (``seal``) backend runs as one operation (graph-driven: found in the exported ONNX).

**Token-split linear map** (``--ln-cls-scale``, :class:`cgf_fhe.fold.CentringDense`): the dense layer before a
LayerNorm with a position-0 variance scale is exported as

    Concat_token( Slice(X, rows 0:1) @ W0 + b0,  Slice(X, rows 1:) @ W + b )

Node by node the packed backend runs two full diagonal-method passes (a pass costs the same whatever the number
of token rows) and adds the pieces at the Concat. As a group it is one pass whose diagonals carry ``W0`` at row 0's
token slots and ``W`` at the others' (:meth:`~cgf_fhe.simulate.backends.seal_packed.PackedBackend.
linear_token_split`): the same result, depth and number of ciphertexts, half the rotations and ct x pt products
of that layer. The Slice nodes still run (data movement, free); the MatMul and Add nodes hand on a
:class:`Deferred` record and the Concat computes. When the backend declines (the slices are not of the same
ciphertexts), the records are evaluated node by node, exactly as without the group.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import numpy_helper


@dataclass
class Deferred:
    """A slice times a plaintext weight (plus a plaintext bias) not evaluated yet (not a ciphertext)."""

    x: object
    W: object
    b: object = None
    bias_first: bool = False  # the graph's Add had the bias as its first input


def _axis(node) -> int | None:
    for a in node.attribute:
        if a.name == "axis":
            return int(onnx.helper.get_attribute_value(a))
    return None


def find_token_split_linears(model: onnx.ModelProto, analysis) -> dict[int, str]:
    """``{node index: role}`` for every token-split linear group (module doc): roles "matmul", "add", "concat".
    A group qualifies when each Concat input is ``[Add(] MatMul(Slice(X), W) [, b)]`` with one X, constant 2-D
    weights of one shape, constant biases, and every value inside used only by the next node of its chain (not
    a graph output)."""
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer, uses = {}, {}
    for idx, n in enumerate(g.node):
        for o in n.output:
            producer[o] = idx
        for x in n.input:
            uses.setdefault(x, []).append(idx)
    outputs = {o.name for o in g.output}
    enc = {r.name for r in analysis.nodes if r.encrypted}

    def only_use(value, idx) -> bool:
        return value not in outputs and uses.get(value, []) == [idx]

    roles: dict[int, str] = {}
    for ci, c in enumerate(g.node):
        if c.op_type != "Concat" or c.name not in enc or _axis(c) not in (1, -2) or len(c.input) < 2:
            continue
        group, xs, shapes = {}, set(), set()
        ok = True
        for p in c.input:
            pi = producer.get(p)
            if pi is None or not only_use(p, ci):
                ok = False
                break
            n = g.node[pi]
            mi = pi
            if n.op_type == "Add":
                inner = [x for x in n.input if x not in consts]
                bias = [x for x in n.input if x in consts]
                if len(inner) != 1 or len(bias) != 1 or inner[0] not in producer or not only_use(inner[0], pi):
                    ok = False
                    break
                group[pi] = "add"
                mi = producer[inner[0]]
            m = g.node[mi]
            if m.op_type != "MatMul" or m.input[1] not in consts or consts[m.input[1]].ndim != 2:
                ok = False
                break
            sl = producer.get(m.input[0])
            if sl is None or g.node[sl].op_type != "Slice" or not only_use(m.input[0], mi):
                ok = False
                break
            group[mi] = "matmul"
            xs.add(g.node[sl].input[0])
            shapes.add(consts[m.input[1]].shape)
        if ok and len(xs) == 1 and len(shapes) == 1:
            roles.update(group)
            roles[ci] = "concat"
    return roles


def run_fused(backend, role: str, node, args, run_node) -> list | None:
    """The packed execution of one node of a group, or None to run it as usual (``run_node(args)`` runs a node
    with possibly updated arguments). ``args``: the node's arguments as the interpreter holds them."""
    if role == "matmul":
        if not backend.is_ct(args[0]):
            return None
        return [Deferred(args[0], args[1])]
    if role == "add":
        d = [a for a in args if isinstance(a, Deferred)]
        if len(d) != 1:
            return None
        b = args[1] if args[0] is d[0] else args[0]
        return [Deferred(d[0].x, d[0].W, b, bias_first=args[0] is not d[0])]
    if role == "concat":
        if not all(isinstance(a, Deferred) for a in args):
            return run_node([materialize(backend, a) for a in args])
        res = backend.linear_token_split([(a.x, a.W, a.b) for a in args])
        if res is None:
            return run_node([materialize(backend, a) for a in args])
        return [res]
    return None


def materialize(backend, a):
    """A :class:`Deferred` evaluated node by node (MatMul, then Add), as the graph states it."""
    if not isinstance(a, Deferred):
        return a
    y = backend.matmul(a.x, a.W)
    if a.b is None:
        return y
    return backend.add(a.b, y) if a.bias_first else backend.add(y, a.b)


__all__ = ["Deferred", "find_token_split_linears", "run_fused", "materialize"]
