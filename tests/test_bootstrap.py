"""Refresh placement (cgf_fhe.bootstrap): a refresh is counted once per point where the encrypted state is refreshed
(however many tensors are refreshed there), and the placement is the exhaustive optimum (fewest points, then fewest
refreshed tensors) on small attention-like and residual graphs."""
import itertools
import json
import math

import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from cgf_fhe import fhe_ops
from cgf_fhe.bootstrap import _key, _lazy, _steps, plan_bootstraps
from cgf_fhe.export.report import build_report


def _vi(name, shape=(4,)):
    return h.make_tensor_value_info(name, T.FLOAT, list(shape))


def residual_stack(blocks: int, k: int) -> onnx.ModelProto:
    """x -> blocks of (k squarings of h, then h + that): a residual stream like an encoder's, depth blocks * k."""
    nodes, prev = [], "x"
    for b in range(blocks):
        cur = prev
        for j in range(k):
            nodes.append(h.make_node("Mul", [cur, cur], [f"b{b}_{j}"], name=f"sq{b}_{j}"))
            cur = f"b{b}_{j}"
        nodes.append(h.make_node("Add", [cur, prev], [f"h{b}"], name=f"res{b}"))
        prev = f"h{b}"
    return _model(nodes, prev)


def _check_levels(m, a, plan):
    """Every encrypted node has the levels it consumes on each encrypted input (refreshed values: the budget)."""
    left = {}
    for node, r in zip(m.graph.node, a.nodes):
        if not r.encrypted:
            continue
        ins = [left.get(x, plan.level_budget) for x in r.encrypted_inputs]
        assert min(ins) >= r.levels, (r.name, ins)
        for o in node.output:
            left[o] = plan.level_budget if o in plan.refresh else min(ins) - r.levels
    assert left == {k: v for k, v in plan.remaining.items() if k in left}


def attention_like(layers: int, d0: int, dq: int, dk: int, d1: int) -> onnx.ModelProto:
    """Per layer: p = d0 squarings of the stream; q, k = dq, dk squarings of p; the stream becomes
    (q * k + p) then d1 squarings (a score product and a residual, as in an encoder layer)."""
    nodes, n = [], [0]

    def chain(v, d, tag):
        for _ in range(d):
            n[0] += 1
            nodes.append(h.make_node("Mul", [v, v], [f"{tag}{n[0]}"], name=f"n{tag}{n[0]}"))
            v = f"{tag}{n[0]}"
        return v

    cur = "x"
    for _ in range(layers):
        p = chain(cur, d0, "p")
        q, k = chain(p, dq, "q"), chain(p, dk, "k")
        n[0] += 1
        nodes.append(h.make_node("Mul", [q, k], [f"s{n[0]}"], name=f"ns{n[0]}"))
        nodes.append(h.make_node("Add", [f"s{n[0]}", p], [f"r{n[0]}"], name=f"nr{n[0]}"))
        cur = chain(f"r{n[0]}", d1, "f")
    return _model(nodes, cur)


def _model(nodes, out):
    m = h.make_model(h.make_graph(nodes, "g", [_vi("x")], [_vi(out)]), opset_imports=[h.make_opsetid("", 18)])
    h.set_model_props(m, {"cgf_fhe.encrypted_inputs": json.dumps(["x"])})
    onnx.checker.check_model(m)
    return m


def exhaustive(m, a, L) -> tuple[int, int]:
    """The fewest (refresh points, refreshed values) over every valid refresh set (small graphs only)."""
    steps = _steps(m, a.nodes)
    values = [o for _, _, outs in steps for o in outs]
    best = None
    for r in range(len(values) + 1):
        if best is not None and r > best[1]:
            break
        for subset in itertools.combinations(values, r):
            s = set(subset)
            if _lazy(steps, L, s) == s:  # valid: no node short of levels
                best = min(best or (10**9, 0), _key(steps, s))
    return best


@pytest.mark.parametrize("args,L", [((1, 0, 5, 5, 0), 3), ((1, 1, 4, 4, 1), 3), ((2, 1, 3, 3, 1), 3),
                                    ((2, 1, 2, 2, 1), 3), ((1, 1, 3, 2, 2), 3)])
def test_attention_like_placement_is_the_exhaustive_optimum(args, L):
    m = attention_like(*args)
    a = fhe_ops.analyze(m, ["x"])
    plan = plan_bootstraps(m, a, L)
    _check_levels(m, a, plan)
    assert (plan.point_count, plan.count) == exhaustive(m, a, L)
    assert plan.point_count >= math.ceil(a.total_depth / L) - 1
    rep = build_report(m, level_budget=L)
    assert rep["refreshes_total"] == rep["bootstraps_total"] == plan.point_count
    assert rep["refreshed_values_total"] == plan.count
    assert rep["refresh_points"] == plan.points
    assert sum(rep["refreshes_per_layer"] or [0]) <= plan.point_count


def test_q_and_k_refreshed_at_one_point_count_once():
    # q and k (5 squarings each of the fresh input) meet in q * k: with L = 3 both are refreshed after their 3rd
    # squaring, at one point; counting per tensor said 2 refreshes, the critical path needs 1 (depth 6 = 2 L)
    m = attention_like(1, 0, 5, 5, 0)
    a = fhe_ops.analyze(m, ["x"])
    plan = plan_bootstraps(m, a, 3)
    assert a.total_depth == 6 and plan.count == 2 and len(plan.points) == 1 and len(plan.points[0]) == 2
    rep = build_report(m, level_budget=3)
    assert rep["refreshes_total"] == rep["refreshes_lower_bound"] == 1
    assert rep["refreshed_values_total"] == 2


@pytest.mark.parametrize("blocks,k,L", [(4, 3, 5), (5, 2, 3), (5, 3, 7), (4, 4, 7)])
def test_residual_stack_placement_is_the_exhaustive_optimum(blocks, k, L):
    m = residual_stack(blocks, k)
    a = fhe_ops.analyze(m, ["x"])
    plan = plan_bootstraps(m, a, L)
    _check_levels(m, a, plan)
    assert (plan.point_count, plan.count) == exhaustive(m, a, L)


def test_points_partition_the_refreshed_values_in_order():
    m = attention_like(2, 1, 3, 3, 1)
    a = fhe_ops.analyze(m, ["x"])
    plan = plan_bootstraps(m, a, 3)
    assert any(len(p) >= 2 for p in plan.points)
    assert [v for p in plan.points for v in p] == plan.refresh


def test_chain_points_equal_values():
    nodes, prev = [], "x"
    for i in range(10):
        nodes.append(h.make_node("Mul", [prev, prev], [f"m{i}"], name=f"mul{i}"))
        prev = f"m{i}"
    m = _model(nodes, prev)
    a = fhe_ops.analyze(m, ["x"])
    for L in (1, 2, 3, 4, 9, 10):
        plan = plan_bootstraps(m, a, L)
        assert plan.point_count == plan.count == math.ceil(10 / L) - 1
