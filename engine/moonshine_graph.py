"""Moonshine's merged decoder as two plain graphs, with their matrix products in int8.

The decoder ships "merged": one graph whose `If` node picks, by `use_cache_branch`, the branch
that reads the audio and the first tokens (no cache yet) or the one that takes a step with the
cache. Its weights are 8-bit numbers with a scale and an offset, expanded to float32 by
`Cast`/`Mul`/`Add` nodes in front of the `If` (engine/ort_to_onnx.py).

Here the expansion is done once (numpy), each branch becomes a model of its own (a step no
longer pays for the `If`, and each model holds only the weights it reads), and, for `int8`,
every product with a weight becomes onnxruntime's 8-bit `MatMulNBits` (`quantize_int8`).
Measured on this project's 2-core machine (a 3 s sentence, 20 tokens): a decoder step 18.5 ms
as float32 through the `If`, 15.6 ms as a plain graph, 5.6 ms in int8; the whole decode 449 ms
before, 166 ms in int8; the WER of the call-centre sets the same (bench/cpu_engine.py wer).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from engine.config import Precision

BLOCK: Final = 32  # weights per quantization block (measured: 128 no faster, no worse WER)

# The nodes that expand the shipped 8-bit weights, each evaluated once here.
_FOLD: Final[dict[str, Callable[..., npt.NDArray[np.generic]]]] = {
    "Mul": np.multiply,
    "Add": np.add,
    "Sub": np.subtract,
}


class GraphError(ValueError):
    """The decoder is not the merged graph this module knows how to take apart."""


def split_merged_decoder(merged: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(first pass, step): each branch of the merged decoder as a model of its own, its
    outer-scope weights (expanded to float32) as its own initializers. The first pass reads
    START and the first tokens (or a draft) over the audio and gives the logits and the whole
    KV cache; the step reads one token more and gives the logits and the self-attention part
    of the cache."""
    branches = [node for node in merged.graph.node if node.op_type == "If"]
    if len(branches) != 1:
        raise GraphError("the decoder has no single If node (not a merged decoder)")
    branch_node = branches[0]
    values = _folded_constants(merged.graph)
    for attribute in branch_node.attribute:  # the branches' own constants
        values.update((t.name, numpy_helper.to_array(t)) for t in attribute.g.initializer)
    inputs = {i.name: i for i in merged.graph.input}
    outputs = {o.name: o for o in merged.graph.output}
    models: dict[str, onnx.ModelProto] = {}
    for attribute in branch_node.attribute:
        branch = attribute.g
        # Branch outputs take the If's output names: callers keep `present.*` and `logits`.
        renames = dict(zip((o.name for o in branch.output), branch_node.output, strict=True))
        nodes = []
        constants = dict(values)
        # The output projection reads the embedding transposed: a constant the quantizer
        # must see as one (it quantizes only products with a constant weight).
        for node in _fold(list(branch.node), constants):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = [renames.get(n, n) for n in node.input]
            copy.output[:] = [renames.get(n, n) for n in node.output]
            nodes.append(copy)
        written = {o for n in nodes for o in n.output}
        read = _names_read(nodes) - written
        graph = helper.make_graph(
            nodes,
            attribute.name,
            [inputs[name] for name in inputs if name in read],
            # Not those the branch passes through untouched: the step's cross-attention cache,
            # which the caller keeps from the first pass.
            [outputs[name] for name in branch_node.output if name in written],
            initializer=[
                numpy_helper.from_array(constants[name], name)
                for name in sorted(read & constants.keys())
            ],
        )
        missing = read - inputs.keys() - constants.keys() - {""}
        if missing:
            raise GraphError(
                f"the decoder's {attribute.name} reads unknown values {sorted(missing)[:3]}"
            )
        model = helper.make_model(graph, opset_imports=merged.opset_import)
        model.ir_version = merged.ir_version
        _fix_sizes(model, one_token=attribute.name == "then_branch")
        models[attribute.name] = model
    if models.keys() != {"then_branch", "else_branch"}:
        raise GraphError("the decoder's If node does not have two branches")
    return models["else_branch"], models["then_branch"]


def _fix_sizes(model: onnx.ModelProto, one_token: bool) -> None:
    """Declare the sizes every call has: one utterance (batch 1) and, for a step, one token.

    Known sizes let onnxruntime fold the attention's shape arithmetic and fuse its scaled
    products (the step's graph: 962 nodes after optimization, 627 so); measured, a step in
    int8 6.4 ms -> 5.1 ms, a draft still giving the same tokens as steps.
    """
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:  # batch_size
            dims[0].dim_value = 1
        if one_token and value.name in ("input_ids", "logits"):
            dims[1].dim_value = 1


