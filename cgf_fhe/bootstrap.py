"""Bootstrap (refresh) placement for a level budget.

Level model (the one of :mod:`cgf_fhe.fhe_ops`): a fresh or refreshed ciphertext has ``level_budget`` levels.
A node that consumes ``k`` levels (``NodeResult.levels``) needs at least ``k`` levels left on *each* of its
encrypted inputs; its encrypted outputs are left with ``min(levels of its encrypted inputs) - k`` (operands at
different levels are mod-switched down to the lower one, as CKKS libraries do).

A *refresh* replaces an encrypted value by a fresh encryption of it (a real bootstrap, or TenSEAL's
client-aided decrypt + re-encrypt). A refreshed value is refreshed once, right after the node that produced it
and before any consumer reads it, so every consumer sees ``level_budget`` levels on it.

Placement (minimising the number of refresh points):

1. **greedy lazy refresh**: walk the nodes in graph (topological) order; when a node needs more levels than one of
   its encrypted inputs has left, refresh exactly those inputs. On a chain this is optimal (each refresh is
   postponed as long as possible, so it buys the most levels).
2. **hoisting** (DAGs): lazy refresh may refresh several siblings (e.g. Q, K and V of one layer) where one refresh
   of their common ancestor (the layer input) would do. For every branch point ``v`` (an encrypted value with two
   or more encrypted consumers) no more than ``level_budget`` levels above a refreshed value, try: refresh ``v``,
   drop the refreshes downstream of ``v``, and re-run the lazy pass; keep the change when the count drops. Repeat
   until nothing improves.
3. **depth cuts**: pick cut depths ``c_1 < c_2 < ...`` at most ``level_budget`` apart that minimise the number of
   values crossing them (dynamic programming over depth; narrow places such as the residual stream after a
   LayerNorm win), refresh those values, let the lazy pass add anything still missing, drop the refreshes that turn
   out unnecessary, and hoist. The smaller of (2) and (3) is kept.

This is a heuristic (the general problem is a covering problem), never worse than (1); the reports compare it with
the critical-path lower bound ``ceil(depth / L) - 1``.

A final forward pass recomputes the exact levels left everywhere with the chosen refresh set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from .fhe_ops import Analysis, GraphError, NodeResult
from .graph import input_names


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


def _steps(model: onnx.ModelProto, results: list[NodeResult]) -> list[tuple]:
    """(encrypted inputs, levels, outputs) of every encrypted node, in graph order."""
    out = []
    for node, r in zip(model.graph.node, results):
        if r.encrypted:
            out.append((tuple(dict.fromkeys(r.encrypted_inputs)), r.levels, tuple(o for o in node.output if o)))
    return out


def _lazy(steps: list[tuple], budget: int, forced: set[str]) -> set[str]:
    """Greedy lazy refresh on top of the ``forced`` refreshes; returns the full refresh set."""
    refresh = set(forced)
    left: dict[str, int] = {}
    for ins, lv, outs in steps:
        lin = budget
        for x in ins:
            v = left.setdefault(x, budget)
            if v < lv:
                refresh.add(x)
                left[x] = v = budget
            lin = min(lin, v)
        for o in outs:
            left[o] = budget if o in refresh else lin - lv
    return refresh


def _hoist(steps: list[tuple], budget: int, refresh: set[str], depth: dict[str, int]) -> set[str]:
    consumers: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for i, (ins, _, outs) in enumerate(steps):
        for x in ins:
            consumers.setdefault(x, []).append(i)
        for o in outs:
            producer[o] = i
    branch = [v for v, c in consumers.items() if len(c) >= 2 and v in producer]
    desc_cache: dict[str, set[str]] = {}

    def descendants(v: str) -> set[str]:
        if v not in desc_cache:
            seen, stack = set(), [v]
            while stack:
                for i in consumers.get(stack.pop(), ()):
                    for o in steps[i][2]:
                        if o not in seen:
                            seen.add(o)
                            stack.append(o)
            desc_cache[v] = seen
        return desc_cache[v]

    current = set(refresh)
    for _ in range(100):
        best = current
        for v in branch:
            if v in current:
                continue
            d = descendants(v)
            dropped = current & d
            if not dropped or min(depth.get(x, 0) for x in dropped) - depth.get(v, 0) > budget:
                continue
            trial = _lazy(steps, budget, (current - d) | {v})
            if len(trial) < len(best):
                best = trial
        if best is current:
            break
        current = best
    return current


def _prune(steps: list[tuple], budget: int, refresh: set[str], depth: dict[str, int]) -> set[str]:
    """Drop refreshes the plan does not need (deepest first)."""
    cur = set(refresh)
    for y in sorted(refresh, key=lambda v: -depth.get(v, 0)):
        trial = cur - {y}
        if _lazy(steps, budget, trial) == trial:
            cur = trial
    return cur


def _cuts(steps: list[tuple], budget: int, depth: dict[str, int]) -> set[str]:
    """Refresh along depth cuts: choose cut depths c_1 < c_2 < ... (gaps <= budget) minimising the number of
    values crossing them (a value crosses c when it is produced at depth <= c and consumed by a node whose output
    is deeper than c), by dynamic programming; returns the crossing values of the chosen cuts."""
    total = max(depth.values(), default=0)
    if total <= budget:
        return set()
    cross: dict[int, set[str]] = {}
    for ins, _, outs in steps:
        d_out = max((depth.get(o, 0) for o in outs), default=0)
        for x in ins:
            for c in range(depth.get(x, 0), d_out):
                cross.setdefault(c, set()).add(x)
    inf = float("inf")
    best = [inf] * (total + 1)
    back = [-1] * (total + 1)
    best[0] = 0.0
    for c in range(1, total + 1):
        cost = len(cross.get(c, ()))
        for p in range(max(0, c - budget), c):
            if best[p] + cost < best[c]:
                best[c], back[c] = best[p] + cost, p
    end = min(range(max(1, total - budget), total + 1), key=lambda c: best[c])
    chosen = set()
    while end > 0:
        chosen |= cross.get(end, set())
        end = back[end]
    return chosen


def _propagate(model: onnx.ModelProto, results: list[NodeResult], budget: int,
               refresh: set[str]) -> tuple[dict[str, int], dict[str, NodePlan]]:
    """Exact levels left on every encrypted value with ``refresh`` applied (checks that the plan is valid)."""
    left: dict[str, int] = {}
    plans: dict[str, NodePlan] = {}
    for node, r in zip(model.graph.node, results):
        if not r.encrypted:
            continue
        for x in r.encrypted_inputs:
            left.setdefault(x, budget)  # an encrypted graph input: fresh
        short = [x for x in dict.fromkeys(r.encrypted_inputs) if left[x] < r.levels]
        if short:
            raise AssertionError(f"internal: node {r.name} short of levels on {short} with a final plan")
        lin = min(left[x] for x in r.encrypted_inputs)
        lout = lin - r.levels
        outs = [o for o in node.output if o]
        refreshed = [o for o in outs if o in refresh]
        for o in outs:
            left[o] = budget if o in refresh else lout
        plans[r.name] = NodePlan(r.name, r.op_type, r.levels, lin, lout, refreshed)
    return left, plans


def plan_bootstraps(model: onnx.ModelProto, analysis: Analysis, level_budget: int,
                    hoist: bool = True) -> BootstrapPlan:
    """Choose where to refresh so no encrypted value runs out of levels (lazy refresh + hoisting, see module doc).

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

    steps = _steps(model, results)
    refresh = _lazy(steps, level_budget, set())
    if hoist and refresh:
        depth = analysis.depth
        refresh = _hoist(steps, level_budget, refresh, depth)
        cut = _lazy(steps, level_budget, _cuts(steps, level_budget, depth))
        cut = _hoist(steps, level_budget, _prune(steps, level_budget, cut, depth), depth)
        if len(cut) < len(refresh):
            refresh = cut
    # final exact pass with the chosen set
    left, plans = _propagate(model, results, level_budget, refresh)

    producer: dict[str, str] = {}
    order: list[str] = []
    for node, r in zip(model.graph.node, results):
        for o in node.output:
            if o:
                producer[o] = r.name
                order.append(o)
    inputs = input_names(model)
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
