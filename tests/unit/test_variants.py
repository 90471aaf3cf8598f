"""Serving variants: each builds from a tiny MLP and a tiny BERT, agrees with the eager model, is measured at the end
of a job, the chooser picks the fastest within tolerance (never one outside it), the choice is saved with the model
and the predictors serve it (eager when it cannot be built)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import AutoTokenizer

from app.distill import variants
from app.distill.architectures import build_model
from app.distill.artifacts import save_model_dir
from app.distill.jobs import run_job_spec
from app.distill.resources import JobResources
from app.distill.spec import EvaluationSpec, JobSpec, MLPArchitecture, SpecLimits, check_spec
from app.distill.text.data import TokenizedExamples
from app.distill.text.models import PACKAGED_MODELS, build_from_config, save_pretrained_dir, tiny_config
from app.distill.variants import (
    BF16_VARIANTS,
    VARIANT_NAMES,
    FrozenScript,
    Probe,
    Servable,
    VariantUnavailable,
    apply_variant,
    build_variant,
    choose_serving_variant,
    choose_variant,
    measure_variants,
    onednn_bf16_supported,
    servable,
    speedup,
    tabular_probe,
    text_probe,
)
from app.serving.predictor import StudentPredictor, TextPredictor, TextRequest

LIMITS = SpecLimits(max_student_params=100_000_000, max_steps=100_000, max_dataset_rows=1_000_000)


#: torchscript_bf16_packed needs oneDNN's bf16 kernels (AVX-512 or AMX): elsewhere it is unavailable, not built
PACKED = "torchscript_bf16_packed"
PACKED_HERE = onednn_bf16_supported()
needs_packed = pytest.mark.skipif(not PACKED_HERE, reason="oneDNN has no bf16 kernels on this CPU")
#: every variant, the packed one skipped where it cannot be built
VARIANTS_HERE = [pytest.param(n, marks=needs_packed) if n == PACKED else n for n in VARIANT_NAMES]

#: the largest probability difference from eager allowed for the variants that change the arithmetic
LOSSY = {
    "int8_dynamic": 0.05,
    "onnx_int8": 0.05,
    "bf16": 0.05,
    "torchscript_bf16": 0.05,
    "torchscript_bf16_packed": 0.05,
}


def mlp() -> torch.nn.Module:
    model = build_model(MLPArchitecture(input_dim=6, hidden_dims=[16], output_dim=4), seed=0)
    model.set_input_normalization(torch.full((6,), 0.5), torch.full((6,), 2.0))
    return model.eval()


def bert(task: str = "embedding") -> torch.nn.Module:
    config = tiny_config("bert", vocab_size=128, hidden_size=32, num_layers=2, max_positions=64)
    return build_from_config(config, task, seed=0, num_labels=3 if task == "text_classification" else None).eval()  # type: ignore[arg-type]


def token_batch(rows: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of random lengths (the first row full), as a tokenizer pads a batch."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (rows,), generator=generator)
    lengths[0] = width
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = torch.randint(3, 128, (rows, width), generator=generator) * mask
    return ids, mask


def held_out_text(rows: int = 24, width: int = 20) -> TokenizedExamples:
    return TokenizedExamples(*token_batch(rows, width, seed=1))


# --- each variant builds and agrees with eager ---------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS_HERE)
def test_each_variant_of_an_mlp_matches_eager(name: str) -> None:
    model = mlp()
    made = servable(model, "classification")
    assert made is not None
    built = build_variant(name, made)
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = torch.softmax(model(x), dim=-1)
        for rows in (x, x[:1]):  # any batch size, not only the example's
            got = torch.softmax(built.forward(rows).float(), dim=-1)
            tolerance = LOSSY.get(name, 1e-5)
            assert torch.allclose(got, expected[: len(rows)], atol=tolerance), name


@pytest.mark.parametrize("name", VARIANTS_HERE)
@pytest.mark.parametrize("task", ["embedding", "text_classification"])
def test_each_variant_of_a_bert_matches_eager_on_padded_batches_of_any_length(name: str, task: str) -> None:
    model = bert(task)
    made = servable(model, task)
    assert made is not None and made.output == ("embeddings" if task == "embedding" else "logits")
    built = build_variant(name, made)
    with torch.inference_mode():
        for ids, mask in (token_batch(6, 17), token_batch(1, 9), token_batch(3, 30, seed=2)):
            expected, got = made.module(ids, mask), built.forward(ids, mask).float()
            assert got.shape == expected.shape
            if task == "embedding":
                assert float(F.cosine_similarity(got, expected, dim=-1).min()) >= 0.99, name
            else:
                assert torch.equal(got.argmax(-1), expected.argmax(-1)), name


def test_the_embedder_variant_is_the_served_embedding() -> None:
    from app.distill.text.evaluation import pooled_embeddings

    model = bert()
    made = servable(model, "embedding")
    assert made is not None
    ids, mask = token_batch(4, 12)
    with torch.inference_mode():
        assert torch.equal(made.module(ids, mask), pooled_embeddings(model, TokenizedExamples(ids, mask)))


def test_the_bf16_variant_holds_bf16_weights_at_half_the_bytes_and_answers_in_float32() -> None:
    model = bert()
    made = servable(model, "embedding")
    assert made is not None
    built = build_variant("bf16", made)
    module = cast(torch.nn.Module, built.forward)
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the student itself is not converted
    float_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    integer_buffers = sum(t.numel() * t.element_size() for t in model.buffers() if not t.is_floating_point())
    assert built.extra_bytes == (float_bytes - integer_buffers) // 2 + integer_buffers
    ids, mask = token_batch(3, 11)
    with torch.inference_mode():
        assert built.forward(ids, mask).dtype == torch.float32


def test_the_traced_bf16_variant_is_a_frozen_script_over_the_converted_weights() -> None:
    """torchscript_bf16: the whole forward is one TorchScript call (no Python between the ops, so no GIL taken back
    between them); served in place, its constants are the converted module's own bf16 weights, not a copy."""
    model = bert()
    made = servable(model, "embedding")
    assert made is not None
    built = apply_variant("torchscript_bf16", made, in_place=True)
    assert built.name == "torchscript_bf16" and built.extra_bytes == 0
    assert isinstance(built.forward, FrozenScript) and isinstance(built.forward.script, torch.jit.ScriptModule)
    weights = {p.data_ptr() for p in model.parameters()}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    constants = [
        value
        for node in built.forward.script.graph.nodes()
        if node.kind() == "prim::Constant" and isinstance(value := node.output().toIValue(), torch.Tensor)
    ]
    shared = sum(t.numel() * t.element_size() for t in constants if t.data_ptr() in weights)
    assert shared >= 0.9 * sum(t.numel() * t.element_size() for t in constants)
    ids, mask = token_batch(3, 11)
    with torch.inference_mode():
        assert built.forward(ids, mask).dtype == torch.float32


