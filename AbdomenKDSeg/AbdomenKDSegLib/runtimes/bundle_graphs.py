"""ONNX graphs stored in a model bundle, so that the CPU runtimes need no PyTorch.

A bundle may hold, per stage, two uint8 tensors (covered by the bundle's checksum like the weights):
``graph.<stage>``, the stage's exported ONNX graph (logits, fixed (1, 1, *window_zyx) input) with
the initializers that are the stage's weights removed, and ``graph.<stage>.weights``, the JSON
list of those weight names. :func:`complete_graph` puts the weights back (float32, from the
bundle's float16/float32 tensors) by appending them to the serialized model: protobuf merges a
repeated ``graph`` field into one message, so no ONNX or protobuf package is needed at run time,
and the file holds the weights once (the graphs add ~0.3 MB, not another copy of the weights).

:func:`embed_graphs` (``python -m AbdomenKDSegLib.runtimes.bundle_graphs BUNDLE [OUT]``) adds the
graphs to a bundle; it needs PyTorch and ``onnx`` (the export), the bundle's weights and card are kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..engine.bundle import GRAPH_PREFIX, STAGES, ModelBundle, PathLike, load_bundle, write_bundle
from ..errors import BundleError

_FLOAT = 1  # onnx.TensorProto.FLOAT


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _tensor_proto(name: str, array: np.ndarray) -> bytes:
    """An ONNX TensorProto (dims = 1, data_type = 2, name = 8, raw_data = 9) of float32 ``array``."""
    data = np.ascontiguousarray(array, dtype="<f4")
    dims = b"".join(_varint(1 << 3) + _varint(int(d)) for d in data.shape)
    return dims + _varint(2 << 3) + _varint(_FLOAT) + _field(8, name.encode()) + _field(9, data.tobytes())


def weight_names(bundle: ModelBundle, stage: str) -> list[str]:
    """Names of the weights removed from ``stage``'s stored graph."""
    data = bundle.tensors.get(f"{GRAPH_PREFIX}{stage}.weights")
    return [] if data is None else list(json.loads(data.tobytes().decode("utf-8")))


def complete_graph(bundle: ModelBundle, stage: str) -> bytes:
    """The complete ONNX model of ``stage``: the stored graph with its weights appended (float32).

    Raises :class:`BundleError` when the bundle stores no graph or lacks one of its weights.
    """
    graph = bundle.graph(stage)
    if graph is None:
        raise BundleError(f"model bundle {bundle.path} stores no ONNX graph for its {stage} network")
    weights = bundle.stage_tensors(stage)
    missing = [n for n in weight_names(bundle, stage) if n not in weights]
    if missing:
        raise BundleError(f"model bundle {bundle.path}: its {stage} graph needs weights it lacks ({missing[0]})")
    initializers = b"".join(_field(5, _tensor_proto(n, weights[n])) for n in weight_names(bundle, stage))
    return graph + _field(7, initializers)  # ModelProto.graph = 7, GraphProto.initializer = 5


def strip_graph(model: bytes, weights: dict[str, np.ndarray]) -> tuple[bytes, list[str]]:
    """``model`` without the initializers equal to a tensor of ``weights`` (same name, float32 value),
    and their names. Needs the ``onnx`` package."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(model)
    kept, removed = [], []
    for init in proto.graph.initializer:
        stored = weights.get(init.name)
        value = numpy_helper.to_array(init)
        if (stored is not None and value.dtype == np.float32 and value.shape == stored.shape
                and np.array_equal(value, stored.astype(np.float32))):
            removed.append(init.name)
        else:
            kept.append(init)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto.SerializeToString(), removed


def embed_graphs(path: PathLike, out: PathLike | None = None) -> Path:
    """Write ``path``'s bundle with both stages' ONNX graphs stored (weights and card unchanged) to
    ``out`` (default: replace ``path`` atomically). Needs PyTorch and ``onnx``."""
    from .onnx_backend import export_onnx

    bundle = load_bundle(path)
    tensors = {k: v for k, v in bundle.tensors.items() if not k.startswith(GRAPH_PREFIX)}
    window = bundle.preprocessing.window_zyx
    for stage in STAGES:
        graph, names = strip_graph(export_onnx(bundle.network(stage), window), bundle.stage_tensors(stage))
        tensors[GRAPH_PREFIX + stage] = np.frombuffer(graph, dtype=np.uint8).copy()
        tensors[f"{GRAPH_PREFIX}{stage}.weights"] = np.frombuffer(json.dumps(names).encode(), dtype=np.uint8).copy()
    return write_bundle(out if out is not None else path, tensors, bundle.metadata)


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m AbdomenKDSegLib.runtimes.bundle_graphs BUNDLE [OUT]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        print("usage: python -m AbdomenKDSegLib.runtimes.bundle_graphs BUNDLE [OUT]", file=sys.stderr)
        return 2
    try:
        written = embed_graphs(args[0], args[1] if len(args) == 2 else None)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {written} with the coarse and fine ONNX graphs")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
