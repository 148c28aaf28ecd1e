"""Bootstrap (refresh) placement for a level budget.

Level model (the one of :mod:`cgf_fhe.fhe_ops`): a fresh or refreshed ciphertext has ``level_budget`` levels.
A node that consumes ``k`` levels (``NodeResult.levels``) needs at least ``k`` levels left on *each* of its
encrypted inputs; its encrypted outputs are left with ``min(levels of its encrypted inputs) - k`` (operands at
different levels are mod-switched down to the lower one, as CKKS libraries do).

A *refresh* replaces an encrypted value by a fresh encryption of it (a real bootstrap, or TenSEAL's
client-aided decrypt + re-encrypt). A refreshed value is refreshed once, right after the node that produced it
and before any consumer reads it, so every consumer sees ``level_budget`` levels on it.

How refreshes are counted: a **refresh point** (``BootstrapPlan.points``) is one moment of the evaluation where the
encrypted state is refreshed: every value refreshed there goes to the key holder in one round trip (client-aided)
or is bootstrapped in one batch. Several values can share a point: the residual stream and the attention branch
that meet at the next residual ``Add``, or Q, K and V of one layer. A set of refreshed values is grouped into points
as early as possible: the point of a refreshed value ``v`` is 1 + the largest number of refreshed values on a path
from the inputs to ``v`` (inclusive of ``v``'s ancestors only), so two refreshed values share a point unless one
depends on the other through a refresh; this is the fewest points any schedule of that set can have (a path
crossing ``k`` refreshed values needs ``k`` successive points). ``point_count`` is what the report calls
``refreshes_total``; ``count`` is the number of refreshed values (tensors; what the simulator refreshes one by one),
and the ciphertexts in them are the report's ``refreshed_ciphertexts``. Lower bound on the points:
``ceil(total_depth / level_budget) - 1`` (the critical path).

Placement (minimising the number of refresh points, then the refreshed size: the element count of the refreshed
values, i.e. their ciphertexts under element packing):

1. **phases** (points first): evaluate every node that still has the levels it needs, as far as it goes; at that
   point refresh every computed value with a consumer still waiting (and fewer than ``level_budget`` levels); go
   on. Evaluating a node as early as possible never leaves fewer levels on anything (a value computed before a
   point is refreshed at it), so this reaches the fewest points for the graph; it refreshes too many values,
   which step 4 removes.
2. **greedy lazy refresh**: walk the nodes in graph (topological) order; when a node needs more levels than one of
   its encrypted inputs has left, refresh exactly those inputs. On a chain this is optimal (each refresh is
   postponed as long as possible, so it buys the most levels).
3. **hoisting** (DAGs): lazy refresh may refresh several siblings (e.g. Q, K and V of one layer) where one refresh
   of their common ancestor (the layer input) would do. For every branch point ``v`` (an encrypted value with two
   or more encrypted consumers) no more than ``level_budget`` levels above a refreshed value, try: refresh ``v``,
   drop the refreshes downstream of ``v``, and re-run the lazy pass; keep the change when the count drops. Repeat
   until nothing improves. **Depth cuts**: pick cut depths ``c_1 < c_2 < ...`` at most ``level_budget`` apart that
   minimise the number of values crossing them (dynamic programming over depth), refresh those values, let the
   lazy pass add anything still missing, drop the refreshes that turn out unnecessary, and hoist.
4. **trimming**: on each candidate set (1, 2 and 3), try dropping each refreshed value (the lazy pass adding
   whatever the drop makes necessary); keep a drop when (points, size) gets smaller; hoist again with that
   order. The smallest (points, size) is kept.

This is a heuristic for the size (the general problem is a covering problem); the point count of step 1 is
the fewest for the graph (every point refreshes everything waiting, and nothing is evaluated later than it can be).

A final forward pass recomputes the exact levels left everywhere with the chosen refresh set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from .fhe_ops import Analysis, GraphError, NodeResult
from .graph import input_names, numel


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
    count: int  # refreshed values (= len(refresh)); the simulator refreshes them one by one
    refresh_nodes: list[str]  # the node producing each refreshed value (parallel to ``refresh``; input name for graph inputs)
    nodes: dict[str, NodePlan]  # per encrypted node
    min_budget: int  # the smallest budget needing no refresh (= total multiplicative depth)
    points: list[list[str]] = field(default_factory=list)  # refresh points in order: the values refreshed at each

    @property
    def point_count(self) -> int:
        """Refresh points (round trips / bootstrap batches): what the report counts as ``refreshes_total``."""
        return len(self.points)

    def to_dict(self) -> dict:
        return {
            "level_budget": self.level_budget,
            "count": self.count,
            "points": [list(p) for p in self.points],
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


def _point_of(steps: list[tuple], refresh: set[str]) -> dict[str, int]:
    """The refresh point (1, 2, ...) of every refreshed value, as early as possible: 1 + the largest number of
    refreshed values on a path into it (see the module doc)."""
    crossed: dict[str, int] = {}  # value -> refreshed values on the longest path into it (its own refresh excluded)
    point: dict[str, int] = {}
    for ins, _, outs in steps:
        c = 0
        for x in ins:
            cx = crossed.get(x, 0)
            if x in refresh:
                point[x] = cx + 1
                cx += 1
            c = max(c, cx)
        for o in outs:
            crossed[o] = c
    for v in refresh:  # refreshed but never consumed by an encrypted node (an output): after its ancestors' points
        point.setdefault(v, crossed.get(v, 0) + 1)
    return point


def _key(steps: list[tuple], refresh: set[str], size: dict[str, int] | None = None) -> tuple[int, int]:
    """What placement minimises: (refresh points, refreshed size), the size of a value being its element count
    (``size``; 1 each when not given, i.e. the number of refreshed values)."""
    points = max(_point_of(steps, refresh).values(), default=0)
    return points, sum(size.get(v, 1) for v in refresh) if size else len(refresh)


def _phases(steps: list[tuple], budget: int) -> set[str]:
    """Evaluate every node that has its levels, refresh everything still waiting, repeat (module doc, step 1)."""
    consumers: dict[str, list[int]] = {}
    for i, (ins, _, _) in enumerate(steps):
        for x in ins:
            consumers.setdefault(x, []).append(i)
    left: dict[str, int] = {}
    for x in (x for ins, _, _ in steps for x in ins):
        left.setdefault(x, budget)  # encrypted graph inputs: fresh
    for o in (o for _, _, outs in steps for o in outs):
        left.pop(o, None)
    refresh: set[str] = set()
    done: set[int] = set()
    while len(done) < len(steps):
        phase: list[int] = []
        for i, (ins, lv, outs) in enumerate(steps):
            if i in done:
                continue
            if all(x in left for x in ins) and min((left[x] for x in ins), default=budget) >= lv:
                lin = min((left[x] for x in ins), default=budget)
                for o in outs:
                    left[o] = lin - lv
                phase.append(i)
        if not phase:
            raise AssertionError("internal: no node can be evaluated after a refresh point")
        now = set(phase)
        while True:
            # a value refreshed at this point is refreshed for all its consumers (right after it is produced), so
            # a consumer already evaluated in this phase waits for the refreshed value: undo it (and what it fed)
            waiting = {i for i in range(len(steps)) if i not in done and i not in now}
            fresh = {x for i in waiting for x in steps[i][0]
                     if x in left and left[x] < budget and x not in refresh
                     and any(j in now for j in consumers.get(x, ()))}
            undo = {j for x in fresh for j in consumers.get(x, ()) if j in now}
            if not undo:
                break
            stack = list(undo)
            while stack:
                j = stack.pop()
                if j not in now:
                    continue
                now.discard(j)
                for o in steps[j][2]:
                    left.pop(o, None)
                    stack.extend(k for k in consumers.get(o, ()) if k in now)
        done |= now
        for x in {x for i in range(len(steps)) if i not in done for x in steps[i][0]}:
            if x in left and left[x] < budget and x not in refresh:
                refresh.add(x)
                left[x] = budget
    return refresh


def _trim(steps: list[tuple], budget: int, refresh: set[str], depth: dict[str, int], key) -> set[str]:
    """Drop refreshed values one at a time (the lazy pass adds what a drop makes necessary) while ``key``
    (points, size) gets smaller (module doc, step 4)."""
    cur, best = set(refresh), key(refresh)
    for _ in range(20):
        improved = False
        for y in sorted(cur, key=lambda v: (-depth.get(v, 0), v)):
            if y not in cur:
                continue
            trial = _lazy(steps, budget, cur - {y})
            k = key(trial)
            if k < best:
                cur, best, improved = trial, k, True
        if not improved:
            break
    return cur


def _hoist(steps: list[tuple], budget: int, refresh: set[str], depth: dict[str, int], key=len) -> set[str]:
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
            if key(trial) < key(best):
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
        candidates = [_hoist(steps, level_budget, refresh, depth)]
        cut = _lazy(steps, level_budget, _cuts(steps, level_budget, depth))
        candidates.append(_hoist(steps, level_budget, _prune(steps, level_budget, cut, depth), depth))
        candidates.append(_phases(steps, level_budget))
        size = {v: numel(shape) or 1 for v, shape in analysis.shapes.items()}
        key = lambda c: _key(steps, c, size)  # noqa: E731
        candidates = [_hoist(steps, level_budget, _trim(steps, level_budget, c, depth, key), depth, key)
                      for c in candidates]
        refresh = min(candidates, key=key)
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
    point = _point_of(steps, refresh)
    points = [[v for v in ordered if point[v] == p] for p in range(1, max(point.values(), default=0) + 1)]
    return BootstrapPlan(
        level_budget=level_budget,
        refresh=ordered,
        remaining=left,
        count=len(ordered),
        refresh_nodes=[producer.get(v, v) for v in ordered],
        nodes=plans,
        min_budget=analysis.total_depth,
        points=points,
    )