@pytest.mark.parametrize("name", ["torchscript_bf16", pytest.param(PACKED, marks=needs_packed)])
def test_a_traced_bf16_variant_that_fails_after_converting_in_place_serves_bf16(
    name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The loader's module is already bf16 when the trace fails: eager would feed float32 rows to bf16 weights. The
    packed variant puts the module's linear layers back first."""

    def failing(made: Servable, freeze: bool = True) -> tuple[variants.Forward, int]:
        raise RuntimeError("the tracer gave up")

    monkeypatch.setattr(variants, "build_torchscript", failing)
    model = mlp()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = torch.softmax(model(x), dim=-1)
    made = servable(model, "classification")
    assert made is not None
    with caplog.at_level(logging.WARNING, logger="app.distill.variants"):
        built = apply_variant(name, made, in_place=True)
    assert built.name == "bf16" and "the tracer gave up" in caplog.text
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 2
    with torch.inference_mode():
        got = torch.softmax(built.forward(x), dim=-1)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=0.05)


def graph_kinds(script: torch.jit.ScriptModule) -> set[str]:
    """The operators a traced or frozen script runs, its scripted submodules' calls inlined."""
    graph = script.graph.copy()
    torch._C._jit_pass_inline(graph)
    return {node.kind() for node in graph.nodes()}


@needs_packed
def test_the_packed_variant_runs_every_linear_on_weights_packed_once() -> None:
    """torchscript_bf16_packed: served in place, no nn.Linear is left in the module; the traced graph calls oneDNN's
    linear on pre-packed weights (no aten::linear, which reorders its weight on every call); and it agrees with
    torchscript_bf16 on padded batches of any width."""
    model, plain_model = bert(), bert()
    made, plain_made = servable(model, "embedding"), servable(plain_model, "embedding")
    assert made is not None and plain_made is not None
    built = apply_variant("torchscript_bf16_packed", made, in_place=True)
    plain = apply_variant("torchscript_bf16", plain_made, in_place=True)
    assert built.name == "torchscript_bf16_packed" and built.extra_bytes == 0
    assert isinstance(built.forward, FrozenScript)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len([m for m in plain_model.modules() if isinstance(m, torch.nn.Linear)]) == 13  # 2 layers × 6, the pooler
    kinds = graph_kinds(built.forward.script)
    assert "mkldnn::_linear_pointwise" in kinds and "aten::linear" not in kinds
    assert "aten::linear" in graph_kinds(plain.forward.script)  # type: ignore[attr-defined]
    with torch.inference_mode():
        for rows, width in ((1, 3), (4, 17), (9, 40)):
            ids, mask = token_batch(rows, width, seed=width)
            got, expected = built.forward(ids, mask), plain.forward(ids, mask)
            assert got.dtype == torch.float32 and got.shape == (rows, 32)
            assert float(F.cosine_similarity(got, expected, dim=-1).min()) > 0.999, (rows, width)


