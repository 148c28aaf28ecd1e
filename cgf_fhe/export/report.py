"""``cgf-fhe report``: multiplicative depth, op counts, refresh placement and a latency estimate.

Everything about individual ops (allowed?, levels, costs per packing) comes from :func:`cgf_fhe.fhe_ops.analyze`;
this module aggregates it per encoder layer and stage (:mod:`cgf_fhe.graphinfo`), places refreshes with
:func:`cgf_fhe.bootstrap.plan_bootstraps`, and prices it with a cost table (:mod:`cgf_fhe.ckks`).

Packings (``--packing``)
------------------------
The op counts of every node come from the op table's per-packing cost formulas (:data:`cgf_fhe.fhe_ops.PACKINGS`,
described in :mod:`cgf_fhe.fhe_ops`): ``element`` (default; what the simulator runs: one ciphertext per tensor
element, the examples of a batch in the slots, up to N/2 examples per pass, no rotation ever) and ``packed``
(one example per pass, the last axis of every tensor in the slots; diagonal method with baby-step/giant-step
for plaintext matrices, rotate-and-sum for reductions). ``slots`` and ``row`` are accepted as the former names.
Counts are per pass; the per-example latency is the pass latency divided by the examples per pass.

Levels, depth and refreshes
---------------------------
``depth`` of a node = multiplicative depth of its encrypted output from the encrypted inputs; per layer/stage
``depth`` = the longest chain of levels inside that group (its "levels per layer"), ``depth_in``/``depth_out`` the
absolute depth entering/leaving it. Refresh points are placed for the budget ``--levels L`` (fewest points first,
then fewest refreshed tensors; see :mod:`cgf_fhe.bootstrap`). ``refreshes_total`` counts refresh *points*: one per
moment where the encrypted state is refreshed, however many tensors are refreshed there together (e.g. the residual
stream and the branch meeting it); ``refreshed_values_total`` counts the tensors, ``refresh_points`` lists them per
point, and every ciphertext of a refreshed tensor is refreshed (``refreshed_ciphertexts``). Per layer/stage,
``refreshes`` counts the points whose deepest tensor lies in it (they sum to ``refreshes_total``) and
``refreshed_values`` the tensors. A refresh is either a **client-aided refresh** (the ciphertext goes back to the key
holder, who decrypts and re-encrypts it: a round trip per point, what TenSEAL does) or a **bootstrap** (on the
server, under encryption); ``refresh_kind`` says which the cost table prices (``bootstrap`` when the table has a
``bootstrap`` figure, else ``client-aided``). The counts are the same for both; cost and leakage are not.

JSON schema (``cgf-fhe-report/1``; ``--format json`` prints it, ``-o DIR`` writes ``DIR/report.json``)
---------------------------------------------------------------------------------------------------
Top level: ``file``, ``encrypted_inputs``, ``seq_len``, ``input_dims``, ``packing``, ``total_depth``,
``min_level_budget_no_bootstrap`` (= total depth: the smallest budget with no refresh), ``min_level_budget_feasible``
(largest single-node need), ``level_budget``, ``refreshes_total``, ``refreshes_lower_bound`` (``ceil(depth/L) - 1``),
``refresh_kind`` (``client-aided`` | ``bootstrap``), ``refresh_description``, ``refreshed_ciphertexts``,
``refresh_nodes`` / ``refresh_values`` (ordered refresh positions: producing node, refreshed value),
``refreshed_values_total``, ``refresh_points`` (the refreshed values of each point, in order),
``levels_per_layer``, ``refreshes_per_layer``, ``ckks`` (``poly_modulus``, ``slots``, ``coeff_bits``, ``log_q``,
``scale_bits``, ``secure_128``; the ring and chain ``simulate`` uses for the same ``--levels``, :mod:`cgf_fhe.ckks`),
``costs`` (``ms`` per op, ``note``, ``source``), ``latency_seconds`` (one encrypted pass on the server),
``examples_per_pass``, ``latency_per_example_seconds``, ``client_seconds`` (encrypt inputs + decrypt outputs),
``totals`` (op counts), ``layers`` (list), ``head`` (list of non-layer groups: ``name`` in
embeddings/pooler/classifier/input/other), ``stages`` (per stage summed over layers, with ``depth_per_layer``),
``critical_path`` (nodes consuming levels, input to output), ``nodes`` (list), ``poly`` (the export metadata's
polynomial groups, when present). Older names kept as aliases (they counted client-aided refreshes as
"bootstraps"): ``bootstraps_total``, ``bootstraps_lower_bound``, ``bootstrap_kind`` (its old wording),
``bootstrap_nodes``, ``bootstrap_values``, ``bootstraps_per_layer``, and per group ``bootstraps`` /
``bootstrap_nodes``.

Each layer/group: ``index`` (layers) or ``name`` (head), ``depth`` (levels consumed inside it), ``depth_in``,
``depth_out``, ``ct_ct_mults``, ``ct_pt_mults``, ``additions``, ``rotations``, ``ciphertexts`` (largest encrypted
tensor, in ciphertexts), ``nodes``, ``encrypted_nodes``, ``refreshes``, ``refresh_nodes``,
``refreshed_ciphertexts``, ``latency_seconds``; layers also carry ``stages`` (same fields per stage).
Each node: ``name``, ``op_type``, ``layer``, ``stage``, ``encrypted``, ``depth``, ``levels``, ``operands``
(ct-ct / ct-pt / ct / pt), the four op counts, ``ciphertexts``, ``levels_left`` (after the node, before any
refresh of its output), ``refreshed`` (its outputs refreshed by the plan).
Several files: ``{"schema": ..., "models": [report, ...]}``.

``--packed-seal`` adds ``packed_seal``: the schedule ``simulate --backend seal`` runs (one example per pass,
tokens x hidden packed per ciphertext, rotations), counted by its dry run on random embeddings of ``seq_len``
tokens (:func:`cgf_fhe.simulate.api.packed_seal_estimate`; the counts do not depend on the values): ``tokens``,
``ckks`` (its parameters: simulate's default chain, or ``--levels``), ``latency_seconds`` (one example),
``estimated_peak_bytes``, ``galois_keys``, ``refreshes`` (client-aided), ``cost_source``, ``totals`` and
``layers`` (``layer``: index or ``"head"``), each with ``ct_pt_mults``, ``ct_ct_mults``, ``rotations``,
``level_matches``, ``additions``, ``rescales``, ``encodes``, ``refreshes``, ``refreshed_ciphertexts``,
``latency_seconds``. The renderings put it per layer next to the ``--packing`` counts.
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import onnx

from .. import ckks, fhe_ops
from ..bootstrap import plan_bootstraps
from ..fmt import fmt_seconds as _fmt_s
from ..graph import output_names, read_metadata
from ..graphinfo import HEAD_STAGES, STAGES, classify

SCHEMA = "cgf-fhe-report/1"
COUNT_KEYS = fhe_ops.COUNT_KEYS
OP_MS = {"ct_ct_mults": "ct_ct_mult", "ct_pt_mults": "ct_pt_mult", "additions": "add", "rotations": "rotation"}
DEFAULT_SEQ_LEN = 128
# the packed SEAL dry run's operation kinds -> this report's names
SEAL_KEYS = {"mul_pt": "ct_pt_mults", "mul_ct": "ct_ct_mults", "rotate": "rotations", "level_match": "level_matches",
             "add": "additions", "rescale": "rescales", "encode": "encodes", "refresh": "refreshed_ciphertexts"}
SEAL_COST_SOURCE = ("SEAL op latencies measured at N=16384 with 8 primes (ct x ct 54 ms, ct x pt 13 ms, rotation "
                    "33 ms), scaled with the ring and the primes left at each operation's level")
# what a refresh point costs and leaks depends on its kind: a bootstrap runs on the server under encryption; a
# client-aided refresh sends the ciphertext to the key holder, who decrypts and re-encrypts it (a round trip)
REFRESH_WHAT = {"client-aided": "client-aided refresh (decrypt + re-encrypt by the key holder)",
                "bootstrap": "bootstrap (on the server, under encryption)"}


# --- aggregation -------------------------------------------------------------------------------------------------

def _input_dims(model: onnx.ModelProto, seq_len: int) -> dict:
    dims = {}
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        shape = inp.type.tensor_type.shape.dim
        dims[inp.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (1 if i == 0 else seq_len)
                               for i, d in enumerate(shape))
    return dims


def _group_stats(idx: list[int], nodes_out: list[dict], results, producer_of_input, depth_of) -> dict:
    """Aggregate node rows ``idx`` (indices into the graph)."""
    members = set(idx)
    local: dict[str, int] = {}
    depth_in = 0
    tot = Counter()
    cts = 0
    for i in idx:
        r = results[i]
        row = nodes_out[i]
        if not r.encrypted:
            continue
        for k in COUNT_KEYS:
            tot[k] += row[k]
        cts = max(cts, row["ciphertexts"])
        best = 0
        for x in r.encrypted_inputs:
            p = producer_of_input.get(x)
            if p is not None and p in members:
                best = max(best, local.get(x, 0))
            else:
                depth_in = max(depth_in, depth_of.get(x, 0))
        for o in row["outputs"]:
            local[o] = best + r.levels
    enc_nodes = [i for i in idx if results[i].encrypted]
    return {
        "depth": max(local.values(), default=0),
        "depth_in": depth_in if enc_nodes else 0,
        "depth_out": max((results[i].depth for i in enc_nodes), default=0),
        **{k: int(tot[k]) for k in COUNT_KEYS},
        "ciphertexts": int(cts),
        "nodes": len(idx),
        "encrypted_nodes": len(enc_nodes),
    }


def build_report(model_or_path, *, level_budget: int | None = None, scale_bits: int = 40,
                 cost_table: str | Path | dict | None = None, encrypted: list[str] | None = None,
                 seq_len: int | None = None, packing: str = "element", packed_seal: bool = False) -> dict:
    """The report as a JSON-serialisable dict (schema in the module doc and docs/). ``packed_seal``: also the
    packed SEAL schedule's per-layer counts and latency (its dry run: slow for wide models at long sequences)."""
    packing = fhe_ops.packing_name(packing)
    model, path = fhe_ops.resolve_model(model_or_path)
    meta = read_metadata(model)
    seq = int(seq_len or meta.get("seq_len") or meta.get("max_length") or DEFAULT_SEQ_LEN)
    dims = _input_dims(model, seq)
    analysis = fhe_ops.analyze(model, encrypted or None, dims)
    if analysis.violations:
        v = analysis.violations
        raise fhe_ops.GraphError(f"{path}: {len(v)} operation(s) on ciphertexts are not FHE-evaluable (first: node "
                                 f"{v[0].name} ({v[0].op_type}): {v[0].violation}); run `cgf-fhe check` for the list")
    shapes = analysis.shapes
    where = classify(model)
    gnodes = list(model.graph.node)
    results = analysis.nodes
    min_feasible = max((r.levels for r in results if r.encrypted), default=0)
    L = analysis.total_depth if level_budget is None else int(level_budget)
    plan = plan_bootstraps(model, analysis, L)

    producer = fhe_ops.producers(gnodes)
    refreshed_by_node = defaultdict(list)
    for v in plan.refresh:
        if v in producer:
            refreshed_by_node[producer[v]].append(v)

    def cts_of(value):
        return fhe_ops.ciphertexts(shapes.get(value), packing) or 1

    rows = []
    for i, (n, r) in enumerate(zip(gnodes, results)):
        layer, stage = where[i]
        cnt = r.costs.get(packing, Counter())
        outs = [o for o in n.output if o]
        rp = plan.nodes.get(r.name)
        rows.append({
            "name": r.name, "op_type": r.op_type, "layer": layer, "stage": stage, "encrypted": r.encrypted,
            "depth": r.depth if r.encrypted else 0, "levels": r.levels, "operands": r.operands,
            **{k: int(cnt.get(k, 0)) for k in COUNT_KEYS},
            "ciphertexts": max((cts_of(o) for o in outs), default=0) if r.encrypted else 0,
            "levels_left": rp.levels_out if rp else None,
            "refreshed": refreshed_by_node.get(i, []),
            "outputs": outs,
        })

    # CKKS parameters (the ring and chain simulate would use, cgf_fhe.ckks) and costs
    params = ckks.CKKSParams.from_options(None, None, scale_bits, L, insecure=True)
    chain, n_ring, secure = list(params.coeff_bits), params.poly_modulus, not params.warnings
    table = cost_table if isinstance(cost_table, dict) else ckks.load_cost_table(cost_table)
    cst = ckks.costs_for(table, n_ring, chain)
    ms = cst["ms"]
    refresh_ms = ms["bootstrap"] if ms.get("bootstrap") is not None else ms.get("refresh")
    refresh_kind = "bootstrap" if ms.get("bootstrap") is not None else "client-aided"
    refresh_what = REFRESH_WHAT[refresh_kind]
    slots = n_ring // 2

    def latency(stats: dict, refreshed_cts: int) -> float:
        t = sum(stats[k] * ms[OP_MS[k]] for k in COUNT_KEYS)
        t += refreshed_cts * (refresh_ms or 0.0)
        return t / 1e3

    depth_of = dict(analysis.depth)
    by_layer = defaultdict(list)
    by_layer_stage = defaultdict(lambda: defaultdict(list))
    head = defaultdict(list)
    for i, row in enumerate(rows):
        if row["layer"] is not None:
            by_layer[row["layer"]].append(i)
            by_layer_stage[row["layer"]][row["stage"]].append(i)
        else:
            head[row["stage"]].append(i)

    # a refresh point belongs to the group of its deepest refreshed value (so the groups' points sum to the total)
    anchors = {max(p, key=lambda v: (depth_of.get(v, 0), p.index(v))) for p in plan.points}

    def refresh_info(idx):
        vals = [v for i in idx for v in rows[i]["refreshed"]]
        nodes = [rows[i]["name"] for i in idx if rows[i]["refreshed"]]
        pts = sum(v in anchors for v in vals)
        return {"refreshes": pts, "refreshed_values": len(vals), "refresh_nodes": nodes,
                "refreshed_ciphertexts": int(sum(cts_of(v) for v in vals)),
                "bootstraps": pts, "bootstrap_nodes": nodes}  # old names, kept as aliases

    def group(idx):
        st = _group_stats(idx, rows, results, producer, depth_of)
        st.update(refresh_info(idx))
        st["latency_seconds"] = latency(st, st["refreshed_ciphertexts"])
        return st

    layers = []
    for li in sorted(by_layer):
        g = {"index": li, **group(by_layer[li])}
        g["stages"] = {s: group(by_layer_stage[li][s]) for s in STAGES if by_layer_stage[li].get(s)}
        g["stages"].update({s: group(ix) for s, ix in by_layer_stage[li].items() if s not in STAGES})
        layers.append(g)
    head_groups = [{"name": s, **group(head[s])} for s in HEAD_STAGES if head.get(s)]
    stage_totals = {}
    for s in list(STAGES) + sorted({st for lay in layers for st in lay["stages"]} - set(STAGES)):
        members = [i for li in by_layer for i in by_layer_stage[li].get(s, [])]
        if members:
            agg = Counter()
            for lay in layers:
                if s in lay["stages"]:
                    for k in COUNT_KEYS + ("refreshes", "refreshed_ciphertexts"):
                        agg[k] += lay["stages"][s][k]
            stage_totals[s] = {**{k: int(agg[k]) for k in COUNT_KEYS + ("refreshes", "refreshed_ciphertexts")},
                               "bootstraps": int(agg["refreshes"]),
                               "depth_per_layer": [lay["stages"][s]["depth"] if s in lay["stages"] else 0
                                                   for lay in layers]}
    all_idx = list(range(len(rows)))
    totals = group(all_idx)

    # critical path: from the deepest encrypted output back to an encrypted input through the deepest operand
    crit = []
    if analysis.depth:
        outs = [o for o in output_names(model) if o in analysis.depth]
        cur = max(outs or analysis.depth, key=lambda v: analysis.depth[v])
        seen = set()
        while cur in producer and cur not in seen:
            seen.add(cur)
            i = producer[cur]
            r = results[i]
            if r.levels:
                crit.append({k: rows[i][k] for k in ("name", "op_type", "layer", "stage", "depth", "levels")})
            if not r.encrypted_inputs:
                break
            cur = max(r.encrypted_inputs, key=lambda v: analysis.depth.get(v, 0))
        crit.reverse()

    enc_inputs = list(analysis.encrypted_inputs)
    out_enc = [o for o in output_names(model) if o in analysis.depth]
    client_ms = (sum(cts_of(x) for x in enc_inputs) * (ms.get("encrypt") or 0.0)
                 + sum(cts_of(x) for x in out_enc) * (ms.get("decrypt") or 0.0))
    report = {
        "schema": SCHEMA,
        "file": path,
        "encrypted_inputs": enc_inputs,
        "seq_len": seq,
        "input_dims": {k: list(v) for k, v in dims.items()},
        "packing": packing,
        "total_depth": analysis.total_depth,
        "min_level_budget_no_bootstrap": analysis.total_depth,
        "min_level_budget_feasible": min_feasible,
        "level_budget": L,
        "refreshes_total": plan.point_count,
        "refreshed_values_total": plan.count,
        "refresh_points": [list(p) for p in plan.points],
        "refreshes_lower_bound": max(math.ceil(analysis.total_depth / L) - 1, 0) if L > 0 else None,
        "refresh_kind": refresh_kind,
        "refresh_description": refresh_what,
        "refreshed_ciphertexts": totals["refreshed_ciphertexts"],
        "refresh_nodes": list(plan.refresh_nodes),
        "refresh_values": list(plan.refresh),
        "levels_per_layer": [lay["depth"] for lay in layers],
        "refreshes_per_layer": [lay["refreshes"] for lay in layers],
        # old names (they counted client-aided refreshes too), kept as aliases for readers of older reports
        "bootstraps_total": plan.point_count,
        "bootstraps_lower_bound": max(math.ceil(analysis.total_depth / L) - 1, 0) if L > 0 else None,
        "bootstrap_kind": "bootstrap" if refresh_kind == "bootstrap" else "client-aided refresh (decrypt + re-encrypt)",
        "bootstrap_nodes": list(plan.refresh_nodes),
        "bootstrap_values": list(plan.refresh),
        "bootstraps_per_layer": [lay["refreshes"] for lay in layers],
        "ckks": {"poly_modulus": n_ring, "slots": slots, "coeff_bits": chain, "log_q": sum(chain),
                 "scale_bits": scale_bits, "secure_128": secure,
                 "note": "" if secure else (f"log Q = {sum(chain)} exceeds the HE standard's 128-bit bound of every "
                                            f"ring size (max {ckks.HE_STANDARD_128[n_ring]} at N={n_ring}); simulate "
                                            "refuses it without --insecure: use a smaller --levels (more refreshes)")},
        "costs": {"ms": ms, "note": cst["note"], "source": cst["source"]},
        "latency_seconds": totals["latency_seconds"],
        "examples_per_pass": slots if packing == "element" else 1,
        "latency_per_example_seconds": totals["latency_seconds"] / (slots if packing == "element" else 1),
        "client_seconds": client_ms / 1e3,
        "totals": {k: totals[k] for k in COUNT_KEYS + ("ciphertexts", "nodes", "encrypted_nodes")},
        "layers": layers,
        "head": head_groups,
        "stages": stage_totals,
        "critical_path": crit,
        "nodes": [{k: v for k, v in row.items() if k != "outputs"} for row in rows],
        "poly": meta.get("poly"),
    }
    if packed_seal:
        from ..simulate.api import packed_seal_estimate  # the simulate stage's public estimate

        seal_params = ckks.CKKSParams.from_options(None, None, scale_bits, level_budget, insecure=True)
        report["packed_seal"] = packed_seal_section(packed_seal_estimate(model, seq, seal_params))
    return report


