"""Small ONNX graph helpers used by every stage that reads an exported graph, each stated once.

At the bottom of the package (imports only onnx): :mod:`cgf_fhe.fhe_ops`, the report, the verifier, graph
classification and the simulator's interpreter all read attributes, metadata, element counts, layer indices and
the graph's input/output names through these functions.
"""
from __future__ import annotations

import json
import math
import re

import onnx

METADATA_PREFIX = "cgf_fhe."  # the exporter's model metadata keys
# an encoder layer index in a module path or node name: ``encoder.layer.3``, ``/layers_3/``, ``h.3``, ``block_3``
LAYER_RE = re.compile(r"(?:^|[./_])(?:layer|layers|h|block|blocks)[._/](\d+)(?=$|[./_])")


def attr(node: onnx.NodeProto, name: str, default=None):
    """Value of attribute ``name`` of ``node`` (``default`` when absent)."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def read_metadata(model_or_path) -> dict:
    """The exporter's model metadata: ``{key without the cgf_fhe. prefix: JSON-decoded value (or the string)}``,
    from an ``onnx.ModelProto`` or a file path."""
    proto = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path),
                                                                                         load_external_data=False)
    out = {}
    for p in proto.metadata_props:
        if p.key.startswith(METADATA_PREFIX):
            key = p.key[len(METADATA_PREFIX):]
            try:
                out[key] = json.loads(p.value)
            except json.JSONDecodeError:
                out[key] = p.value
    return out


def node_metadata(node: onnx.NodeProto) -> dict[str, str]:
    """A node's own ``metadata_props`` (the torch exporter's scopes and stack traces)."""
    return {p.key: p.value for p in node.metadata_props}


def numel(shape) -> int | None:
    """Number of elements of a static shape; None when a dim is unknown or symbolic."""
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    return int(math.prod(shape)) if len(shape) else 1


def layer_index(path: str) -> int | None:
    """Encoder layer index named in a module path or node name, None when there is none."""
    m = LAYER_RE.search(path or "")
    return int(m.group(1)) if m else None


def input_names(model: onnx.ModelProto, with_initializers: bool = True) -> list[str]:
    """The graph's input names (without those an initializer feeds, when ``with_initializers`` is False)."""
    inits = set() if with_initializers else {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def output_names(model: onnx.ModelProto) -> list[str]:
    """The graph's output names."""
    return [o.name for o in model.graph.output]


__all__ = ["attr", "read_metadata", "node_metadata", "numel", "layer_index", "input_names", "output_names",
           "LAYER_RE", "METADATA_PREFIX"]
