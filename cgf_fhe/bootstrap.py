"""Bootstrap (refresh) placement for a level budget.

Level model (the one of :mod:`cgf_fhe.fhe_ops`): a fresh or refreshed ciphertext has ``level_budget`` levels.
A node that consumes ``k`` levels (``NodeResult.levels``) needs at least ``k`` levels left on *each* of its
encrypted inputs; its encrypted outputs are left with ``min(levels of its encrypted inputs) - k`` (operands at
different levels are mod-switched down to the lower one, as CKKS libraries do).

A *refresh* replaces an encrypted value by a fresh encryption of it (a real bootstrap, or TenSEAL's
client-aided decrypt + re-encrypt). A refreshed value is refreshed once, right after the node that produced it
and before any consumer reads it, so every consumer sees ``level_budget`` levels on it.

Placement is **greedy lazy refresh**: walk the nodes in graph (topological) order; when a node needs more levels
than one of its encrypted inputs has left, refresh exactly those inputs. On a chain this is optimal (each refresh
is postponed as long as possible, so it buys the most levels); on a DAG it is a heuristic -- it never refreshes a
value that no consumer needs refreshed, but it does not search over earlier common ancestors. A final forward pass
recomputes the exact levels left everywhere with the chosen refresh set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from .fhe_ops import Analysis, GraphError, NodeResult


class LevelBudgetError(GraphError):
    """A single node needs more levels than a fresh ciphertext has."""


@dataclass
class NodePlan:
    name: str  # node name (as in the Analysis)
    op_type: str
    levels: int  # levels the node consumes
    levels_in: int  # min levels left on its encrypted inputs (after any refresh of them)
    levels_out: int  # levels left on its encrypted outputs (before any refresh of them)
    refreshed_outputs: list[str] = field(default_factory=list)  # outputs of this node that get refreshed


@dataclass
class BootstrapPlan:
    level_budget: int
    refresh: list[str]  # encrypted value names refreshed right after they are produced (graph order)
    remaining: dict[str, int]  # levels left on each encrypted value after the plan (L for refreshed values)
    count: int
    refresh_nodes: list[str]  # the node producing each refreshed value (parallel to ``refresh``; input name for graph inputs)
    nodes: dict[str, NodePlan]  # per encrypted node
    min_budget: int  # the smallest budget needing no refresh (= total multiplicative depth)

    def to_dict(self) -> dict:
        return {
            "level_budget": self.level_budget,
            "count": self.count,
            "refresh": list(self.refresh),
            "refresh_nodes": list(self.refresh_nodes),
            "min_budget": self.min_budget,
        }


def _node_names(model: onnx.ModelProto, analysis: Analysis) -> list[NodeResult]:
    nodes = list(model.graph.node)
    if len(nodes) != len(analysis.nodes):
        raise GraphError(f"the analysis has {len(analysis.nodes)} nodes but the model has {len(nodes)}: "
                         "analyze() the same model you plan")
    return analysis.nodes


def _propagate(model: onnx.ModelProto, results: list[NodeResult], budget: int, refresh: set[str],
               on_short=None) -> tuple[dict[str, int], dict[str, NodePlan]]:
    """Levels left on every encrypted value with ``refresh`` applied. ``on_short(node_result, short_inputs)``
    is called when an input lacks levels and must return the inputs to refresh now (greedy pass)."""
    left: dict[str, int] = {}
    plans: dict[str, NodePlan] = {}
    for node, r in zip(model.graph.node, results):
        if not r.encrypted:
            continue
        for x in r.encrypted_inputs:
            if x not in left:  # an encrypted graph input: fresh
                left[x] = budget
        short = [x for x in dict.fromkeys(r.encrypted_inputs) if left[x] < r.levels]
        if short:
            if on_short is None:
                raise AssertionError(f"internal: node {r.name} short of levels on {short} with a final plan")
            for x in on_short(r, short):
                refresh.add(x)
                left[x] = budget
        lin = min(left[x] for x in r.encrypted_inputs)
        lout = lin - r.levels
        outs = [o for o in node.output if o]
        refreshed = [o for o in outs if o in refresh]
        for o in outs:
            left[o] = budget if o in refresh else lout
        plans[r.name] = NodePlan(r.name, r.op_type, r.levels, lin, lout, refreshed)
    return left, plans


def plan_bootstraps(model: onnx.ModelProto, analysis: Analysis, level_budget: int) -> BootstrapPlan:
    """Choose where to refresh so no encrypted value runs out of levels (greedy lazy refresh, see module doc).

    Raises :class:`GraphError` when the analysis has FHE violations (a refused op has no level semantics) and
    :class:`LevelBudgetError` when one node alone needs more than ``level_budget`` levels."""
    if level_budget < 0:
        raise GraphError(f"level budget must be >= 0, got {level_budget}")
    results = _node_names(model, analysis)
    bad = analysis.violations
    if bad:
        first = bad[0]
        raise GraphError(f"cannot plan bootstraps: {len(bad)} node(s) are not FHE-evaluable, first {first.name} "
                         f"({first.op_type}): {first.violation}")
    for r in results:
        if r.encrypted and r.levels > level_budget:
            raise LevelBudgetError(f"node {r.name} ({r.op_type}) consumes {r.levels} levels but the level budget is "
                                   f"{level_budget}: no refresh can help; raise --levels to at least {r.levels} "
                                   "(or use a longer modulus chain)")

    refresh: set[str] = set()
    _propagate(model, results, level_budget, refresh, on_short=lambda r, short: short)
    # final exact pass with the chosen set
    left, plans = _propagate(model, results, level_budget, refresh)

    producer: dict[str, str] = {}
    order: list[str] = []
    for node, r in zip(model.graph.node, results):
        for o in node.output:
            if o:
                producer[o] = r.name
                order.append(o)
    inputs = [i.name for i in model.graph.input]
    ordered = [v for v in inputs + order if v in refresh]
    return BootstrapPlan(
        level_budget=level_budget,
        refresh=ordered,
        remaining=left,
        count=len(ordered),
        refresh_nodes=[producer.get(v, v) for v in ordered],
        nodes=plans,
        min_budget=analysis.total_depth,
    )


def min_budget_without_refresh(analysis: Analysis) -> int:
    """Smallest level budget for which :func:`plan_bootstraps` places no refresh: the total depth."""
    return analysis.total_depth