def packed_seal_section(est: dict) -> dict:
    """The packed SEAL dry run's estimate (:func:`cgf_fhe.simulate.api.packed_seal_estimate`) in this report's
    names (module doc: ``packed_seal``)."""
    def counts(row: dict) -> dict:
        return {name: int(row.get(kind, 0)) for kind, name in SEAL_KEYS.items()}

    layers = [{"layer": r["layer"], **counts(r), "refreshes": int(r["refreshes"]),
               "latency_seconds": float(r.get("estimated_seconds") or 0.0)} for r in est["layers"]]
    return {"packing": est["packing"], "tokens": est["tokens"], "ckks": est["params"],
            "latency_seconds": float(est["estimated_seconds"]), "estimated_peak_bytes": int(est["estimated_peak_bytes"]),
            "galois_keys": int(est["galois_keys"]), "refreshes": int(est["client_aided_refreshes"]),
            "refresh_kind": "client-aided", "cost_source": SEAL_COST_SOURCE,
            "totals": counts(est["totals"]), "layers": layers}


# --- rendering ---------------------------------------------------------------------------------------------------

def _fmt_int(v) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


def _layer_rows(rep: dict) -> list[list[str]]:
    out = []
    for lay in rep["layers"]:
        out.append([f"layer {lay['index']}", str(lay["depth"]), str(lay["depth_out"]), _fmt_int(lay["ct_ct_mults"]),
                    _fmt_int(lay["ct_pt_mults"]), _fmt_int(lay["additions"]), _fmt_int(lay["rotations"]),
                    _fmt_int(lay["ciphertexts"]), str(lay["refreshes"]), _fmt_s(lay["latency_seconds"])])
    for g in rep["head"]:
        if g["encrypted_nodes"]:
            out.append([g["name"], str(g["depth"]), str(g["depth_out"]), _fmt_int(g["ct_ct_mults"]),
                        _fmt_int(g["ct_pt_mults"]), _fmt_int(g["additions"]), _fmt_int(g["rotations"]),
                        _fmt_int(g["ciphertexts"]), str(g["refreshes"]), _fmt_s(g["latency_seconds"])])
    return out


