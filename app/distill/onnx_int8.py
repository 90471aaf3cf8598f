"""Dynamic int8 quantization of an ONNX graph's products by weight matrices, in memory.

What ``onnxruntime.quantization.quantize_dynamic`` emits for a ``MatMul`` by a weight, written here because that
tool reads and writes the model as files (weights are only ever written as safetensors) and its in-memory class is
not a public API. Each ``x @ W`` (``MatMul`` whose second input is a 2-D float32 initializer; ``Gemm`` without a
transposed ``A``, its ``alpha`` and ``beta`` 1) becomes

    x_q, x_scale, x_zero = DynamicQuantizeLinear(x)        # uint8, one scale per call, computed at run time
    y = Cast(MatMulInteger(x_q, W_q, x_zero, 0)) * (x_scale * W_scale)   (+ C for a Gemm)

with ``W_q`` int8, one scale per output column, symmetric, 7 bits wide (-63..63: a CPU without VNNI sums pairs of
u8 × s8 products in 16 bits, which full-range int8 weights can overflow). onnxruntime fuses the pattern into its
``DynamicQuantizeMatMul`` kernel. Products of two activations (attention's ``Q Kᵀ``) and embedding lookups stay
float32. One ``DynamicQuantizeLinear`` serves every product of the same activation (a transformer's Q, K and V).
"""

from __future__ import annotations

import numpy as np

WEIGHT_LEVELS = 63  # symmetric 7-bit int8 weights


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` [K, N] float32 → (int8 [K, N], float32 scales [N]) with ``weight ≈ q * scale`` column by column;
    an all-zero column gets scale 1."""
    absmax = np.abs(weight).max(axis=0)
    scale = np.where(absmax > 0, absmax / WEIGHT_LEVELS, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(weight / scale), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8)
    return quantized, scale


def quantize_weight_products(model: object) -> int:
    """Rewrite ``model`` (an ``onnx.ModelProto``) in place; returns how many products it quantized. Float weights
    no other node reads are dropped."""
    import onnx
    from onnx import helper, numpy_helper

    assert isinstance(model, onnx.ModelProto)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    taken = {tensor.name for tensor in graph.initializer} | {value.name for value in graph.value_info}
    taken |= {name for node in graph.node for name in (*node.input, *node.output)}

    def fresh(base: str) -> str:
        name, suffix = base, 1
        while name in taken:
            name, suffix = f"{base}_{suffix}", suffix + 1
        taken.add(name)
        return name

    def weight_of(node: onnx.NodeProto) -> np.ndarray | None:
        """The [K, N] float32 weight ``node`` multiplies its first input by, when it is a quantizable product."""
        if len(node.input) < 2 or node.input[1] not in initializers:
            return None
        tensor = initializers[node.input[1]]
        if tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) != 2:
            return None
        if node.op_type == "MatMul":
            return numpy_helper.to_array(tensor)
        if node.op_type == "Gemm":
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
                return None
            weight = numpy_helper.to_array(tensor)
            return weight.T if attributes.get("transB", 0) else weight
        return None

    activations: dict[str, tuple[str, str, str]] = {}  # activation → its (uint8, scale, zero point) names
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        weight = weight_of(node)
        if weight is None:
            nodes.append(node)
            continue
        source = node.input[0]
        if source not in activations:
            activations[source] = (fresh(f"{source}_q"), fresh(f"{source}_scale"), fresh(f"{source}_zero"))
            nodes.append(helper.make_node("DynamicQuantizeLinear", [source], list(activations[source])))
        quantized, scale = quantize_columns(np.ascontiguousarray(weight, dtype=np.float32))
        w_q, w_scale, w_zero = (
            fresh(f"{node.input[1]}_q"),
            fresh(f"{node.input[1]}_scale"),
            fresh(f"{node.input[1]}_zero"),
        )
        graph.initializer.extend(
            [
                numpy_helper.from_array(quantized, w_q),
                numpy_helper.from_array(scale, w_scale),
                numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), w_zero),
            ]
        )
        x_q, x_scale, x_zero = activations[source]
        product, as_float, scales = (
            fresh(f"{node.output[0]}_int32"),
            fresh(f"{node.output[0]}_float"),
            fresh(f"{node.output[0]}_scales"),
        )
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] != ""
        scaled = fresh(f"{node.output[0]}_scaled") if has_bias else node.output[0]
        nodes += [
            helper.make_node("MatMulInteger", [x_q, w_q, x_zero, w_zero], [product]),
            helper.make_node("Cast", [product], [as_float], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [x_scale, w_scale], [scales]),
            helper.make_node("Mul", [as_float, scales], [scaled]),
        ]
        if has_bias:
            nodes.append(helper.make_node("Add", [scaled, node.input[2]], [node.output[0]]))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
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