PACKED_ERRORS = """
import torch
from app.distill.text.models import build_from_config, tiny_config
from app.distill.variants import apply_variant, servable

model = build_from_config(tiny_config("bert", vocab_size=128, hidden_size=32, num_layers=2), "embedding", seed=0)
built = apply_variant("torchscript_bf16_packed", servable(model.eval(), "embedding"), in_place=True)
assert built.name == "torchscript_bf16_packed", built.name
with torch.inference_mode():
    for ids in (torch.full((1, 5), 500), torch.zeros((0, 5), dtype=torch.long), torch.ones((1, 200), dtype=torch.long)):
        try:
            built.forward(ids, torch.ones_like(ids))
        except RuntimeError:
            print("raised", flush=True)
    print(tuple(built.forward(torch.ones((2, 4), dtype=torch.long), torch.ones((2, 4), dtype=torch.long)).shape))
"""


@needs_packed
def test_an_error_in_a_packed_forward_is_an_exception_not_a_crash() -> None:
    """An id past the vocabulary, an empty batch, a text past the positions: the forward raises and the process goes
    on serving. (Frozen, a graph of packed layers crashed the process with SIGSEGV while TorchScript reported the
    error; so the packed variant is traced but not frozen.) In a subprocess: a crash
    must fail this test, not the test run."""
    result = subprocess.run(
        [sys.executable, "-c", PACKED_ERRORS],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split() == ["raised", "raised", "raised", "(2,", "32)"]


@needs_packed
def test_packing_swaps_nothing_unless_every_layer_packs_right(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each packed layer is checked against its nn.Linear before any is swapped in: a wrong one leaves the module as
    it was (and the variant unavailable, with the reason)."""

    class Wrong(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.out_features = linear.out_features

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype)

    made_layers: list[str] = []
    real = variants.PackedLinear

    def second_wrong(linear: torch.nn.Linear) -> torch.nn.Module:
        made_layers.append("x")
        return real(linear) if len(made_layers) == 1 else Wrong(linear)

    monkeypatch.setattr(variants, "PackedLinear", second_wrong)
    model = mlp()
    made = servable(model, "classification")
    assert made is not None
    with pytest.raises(VariantUnavailable, match="packing the weights failed"):
        variants.build_torchscript_bf16_packed(made, in_place=True)  # the module itself: converted, then packed
    assert len(made_layers) == 2
    assert [type(m) for m in model.modules()] == [type(m) for m in mlp().modules()]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_the_packed_variant_is_unavailable_without_onednn_bf16_and_the_loader_serves_eager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model recorded as packed, loaded on a CPU without oneDNN's bf16 kernels (AVX2 only), is served eager: the
    build failed before converting anything, and bf16 would be slower than float32 there."""
    monkeypatch.setattr(variants, "onednn_bf16_supported", lambda: False)
    made = servable(mlp(), "classification")
    assert made is not None
    with pytest.raises(VariantUnavailable, match="no bf16 kernels"):
        build_variant("torchscript_bf16_packed", made)
    model = mlp()
    loaded = servable(model, "classification")
    assert loaded is not None
    built = apply_variant("torchscript_bf16_packed", loaded, in_place=True)
    assert built.name == "eager" and {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_torch_without_the_packing_operators_has_no_packed_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace(_is_mkldnn_bf16_supported=lambda: True))
    assert onednn_bf16_supported() is False


@needs_packed
def test_a_linear_registered_twice_is_packed_once() -> None:
    shared = torch.nn.Linear(8, 8).to(torch.bfloat16)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        replaced = variants.pack_linears(model)
        assert len(replaced) == 2 and model[0] is model[2] and not isinstance(model[0], torch.nn.Linear)
        assert torch.allclose(model(x).float(), expected.float(), atol=1e-2)


def test_traced_variants_run_unoptimised_for_the_call_only() -> None:
    """The graph executor's shape specialisation is off while a traced variant runs (a served model sees a new shape
    with almost every batch) and back to what it was afterwards, also when the call fails."""
    seen: list[bool] = []

    def script(*inputs: torch.Tensor) -> torch.Tensor:
        seen.append(torch._C._get_graph_executor_optimize())
        if not inputs:
            raise RuntimeError("no inputs")
        return inputs[0]

    forward = FrozenScript(script)  # type: ignore[arg-type]
    assert torch._C._get_graph_executor_optimize() is True
    assert torch.equal(forward(torch.ones(2)), torch.ones(2))
    with pytest.raises(RuntimeError):
        forward()
    assert seen == [False, False] and torch._C._get_graph_executor_optimize() is True
    made = servable(mlp(), "classification")
    assert made is not None
    for name in ("torchscript", "torchscript_bf16"):
        assert isinstance(build_variant(name, made).forward, FrozenScript), name


def test_building_variants_leaves_the_student_untouched() -> None:
    model = mlp()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    made = servable(model, "classification")
    assert made is not None
    measure_variants(made, tabular_probe(torch.randn(40, 6)) or pytest.fail("no probe"), repeats=2)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_causal_lm_is_served_eager_unless_its_job_asks_for_bf16() -> None:
    """By default a causal LM's job measures nothing (generation runs the transformers model itself); listing bf16
    measures eager and bf16 on next-token logits (each text's last positions) and lists the variants that cannot
    apply with the reason."""
    lm = build_from_config(tiny_config("llama", vocab_size=128), "causal_lm", seed=0)
    assert servable(lm, "causal_lm") is None
    result = choose_serving_variant(lm, "causal_lm", lambda: pytest.fail("nothing to measure"), EvaluationSpec())
    assert result["serving_variant"] == "eager"
    assert [v["name"] for v in result["variants"]] == list(VARIANT_NAMES)
    assert all(not v["applies"] and "bf16" in v["reason"] for v in result["variants"][1:])

    asked = EvaluationSpec(variants=["bf16", "onnx"], latency_repeats=2)
    result = choose_serving_variant(lm, "causal_lm", lambda: text_probe(held_out_text(), max_examples=8), asked)
    by_name = {v["name"]: v for v in result["variants"]}
    assert list(by_name) == ["eager", "bf16", "onnx"]
    assert by_name["eager"]["applies"] and by_name["eager"]["agreement"] == 1.0
    assert by_name["bf16"]["applies"] and 0.5 < by_name["bf16"]["agreement"] <= 1.0
    assert by_name["bf16"]["max_prob_diff"] < LOSSY["bf16"] and by_name["bf16"]["latency_ms"] > 0
    assert not by_name["onnx"]["applies"] and "only eager and bf16" in by_name["onnx"]["reason"]
    assert result["serving_variant"] in {"eager", "bf16"}
    # what was compared: the last 8 real positions of each of the 8 texts (right-padded, 2 to 20 tokens)
    probe = text_probe(held_out_text(), max_examples=8) or pytest.fail("no probe")
    compared = variants.lm_servable(lm).module(*probe.batches[0])
    lengths = probe.batches[0][1].sum(-1)
    assert compared.shape == (int(lengths.clamp(max=variants.CAUSAL_LM_POSITIONS).sum()), 128)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_causal_lm_is_compared_and_timed_through_prefill_and_decode_steps(family: str) -> None:
    """``NextTokenForward`` runs the rows as generation does (left-padded, a prefill into the KV cache, then one
    decode step per position) and gives what one full forward of each text alone gives at its last 8 positions:
    rows shorter than 8 tokens, longer ones, and learned absolute positions (gpt2) included."""
    lm = build_from_config(tiny_config(family, vocab_size=128), "causal_lm", seed=0).eval()  # type: ignore[arg-type]
    ids, mask = token_batch(6, 20, seed=3)
    ids[1:3, :], mask[1:3, :] = 0, 0
    ids[1, :5], mask[1, :5] = torch.arange(3, 8), 1  # 5 tokens: fewer than the 8 positions compared
    ids[2, :9], mask[2, :9] = torch.arange(3, 12), 1  # 9 tokens: a one-column prefill

    def alone(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each text's logits at its last 8 positions, from one forward of the text alone."""
        rows = [lm(input_ids=row[keep.bool()][None]).logits[0] for row, keep in zip(ids, mask, strict=True)]
        return torch.cat([logits[-variants.CAUSAL_LM_POSITIONS :] for logits in rows])

    with torch.inference_mode():
        assert torch.allclose(variants.NextTokenForward(lm)(ids, mask), alone(ids, mask), atol=1e-4)
        # 6 columns: no prefill at all, every column a decode step
        assert torch.allclose(
            variants.NextTokenForward(lm)(ids[:, :6], mask[:, :6]), alone(ids[:, :6], mask[:, :6]), atol=1e-4
        )


def test_a_variant_that_cannot_be_built_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    real = variants.importlib.util.find_spec
    monkeypatch.setattr(
        variants.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    made = servable(mlp(), "classification")
    assert made is not None
    with pytest.raises(VariantUnavailable, match="onnxruntime is not installed"):
        build_variant("onnx", made)
    result = measure_variants(made, tabular_probe(torch.randn(20, 6)) or pytest.fail("no probe"), repeats=2)
    onnx = next(v for v in result["variants"] if v["name"] == "onnx")
    assert onnx == {"name": "onnx", "applies": False, "reason": "onnxruntime is not installed"}
    assert result["serving_variant"] != "onnx"


# --- measuring and choosing ----------------------------------------------------------------------------------------


def test_measurement_records_latency_and_agreement_for_an_mlp() -> None:
    made = servable(mlp(), "classification")
    assert made is not None
    result = measure_variants(made, tabular_probe(torch.randn(50, 6)) or pytest.fail("no probe"), repeats=3)
    records = {v["name"]: v for v in result["variants"]}
    assert list(records) == list(VARIANT_NAMES)
    for record in records.values():
        assert record["applies"] is (PACKED_HERE or record["name"] != PACKED), record
        if not record["applies"]:
            assert "no bf16 kernels" in record["reason"]
            continue
        assert record["latency_ms"] > 0 and record["latency_ms_batch32"] > 0
        assert 0.0 <= record["agreement"] <= 1.0 and record["max_prob_diff"] >= 0.0
    assert records["eager"]["agreement"] == 1.0 and records["eager"]["within_tolerance"] is True
    assert records["torchscript"]["agreement"] == 1.0 and records["onnx"]["agreement"] == 1.0
    assert result["serving_variant"] == choose_variant(result["variants"])
    json.dumps(result, allow_nan=False)  # storable as it is


def test_onnx_builds_are_timed_after_the_exporter_has_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exporter's one-time start would be charged to whichever ONNX variant is built first."""
    calls: list[str] = []
    monkeypatch.setattr(variants, "warm_onnx_export", lambda: calls.append("warm"))

    def onnx_builder(made: Servable) -> tuple[variants.Forward, int]:
        calls.append("build onnx")
        return made.module, 0

    made = servable(mlp(), "classification")
    assert made is not None
    probe = tabular_probe(torch.randn(20, 6)) or pytest.fail("no probe")
    builders = {**variants.BUILDERS, "onnx": onnx_builder}
    measure_variants(made, probe, names=["eager", "torchscript", "onnx"], builders=builders, repeats=1)
    assert calls == ["warm", "build onnx"]
    calls.clear()
    measure_variants(made, probe, names=["eager", "torchscript"], builders=builders, repeats=1)
    assert calls == []


def test_the_exporter_warm_up_exports_once_per_process_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    exports: list[Servable] = []

    def failing_export(made: Servable) -> bytes:
        exports.append(made)
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(variants, "onnx_bytes", failing_export)
    variants.warm_onnx_export.cache_clear()
    try:
        variants.warm_onnx_export()
        variants.warm_onnx_export()
    finally:
        variants.warm_onnx_export.cache_clear()
    assert len(exports) == 1 and isinstance(exports[0].module, torch.nn.Linear)


def test_measurement_records_cosines_for_an_embedder() -> None:
    model = bert()
    result = choose_serving_variant(model, "embedding", lambda: text_probe(held_out_text()), EvaluationSpec())
    records = {v["name"]: v for v in result["variants"]}
    assert list(records) == list(VARIANT_NAMES)
    for record in records.values():
        assert record["applies"] is (PACKED_HERE or record["name"] != PACKED), record
        if not record["applies"]:
            assert "no bf16 kernels" in record["reason"]
            continue
        assert record["cosine_min"] >= 0.99 and record["cosine_mean"] >= record["cosine_min"] - 1e-6
        assert record["within_tolerance"] is True
    chosen = records[result["serving_variant"]]
    assert chosen["within_tolerance"] and chosen["latency_ms"] <= records["eager"]["latency_ms"]


def test_the_chooser_takes_the_fastest_within_tolerance() -> None:
    def record(name: str, latency: float | None, ok: bool = True, applies: bool = True) -> dict[str, Any]:
        return {"name": name, "latency_ms": latency, "within_tolerance": ok, "applies": applies}

    assert choose_variant([record("eager", 1.0), record("a", 0.5), record("b", 0.2, ok=False), record("c", 0.6)]) == "a"
    assert choose_variant([record("eager", 1.0), record("a", 0.1, applies=False), record("c", 0.6)]) == "c"
    assert choose_variant([record("eager", 1.0), record("a", None)]) == "eager"
    assert choose_variant([record("eager", 1.0), record("a", 0.98)]) == "eager"  # noise-level gains do not count
    assert choose_variant([record("eager", 1.0), record("b", 0.01, ok=False)]) == "eager"
    assert choose_variant([{"name": "eager", "applies": True}, record("a", 0.1)]) == "eager"  # eager unmeasured


def test_the_chooser_counts_batches_as_well_as_lone_requests() -> None:
    def record(name: str, one: float, batch: float | None) -> dict[str, Any]:
        timed = {"latency_ms": one} if batch is None else {"latency_ms": one, "latency_ms_batch32": batch}
        return {"name": name, "applies": True, "within_tolerance": True, **timed}

    eager = record("eager", 3.0, 106.0)
    # MiniLM 2 layers on a bf16-capable CPU (measured): onnx wins alone, bf16 wins on a batch and overall
    onnx, bf16 = record("onnx", 1.88, 47.6), record("bf16", 2.23, 38.1)
    assert speedup(onnx, eager) == pytest.approx(((3.0 / 1.88) * (106.0 / 47.6)) ** 0.5)
    assert choose_variant([eager, onnx, bf16]) == "bf16"
    # twice as fast on a batch but slower alone: low load must not pay for it
    assert choose_variant([eager, record("a", 3.1, 50.0)]) == "eager"
    # batch 32 not timed (for one variant or for eager): batch 1 alone decides
    assert speedup(record("b", 1.5, None), eager) == pytest.approx(2.0)
    assert speedup(onnx, record("eager", 3.0, None)) == pytest.approx(3.0 / 1.88)
    assert speedup(onnx, {"name": "eager"}) is None


def constant_builder(output: torch.Tensor) -> variants.Builder:
    """A variant that is very fast and wrong: it returns the same rows whatever the input."""

    def build(made: Servable) -> tuple[variants.Forward, int]:
        return (lambda *inputs: output[: len(inputs[0])]), 0

    return build


def test_a_fast_but_wrong_classifier_variant_is_never_chosen() -> None:
    model = mlp()
    made = servable(model, "classification")
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        eager_classes = model(x).argmax(-1)
    rarest = int(torch.bincount(eager_classes, minlength=4).argmin())
    wrong = F.one_hot(torch.full((512,), rarest), 4).float() * 10  # always the eager model's rarest class
    builders = {**variants.BUILDERS, "fast_wrong": constant_builder(wrong)}
    assert made is not None
    result = measure_variants(
        made, tabular_probe(x) or pytest.fail("no probe"), names=["fast_wrong"], repeats=20, builders=builders
    )
    records = {v["name"]: v for v in result["variants"]}
    assert list(records) == ["eager", "fast_wrong"]
    assert records["fast_wrong"]["applies"] and records["fast_wrong"]["within_tolerance"] is False
    assert records["fast_wrong"]["agreement"] < 0.99
    assert result["serving_variant"] == "eager"


def test_a_fast_but_wrong_embedder_variant_is_never_chosen() -> None:
    made = servable(bert(), "embedding")
    assert made is not None
    wrong = F.normalize(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    builders = {**variants.BUILDERS, "fast_wrong": constant_builder(wrong)}
    probe = text_probe(held_out_text()) or pytest.fail("no probe")
    result = measure_variants(made, probe, names=["fast_wrong", "onnx"], repeats=5, builders=builders)
    records = {v["name"]: v for v in result["variants"]}
    assert records["fast_wrong"]["within_tolerance"] is False and records["fast_wrong"]["cosine_min"] < 0.99
    assert records["onnx"]["within_tolerance"] is True
    assert result["serving_variant"] in ("eager", "onnx")


def test_a_variant_that_fails_to_run_is_recorded_not_chosen() -> None:
    def broken(made: Servable) -> tuple[variants.Forward, int]:
        def forward(*inputs: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no kernel for this shape")

        return forward, 0

    made = servable(mlp(), "classification")
    assert made is not None
    probe = Probe([(torch.randn(4, 6),)], {1: (torch.randn(1, 6),)})
    result = measure_variants(
        made, probe, names=["broken"], repeats=2, builders={**variants.BUILDERS, "broken": broken}
    )
    broken_record = result["variants"][1]
    assert broken_record["applies"] is False and "no kernel for this shape" in broken_record["reason"]
    assert result["serving_variant"] == "eager"


def test_an_empty_variant_list_serves_eager_without_measuring() -> None:
    spec = EvaluationSpec(variants=[])
    result = choose_serving_variant(mlp(), "classification", lambda: pytest.fail("nothing to measure"), spec)
    assert result == {"serving_variant": "eager", "variants": [{"name": "eager", "applies": True}]}


def test_only_the_listed_variants_are_measured_with_the_spec_tolerance() -> None:
    spec = EvaluationSpec(variants=["int8_dynamic"], variant_min_agreement=1.0)
    result = choose_serving_variant(mlp(), "classification", lambda: tabular_probe(torch.randn(64, 6)), spec)
    assert [v["name"] for v in result["variants"]] == ["eager", "int8_dynamic"]
    int8 = result["variants"][1]
    assert int8["within_tolerance"] is (int8["agreement"] >= 1.0)


def test_variants_are_timed_at_the_serving_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The api serves with its own torch thread count: the variants are timed at it, then the job's is restored."""
    seen: list[int] = []
    measure = variants.measure_variants

    def spying(*args: Any, **kwargs: Any) -> dict[str, Any]:
        seen.append(torch.get_num_threads())
        return measure(*args, **kwargs)

    monkeypatch.setattr(variants, "measure_variants", spying)
    before = torch.get_num_threads()
    serving = 1 if before > 1 else 2
    spec = EvaluationSpec(variants=["eager", "torchscript"])
    result = choose_serving_variant(mlp(), "classification", lambda: tabular_probe(torch.randn(64, 6)), spec, serving)
    assert seen == [serving] and torch.get_num_threads() == before
    assert result["variants_threads"] == serving
    choose_serving_variant(mlp(), "classification", lambda: tabular_probe(torch.randn(64, 6)), spec)
    assert seen == [serving, before]  # without a serving count: the job's own


# --- the spec knob -------------------------------------------------------------------------------------------------


def job(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "teacher": {"source": "builtin", "architecture": {"input_dim": 6, "hidden_dims": [12], "output_dim": 3}},
        "student": {"architecture": {"input_dim": 6, "hidden_dims": [8], "output_dim": 3}},
        "data": {"source": "synthetic", "n_train": 32, "n_test": 48},
        "training": {"steps": 3},
        "evaluation": {"latency_repeats": 1},
    }
    document.update(overrides)
    return document


def test_an_unknown_variant_is_rejected_with_its_path() -> None:
    with pytest.raises(ValidationError) as error:
        JobSpec.model_validate(job(evaluation={"variants": ["onnx", "tensorrt"]}))
    assert [tuple(e["loc"]) for e in error.value.errors()] == [("evaluation", "variants", 1)]
    with pytest.raises(ValidationError) as error:
        JobSpec.model_validate(job(evaluation={"variant_min_agreement": 1.5}))
    assert [tuple(e["loc"]) for e in error.value.errors()] == [("evaluation", "variant_min_agreement")]


def test_a_causal_lm_job_can_ask_for_bf16_only() -> None:
    document = {
        "task": "causal_lm",
        "teacher": {"source": "builtin", "architecture": {"type": "transformer", "config": tiny_config("gpt2")}},
        "student": {"architecture": {"type": "transformer", "config": tiny_config("gpt2", num_layers=1)}},
        "data": {"source": "inline", "records": [{"text": "a b c"}, {"text": "d e f"}]},
    }
    assert check_spec(JobSpec.model_validate({**document, "evaluation": {"variants": ["eager"]}}), LIMITS) == []
    assert check_spec(JobSpec.model_validate({**document, "evaluation": {"variants": ["bf16"]}}), LIMITS) == []
    problems = check_spec(JobSpec.model_validate({**document, "evaluation": {"variants": ["bf16", "onnx"]}}), LIMITS)
    assert [p.loc for p in problems] == [("evaluation", "variants")] and "only eager and bf16" in problems[0].msg


# --- a job records its choice; serving applies it ------------------------------------------------------------------


def test_a_job_records_the_variants_and_saves_the_choice_with_the_model(tmp_path: Path) -> None:
    trained = run_job_spec(JobSpec.model_validate(job()), JobResources(), device=torch.device("cpu"))
    evaluation = trained.evaluation
    assert [v["name"] for v in evaluation["variants"]] == list(VARIANT_NAMES)
    assert evaluation["serving_variant"] in VARIANT_NAMES and evaluation["variants_seconds"] < 10
    trained.save(tmp_path / "m", {"source_job_id": "job_x"})
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["serving_variant"] == evaluation["serving_variant"]
    assert config["variants"] == evaluation["variants"] and config["source_job_id"] == "job_x"
    predictor = StudentPredictor("mdl_x", tmp_path / "m", "sha", config)
    assert predictor.variant == evaluation["serving_variant"]


def assert_weights_held_once(name: str, model: torch.nn.Module, served: int, eager: int | None) -> None:
    """A predictor serving an ONNX variant releases its module's weights (the session holds its own copy) and counts
    the session's bytes: about eager's for ``onnx`` (they were twice that), less for ``onnx_int8``. ``int8_dynamic``
    quantizes the loaded module itself: no float linear layer is left beside the int8 ones, and it counts less than
    eager (it counted eager's bytes and the copy's). ``eager`` None: a model too small to compare (the tabular MLP's
    720 bytes of weights, a graph of 1.5 KB)."""
    if name == "int8_dynamic":
        assert not any(type(m) is torch.nn.Linear for m in model.modules())
        assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())
        assert eager is None or served < eager
        return
    if name not in ("onnx", "onnx_int8"):
        return
    assert all(p.numel() == 0 for p in model.parameters())
    assert eager is None or served < (1.1 if name == "onnx" else 1.0) * eager


def test_an_onnx_session_keeps_neither_its_bytes_nor_a_file_open() -> None:
    """onnxruntime's Python session holds the bytes it was made from for its whole life; ``onnx_session`` hands it
    an in-memory file instead, closed once the session has read it."""
    import onnxruntime

    made = servable(mlp(), "classification")
    assert made is not None
    proto = variants.onnx_bytes(made)
    references = sys.getrefcount(proto)
    descriptors = len(list(Path("/proc/self/fd").iterdir()))
    session = variants.onnx_session(proto, onnxruntime.SessionOptions())
    assert sys.getrefcount(proto) == references
    assert len(list(Path("/proc/self/fd").iterdir())) == descriptors
    rows = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = made.module(rows)
    got = torch.from_numpy(session.run(None, {"inputs": rows.numpy()})[0])
    assert torch.allclose(got, expected, atol=1e-5)


def test_where_no_in_memory_file_can_be_made_the_session_takes_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    def refused(name: str, flags: int = 0) -> int:
        raise PermissionError("memfd_create is not allowed here")

    monkeypatch.setattr(variants.os, "memfd_create", refused)
    made = servable(mlp(), "classification")
    assert made is not None
    session = variants.onnx_session(variants.onnx_bytes(made), onnxruntime.SessionOptions())
    rows = torch.randn(2, 6, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = made.module(rows)
    assert torch.allclose(torch.from_numpy(session.run(None, {"inputs": rows.numpy()})[0]), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["onnx", "onnx_int8"])
def test_onnx_sessions_allocate_from_the_process_shared_arena(name: str) -> None:
    """Each session's own arena would keep the largest batch's activations for the process's life, one per model."""
    made = servable(bert(), "embedding")
    assert made is not None
    first, second = build_variant(name, made), build_variant(name, made)
    assert variants.shared_cpu_arena()
    for built in (first, second):
        forward = cast(variants.OnnxForward, built.forward)
        options = forward.session.get_session_options()
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
    ids, mask = token_batch(8, 24)
    assert torch.allclose(first.forward(ids, mask), second.forward(ids, mask))


def test_without_the_shared_arena_sessions_keep_their_own(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime

    def refused(*args: Any) -> None:
        raise RuntimeError("an allocator is already registered")

    monkeypatch.setattr(variants, "_SHARED_ARENA", {})
    monkeypatch.setattr(onnxruntime, "create_and_register_allocator", refused)
    made = servable(mlp(), "classification")
    assert made is not None
    with caplog.at_level(logging.WARNING, logger="app.distill.variants"):
        built = build_variant("onnx", made)
    assert "already registered" in caplog.text
    options = cast(variants.OnnxForward, built.forward).session.get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):
        options.get_session_config_entry("session.use_env_allocators")
    rows = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.allclose(built.forward(rows), made.module(rows), atol=1e-5)


def test_a_failed_in_place_onnx_build_leaves_the_weights_for_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(proto: bytes, made: Servable) -> variants.Forward:
        raise RuntimeError("the session could not be made")

    monkeypatch.setattr(variants, "onnx_forward", failing)
    model = mlp()
    made = servable(model, "classification")
    assert made is not None
    built = apply_variant("onnx", made, in_place=True)
    assert built.name == "eager"
    assert all(p.numel() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", VARIANTS_HERE)
def test_the_tabular_predictor_serves_the_recorded_variant(tmp_path: Path, name: str) -> None:
    model = mlp()
    save_model_dir(model, tmp_path / "m", extra_config={"serving_variant": name})
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    predictor = StudentPredictor("mdl_v", tmp_path / "m", "sha", config)
    assert predictor.variant == name
    assert_weights_held_once(name, predictor.model, predictor.memory_bytes, None)
    rows = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    got = torch.from_numpy(predictor.predict_batch([rows.numpy()])[0])
    with torch.inference_mode():
        expected = torch.softmax(model(rows), dim=-1)
    assert torch.allclose(got, expected, atol=LOSSY.get(name, 1e-5))
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_a_variant_that_cannot_be_built_at_load_falls_back_to_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def missing() -> None:
        raise VariantUnavailable("onnxruntime is not installed")

    monkeypatch.setattr(variants, "require_onnxruntime", missing)
    save_model_dir(mlp(), tmp_path / "m", extra_config={"serving_variant": "onnx"})
    with caplog.at_level(logging.WARNING, logger="app.distill.variants"):
        predictor = StudentPredictor("mdl_f", tmp_path / "m", "sha", {"serving_variant": "onnx"})
    assert predictor.variant == "eager"
    assert "onnxruntime is not installed" in caplog.text and "eager" in caplog.text
    made = servable(mlp(), "classification")
    assert made is not None
    assert apply_variant("no_such_variant", made).name == "eager"
    assert apply_variant(None, made).name == "eager"


@pytest.mark.parametrize("name", VARIANTS_HERE)
def test_the_text_predictor_serves_the_recorded_variant(tmp_path: Path, name: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(PACKAGED_MODELS["all-MiniLM-L6-v2"]()))
    model = build_from_config(tiny_config("bert", vocab_size=len(tokenizer), max_positions=64), "embedding", seed=0)
    save_pretrained_dir(model, tokenizer, tmp_path / "m", extra_config={"task": "embedding"})
    eager = TextPredictor("mdl_e", tmp_path / "m", "sha", {"task": "embedding"})
    served = TextPredictor("mdl_e", tmp_path / "m", "sha", {"task": "embedding", "serving_variant": name})
    assert eager.variant == "eager" and served.variant == name
    if name in BF16_VARIANTS:  # the loaded weights are converted, not copied: half of eager's bytes
        assert {p.dtype for p in served.model.parameters()} == {torch.bfloat16}
        assert served.memory_bytes < 0.55 * eager.memory_bytes
    assert_weights_held_once(name, served.model, served.memory_bytes, eager.memory_bytes)
    texts = ["a short one", "a somewhat longer sentence with more words in it", "x"]
    expected = torch.from_numpy(eager.predict_batch([TextRequest(texts)])[0].values)
    for batch in (texts, texts[1:2]):
        got = torch.from_numpy(served.predict_batch([TextRequest(batch)])[0].values)
        reference = expected if len(batch) == 3 else expected[1:2]
        assert float(F.cosine_similarity(got, reference, dim=-1).min()) >= 0.99
