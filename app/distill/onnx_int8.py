"""Dynamic int8 quantization of an ONNX graph's products by weight matrices, in memory.

What ``onnxruntime.quantization.quantize_dynamic`` emits for a ``MatMul`` by a weight, written here because that
tool reads and writes the model as files (weights are only ever written as safetensors) and its in-memory class is
not a public API. Each ``x @ W`` (``MatMul`` whose second input is a 2-D float32 initializer, directly or through an
``Identity``; ``Gemm`` without a transposed ``A``, its ``alpha`` and ``beta`` 1) becomes

    x_q, x_scale, x_zero = DynamicQuantizeLinear(x)        # uint8, one scale per call, computed at run time
    y = Cast(MatMulInteger(x_q, W_q, x_zero, 0)) * (x_scale * W_scale)   (+ C for a Gemm)

with ``W_q`` int8, one scale per output column, symmetric, 7 bits wide (-63..63: a CPU without VNNI sums pairs of
u8 × s8 products in 16 bits, which full-range int8 weights can overflow). onnxruntime's graph optimizer fuses the
pattern into its ``DynamicQuantizeMatMul`` and ``MatMulIntegerToFloat`` kernels. Products of two activations
(attention's ``Q Kᵀ``) and embedding lookups stay float32. One ``DynamicQuantizeLinear`` serves every product of the
same activation (a transformer's Q, K and V), and one int8 copy every product of the same weight (ALBERT's layers
share theirs; the exporter hands a shared weight to each layer through an ``Identity``).

The activations' scale is taken per call over the whole tensor, so a row's result depends on the rows batched with
it (an outlier row coarsens the quantization of every row beside it); the job's agreement check runs on batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

WEIGHT_LEVELS = 63  # symmetric 7-bit int8 weights


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` [K, N] float32 → (int8 [K, N], float32 scales [N]) with ``weight ≈ q * scale`` column by column;
    a column of zeros (or one whose scale would underflow to 0) gets scale 1, non-finite weights become 0 (the job's
    agreement check refuses such a model anyway)."""
    with np.errstate(invalid="ignore", over="ignore", under="ignore", divide="ignore"):
        scale = (np.abs(weight).max(axis=0) / WEIGHT_LEVELS).astype(np.float32)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, np.float32(1.0)).astype(np.float32)
        values = np.nan_to_num(weight / scale, nan=0.0, posinf=0.0, neginf=0.0)
    quantized = np.clip(np.rint(values), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8)
    return quantized, scale


def names_read(nodes: Any, outputs: Any = ()) -> set[str]:
    """Every tensor name ``nodes`` read (their inputs, and what their subgraphs, ``If``/``Loop``/``Scan`` bodies,
    read, which may be the outer graph's tensors), with the names of ``outputs`` (``ValueInfoProto``s)."""
    read = {output.name for output in outputs}
    for node in nodes:
        read.update(node.input)
        for attribute in node.attribute:
            for body in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                read |= names_read(body.node, body.output)
    return read


def quantize_weight_products(model: Any) -> int:
    """Rewrite ``model`` (an ``onnx.ModelProto``) in place; returns how many products it quantized. Float weights
    (and the ``Identity`` nodes that passed them on) that nothing reads any more are dropped."""
    import onnx
    from onnx import helper, numpy_helper

    assert isinstance(model, onnx.ModelProto)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    taken = set(initializers) | {value.name for value in (*graph.value_info, *graph.input, *graph.output)}
    taken |= {name for node in graph.node for name in node.output} | names_read(graph.node)
    # a weight the exporter passes on through an Identity (a parameter shared by several layers): the initializer
    aliases = {
        node.output[0]: node.input[0]
        for node in graph.node
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in initializers
    }

    def fresh(base: str) -> str:
        name, suffix = base, 1
        while name in taken:
            name, suffix = f"{base}_{suffix}", suffix + 1
        taken.add(name)
        return name

    def weight_of(node: onnx.NodeProto) -> tuple[str, bool] | None:
        """(initializer, transposed) of the float32 matrix ``node`` multiplies its first input by, when ``node`` is
        a product this rewrite quantizes."""
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            return None
        name = aliases.get(node.input[1], node.input[1])
        tensor = initializers.get(name)
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) != 2:
            return None
        if node.op_type == "MatMul":
            return name, False
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            return None
        return name, bool(attributes.get("transB", 0))

    activations: dict[str, tuple[str, str, str]] = {}  # activation → its (uint8, scale, zero point)
    weights: dict[tuple[str, bool], tuple[str, str, str]] = {}  # (initializer, transposed) → (int8, scales, zeros)
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        found = weight_of(node)
        if found is None:
            nodes.append(node)
            continue
        source = node.input[0]
        if source not in activations:
            activations[source] = (fresh(f"{source}_q"), fresh(f"{source}_scale"), fresh(f"{source}_zero"))
            nodes.append(helper.make_node("DynamicQuantizeLinear", [source], list(activations[source])))
        if found not in weights:
            name, transposed = found
            matrix = numpy_helper.to_array(initializers[name])
            quantized, scale = quantize_columns(np.ascontiguousarray(matrix.T if transposed else matrix, np.float32))
            weights[found] = (fresh(f"{name}_q"), fresh(f"{name}_scale"), fresh(f"{name}_zero"))
            arrays = (quantized, scale, np.zeros(scale.shape, dtype=np.int8))
            graph.initializer.extend(
                numpy_helper.from_array(array, tensor) for array, tensor in zip(arrays, weights[found], strict=True)
            )
        x_q, x_scale, x_zero = activations[source]
        w_q, w_scale, w_zero = weights[found]
        output = node.output[0]
        product, as_float, scales = fresh(f"{output}_int32"), fresh(f"{output}_float"), fresh(f"{output}_scales")
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] != ""
        scaled = fresh(f"{output}_scaled") if has_bias else output
        nodes += [
            helper.make_node("MatMulInteger", [x_q, w_q, x_zero, w_zero], [product]),
            helper.make_node("Cast", [product], [as_float], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [x_scale, w_scale], [scales]),
            helper.make_node("Mul", [as_float, scales], [scaled]),
        ]
        if has_bias:
            nodes.append(helper.make_node("Add", [scaled, node.input[2]], [output]))
        count += 1
    # the Identity nodes that handed a shared weight to products now quantized are read by nothing
    read = names_read(nodes, graph.output)
    nodes = [node for node in nodes if not (node.output and node.output[0] in aliases and node.output[0] not in read)]
    del graph.node[:]
    graph.node.extend(nodes)
    read = names_read(graph.node, graph.output)
    kept = [tensor for tensor in graph.initializer if tensor.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # the graph's inputs may list initializers (older exporters): those no longer held must go too
    held = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers or value.name in held]
    del graph.input[:]
    graph.input.extend(inputs)
    return count


def onnx_int8_bytes(proto: bytes) -> bytes:
    """A serialized ONNX model with its products by weight matrices quantized (``quantize_weight_products``)."""
    import onnx

    model = onnx.load_from_string(proto)
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise ValueError(f"DynamicQuantizeLinear needs ONNX opset 11 or later; the export has {opset}")
    if quantize_weight_products(model) == 0:
        raise LookupError("the model has no product by a weight matrix to quantize")
    return model.SerializeToString()  # type: ignore[no-any-return]
