"""Export, check and depth-report sections."""
from __future__ import annotations

from . import tables
from .fmt import notes, cite, code, num, sci, secs


def section(rec: dict, level: str = "###") -> list[str]:
    m = rec["metrics"]
    ops = ", ".join(f"{k} x{v}" for k, v in sorted((m.get("encrypted_op_types") or {}).items()))
    items = [f"graph: {num(m.get('nodes'))} nodes, {num(m.get('encrypted_nodes'))} on ciphertexts ({ops}); depth "
             f"{m.get('depth')}; `check`: " + ("OK, every operation on an encrypted value is polynomial" if m.get("ok")
                                              else "**violations**"),
             f"parity (onnxruntime vs torch, {m.get('n_examples')} dev examples, max length {m.get('max_length')}): "
             f"max |logit diff| {sci(m.get('max_abs_logit_diff'))}, mean {sci(m.get('mean_abs_logit_diff'))}, "
             f"agreement {num(100 * m['agreement'], 2)}% (accuracy torch {num(m.get('torch_accuracy'))}, onnx "
             f"{num(m.get('onnx_accuracy'))}); {secs(m.get('seconds'))}"]
    return [f"{level} {rec['title']}", "", *code(rec["command"]), cite(rec), "", *[f"- {x}" for x in items], "",
            *notes(rec.get("notes", [])), ""]


def report(rec: dict, level: str = "###") -> list[str]:
    if rec.get("tables"):
        return tables.section(rec, level)
    return tables.metrics_section(rec, level)
