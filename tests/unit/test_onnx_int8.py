"""The `onnx_int8` variant's graph rewrite (app/distill/onnx_int8.py): weights quantized per column in 7 bits, every
product by a weight (and only those) turned into onnxruntime's dynamic-quantization pattern, nothing written to disk,
and a clear reason where there is nothing to quantize."""

from __future__ import annotations

import tempfile

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from app.distill.onnx_int8 import WEIGHT_LEVELS, onnx_int8_bytes, quantize_columns, quantize_weight_products
from app.distill.variants import VariantUnavailable, build_variant, onnx_bytes, onnx_forward, servable
from tests.unit.test_variants import bert, mlp, token_batch


def test_columns_golden() -> None:
    weight = np.array([[63.0, 0.0, -1.26], [-31.7, 0.0, 0.6]], dtype=np.float32)
    quantized, scale = quantize_columns(weight)
    assert quantized.dtype == np.int8 and scale.dtype == np.float32
    np.testing.assert_allclose(scale, [1.0, 1.0, 0.02], rtol=1e-6)  # absmax / 63; an all-zero column: 1
    assert quantized.tolist() == [[63, 0, -63], [-32, 0, 30]]


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 12), st.integers(1, 12)),
        elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
    )
)
def test_columns_round_trip_within_half_a_step_in_seven_bits(weight: np.ndarray) -> None:
    quantized, scale = quantize_columns(weight)
    assert quantized.shape == weight.shape and scale.shape == (weight.shape[1],)
    assert int(np.abs(quantized.astype(np.int32)).max()) <= WEIGHT_LEVELS
    assert (scale > 0).all()
    error = np.abs(weight - quantized.astype(np.float32) * scale)
    assert (error <= scale / 2 * (1 + 1e-5) + 1e-30).all()
    absmax = np.abs(weight).max(axis=0)
    peak = np.abs(quantized.astype(np.int32)).max(axis=0)
    assert ((peak == WEIGHT_LEVELS) | (absmax == 0)).all()  # each column uses the whole range


def weight_products(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    weights = {tensor.name for tensor in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]


def test_every_product_by_a_weight_is_quantized_and_only_those() -> None:
    made = servable(bert(), "embedding")
    assert made is not None
    model = onnx.load_from_string(onnx_bytes(made))
    products = weight_products(model)
    sources = {node.input[0] for node in products}
    activation_products = [n for n in model.graph.node if n.op_type == "MatMul" and n not in products]
    assert len(products) == 12  # 2 layers × (Q, K, V, attention output, FFN in, FFN out)
    assert quantize_weight_products(model) == len(products)
    onnx.checker.check_model(model)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulInteger") == 12 and weight_products(model) == []
    assert ops.count("DynamicQuantizeLinear") == len(sources) < 12  # Q, K and V share their input's quantization
    assert ops.count("MatMul") == len(activation_products)  # attention's products of activations stay float32
    assert "Gather" in ops  # the embedding tables are not quantized
    int8 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == 12
    # the float32 weights it replaced are gone (the graph holds int8 ones instead)
    assert not {node.input[1] for node in products} & {tensor.name for tensor in model.graph.initializer}


def test_the_gemm_of_a_linear_layer_is_quantized_with_its_bias() -> None:
    model = mlp()
    made = servable(model, "classification")
    assert made is not None
    proto = onnx_bytes(made)
    assert any(node.op_type == "Gemm" for node in onnx.load_from_string(proto).graph.node)
    quantized = onnx.load_from_string(onnx_int8_bytes(proto))
    ops = [node.op_type for node in quantized.graph.node]
    assert "Gemm" not in ops and ops.count("MatMulInteger") == 2 and ops.count("Add") >= 2
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(3))
    forward = onnx_forward(quantized.SerializeToString(), made)
    with torch.inference_mode():
        expected = torch.softmax(model(x), dim=-1)
        got = torch.softmax(forward(x), dim=-1)
    assert float((got - expected).abs().max()) < 0.05
    assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) >= 0.95


