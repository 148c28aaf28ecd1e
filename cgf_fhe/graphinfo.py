"""Where a node of an exported graph comes from: its module scope, encoder layer and stage.

Scopes come from the node metadata written by ``torch.onnx.export(dynamo=True)``
(``pkg.torch.onnx.name_scopes``: the cumulative module paths, last entry the FX node name); for graphs without it
(the TorchScript exporter, other tools) the node name is used (``/bert/encoder/layer.0/attention/self/MatMul``).

Stages of one encoder layer (BERT module naming; other families fall back to ``other``):

=============  ==================================================================================
projections    Q/K/V linear maps, head split/merge, attention output dense
scores         Q K^T (and any ancestors of it inside the attention core, e.g. a scaling)
cgf_stats      the CGF statistics (mean / variance of the scores, the 1/n weights) -- or the mask
               add before a stock Softmax
exp            the exponential (the polynomial ``cgf_exp`` module, an ``Exp``, or a ``Softmax``)
attn_v         everything after the exponential: the 1/n scaling of the weights and P V
residual       residual additions
layernorm      LayerNorm (exact or polynomial)
gelu           the FFN activation
ffn            the two FFN dense layers
=============  ==================================================================================

Outside the layers: ``embeddings``, ``pooler``, ``classifier``, ``input`` (mask pre-processing), ``other``.
"""
from __future__ import annotations

import ast
from collections import defaultdict

import onnx

from . import fhe_ops
from .graph import LAYER_RE, layer_index, node_metadata  # noqa: F401  (layer_index re-exported)

STAGES = ("projections", "scores", "cgf_stats", "exp", "attn_v", "residual", "layernorm", "gelu", "ffn")
HEAD_STAGES = ("embeddings", "pooler", "classifier", "input", "other")


def module_path(node: onnx.NodeProto) -> str:
    """Dotted module path of the node (``m.bert.encoder.layer.0.attention.self.query``), '' when unknown."""
    raw = node_metadata(node).get("pkg.torch.onnx.name_scopes")
    if raw:
        try:
            scopes = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            scopes = None
        if isinstance(scopes, list) and scopes:
            mods = [s for s in scopes[:-1] if s and not s.startswith("_empty_nn_module_stack")]
            return mods[-1] if mods else ""
    name = node.name or ""
    if "/" in name:  # TorchScript exporter: /bert/encoder/layer.0/attention/self/MatMul
        parts = [p for p in name.split("/") if p]
        return ".".join(parts[:-1])
    return ""


def node_scope(node: onnx.NodeProto) -> str:
    """Human-readable location (module path), '' when the graph carries none."""
    return module_path(node)


def _static_stage(path: str) -> str | None:
    """Stage from the module path alone; None = inside the attention core (decided structurally)."""
    p = path.lower()
    comps = p.split(".")
    if layer_index(path) is None:
        if "pooler" in comps:
            return "pooler"
        if "classifier" in comps or "score" in comps:
            return "classifier"
        if "embeddings" in comps:
            return "embeddings"
        return "other" if p else "input"
    m = LAYER_RE.search(p)
    rel = [c for c in p[m.end():].split(".") if c]
    last = rel[-1] if rel else ""
    if "layernorm" in last or last in ("ln", "norm", "ln_1", "ln_2") or "layer_norm" in last:
        return "layernorm"
    if any("layernorm" in c or "layer_norm" in c for c in rel):
        return "layernorm"
    if rel[:2] == ["attention", "self"] or rel[:1] in (["attn"], ["self_attn"]) or rel[:1] == ["attention"]:
        if len(rel) >= 3 and rel[2] in ("query", "key", "value", "q_proj", "k_proj", "v_proj"):
            return "projections"
        if "exp" in last:
            return "exp"
        if rel[:2] == ["attention", "output"]:
            return "projections" if "dense" in rel else "residual"
        return None
    if rel[:1] == ["intermediate"]:
        if len(rel) >= 2 and ("act" in rel[1] or "gelu" in rel[1]):
            return "gelu"
        return "ffn"
    if rel[:1] == ["output"]:
        return "ffn" if "dense" in rel else "residual"
    if "gelu" in last or "act" in last:
        return "gelu"
    if "mlp" in rel or "ffn" in rel:
        return "ffn"
    return "residual" if not rel else "other"


def classify(model: onnx.ModelProto) -> list[tuple[int | None, str]]:
    """(encoder layer index or None, stage) for every node, in graph order."""
    nodes = list(model.graph.node)
    paths = [module_path(n) for n in nodes]
    out: list[tuple[int | None, str | None]] = [(layer_index(p), _static_stage(p)) for p in paths]

    producer = fhe_ops.producers(nodes)
    consumers = defaultdict(list)
    for i, n in enumerate(nodes):
        for x in n.input:
            if x in producer:
                consumers[producer[x]].append(i)

    # attention core of each layer: nodes with stage None, grouped by layer
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (layer, stage) in enumerate(out):
        if stage is None:
            groups[layer].append(i)
    for layer, members in groups.items():
        core = set(members)
        exp_nodes = {i for i, (lay, st) in enumerate(out) if lay == layer and st == "exp"}
        exp_nodes |= {i for i in core if nodes[i].op_type in ("Exp", "Softmax")}

        def closure(start, nbrs):
            seen, stack = set(), list(start)
            while stack:
                i = stack.pop()
                for j in nbrs(i):
                    if j in core and j not in seen:
                        seen.add(j)
                        stack.append(j)
            return seen

        preds = lambda i: [producer[x] for x in nodes[i].input if x in producer]  # noqa: E731
        anc = closure(exp_nodes, preds) - exp_nodes
        desc = closure(exp_nodes, lambda i: consumers[i]) - exp_nodes
        mms = sorted(i for i in anc if nodes[i].op_type in ("MatMul", "Gemm", "Einsum"))
        score_set = set()
        if mms:
            first = mms[0]
            score_set = {first} | closure([first], preds)
        for i in core:
            if i in exp_nodes:
                st = "exp"
            elif i in score_set:
                st = "scores"
            elif i in anc:
                st = "cgf_stats"
            elif i in desc or not exp_nodes:
                st = "attn_v"
            else:  # V head reshapes and the like: ancestors of P V only
                st = "attn_v" if any(j in desc for j in consumers[i]) else "projections"
            out[i] = (layer, st)
    return [(lay, st or "other") for lay, st in out]
