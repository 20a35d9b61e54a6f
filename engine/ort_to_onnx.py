"""ONNX Runtime's own `.ort` model format back to a standard `.onnx` file.

The Moonshine models in the `moonshine-cpp` wheel ship as `.ort` flatbuffers with 8-bit weights.
onnxruntime runs them as they are, but a model in ORT format cannot be re-optimized when it is
loaded, so every decoder step expands the weights again (about 180 ms a token on one core).
Written back as `.onnx`, the same graph lets onnxruntime fold the dequantization once at load:
the tokens are identical and decoding is 5.6x faster (../shared/protocols/moonshine.md).

The reader is the flatbuffers schema that ships inside the onnxruntime wheel
(`onnxruntime.tools.ort_format_model`); the writer is the `onnx` package. ORT's tensor element
types and attribute kinds use ONNX's own numbering, so values carry over one to one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
from onnx import helper
from onnxruntime.tools.ort_format_model.ort_flatbuffers_py import fbs


class OrtFormatError(ValueError):
    """A file that is not a usable ORT-format model."""


def convert(ort_path: Path, onnx_path: Path) -> None:
    """Read `ort_path` (ORT format) and write the same model as ONNX to `onnx_path`."""
    proto = read(ort_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_path.with_suffix(".partial")
    onnx.save_model(proto, str(tmp))
    tmp.replace(onnx_path)  # a crash mid-write never leaves a truncated model behind


def read(ort_path: Path) -> onnx.ModelProto:
    """The model in `ort_path` (ORT format) as ONNX."""
    data = ort_path.read_bytes()
    if not fbs.InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(data, 0):
        raise OrtFormatError(f"{ort_path}: not an ORT-format model")
    session = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(data, 0)
    model = session.Model()
    if model is None or model.Graph() is None:
        raise OrtFormatError(f"{ort_path}: the file holds no model graph")
    opsets = [
        helper.make_opsetid(_text(model.OpsetImport(i).Domain()), model.OpsetImport(i).Version())
        for i in range(model.OpsetImportLength())
    ]
    proto = helper.make_model(
        _graph(model.Graph(), "main"),
        opset_imports=opsets,
        producer_name="stt-bridge ort_to_onnx",
    )
    proto.ir_version = model.IrVersion()
    return proto


def _text(value: bytes | None) -> str:
    return value.decode() if value else ""


def _graph(graph: Any, name: str) -> onnx.GraphProto:
    types = {}
    for i in range(graph.NodeArgsLength()):
        arg = graph.NodeArgs(i)
        types[_text(arg.Name())] = arg.Type()
    initializers = [_tensor(graph.Initializers(i)) for i in range(graph.InitializersLength())]
    nodes = [_node(graph.Nodes(i)) for i in range(graph.NodesLength())]
    inputs = [_text(graph.Inputs(i)) for i in range(graph.InputsLength())]
    outputs = [_text(graph.Outputs(i)) for i in range(graph.OutputsLength())]
    known = {t.name for t in initializers}
    return helper.make_graph(
        nodes,
        name,
        [_value_info(n, types.get(n)) for n in inputs if n not in known],
        [_value_info(n, types.get(n)) for n in outputs],
        initializer=initializers,
    )


def _node(node: Any) -> onnx.NodeProto:
    if node.Type() != fbs.NodeType.NodeType.Primitive:
        raise OrtFormatError(f"node {_text(node.Name())!r} is a fused node: cannot convert")
    return helper.make_node(
        _text(node.OpType()),
        [_text(node.Inputs(i)) for i in range(node.InputsLength())],
        [_text(node.Outputs(i)) for i in range(node.OutputsLength())],
        name=_text(node.Name()),
        domain=_text(node.Domain()) or None,
        **{
            _text(node.Attributes(i).Name()): _attribute(node.Attributes(i))
            for i in range(node.AttributesLength())
        },
    )


def _attribute(attr: Any) -> Any:
    kind = fbs.AttributeType.AttributeType
    value_of: dict[int, Callable[[], Any]] = {
        kind.FLOAT: lambda: attr.F(),
        kind.INT: lambda: attr.I(),
        kind.STRING: lambda: attr.S(),
        kind.TENSOR: lambda: _tensor(attr.T()),
        kind.GRAPH: lambda: _graph(attr.G(), _text(attr.Name())),
        kind.FLOATS: lambda: [attr.Floats(i) for i in range(attr.FloatsLength())],
        kind.INTS: lambda: [attr.Ints(i) for i in range(attr.IntsLength())],
        kind.STRINGS: lambda: [attr.Strings(i) for i in range(attr.StringsLength())],
        kind.TENSORS: lambda: [_tensor(attr.Tensors(i)) for i in range(attr.TensorsLength())],
        kind.GRAPHS: lambda: [
            _graph(attr.Graphs(i), f"{_text(attr.Name())}_{i}") for i in range(attr.GraphsLength())
        ],
    }
    if attr.Type() not in value_of:
        raise OrtFormatError(f"attribute {_text(attr.Name())!r} has an unsupported kind")
    return value_of[attr.Type()]()


def _tensor(tensor: Any) -> onnx.TensorProto:
    proto = onnx.TensorProto()
    proto.name = _text(tensor.Name())
    proto.data_type = tensor.DataType()
    proto.dims.extend(tensor.Dims(i) for i in range(tensor.DimsLength()))
    if tensor.DataType() == onnx.TensorProto.STRING:
        proto.string_data.extend(tensor.StringData(i) for i in range(tensor.StringDataLength()))
    elif tensor.RawDataLength():
        proto.raw_data = tensor.RawDataAsNumpy().tobytes()
    return proto


def _value_info(name: str, type_info: Any) -> onnx.ValueInfoProto:
    if type_info is None or type_info.ValueType() != fbs.TypeInfoValue.TypeInfoValue.tensor_type:
        return helper.make_empty_tensor_value_info(name)
    table = type_info.Value()
    tensor_type = fbs.TensorTypeAndShape.TensorTypeAndShape()
    tensor_type.Init(table.Bytes, table.Pos)
    shape = tensor_type.Shape()
    dims: list[int | str | None] | None = None
    if shape is not None:
        dims = []
        for i in range(shape.DimLength()):
            value = shape.Dim(i).Value()
            if value is None:
                dims.append(None)
            elif value.DimType() == fbs.DimensionValueType.DimensionValueType.VALUE:
                dims.append(value.DimValue())
            else:
                dims.append(_text(value.DimParam()) or None)
    return helper.make_tensor_value_info(name, tensor_type.ElemType(), dims)