LAYER_COLS = ["group", "levels", "depth out", "ct x ct", "ct x pt", "adds", "rotations", "max cts", "refreshes",
              "est. time"]
STAGE_COLS = ["stage", "levels / layer", "ct x ct", "ct x pt", "adds", "rotations", "refreshes"]


def _stage_rows(rep: dict) -> list[list[str]]:
    return [[s, ",".join(map(str, v["depth_per_layer"])), _fmt_int(v["ct_ct_mults"]), _fmt_int(v["ct_pt_mults"]),
             _fmt_int(v["additions"]), _fmt_int(v["rotations"]), str(v["refreshes"])] for s, v in rep["stages"].items()]


def _summary_lines(rep: dict) -> list[str]:
    ck = rep["ckks"]
    lines = [
        f"file: {rep['file']}  (encrypted: {', '.join(rep['encrypted_inputs'])}; seq len {rep['seq_len']}; "
        f"packing: {rep['packing']})",
        f"total multiplicative depth: {rep['total_depth']}  -> smallest level budget with no refresh: "
        f"{rep['min_level_budget_no_bootstrap']}",
        f"level budget L = {rep['level_budget']}: {rep['refreshes_total']} refresh point(s) "
        f"({_fmt_int(rep['refreshed_ciphertexts'])} ciphertexts; each a {rep['refresh_description']})",
        f"levels per layer: {rep['levels_per_layer']}; refreshes per layer: {rep['refreshes_per_layer']}",
        f"CKKS: N = {ck['poly_modulus']} ({ck['slots']} slots), chain {len(ck['coeff_bits'])} primes, "
        f"log Q = {ck['log_q']}{'' if ck['secure_128'] else '  (NOT 128-bit secure: ' + ck['note'] + ')'}",
        f"estimated server latency: {_fmt_s(rep['latency_seconds'])} per pass "
        f"({rep['examples_per_pass']} example(s) per pass -> {_fmt_s(rep['latency_per_example_seconds'])} "
        f"per example); client encrypt+decrypt {_fmt_s(rep['client_seconds'])}",
        f"costs: {rep['costs']['note']}; source: {rep['costs']['source']}",
    ]
    if rep["refresh_nodes"]:
        shown = ", ".join(rep["refresh_nodes"][:12]) + (" ..." if len(rep["refresh_nodes"]) > 12 else "")
        lines.append(f"refresh after: {shown}")
    if rep["critical_path"]:
        seq = []
        for c in rep["critical_path"]:
            tag = f"L{c['layer']}.{c['stage']}" if c["layer"] is not None else c["stage"]
            if seq and seq[-1][0] == tag:
                seq[-1][1] += c["levels"]
            else:
                seq.append([tag, c["levels"]])
        lines.append("critical path (levels): " + " > ".join(f"{t}({n})" for t, n in seq))
    return lines


