"""FHE verifier: ``cgf-fhe check model.onnx`` on any ONNX file.

Encryption taint starts at the graph inputs declared encrypted (``cgf_fhe.encrypted_inputs`` in the model's
``metadata_props``, or ``--encrypted NAME``, repeatable, which overrides the metadata) and follows the data flow.
Every node reading a ciphertext is checked against :data:`cgf_fhe.fhe_ops.OP_TABLE` (via
:func:`cgf_fhe.fhe_ops.analyze`; this module states no op semantics of its own). Nodes whose inputs are all
plaintext (e.g. ``1/n`` computed from the public attention mask) may use any op.

Exit codes: 0 clean, 1 violations, 2 unreadable/corrupt file or bad ``--encrypted`` name.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import onnx

from .. import fhe_ops
from ..graphinfo import node_scope


@dataclass
class CheckResult:
    path: str
    analysis: fhe_ops.Analysis
    model: onnx.ModelProto

    @property
    def ok(self) -> bool:
        return not self.analysis.violations

    def violations(self) -> list[dict]:
        nodes = list(self.model.graph.node)
        out = []
        for r in self.analysis.violations:
            out.append({
                "node": r.name,
                "op_type": r.op_type,
                "encrypted_inputs": list(r.encrypted_inputs),
                "reason": r.violation,
                "scope": node_scope(nodes[r.index]),
            })
        return out

    def summary(self) -> dict:
        a = self.analysis
        enc = [r for r in a.nodes if r.encrypted]
        return {
            "file": self.path,
            "ok": self.ok,
            "encrypted_inputs": list(a.encrypted_inputs),
            "nodes": len(a.nodes),
            "encrypted_nodes": len(enc),
            "plaintext_nodes": len(a.nodes) - len(enc),
            "op_types": dict(sorted(Counter(r.op_type for r in a.nodes).items())),
            "encrypted_op_types": dict(sorted(Counter(r.op_type for r in enc).items())),
            "depth": a.total_depth,
            "output_depth": dict(a.outputs),
            "violations": self.violations(),
        }


def check(model_or_path, encrypted: list[str] | None = None) -> CheckResult:
    """Run the verifier. ``model_or_path``: an ``onnx.ModelProto`` or a file path (loaded with the checker).
    ``encrypted`` overrides the metadata declaration. Raises :class:`cgf_fhe.fhe_ops.GraphError` on unreadable
    files or unknown input names."""
    model, path = fhe_ops.resolve_model(model_or_path)
    analysis = fhe_ops.analyze(model, encrypted or None)
    return CheckResult(path, analysis, model)


def format_text(res: CheckResult) -> str:
    s = res.summary()
    lines = [f"{s['file']}: {s['nodes']} nodes, {s['encrypted_nodes']} on ciphertexts "
             f"(encrypted inputs: {', '.join(s['encrypted_inputs'])})"]
    if res.ok:
        ops = ", ".join(f"{k} x{v}" for k, v in s["encrypted_op_types"].items())
        lines.append(f"ops on ciphertexts: {ops or '-'}")
        outs = ", ".join(f"{k}: {v}" for k, v in s["output_depth"].items()) or "-"
        lines.append(f"multiplicative depth: {s['depth']} (encrypted outputs: {outs})")
        lines.append("OK: every operation on an encrypted value is polynomial (FHE-evaluable).")
    else:
        v = s["violations"]
        lines.append(f"FAIL: {len(v)} operation(s) on encrypted values are not FHE-evaluable:")
        for i, x in enumerate(v, 1):
            where = f" [{x['scope']}]" if x["scope"] else ""
            lines.append(f"  {i}. node {x['node']!r} ({x['op_type']}){where}")
            lines.append(f"     encrypted input(s): {', '.join(x['encrypted_inputs'])}")
            lines.append(f"     refused: {x['reason']}")
        kinds = Counter(x["op_type"] for x in v)
        lines.append("by op type: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
    return "\n".join(lines)


def run_check(args) -> int:
    res = check(args.model, args.encrypted)
    if args.format == "json":
        print(json.dumps(res.summary(), indent=2))
    else:
        print(format_text(res))
    return 0 if res.ok else 1