def test_the_embedder_quantized_stays_close_to_float() -> None:
    made = servable(bert(), "embedding")
    assert made is not None
    built = build_variant("onnx_int8", made)
    with torch.inference_mode():
        for ids, mask in (token_batch(8, 20), token_batch(1, 7, seed=4)):
            cosine = torch.nn.functional.cosine_similarity(built.forward(ids, mask), made.module(ids, mask), dim=-1)
            assert float(cosine.min()) >= 0.99
    assert 0 < built.extra_bytes < len(onnx_bytes(made))  # int8 weights: fewer bytes than the float export


def test_building_it_writes_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a file was written")

    for module, name in ((onnx, "save_model"), (onnx, "save"), (tempfile, "mkstemp"), (tempfile, "mkdtemp")):
        monkeypatch.setattr(module, name, refuse)
    made = servable(bert(), "embedding")
    assert made is not None
    assert build_variant("onnx_int8", made).name == "onnx_int8"


def graph(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], opset: int = 17) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    made = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], initializer=initializers),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    return made.SerializeToString()  # type: ignore[no-any-return]


def test_a_graph_without_a_product_by_a_weight_has_nothing_to_quantize() -> None:
    bias = numpy_helper.from_array(np.ones(4, dtype=np.float32), "b")
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    with pytest.raises(LookupError, match="no product by a weight"):
        onnx_int8_bytes(graph([helper.make_node("Add", ["x", "b"], ["y"])], [bias]))
    # a scaled Gemm is not the plain x @ W + b the pattern computes: left as it is
    scaled = helper.make_node("Gemm", ["x", "w", "b"], ["y"], alpha=2.0)
    with pytest.raises(LookupError):
        onnx_int8_bytes(graph([scaled], [weight, bias]))
    with pytest.raises(ValueError, match="opset 11"):
        onnx_int8_bytes(graph([helper.make_node("MatMul", ["x", "w"], ["y"])], [weight], opset=10))


def test_a_model_with_nothing_to_quantize_says_so_as_a_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.distill import variants

    made = servable(mlp(), "classification")
    assert made is not None
    bias = numpy_helper.from_array(np.ones(4, dtype=np.float32), "b")
    monkeypatch.setattr(variants, "onnx_bytes", lambda _: graph([helper.make_node("Add", ["x", "b"], ["y"])], [bias]))
    with pytest.raises(VariantUnavailable, match="no product by a weight matrix to quantize"):
        build_variant("onnx_int8", made)


def run(proto: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(proto, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]  # type: ignore[no-any-return]


def test_a_weight_shared_through_identity_is_quantized_once_and_its_float_copy_dropped() -> None:
    """ALBERT's layers share their weights: the exporter hands each use one through an Identity."""
    weight = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Identity", ["w"], ["w_again"]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("MatMul", ["h", "w_again"], ["y"]),
    ]
    proto = graph(nodes, [numpy_helper.from_array(weight, "w")])
    model = onnx.load_from_string(onnx_int8_bytes(proto))
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulInteger") == 2 and "Identity" not in ops and "MatMul" not in ops
    int8 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == 1 and "w" not in {t.name for t in model.graph.initializer}
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(run(onnx_int8_bytes(proto), x), x @ weight @ weight, rtol=0.1, atol=0.1)


def test_a_weight_a_subgraph_reads_is_kept_and_new_names_avoid_the_graphs_inputs() -> None:
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    branch = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["z"])],
        "then",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 4])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("If", ["c"], ["unused"], then_branch=branch, else_branch=branch),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    taken = helper.make_tensor_value_info("x_q", TensorProto.FLOAT, [1])  # the name the rewrite would give x's uint8
    condition = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    made = helper.make_model(
        helper.make_graph(nodes, "g", [x, taken, condition], [y], initializer=[weight]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model = onnx.load_from_string(onnx_int8_bytes(made.SerializeToString()))
    onnx.checker.check_model(model, full_check=True)
    assert "w" in {t.name for t in model.graph.initializer}  # the If's branches still read it
    quantize = next(node for node in model.graph.node if node.op_type == "DynamicQuantizeLinear")
    assert "x_q" not in quantize.output