SEAL_COLS = ["group", "{p}: rotations", "{p}: time / pass", "{p}: time / example", "seal: ct x pt", "seal: ct x ct",
             "seal: rotations", "seal: level matches", "seal: refreshes", "seal: time / example"]


def _seal_cols(rep: dict) -> list[str]:
    return [c.format(p=rep["packing"]) for c in SEAL_COLS]


def _seal_summary(rep: dict) -> str:
    ps = rep["packed_seal"]
    ck = ps["ckks"]
    return (f"packed SEAL (simulate --backend seal) at {ps['tokens']} tokens, N = {ck['poly_modulus']}, "
            f"{ck['level_budget']} levels: {_fmt_s(ps['latency_seconds'])} per example (one example per pass; "
            f"{rep['packing']}: {_fmt_s(rep['latency_per_example_seconds'])}), {_fmt_int(ps['totals']['rotations'])} "
            f"rotations, {ps['refreshes']} client-aided refreshes, {ps['galois_keys']} Galois keys, peak ~"
            f"{ps['estimated_peak_bytes'] / 2**30:.1f} GiB; latency: {ps['cost_source']}")


def _seal_rows(rep: dict) -> list[list[str]]:
    """Per layer: the --packing counts next to the packed SEAL schedule's."""
    per = rep["examples_per_pass"]
    elem = {lay["index"]: (lay["rotations"], lay["latency_seconds"]) for lay in rep["layers"]}
    elem["head"] = (sum(g["rotations"] for g in rep["head"]), sum(g["latency_seconds"] for g in rep["head"]))
    out = []
    for r in rep["packed_seal"]["layers"]:
        rot, sec = elem.get(r["layer"], (None, None))
        out.append([f"layer {r['layer']}" if r["layer"] != "head" else "head",
                    "" if rot is None else _fmt_int(rot), "" if sec is None else _fmt_s(sec),
                    "" if sec is None else _fmt_s(sec / per), _fmt_int(r["ct_pt_mults"]), _fmt_int(r["ct_ct_mults"]),
                    _fmt_int(r["rotations"]), _fmt_int(r["level_matches"]), str(r["refreshes"]),
                    _fmt_s(r["latency_seconds"])])
    return out