def save_decoder(model: onnx.ModelProto, path: Path, precision: Precision) -> None:
    """Write a decoder half to `path`, its weight products in 8 bits for `int8`."""
    _write(quantize_int8(model) if precision == "int8" else model, path)


def save_encoder(model: onnx.ModelProto, path: Path, precision: Precision) -> None:
    """Write the encoder to `path`; for `int8`, its weight products as onnxruntime's dynamic
    int8 ones (weights per output channel, each input quantized as it comes).

    Not `MatMulNBits` as in the decoder: the encoder multiplies a whole utterance at once,
    where int8 pays only as a plain integer product (measured, 3 s of audio: 54 ms in float32,
    62 ms in MatMulNBits, 29 ms so). Per channel, not per tensor: per tensor cost words (WER
    clean 0.002 -> 0.006, noisy 0.067 -> 0.074); per channel did not (0.002, 0.066).
    """
    if precision == "float32":
        _write(model, path)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".partial")
    with _quiet():
        quantize_dynamic(
            fold_weights(model),
            tmp,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
    tmp.replace(path)


def fold_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the nodes that expand its 8-bit weights evaluated: the quantizer sees a
    product with a weight only where the weight is an initializer."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = _fold(list(model.graph.node), values)
    read = _names_read(nodes)
    graph = helper.make_graph(
        nodes,
        model.graph.name,
        list(model.graph.input),
        list(model.graph.output),
        initializer=[numpy_helper.from_array(values[n], n) for n in sorted(read & values.keys())],
    )
    folded = helper.make_model(graph, opset_imports=model.opset_import)
    folded.ir_version = model.ir_version
    return folded


def _write(model: onnx.ModelProto, path: Path) -> None:
    tmp = path.with_suffix(".partial")
    onnx.save_model(model, str(tmp))
    tmp.replace(path)  # a crash mid-write never leaves a truncated model behind


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizers log each product they leave alone, at INFO."""
    silenced = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(silenced)


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every product with a constant weight as onnxruntime's `MatMulNBits`: 8-bit weights in
    blocks of `BLOCK` with a scale and a zero point each, multiplied in int8 with the input
    quantized per row and block (accuracy level 4).

    Per row matters: a draft pass (many tokens at once) then quantizes each row as a step of
    one token would, so reusing a draft nearly always gives the tokens decoding step by step
    gives. Not always: the float parts between the products (attention, norms) round a pass
    of many rows a little differently from a step, and an activation at a rounding edge of its
    8 bits can then tip a near-tie (bench/cpu_engine.py cost: 15 of 16 finals the same tokens,
    the 16th "My zip code" reused against "Myzip code" from scratch; float32: 16 of 16).
    onnxruntime's dynamic quantization, one scale for all rows, did worse (1 decode in 18 of the
    tests' grown sentences changed a word, against 0). Measured against it: the same speed, the
    same WER.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=BLOCK, is_symmetric=False, accuracy_level=4, bits=8
    )
    quantizer = MatMulNBitsQuantizer(
        model, bits=8, block_size=BLOCK, is_symmetric=False, accuracy_level=4, algo_config=config
    )
    with _quiet():
        quantizer.process()
    quantized: onnx.ModelProto = quantizer.model.model
    return quantized


def _folded_constants(graph: onnx.GraphProto) -> dict[str, npt.NDArray[np.generic]]:
    """The initializers and the values of the nodes before the `If`, which read only them."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    rest = _fold([node for node in graph.node if node.op_type != "If"], values)
    if rest:
        raise GraphError(f"cannot fold the decoder's {rest[0].op_type} node {rest[0].name!r}")
    return values


def _fold(
    nodes: list[onnx.NodeProto], values: dict[str, npt.NDArray[np.generic]]
) -> list[onnx.NodeProto]:
    """Evaluate, into `values`, each node that reads only constants and that we know (in
    order: ONNX keeps nodes sorted by what they read); the nodes left, in order."""
    rest = []
    for node in nodes:
        args = [values.get(name) for name in node.input]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if any(a is None for a in args) or node.op_type not in (*_FOLD, "Cast", "Transpose"):
            rest.append(node)
            continue
        if node.op_type == "Cast":
            to = helper.tensor_dtype_to_np_dtype(attributes["to"])
            result = args[0].astype(to)  # type: ignore[union-attr]
        elif node.op_type == "Transpose":
            result = np.transpose(args[0], attributes.get("perm"))  # type: ignore[arg-type]
        else:
            result = _FOLD[node.op_type](*args)
        values[node.output[0]] = np.ascontiguousarray(result)
    return rest


def _names_read(nodes: list[onnx.NodeProto]) -> set[str]:
    """Every value the nodes read, those read inside their own subgraphs included."""
    names: set[str] = set()
    for node in nodes:
        names.update(node.input)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                names |= _names_read(list(attribute.g.node))
    return names
