"""A small ONNX graph builder whose weights live in one shared external-data file.

Every graph of a bundle points its initializers into the same `weights.bin` (ONNX external data:
location, offset, length), so a weight used by two graphs is stored once on disk. Weights are
written first (`WeightsFile`), graphs are built afterwards and only reference them by name.
Small constants (shapes, axes, the strategy ids) stay inside the graph.

The builder emits onnxruntime's fused contrib ops (MultiHeadAttention, SkipLayerNormalization,
BiasGelu, DynamicQuantizeMatMul) directly, the way onnxruntime-genai's model builder writes its
graphs: optimum's exported BlenderBot graphs kept about 10 primitive ops per attention, and the
transformer optimizer fused no Attention on them (SPEC section 4).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from star_runtime.bundle import ALIGNMENT, FINGERPRINT_KEY, WEIGHTS_HEADER, weights_header

OPSET = 17  # LayerNormalization is an ONNX op from 17 on
MS_DOMAIN = "com.microsoft"
_ONNX_TYPE = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
}


@dataclass(frozen=True)
class StoredTensor:
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    length: int

    def as_dict(self) -> dict:
        return {"dtype": self.dtype.name, "shape": list(self.shape), "offset": self.offset, "length": self.length}


class WeightsFile:
    """Writes named arrays one after another, each at a multiple of ALIGNMENT bytes, after a header.

    fingerprint (set by `close`) = sha256 over every tensor's name, dtype, shape, offset and bytes:
    the same value goes into the header (star_runtime.bundle.weights_header), both graphs'
    metadata and the manifest, so graphs and weights of different exports are never paired.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tensors: dict[str, StoredTensor] = {}
        self.fingerprint = ""
        self._digest = hashlib.sha256()
        self._file = open(self.path, "wb")
        self._file.write(bytes(WEIGHTS_HEADER))  # filled in by close()

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self.tensors:
            raise ValueError(f"weight {name!r} written twice")
        array = np.ascontiguousarray(array)
        if array.dtype not in _ONNX_TYPE:
            raise TypeError(f"weight {name!r}: unsupported dtype {array.dtype}")
        offset = -(-self._file.tell() // ALIGNMENT) * ALIGNMENT
        self._file.seek(offset)
        self._file.write(array.tobytes())
        self.tensors[name] = StoredTensor(array.dtype, tuple(array.shape), offset, array.nbytes)
        self._digest.update(f"{name}|{array.dtype.name}|{list(array.shape)}|{offset}\n".encode())
        self._digest.update(array.tobytes())

    def close(self) -> None:
        if not self._file.closed:
            self.fingerprint = self._digest.hexdigest()
            self._file.seek(0)
            self._file.write(weights_header(self.fingerprint))
            self._file.close()


@dataclass
class GraphBuilder:
    """Collects nodes, inputs, outputs and references to stored weights for one graph."""

    name: str
    weights: WeightsFile
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    _used: dict[str, None] = field(default_factory=dict)  # stored weights referenced, in order
    _consts: dict[str, onnx.TensorProto] = field(default_factory=dict)
    _count: int = 0
    scope: str = ""  # prefix of the node names, so a profile can add up the time per part

    @contextmanager
    def named(self, scope: str):
        """Nodes added inside are named `scope/op_n` (e.g. "star/Gemm_12")."""
        outer, self.scope = self.scope, scope
        try:
            yield
        finally:
            self.scope = outer

    def input(self, name: str, dtype: np.dtype | type, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _ONNX_TYPE[np.dtype(dtype)], shape))
        return name

    def output(self, value: str, name: str, dtype: np.dtype | type, shape: list[int | str]) -> None:
        """Expose `value` under `name` (an Identity only where the names differ)."""
        if value != name:
            self.op("Identity", [value], [name])
        self.outputs.append(helper.make_tensor_value_info(name, _ONNX_TYPE[np.dtype(dtype)], shape))

    def weight(self, name: str) -> str:
        """A stored weight, by name; raises KeyError for a weight never written."""
        if name not in self.weights.tensors:
            raise KeyError(f"graph {self.name}: weight {name!r} is not in the weights file")
        self._used[name] = None
        return name

    def const(self, value: np.ndarray | list[int], dtype: type = np.int64) -> str:
        """A small constant inside the graph (shapes, axes, ids)."""
        array = np.asarray(value, dtype=dtype)
        name = f"const_{array.dtype.name}_{'_'.join(str(v) for v in array.ravel())}".replace("-", "m")
        if name not in self._consts:
            self._consts[name] = numpy_helper.from_array(array, name)
        return name

    def fresh(self, stem: str) -> str:
        """A value name not used before."""
        self._count += 1
        return f"{stem}_{self._count}"

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | int = 1, *, domain: str = "",
           **attrs) -> str | list[str]:
        """Add a node; `outputs` as a count names them; returns the name(s) of its outputs."""
        self._count += 1
        if isinstance(outputs, int):
            outputs = [f"{op_type.lower()}_{self._count}_{i}" for i in range(outputs)]
        name = f"{self.scope}/{op_type}_{self._count}" if self.scope else f"{op_type}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name,
                                           domain=domain or None, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def model(self, location: str) -> onnx.ModelProto:
        """The ModelProto, its weights pointing into `location` (the shared file, relative path)."""
        initializers = list(self._consts.values())
        for name in self._used:
            stored = self.weights.tensors[name]
            tensor = TensorProto(name=name, data_type=_ONNX_TYPE[stored.dtype], dims=list(stored.shape))
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", stored.offset), ("length", stored.length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            initializers.append(tensor)
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="star-export",
        )
        model.ir_version = 8  # onnxruntime >= 1.14 reads IR 8; keeps older edge installs working
        helper.set_model_props(model, {FINGERPRINT_KEY: self.weights.fingerprint})
        return model