def to_markdown(rep: dict) -> str:
    def table(cols, rows):
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return out

    lines = ["# FHE depth and cost report", ""] + [f"- {x}" for x in _summary_lines(rep)] + ["", "## Per layer", ""]
    lines += table(LAYER_COLS, _layer_rows(rep))
    if rep["stages"]:
        lines += ["", "## Per stage (summed over layers)", ""] + table(STAGE_COLS, _stage_rows(rep))
    if rep["critical_path"]:
        lines += ["", "## Critical path", "", "| node | op | layer | stage | depth |", "|---|---|---|---|---|"]
        lines += [f"| {c['name']} | {c['op_type']} | {c['layer'] if c['layer'] is not None else '-'} | {c['stage']} | "
                  f"{c['depth']} |" for c in rep["critical_path"]]
    if rep.get("packed_seal"):
        lines += ["", f"## {rep['packing']} packing vs packed SEAL (`simulate --backend seal`), per layer", "",
                  _seal_summary(rep), ""] + table(_seal_cols(rep), _seal_rows(rep))
    return "\n".join(lines) + "\n"


def compare_rows(reps: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = ["metric"] + [Path(r["file"]).name for r in reps]
    metrics = [
        ("total depth", lambda r: str(r["total_depth"])),
        ("min L without refresh", lambda r: str(r["min_level_budget_no_bootstrap"])),
        ("level budget L", lambda r: str(r["level_budget"])),
        ("refreshes at L", lambda r: f"{r['refreshes_total']} ({r['refresh_kind']})"),
        ("levels per layer", lambda r: ",".join(map(str, r["levels_per_layer"]))),
        ("refreshes per layer", lambda r: ",".join(map(str, r["refreshes_per_layer"]))),
        ("ct x ct mults", lambda r: _fmt_int(r["totals"]["ct_ct_mults"])),
        ("ct x pt mults", lambda r: _fmt_int(r["totals"]["ct_pt_mults"])),
        ("additions", lambda r: _fmt_int(r["totals"]["additions"])),
        ("rotations", lambda r: _fmt_int(r["totals"]["rotations"])),
        ("ring N", lambda r: str(r["ckks"]["poly_modulus"])),
        ("latency / pass", lambda r: _fmt_s(r["latency_seconds"])),
        ("latency / example", lambda r: _fmt_s(r["latency_per_example_seconds"])),
    ]
    if any(r.get("packed_seal") for r in reps):
        metrics += [("seal: rotations / example",
                     lambda r: _fmt_int(r["packed_seal"]["totals"]["rotations"]) if r.get("packed_seal") else ""),
                    ("seal: latency / example",
                     lambda r: _fmt_s(r["packed_seal"]["latency_seconds"]) if r.get("packed_seal") else "")]
    return cols, [[name] + [f(r) for r in reps] for name, f in metrics]


def _console():
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=160)


