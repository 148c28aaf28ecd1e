"""The one interpreter over an exported ONNX graph, for every backend.

Nodes run in graph (topological) order. :func:`cgf_fhe.fhe_ops.analyze` decides which nodes touch ciphertexts
(taint), how many levels each consumes and whether the graph is FHE-evaluable at all; nothing here restates op
semantics:

* **plaintext nodes** (mask pre-processing, constants, shapes) run with the ONNX reference implementation of
  the node (:mod:`onnx.reference`, one ``OpRun`` per node);
* **encrypted nodes** run the op table's ``exec`` (:data:`cgf_fhe.fhe_ops.OP_TABLE`) on the backend
  (:mod:`cgf_fhe.simulate.backends.base`): arithmetic through its small interface, data movement by running the
  same ONNX reference ``OpRun`` on the backend's data or on element indices (TenSEAL), so
  reshape/transpose/gather/... semantics come from ONNX itself.

Levels: with a leveled backend (emulate, tenseal) a refresh plan is applied -- by default
:func:`cgf_fhe.bootstrap.plan_bootstraps` for the backend's level budget, or an explicit list of value names.
Before each node the interpreter checks the levels left on its encrypted inputs and raises :class:`LevelError`
naming the node, the input and the missing levels; after each node it compares the levels the backend actually
has left with the plan's prediction (``RunResult.level_mismatches``, empty when the op table and the backend
agree).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from .. import fhe_ops
from ..errors import GraphError
from ..graph import input_names, layer_index, output_names, read_metadata
from .backends.base import Backend, LevelError, SimulationError


def unhandled_ct_ops() -> list[str]:
    """Ops the FHE op table allows on ciphertexts but gives no ``exec`` for (should be empty)."""
    return sorted(op for op, spec in fhe_ops.OP_TABLE.items() if spec.ct_allowed and spec.exec is None)


@dataclass
class RunResult:
    outputs: dict[str, np.ndarray]  # graph outputs, decrypted by the client
    trace: dict[str, np.ndarray] = field(default_factory=dict)  # traced encrypted values (client-side diagnostic)
    levels: dict[str, int] = field(default_factory=dict)  # levels left on each encrypted value (leveled backends)
    refreshed: list[str] = field(default_factory=list)  # values refreshed, in order
    # plan prediction != backend level; "more" is benign (TenSEAL returns a fresh encryption of 0 for a product
    # with an all-zero plaintext, so that element keeps its levels), "fewer" means the op table is wrong
    level_mismatches: list[dict] = field(default_factory=list)
    maxabs: dict[str, float] = field(default_factory=dict)  # max |value| per encrypted value (when recorded)
    seconds: float = 0.0


def node_layers(model: onnx.ModelProto) -> list[int | None]:
    """Encoder layer index of every node (node metadata scopes via cgf_fhe.graphinfo, else node names)."""
    try:
        from ..graphinfo import classify

        return [layer for layer, _stage in classify(model)]
    except Exception:  # graphinfo missing or a graph it cannot read: fall back to names
        return [layer_index(n.name) for n in model.graph.node]


def layer_outputs(model: onnx.ModelProto, analysis: fhe_ops.Analysis) -> dict[int, str]:
    """Encrypted value leaving each encoder layer (the hidden state after the layer)."""
    layers = node_layers(model)
    producer_layer: dict[str, int | None] = {}
    order: dict[str, int] = {}
    for i, n in enumerate(model.graph.node):
        for o in n.output:
            if o:
                producer_layer[o] = layers[i]
                order[o] = i
    enc = set(analysis.depth)
    leaving: dict[int, list[str]] = {}
    graph_outs = set(output_names(model))
    for i, n in enumerate(model.graph.node):
        for x in n.input:
            lay = producer_layer.get(x)
            if lay is not None and x in enc and layers[i] != lay:
                leaving.setdefault(lay, []).append(x)
    for o in graph_outs:
        lay = producer_layer.get(o)
        if lay is not None and o in enc:
            leaving.setdefault(lay, []).append(o)
    return {lay: max(set(vals), key=lambda v: order[v]) for lay, vals in sorted(leaving.items())}


def poly_inputs(model: onnx.ModelProto, analysis: fhe_ops.Analysis, groups: list | None = None) -> list[dict]:
    """Polynomial groups of the ``cgf_fhe.poly`` metadata resolved to the graph value holding the polynomial's
    argument: ``[{"name", "op", "layer", "interval", "value", "scale"}]``. The value is the group's ``"input"``
    when the exporter states it, else the single encrypted value entering the group's nodes. ``scale``: the graph
    value equals ``scale * x`` for the interval's ``x`` (``alpha`` of a prescaled group folded upstream: the group's
    ``"alpha"`` or ``fhe.modules[key].approx.alpha`` of the metadata).
    For a LayerNorm group (``ln_*``) the interval is on the variance ``var + eps``, so the value is the variance
    computed inside the group (:func:`_ln_variance`), never the hidden state entering it. Groups whose argument
    cannot be identified get ``value = None``."""
    meta = read_metadata(model)
    if groups is None:
        groups = meta.get("poly") or []
    modules = ((meta.get("fhe") or {}).get("modules") or {}) if isinstance(meta.get("fhe"), dict) else {}
    if isinstance(groups, dict):
        groups = groups.get("groups") or []
    names = {n.name: n for n in model.graph.node}
    produced = {}
    for n in model.graph.node:
        for o in n.output:
            produced[o] = n.name
    enc = set(analysis.depth)
    out = []
    for g in groups:
        if not isinstance(g, dict):
            continue
        nodes = [x for x in g.get("nodes") or [] if x in names]
        op = str(g.get("op") or g.get("kind") or "")
        # a LayerNorm group's interval is on the variance ``var + eps`` computed inside the group, not on the
        # hidden state entering it (the exporter's "input")
        value = _ln_variance(names, nodes, enc) if op.startswith("ln") else g.get("input")
        if value is None and nodes and not op.startswith("ln"):
            inside = set(nodes)
            ext = []
            for nm in nodes:
                for x in names[nm].input:
                    if x in enc and produced.get(x) not in inside and x not in ext:
                        ext.append(x)
            value = ext[0] if len(ext) == 1 else None
        interval = g.get("interval")
        scale = 1.0
        if g.get("prescaled") or op == "ln_newton":  # a Newton LN's reduction holds alpha * var
            alpha = g.get("alpha")
            if alpha is None:  # the exporter's settings copy: fhe.modules[key].approx.alpha
                alpha = ((modules.get(g.get("key")) or {}).get("approx") or {}).get("alpha")
            if alpha is None:
                value = None  # cannot map the graph value back to the interval's variable
            else:
                scale = float(alpha)
        out.append({"name": g.get("module") or g.get("name") or ",".join(nodes[:1]),
                    "op": g.get("op") or g.get("kind"), "layer": g.get("layer"),
                    "interval": list(interval) if interval else None, "value": value if value in enc else None,
                    "scale": scale})
    return out


def _ln_variance(names: dict, nodes: list[str], enc: set) -> str | None:
    """The encrypted value holding a Newton LayerNorm group's variance: the output of the group's first reduction,
    ``sum((x @ P sqrt(alpha/H))^2) = alpha * var`` (:class:`cgf_fhe.poly.NewtonLayerNorm`; the interval is on
    ``var + eps``, and ``eps`` ~ 1e-12 is below any interval's precision). The constant added next (``alpha*eps``,
    often folded with the polynomial's ``beta`` by the exporter) is left out on purpose. None when the group has
    no reduction (a frozen LayerNorm)."""
    reds = [names[nm] for nm in nodes if names[nm].op_type in ("ReduceMean", "ReduceSum")]
    # the reduction of a square (Mul(d, d)); the centring's ReduceSum(x) (issue #22) comes before it
    prod = {o: names[nm] for nm in nodes for o in names[nm].output}
    square = [r for r in reds if (m := prod.get(r.input[0])) is not None and m.op_type in ("Mul", "Pow")
              and (m.op_type == "Pow" or m.input[0] == m.input[1])]
    red = square[0] if square else (reds[0] if reds else None)
    return red.output[0] if red is not None and red.output[0] in enc else None


class Interpreter:
    """Evaluate an ONNX graph with a backend. ``refresh``: "plan" (cgf_fhe.bootstrap for the backend's level
    budget), None/"none" (no refresh), or a list of encrypted value names to refresh after they are produced."""

    def __init__(self, model, backend: Backend, *, encrypted: list[str] | None = None, refresh="plan",
                 level_budget: int | None = None, trace=(), record_maxabs: bool = False,
                 analysis: fhe_ops.Analysis | None = None):
        self.model = model if isinstance(model, onnx.ModelProto) else fhe_ops.load_model(model)
        self.backend = backend
        self.analysis = analysis if analysis is not None else fhe_ops.analyze(self.model, encrypted)
        bad = self.analysis.violations
        if bad:
            lines = "; ".join(f"{r.name} ({r.op_type}): {r.violation}" for r in bad[:5])
            more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
            raise GraphError(f"the graph is not FHE-evaluable: {len(bad)} violation(s): {lines}{more}; "
                             "run `cgf-fhe check` for the full list")
        missing = sorted({r.op_type for r in self.analysis.nodes
                          if r.encrypted and fhe_ops.OP_TABLE[r.op_type].exec is None})
        if missing:
            raise SimulationError(f"no simulator handler for encrypted op(s) {missing} (allowed by fhe_ops.OP_TABLE)")
        self.encrypted = list(self.analysis.encrypted_inputs)
        self.graph = self.model.graph
        self.nodes = list(self.graph.node)
        self.ref = ReferenceEvaluator(self.model)
        if len(self.ref.rt_nodes_) != len(self.nodes):
            raise GraphError("onnx.reference expanded the graph (local functions?); the simulator needs one op per "
                             "node: inline functions first (onnx.inliner.inline_local_functions)")
        self.consts = {init.name: numpy_helper.to_array(init) for init in self.graph.initializer}
        self.budget = None
        self.plan = None
        self.refresh_set: list[str] = []
        if backend.leveled:
            self.budget = level_budget if level_budget is not None else backend.params.level_budget
            if isinstance(refresh, str) and refresh == "plan":
                from ..bootstrap import plan_bootstraps

                self.plan = plan_bootstraps(self.model, self.analysis, self.budget)
                self.refresh_set = list(self.plan.refresh)
            elif refresh in (None, "none"):
                self.refresh_set = []
            else:
                unknown = [v for v in refresh if v not in self.analysis.depth]
                if unknown:
                    raise SimulationError(f"refresh list names values that are not encrypted: {unknown[:5]}")
                self.refresh_set = list(refresh)
        self._refresh = set(self.refresh_set)
        self.trace_names = set(trace or ())
        self.record_maxabs = record_maxabs
        # liveness: free a value after its last consumer
        keep = set(output_names(self.model)) | set(self.consts)
        self.last_use: dict[int, list[str]] = {}
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for x in n.input:
                if x:
                    last[x] = i
        for x, i in last.items():
            if x not in keep:
                self.last_use.setdefault(i, []).append(x)
        self.results = {r.name: r for r in self.analysis.nodes}

    # ---- public ------------------------------------------------------------------------------------------------
    @property
    def n_refresh_planned(self) -> int:
        return len(self.refresh_set)

    def run(self, feeds: dict[str, np.ndarray], progress: bool | str = False) -> RunResult:
        B = self.backend
        t0 = time.perf_counter()
        res = RunResult(outputs={})
        env: dict[str, object] = {}
        for inp in self.graph.input:
            if inp.name in self.consts and inp.name not in feeds:
                continue
            if inp.name not in feeds:
                raise SimulationError(f"missing graph input {inp.name!r} (inputs: {input_names(self.model)})")
            x = np.asarray(feeds[inp.name])
            if inp.name in self.encrypted:
                v = B.encrypt(np.asarray(x, dtype=np.float64))
                if inp.name in self._refresh:
                    v = B.refresh(v)
                    res.refreshed.append(inp.name)
                env[inp.name] = v
                self._after_value(inp.name, v, res, None)
            else:
                et = inp.type.tensor_type.elem_type
                env[inp.name] = x.astype(onnx.helper.tensor_dtype_to_np_dtype(et)) if et else x
        bar = None
        if progress:
            from tqdm.auto import tqdm

            n_enc = sum(1 for r in self.analysis.nodes if r.encrypted)
            bar = tqdm(total=n_enc, desc=progress if isinstance(progress, str) else f"{B.name} nodes",
                       unit="node", leave=False)
        try:
            for i, node in enumerate(self.nodes):
                r = self.analysis.nodes[i]
                args = [self._get(env, x) if x else None for x in node.input]
                if not r.encrypted:
                    outs = self.ref.rt_nodes_[i].run(*args)
                else:
                    self._check_levels(r, node, args)
                    try:
                        outs = self._exec(i, node, r, args)
                    except SimulationError as exc:
                        raise type(exc)(f"node {r.name} ({node.op_type}): {exc}") from exc
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"{node.op_type} {r.name}"[:40], refresh=False)
                for name, val in zip(node.output, outs):
                    if not name:
                        continue
                    env[name] = val
                    if r.encrypted and B.is_ct(val):
                        if name in self._refresh:
                            try:
                                val = B.refresh(val)
                            except SimulationError as exc:
                                raise type(exc)(f"{B.refresh_label} of {name!r} after node {r.name} "
                                                f"({node.op_type}): {exc}") from exc
                            env[name] = val
                            res.refreshed.append(name)
                        self._after_value(name, val, res, r)
                for x in self.last_use.get(i, ()):
                    env.pop(x, None)
        finally:
            if bar is not None:
                bar.close()
        for o in self.graph.output:
            v = env[o.name]
            res.outputs[o.name] = B.decrypt(v) if B.is_ct(v) else np.asarray(v)
        res.seconds = time.perf_counter() - t0
        return res

    # ---- internals ---------------------------------------------------------------------------------------------
    def _get(self, env, name):
        if name in env:
            return env[name]
        if name in self.consts:
            return self.consts[name]
        raise SimulationError(f"value {name!r} is used before it is produced (graph not topologically sorted?)")

    def _after_value(self, name, val, res: RunResult, r):
        B = self.backend
        if B.leveled:
            lv = B.level(val)
            res.levels[name] = lv
            if self.plan is not None:
                expect = self.plan.remaining.get(name, self.budget)
                if lv != expect:
                    res.level_mismatches.append({"value": name, "node": r.name if r else None,
                                                 "op_type": r.op_type if r else None,
                                                 "planned": expect, "actual": lv,
                                                 "kind": "fewer" if lv < expect else "more"})
        if name in self.trace_names:
            res.trace[name] = B.decrypt(val, kind="decrypt_trace")  # client-side diagnostic
        if self.record_maxabs and hasattr(val, "data"):
            d = val.data
            res.maxabs[name] = float(d.abs().max()) if d.numel() else 0.0

    def _check_levels(self, r, node, args):
        B = self.backend
        if not B.leveled or r.levels <= 0 or getattr(B, "on_exhausted", "raise") == "garbage":
            return
        for x, a in zip(node.input, args):
            if a is None or not B.is_ct(a):
                continue
            lv = B.level(a)
            if lv is not None and lv < r.levels:
                missing = r.levels - lv
                total = self.analysis.total_depth
                extra = (f"the graph's multiplicative depth is {total} vs a level budget of {self.budget}"
                         + (f" ({len(self.refresh_set)} refreshes placed)" if self.refresh_set else
                            " and no refresh is placed"))
                raise LevelError(
                    f"node {r.name} ({node.op_type}) needs {r.levels} level(s) but its encrypted input {x!r} has "
                    f"{lv} left: {missing} level(s) missing (node depth {r.depth}); {extra}. Place refreshes/"
                    f"bootstraps (refresh='plan', cgf_fhe.bootstrap) or use a longer chain (--levels/--coeff-bits)")

    def _exec(self, i, node, r, args) -> list:
        """Run an encrypted node: what the op table's ``exec`` says (nothing here restates op semantics)."""
        x = fhe_ops.Exec(self.backend, node, args, self.ref.rt_nodes_[i].run)
        try:
            return fhe_ops.OP_TABLE[node.op_type].exec(x)
        except fhe_ops.OpExecError as exc:
            raise SimulationError(str(exc)) from exc


def load(path_or_model) -> onnx.ModelProto:
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    p = Path(path_or_model)
    if not p.is_file():
        raise FileNotFoundError(f"ONNX file not found: {p}")
    return fhe_ops.load_model(p)


__all__ = ["Interpreter", "RunResult", "layer_outputs", "poly_inputs", "node_layers", "read_metadata",
           "unhandled_ct_ops", "load"]