def _rich_table(title, cols, rows):
    """A rich table whose first column is left-aligned and the numeric ones right-aligned."""
    from rich.table import Table

    t = Table(title=title)
    for i, c in enumerate(cols):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    return t


def print_report(rep: dict, show_nodes: bool = False) -> None:
    from rich.table import Table

    con = _console()
    for line in _summary_lines(rep):
        con.print(line, highlight=False, markup=False)
    con.print(_rich_table("per encoder layer (and head)", LAYER_COLS, _layer_rows(rep)))
    if rep["stages"]:
        con.print(_rich_table("per stage (summed over layers)", STAGE_COLS, _stage_rows(rep)))
    if rep.get("packed_seal"):
        con.print(_seal_summary(rep), highlight=False, markup=False)
        con.print(_rich_table(f"{rep['packing']} packing vs packed SEAL, per layer", _seal_cols(rep), _seal_rows(rep)))
    if show_nodes:
        t = Table(title="encrypted nodes")
        for c in ("node", "op", "layer", "stage", "operands", "levels", "depth", "levels left"):
            t.add_column(c)
        for n in rep["nodes"]:
            if n["encrypted"]:
                t.add_row(n["name"], n["op_type"], str(n["layer"]), n["stage"], n["operands"], str(n["levels"]),
                          str(n["depth"]), str(n["levels_left"]) + (" (refresh)" if n["refreshed"] else ""))
        con.print(t)


def run_report(args) -> int:
    reps = [build_report(m, level_budget=args.levels, scale_bits=args.scale_bits, cost_table=args.cost_table,
                         encrypted=args.encrypted, seq_len=args.seq_len, packing=args.packing,
                         packed_seal=getattr(args, "packed_seal", False)) for m in args.models]
    single = len(reps) == 1
    payload = reps[0] if single else {"schema": SCHEMA, "models": reps}
    if args.output_dir:
        from .plots import plot_levels, plot_stage_ops

        from ..io import check_output_dir, write_json, write_text

        out = check_output_dir(args.output_dir)
        if single:
            write_json(out / "report.json", reps[0])
            write_text(out / "report.md", to_markdown(reps[0]))
            plot_levels(reps[0], out / "levels_per_layer.png")
            plot_stage_ops(reps[0], out / "ops_per_stage.png")
        else:
            cols, rows = compare_rows(reps)
            md = ["# Comparison", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            md += ["| " + " | ".join(r) + " |" for r in rows]
            write_text(out / "comparison.md", "\n".join(md) + "\n")
            write_json(out / "comparison.json", payload)
            for r, m in zip(reps, args.models):
                sub = out / Path(m).stem
                sub.mkdir(exist_ok=True)
                write_json(sub / "report.json", r)
                write_text(sub / "report.md", to_markdown(r))
                plot_levels(r, sub / "levels_per_layer.png")
                plot_stage_ops(r, sub / "ops_per_stage.png")
    if args.format == "json":
        print(json.dumps(payload, indent=2))
    elif args.format == "md":
        if single:
            print(to_markdown(reps[0]))
        else:
            cols, rows = compare_rows(reps)
            print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
            print("\n".join("| " + " | ".join(r) + " |" for r in rows))
    else:
        if single:
            print_report(reps[0], args.nodes)
        else:
            from rich.table import Table

            cols, rows = compare_rows(reps)
            t = Table(title="comparison")
            for c in cols:
                t.add_column(c)
            for r in rows:
                t.add_row(*r)
            _console().print(t)
    if args.output_dir and args.format != "json":
        print(f"wrote {args.output_dir}")
    return 0
