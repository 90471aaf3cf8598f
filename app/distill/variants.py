"""Serving variants of a student: the eager model, TorchScript, dynamic int8, ONNX Runtime and bf16 weights.

Weights are only ever stored as safetensors, so a variant is never a file of its own: it is a deterministic
transformation of the eager model built from the stored weights, applied once at the end of the job (to measure it)
and again whenever the model is loaded for serving (to use it). The job measures every variant that applies on the
CPU (where models are served) — median latency at batch 1 and 32, and agreement with the eager student on held-out
inputs — and records the fastest one within tolerance (``choose_variant``: both batch sizes count, and none may be
slower than eager at batch 1); the serving loader applies the recorded one.

| variant        | what it is                                                                                     |
|----------------|------------------------------------------------------------------------------------------------|
| `eager`        | the model as built (always a candidate; the fallback when another variant cannot be built)     |
| `torchscript`  | ``torch.jit.trace`` of the eager forward on a fixed example, then ``torch.jit.freeze``         |
| `int8_dynamic` | ``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear`` (per-channel int8 weights)   |
| `onnx`         | an in-memory ONNX export (never written to disk) run by an onnxruntime session with one thread |
| `onnx_int8`    | `onnx` with its products by weights dynamically quantized to int8 (per column, 7 bits), in memory |
| `bf16`         | a bfloat16 copy of the weights (floating inputs cast in, float32 out): twice the matmul rate on |
|                | CPUs with bf16 instructions (AVX512-BF16, AMX), slower on those without; the timing decides    |
| `torchscript_bf16` | `bf16` traced and frozen: no Python between the ops, and the forward runs without the GIL  |
| `torchscript_bf16_packed` | `bf16` with each linear layer's weights packed for oneDNN once, at build time, not  |
|                | reordered by every bf16 matmul call (``PackedLinear``), then traced (not frozen): faster alone |

What a variant serves: a tabular classifier's logits, a text classifier's logits, or an embedder's mean-pooled,
L2-normalised embedding. A causal LM generates with the transformers model itself, so only `eager` and `bf16` (its
weights converted) apply to it, and `bf16` is measured only when the job lists it; they are compared on the
next-token logits of each held-out text's last positions and timed on a prefill and decode steps, as generation runs.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import importlib.util
import io
import logging
import math
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import nn

from app.distill.architectures import MLPClassifier
from app.distill.onnx_int8 import onnx_int8_bytes
from app.distill.spec import EvaluationSpec, VariantName
from app.distill.text.attention import align_attention
from app.distill.text.models import cache_argument, cache_of, last_logits
from app.distill.threads import torch_threads

log = logging.getLogger(__name__)

VARIANT_NAMES: tuple[str, ...] = get_args(VariantName)
# A variant costs its build at every model load (cold start): one that takes longer than this is not chosen.
MAX_BUILD_SECONDS = 5.0
# A variant replaces eager only when it is at least this much faster (``speedup``; not for noise-level gains).
MIN_GAIN = 0.05
# Latency rounds (every variant once) per batch size stop after this much time (large models get fewer samples).
MEASURE_BUDGET_S = 0.5
MIN_REPEATS = 10
LATENCY_BATCH_SIZES = (1, 32)
# a causal LM generates with the transformers model itself (KV cache, sampling): a variant must stay that model
CAUSAL_LM_VARIANTS = ("eager", "bf16")
CAUSAL_LM_REASON = "a causal LM generates with the transformers model itself: only eager and bf16 apply"
CAUSAL_LM_DEFAULT = (
    "a causal LM is served eager unless its job lists bf16 in evaluation.variants (then bf16 is measured); the other "
    "variants do not apply: generation runs the transformers model itself"
)
# next-token positions compared per held-out text (its last ones): a causal LM's logits are [tokens, vocab]
CAUSAL_LM_POSITIONS = 8

Forward = Callable[..., torch.Tensor]


class VariantUnavailable(Exception):
    """A variant that cannot be built here (a missing package, an export the model does not support)."""


# --- what a variant serves ------------------------------------------------------------------------------------------


class EmbeddingForward(nn.Module):
    """(input_ids, attention_mask) → mean-pooled, L2-normalised embeddings [B, H], as the embedder is served."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from app.distill.text.data import TokenizedExamples
        from app.distill.text.evaluation import pooled_embeddings

        return pooled_embeddings(self.model, TokenizedExamples(input_ids, attention_mask))


class LogitsForward(nn.Module):
    """(input_ids, attention_mask) → class logits [B, C] of a transformers sequence classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return output.logits.float()  # type: ignore[no-any-return]


class NextTokenForward(nn.Module):
    """(input_ids, attention_mask) → a causal LM's next-token logits at each row's last ``CAUSAL_LM_POSITIONS`` real
    positions [positions, vocab], computed the way generation computes them: the right-padded rows moved to the right
    edge (left padding, as the serving engine batches prompts), one prefill forward of all but the last
    ``CAUSAL_LM_POSITIONS`` columns into the model's KV cache, then one decode step per remaining column. So a
    variant is compared on the logits a completion picks from, through the cached path, and timed on what a short
    completion costs (a prefill and decode steps), not on one full forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cache_argument = cache_argument(model)
        self.last_logits = last_logits(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        width = input_ids.shape[1]
        columns = torch.arange(width, device=input_ids.device)
        # each row rolled right by its padding: real tokens end at the last column
        index = (columns - (width - attention_mask.sum(-1, keepdim=True))) % width
        ids, mask = input_ids.gather(1, index), attention_mask.gather(1, index)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        split = max(0, width - CAUSAL_LM_POSITIONS)
        cache = None
        if split:
            output = self.model(
                input_ids=ids[:, :split],
                attention_mask=mask[:, :split],
                position_ids=positions[:, :split],
                use_cache=True,
                **self.last_logits,
            )
            cache = cache_of(output)
        steps = []
        for column in range(split, width):
            given = {self.cache_argument: cache} if cache is not None else {}
            output = self.model(
                input_ids=ids[:, column : column + 1],
                attention_mask=mask[:, : column + 1],
                position_ids=positions[:, column : column + 1],
                use_cache=True,
                **given,
            )
            cache = cache_of(output)
            steps.append(output.logits[:, -1])
        return torch.stack(steps, 1)[mask[:, split:].bool()].float()


@dataclass
class Servable:
    """The eager forward a variant transforms, with the fixed example it is traced/exported on."""

    module: nn.Module
    output: Literal["logits", "embeddings"]
    example: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


def servable(model: nn.Module, task: str) -> Servable | None:
    """The servable forward of a student for ``task``; None for causal LMs (served eager).

    The example is fixed (not taken from data), so that the job and every later load build the same variant. Text
    examples hold a padded row: a trace must keep the attention-mask path that padded batches need.
    """
    model.eval()
    if task == "causal_lm":
        return None
    if task == "classification":
        if not isinstance(model, MLPClassifier):
            raise TypeError(f"a tabular classifier is an MLPClassifier, not {type(model).__name__}")
        input_dim = model.architecture.input_dim
        return Servable(
            model,
            "logits",
            (torch.zeros(2, input_dim),),
            ("inputs",),
            {"inputs": {0: "batch"}, "output": {0: "batch"}},
        )
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 256)
    input_ids = torch.tensor([[1, 3, 4, 5, 2], [1, 6, 2, 0, 0]], dtype=torch.int64) % vocab
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    wrapper: nn.Module = EmbeddingForward(model) if task == "embedding" else LogitsForward(model)
    return Servable(
        wrapper.eval(),
        "embeddings" if task == "embedding" else "logits",
        (input_ids, attention_mask),
        ("input_ids", "attention_mask"),
        {"input_ids": axes, "attention_mask": axes, "output": {0: "batch"}},
    )


# --- building variants ----------------------------------------------------------------------------------------------


@dataclass
class BuiltVariant:
    name: str
    forward: Forward
    build_seconds: float
    extra_bytes: int = 0  # memory beyond the eager model's weights (a quantized copy, an ONNX Runtime session)


Builder = Callable[[Servable], tuple[Forward, int]]


def build_eager(servable: Servable) -> tuple[Forward, int]:
    return servable.module, 0


class FrozenScript:
    """A frozen (for ``torchscript_bf16_packed``: traced only) TorchScript module called with the graph executor's
    optimisations off (a thread-local flag, set for the call only). By default the executor profiles the first calls
    and specialises the graph to the shapes it saw; a served model sees a new shape with almost every batch (batch
    size × padded length), and after a few dozen such batches every call walked a chain of failed guards: measured on
    the 2-layer MiniLM in bf16, one sentence went from 2.3 to 3.2 ms and a batch of 32 from 1.0 to 1.8 ms per
    sentence once batches of mixed shapes had run. Unoptimised, the graph runs as traced, at the first calls' speed,
    whatever came before."""

    def __init__(self, script: torch.jit.ScriptModule) -> None:
        self.script = script

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        # what torch.jit.optimized_execution(False) does, without a generator context manager's microseconds (the
        # tutorial's MLP forward takes ~10 µs)
        previous = torch._C._get_graph_executor_optimize()
        torch._C._set_graph_executor_optimize(False)
        try:
            return self.script(*inputs)  # type: ignore[no-any-return]
        finally:
            torch._C._set_graph_executor_optimize(previous)


def build_torchscript(servable: Servable, freeze: bool = True) -> tuple[Forward, int]:
    """Trace the servable's forward and freeze it (the weights become graph constants); ``freeze=False`` keeps them
    module attributes (``torchscript_bf16_packed``: see ``build_torchscript_bf16_packed``)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: the measurement is what decides
        traced = torch.jit.trace(  # type: ignore[no-untyped-call]
            servable.module, servable.example, check_trace=False, strict=False
        )
        script = torch.jit.freeze(traced.eval()) if freeze else traced.eval()
    return FrozenScript(script), 0


def build_int8_dynamic(servable: Servable, in_place: bool = False) -> tuple[Forward, int]:
    """The module's ``nn.Linear`` layers replaced by dynamically quantized ones (int8 weights, per output channel);
    the rest stays float32. ``in_place``: the module itself quantized, for a loader that owns it (the float weights
    of its linear layers are then dropped, not held beside the int8 copy)."""
    if torch.backends.quantized.engine == "none":
        raise VariantUnavailable("this torch build has no quantized CPU kernels")
    linears = [m for m in servable.module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise VariantUnavailable("the model has no Linear layers to quantize")
    int8_weights = sum(m.weight.numel() for m in linears)
    biases = sum(m.bias.numel() * m.bias.element_size() for m in linears if m.bias is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        # per-output-channel weight scales: closer to the float model than one scale per tensor (on all-MiniLM-L6-v2,
        # min cosine 0.94 instead of 0.83), at about the same speed
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        quantized = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            servable.module if in_place else copy.deepcopy(servable.module),
            {nn.Linear: qconfig},
            dtype=torch.qint8,
            inplace=in_place,
        )
    quantized.eval()
    if in_place:  # the module's parameters are counted by the caller; the packed linears hold weights and biases
        return quantized, int8_weights + biases
    # a copy: its float parameters (embeddings, norms) are held beside the original's
    others = sum(p.numel() * p.element_size() for p in quantized.parameters())
    return quantized, int8_weights + biases + others


def onnx_bytes(servable: Servable) -> bytes:
    """The model as ONNX, in memory: the TorchScript-based exporter (fast), else the dynamo one (needs onnxscript)."""
    names = list(servable.input_names)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            buffer = io.BytesIO()
            torch.onnx.export(
                servable.module,
                servable.example,
                buffer,  # type: ignore[arg-type]  # the exporter writes to a file object too
                dynamo=False,
                input_names=names,
                output_names=["output"],
                dynamic_axes=servable.dynamic_axes,
                opset_version=17,
            )
            return buffer.getvalue()
        except Exception as legacy:
            try:
                shapes = tuple(
                    {axis: torch.export.Dim.AUTO for axis in servable.dynamic_axes.get(name, {})} for name in names
                )
                program = torch.onnx.export(
                    servable.module,
                    servable.example,
                    dynamo=True,
                    input_names=names,
                    output_names=["output"],
                    dynamic_shapes=shapes,
                    verbose=False,
                )
                if program is None:
                    raise VariantUnavailable("the exporter returned no program") from legacy
                return program.model_proto.SerializeToString()  # type: ignore[no-any-return]
            except Exception as dynamo:
                raise VariantUnavailable(
                    f"ONNX export failed: {short(legacy)}; with dynamo: {short(dynamo)}"
                ) from dynamo


ONNX_VARIANTS = frozenset({"onnx", "onnx_int8"})


@functools.cache
def warm_onnx_export() -> None:
    """Export a one-layer model, once per process, before a job times its ONNX builds: the exporter's one-time start
    (lazy imports, the tracer's first run) is not a cost "paid at every model load", which a build's time stands for
    (``MAX_BUILD_SECONDS``); a serving process pays it once. Measured on the MiniLM-derived 2-layer embedder (AMD EPYC
    Zen 4): a process's first `onnx` build took 1.89 s and its second 0.68 s; after this warm-up (0.82 s), 0.89 and
    0.76 s. The variant listed first was charged it, which a slower machine could push over the limit."""
    linear = nn.Linear(2, 2).eval()
    example = Servable(linear, "logits", (torch.zeros(1, 2),), ("inputs",), {"inputs": {0: "batch"}})
    with contextlib.suppress(Exception):  # an exporter that fails here fails (and says why) in the build itself
        onnx_bytes(example)


def require_onnxruntime() -> None:
    if importlib.util.find_spec("onnxruntime") is None:
        raise VariantUnavailable("onnxruntime is not installed")


def onnx_session(proto: bytes, options: Any) -> Any:
    """An onnxruntime CPU session over ``proto`` that does not keep ``proto`` alive. Given bytes, onnxruntime's Python
    session holds on to them for its whole life (to re-create itself on a provider fallback a CPU session never
    makes): a second copy of every weight beside the session's own, 59 MiB for the MiniLM-derived 2-layer embedder.
    Given a path it keeps only the path, so the bytes go to an anonymous in-memory file (``memfd_create``: Linux; no
    file on any disk) that is closed once the session has read it. Where that cannot be done, the bytes."""
    import onnxruntime

    providers = ["CPUExecutionProvider"]
    try:
        if not os.path.isdir("/proc/self/fd"):
            raise OSError("no /proc/self/fd")
        descriptor = os.memfd_create("distillery-onnx", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux, no /proc, or memfd_create refused (a seccomp profile)
        return onnxruntime.InferenceSession(proto, options, providers=providers)
    try:
        with open(descriptor, "wb", closefd=False) as memory:
            memory.write(proto)
        return onnxruntime.InferenceSession(f"/proc/self/fd/{descriptor}", options, providers=providers)
    finally:
        os.close(descriptor)


_SHARED_ARENA: dict[str, bool] = {}  # "registered": whether this process registered onnxruntime's shared CPU arena
_SHARED_ARENA_LOCK = threading.Lock()


def shared_cpu_arena() -> bool:
    """Register, once per process, a CPU arena that every ONNX session allocates from (onnxruntime's "share
    allocators between sessions": ``create_and_register_allocator`` + ``session.use_env_allocators``). Each session's
    own arena keeps the largest batch's activations it ever ran for the process's life: measured with three sessions
    of the MiniLM-derived embedder as ``onnx_int8`` after batches up to 32 × 64 tokens, +114.7 MiB with their own
    arenas against +39.4 MiB sharing one, at the same latency (interleaved in one process: batch of 32 78–80 ms
    shared, 80–82 own). False where onnxruntime refuses it: sessions then keep their own arenas."""
    with _SHARED_ARENA_LOCK:
        if "registered" not in _SHARED_ARENA:
            import onnxruntime

            try:
                memory = onnxruntime.OrtMemoryInfo(
                    "Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, onnxruntime.OrtMemType.DEFAULT
                )
                onnxruntime.create_and_register_allocator(memory, onnxruntime.OrtArenaCfg({}))
                _SHARED_ARENA["registered"] = True
            except Exception as exc:  # an onnxruntime without it, or an allocator registered by someone else
                log.warning("onnxruntime's shared CPU arena is unavailable (%s); sessions keep their own", short(exc))
                _SHARED_ARENA["registered"] = False
        return _SHARED_ARENA["registered"]


def onnx_forward(proto: bytes, servable: Servable) -> OnnxForward:
    """An onnxruntime session over ``proto`` (one intra-op and one inter-op thread, like torch in the api; the
    process's shared CPU arena), called with the servable's inputs."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if shared_cpu_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    return OnnxForward(onnx_session(proto, options), servable.input_names)


class OnnxForward:
    """A servable's forward through an onnxruntime session: its inputs as numpy arrays, the first output back."""

    def __init__(self, session: Any, input_names: Sequence[str]) -> None:
        self.session = session
        expected = {item.name for item in session.get_inputs()}  # the exporter drops inputs the graph does not use
        self.names = [(index, name) for index, name in enumerate(input_names) if name in expected]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: inputs[index].detach().cpu().contiguous().numpy() for index, name in self.names}
        return torch.from_numpy(self.session.run(None, feed)[0])


def release_parameters(module: nn.Module) -> None:
    """Every parameter of ``module`` emptied (same dtype, no elements): for a loader that owns the module and now
    serves a session holding its own copy of the weights (the ONNX variants). The module stays an object to read
    (config, architecture); calling it would fail loudly rather than compute with stale weights."""
    for parameter in module.parameters():
        parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)


def serve_onnx(proto: bytes, servable: Servable, in_place: bool) -> tuple[Forward, int]:
    """A session over ``proto`` and its bytes; ``in_place``: the module's weights released once the session holds
    its own copy (not before: a failed build leaves them for eager)."""
    forward = onnx_forward(proto, servable)
    if in_place:
        release_parameters(servable.module)
    return forward, len(proto)


def build_onnx(servable: Servable, in_place: bool = False) -> tuple[Forward, int]:
    """``in_place``: the module's own weights are released once the session holds its copy, so that a served model
    holds its weights once (the session's), not twice."""
    require_onnxruntime()
    return serve_onnx(onnx_bytes(servable), servable, in_place)


def build_onnx_int8(servable: Servable, in_place: bool = False) -> tuple[Forward, int]:
    """``onnx`` with its products by weight matrices quantized to int8 in memory (app/distill/onnx_int8.py): measured
    the fastest variant of the MiniLM-derived embedder on an AVX2 EPYC without bf16 and on a Zen 4 EPYC with VNNI and
    bf16 (docs/serving-measurements.md), chosen where it agrees with the eager student within the job's tolerance.
    ``in_place``: as ``build_onnx``."""
    require_onnxruntime()
    try:
        proto = onnx_int8_bytes(onnx_bytes(servable))
    except (LookupError, ValueError) as exc:
        raise VariantUnavailable(str(exc)) from exc
    return serve_onnx(proto, servable, in_place)


class BFloat16Forward(nn.Module):
    """A servable forward with bfloat16 weights: floating inputs are cast to bf16, the output back to float32."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        cast = [x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs]
        return self.module(*cast).float()  # type: ignore[no-any-return]


def build_bf16(servable: Servable, in_place: bool = False) -> tuple[Forward, int]:
    """A bf16 copy of the module (the job measures it beside eager); ``in_place``: the module itself converted, for a
    loader that owns it and serves nothing else from it (no second copy of the weights in memory)."""
    module = (servable.module if in_place else copy.deepcopy(servable.module)).to(torch.bfloat16).eval()
    if isinstance(module, EmbeddingForward | LogitsForward):  # not a causal LM: its generation engine needs sdpa
        # a text encoder attends with its keys padded to a multiple of 16: the same outputs, and in bf16 a batch is
        # 10-40 % cheaper on a CPU (in float32 it measured no faster, eager slower: app/distill/text/attention.py)
        align_attention(module)
    held = [*module.parameters(), *module.buffers()]
    return BFloat16Forward(module).eval(), 0 if in_place else sum(t.numel() * t.element_size() for t in held)


def build_torchscript_bf16(servable: Servable, in_place: bool = False) -> tuple[Forward, int]:
    """The bf16 forward traced and frozen: bf16's matmul rate without Python between the ops. On a server this
    matters beyond the saved overhead: the whole forward runs in TorchScript's interpreter without the GIL, so the
    event loop's thread parsing requests does not stall it between ops (eager modules take the GIL back ~150 times
    per forward of a 2-layer BERT)."""
    converted, extra = build_bf16(servable, in_place)
    traced, _ = build_torchscript(replace(servable, module=cast(nn.Module, converted)))
    return traced, extra


class PackedLinear(nn.Module):
    """An ``nn.Linear`` with bf16 weights that oneDNN reordered once, at build time, into the blocked layout its
    matrix kernels read (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing emits on CPUs): a plain
    bf16 ``F.linear`` reorders the weight on every call, a fixed cost per layer per forward that a lone request pays
    in full. Called through ``torch.ops.mkldnn._linear_pointwise``. Scripted by ``pack_linears``: the tracer cannot
    record an opaque oneDNN tensor as an argument, but it records the call of a scripted module."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return y


def pack_linears(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Every bf16 ``nn.Linear`` in ``module`` replaced by a scripted ``PackedLinear``; returns what was replaced
    (``unpack_linears`` puts it back). Each packed layer is checked against the plain one on a random row before any
    is swapped in, so a failure leaves the module as it was."""
    found = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent._modules.items()  # every name: named_children() skips a module's second one
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16
    ]
    packed: dict[int, nn.Module] = {}  # by the nn.Linear: one registered under two parents is packed once
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, linear in found:
            if id(linear) in packed:
                continue
            made = torch.jit.script(PackedLinear(linear))
            row = torch.randn(1, 3, linear.in_features, generator=generator).to(torch.bfloat16)
            torch.testing.assert_close(made(row).float(), linear(row).float(), rtol=2e-2, atol=2e-2)
            packed[id(linear)] = made
    for parent, name, linear in found:
        setattr(parent, name, packed[id(linear)])
    return found


def unpack_linears(replaced: list[tuple[nn.Module, str, nn.Linear]]) -> None:
    for parent, name, linear in replaced:
        setattr(parent, name, linear)


def onednn_bf16_supported() -> bool:
    """Whether oneDNN has bf16 kernels here (AVX-512 or AMX) and this torch has the operators ``PackedLinear`` calls."""
    try:
        ops = all(hasattr(torch.ops.mkldnn, name) for name in ("_reorder_linear_weight", "_linear_pointwise"))
        return bool(torch._C._has_mkldnn and ops and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the check itself
        return False


def build_torchscript_bf16_packed(servable: Servable, in_place: bool = False) -> tuple[Forward, int]:
    """``torchscript_bf16`` with its linear layers' weights pre-packed for oneDNN (``PackedLinear``): the weight
    reorders a bf16 matmul repeats on every call are done once at load. Measured on an Intel Xeon with AMX (the 2-layer
    MiniLM embedder, ``benchmarks.packed``): one sentence 12-20 % faster, batches of 16 and 32 1-15 % cheaper. Only
    where oneDNN has bf16 kernels; the operators are torch's private ones (inductor's), so a torch without them makes
    this variant unavailable, not wrong."""
    if not onednn_bf16_supported():
        raise VariantUnavailable("oneDNN has no bf16 kernels on this CPU")
    converted, extra = build_bf16(servable, in_place)
    try:
        replaced = pack_linears(cast(nn.Module, converted))
    except Exception as exc:
        raise VariantUnavailable(f"packing the weights failed: {short(exc)}") from exc
    if not replaced:
        raise VariantUnavailable("the model has no Linear layers to pack")
    try:
        # not frozen: frozen, a graph of packed layers crashes the process (SIGSEGV, in TorchScript's error report)
        # when anything in the forward raises (an id past the vocabulary, an empty batch), also with the packed
        # weights kept as attributes (preserved_attrs); traced alone, the same error is an ordinary RuntimeError
        traced, _ = build_torchscript(replace(servable, module=cast(nn.Module, converted)), freeze=False)
    except Exception:
        unpack_linears(replaced)  # in place: the bf16 fallback serves the module as it was converted
        raise
    if in_place:
        del replaced  # the last references to the unpacked weights
        trim_heap()
    return traced, extra


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere). Packing allocates
    each layer's packed copy while its bf16 weights are still held, so the freed weights end up below live memory
    and stay in the process: 700 MB resident against 565 for ``torchscript_bf16`` on a 6-layer 1024-wide BERT, 568
    once trimmed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


BUILDERS: dict[str, Builder] = {
    "eager": build_eager,
    "torchscript": build_torchscript,
    "int8_dynamic": build_int8_dynamic,
    "onnx": build_onnx,
    "onnx_int8": build_onnx_int8,
    "bf16": build_bf16,
    "torchscript_bf16": build_torchscript_bf16,
    "torchscript_bf16_packed": build_torchscript_bf16_packed,
}
# the builders that can convert the servable's own module (what a serving loader that owns it asks for)
IN_PLACE_BUILDERS: dict[str, Builder] = {
    "int8_dynamic": functools.partial(build_int8_dynamic, in_place=True),
    "onnx": functools.partial(build_onnx, in_place=True),
    "onnx_int8": functools.partial(build_onnx_int8, in_place=True),
    "bf16": functools.partial(build_bf16, in_place=True),
    "torchscript_bf16": functools.partial(build_torchscript_bf16, in_place=True),
    "torchscript_bf16_packed": functools.partial(build_torchscript_bf16_packed, in_place=True),
}
# the variants that serve bf16 weights (half of eager's bytes)
BF16_VARIANTS = frozenset({"bf16", "torchscript_bf16", "torchscript_bf16_packed"})
# what serves when an in-place build fails after converting the module (eager would feed float32 to bf16 weights)
IN_PLACE_FALLBACK = {"torchscript_bf16": "bf16", "torchscript_bf16_packed": "bf16"}


def short(exc: BaseException, limit: int = 200) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_variant(name: str, servable: Servable, builders: Mapping[str, Builder] | None = None) -> BuiltVariant:
    """Build variant ``name`` of ``servable``; VariantUnavailable (with the reason) when it cannot be built."""
    builder = (builders or BUILDERS).get(name)
    if builder is None:
        raise VariantUnavailable(f"unknown variant {name!r}")
    started = time.perf_counter()
    try:
        forward, extra = builder(servable)
    except VariantUnavailable:
        raise
    except Exception as exc:
        raise VariantUnavailable(f"building it failed: {short(exc)}") from exc
    return BuiltVariant(name, forward, time.perf_counter() - started, extra)


def apply_variant(name: str | None, servable: Servable, *, in_place: bool = False) -> BuiltVariant:
    """The serving loader's side: build the variant the job recorded (eager when none was); when it cannot be built
    here (onnxruntime missing, an export that fails in this environment), serve eager and log a warning.
    ``in_place``: the caller owns ``servable.module`` and will not use it as float32 again, so a variant that can
    convert it rather than copy it does (bf16: half the memory of eager instead of one and a half times)."""
    wanted = name or "eager"
    if wanted != "eager":
        builders = {**BUILDERS, **IN_PLACE_BUILDERS} if in_place else None
        try:
            return build_variant(wanted, servable, builders)
        except VariantUnavailable as exc:
            # bf16 only where the failed build had converted the module already (eager would feed it float32 rows);
            # one that failed before (no bf16 kernels here, where bf16 would be slower than eager) falls back to eager
            converted = in_place and any(p.dtype == torch.bfloat16 for p in servable.module.parameters())
            fallback = IN_PLACE_FALLBACK.get(wanted, "eager") if converted else "eager"
            log.warning("serving variant %s cannot be built here (%s); serving %s", wanted, exc, fallback)
            if fallback != "eager":
                return build_variant(fallback, servable, builders)
    return build_variant("eager", servable)


# --- measuring and choosing -----------------------------------------------------------------------------------------


@dataclass
class Probe:
    """Held-out inputs (CPU tensors): batches to compare a variant's outputs with eager, and one input per latency
    batch size."""

    batches: list[tuple[torch.Tensor, ...]]
    latency: Mapping[int, tuple[torch.Tensor, ...]]


def tabular_probe(x_test: torch.Tensor, max_rows: int = 512) -> Probe | None:
    x = x_test[:max_rows].float().cpu().contiguous()
    if len(x) == 0:
        return None
    latency = {size: (x.repeat(-(-size // len(x)), 1)[:size].contiguous(),) for size in LATENCY_BATCH_SIZES}
    return Probe([(x,), latency[1]], latency)


def text_probe(examples: Any, max_examples: int = 32, batch_size: int = 16) -> Probe | None:
    """``examples``: the held-out TokenizedExamples (right-padded); batches are trimmed as the serving tokenizer pads
    them (to their longest row)."""
    n = min(len(examples), max_examples)
    if n == 0:
        return None

    def rows(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = examples.batch(index)
        return batch.input_ids.contiguous(), batch.attention_mask.contiguous()

    batches = [rows(torch.arange(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
    latency = {size: rows(torch.arange(size) % n) for size in LATENCY_BATCH_SIZES}
    return Probe([*batches, latency[1]], latency)


def interleaved_latency(
    forwards: Mapping[str, Forward], inputs: tuple[torch.Tensor, ...], repeats: int, budget_s: float
) -> dict[str, float]:
    """Median wall time (ms) of each ``forward(*inputs)``, sampled in rounds (one call of each per round) so that a
    burst of load elsewhere on the machine slows every variant alike. After a warm-up (a traced or ONNX model's first
    calls are slower), rounds stop at ``repeats`` or after ``budget_s`` seconds (at least one round)."""
    for forward in forwards.values():
        started = time.perf_counter()
        for _ in range(3):
            forward(*inputs)
            if time.perf_counter() - started > budget_s / (2 * len(forwards)):
                break
    samples: dict[str, list[float]] = {name: [] for name in forwards}
    started = time.perf_counter()
    for _ in range(repeats):
        for name, forward in forwards.items():
            begin = time.perf_counter()
            forward(*inputs)
            samples[name].append((time.perf_counter() - begin) * 1000.0)
        if time.perf_counter() - started > budget_s:
            break
    return {name: statistics.median(values) for name, values in samples.items()}


def finite(value: float) -> float | None:
    """JSON (and Postgres) cannot hold NaN or infinities: a non-finite measurement is recorded as null."""
    return value if math.isfinite(value) else None


def agreement_metrics(
    output: str,
    reference: torch.Tensor,
    candidate: torch.Tensor,
    min_agreement: float,
    min_cosine: float,
) -> dict[str, Any]:
    """Classifiers: share of inputs with the same class and the largest probability difference; embedders: mean and
    least cosine similarity. ``within_tolerance`` is false for anything non-finite."""
    candidate = candidate.float()
    if candidate.shape != reference.shape:
        raise ValueError(f"outputs have shape {tuple(candidate.shape)}; the eager model's {tuple(reference.shape)}")
    if output == "logits":
        p, q = torch.softmax(reference, dim=-1), torch.softmax(candidate, dim=-1)
        agreement = float((p.argmax(-1) == q.argmax(-1)).float().mean())
        max_diff = float((p - q).abs().max())
        ok = bool(torch.isfinite(q).all()) and agreement >= min_agreement
        return {"agreement": agreement, "max_prob_diff": finite(max_diff), "within_tolerance": ok}
    cosine = F.cosine_similarity(reference, candidate, dim=-1)
    cosine_min, cosine_mean = float(cosine.min()), float(cosine.mean())
    ok = math.isfinite(cosine_min) and cosine_min >= min_cosine
    return {"cosine_mean": finite(cosine_mean), "cosine_min": finite(cosine_min), "within_tolerance": ok}


def speedup(record: Mapping[str, Any], eager: Mapping[str, Any]) -> float | None:
    """How much faster than eager a variant is: the geometric mean of eager's latency over the variant's at each
    batch size both were timed at (batch 1, a lone request; batch 32, what a loaded server's batcher forms). None
    when either was not timed at batch 1."""
    ratios: list[float] = []
    for size in LATENCY_BATCH_SIZES:
        key = "latency_ms" if size == 1 else f"latency_ms_batch{size}"
        mine, base = record.get(key), eager.get(key)
        if mine is None or base is None or mine <= 0 or base <= 0:
            if size == 1:
                return None
            continue
        ratios.append(base / mine)
    return math.prod(ratios) ** (1.0 / len(ratios))


def choose_variant(records: Sequence[Mapping[str, Any]]) -> str:
    """The variant with the largest ``speedup`` over eager among those that apply, agree within tolerance and are no
    slower than eager at batch 1 (low load never pays for throughput under load); it must beat eager by
    ``MIN_GAIN``. Eager when nothing else qualifies."""
    eager = next((r for r in records if r["name"] == "eager"), None)
    if eager is None or eager.get("latency_ms") is None:
        return "eager"
    best, best_score = "eager", 1.0 / (1.0 - MIN_GAIN)
    for r in records:
        if r["name"] == "eager" or not r.get("applies") or not r.get("within_tolerance"):
            continue
        score = speedup(r, eager)
        if score is not None and r["latency_ms"] <= eager["latency_ms"] and score >= best_score:
            best, best_score = str(r["name"]), score
    return best


def measure_variants(
    servable: Servable,
    probe: Probe,
    *,
    names: Sequence[str] | None = None,
    min_agreement: float = 0.99,
    min_cosine: float = 0.99,
    repeats: int = MIN_REPEATS,
    builders: Mapping[str, Builder] | None = None,
) -> dict[str, Any]:
    """Build each variant, compare it with eager on ``probe`` and time it; choose the serving variant.

    Returns ``{"serving_variant", "variants": [record…], "variants_seconds"}``; a record is ``{"name", "applies",
    "reason"?, "build_seconds", "latency_ms" (batch 1), "latency_ms_batch32", "speedup", "agreement" and "max_prob_diff"
    (classifiers) or "cosine_mean" and "cosine_min" (embedders), "within_tolerance"}``.
    """
    started = time.perf_counter()
    wanted = list(VARIANT_NAMES if names is None else names)
    ordered = ["eager", *dict.fromkeys(n for n in wanted if n != "eager")]
    with torch.inference_mode():
        reference = torch.cat([servable.module(*batch).float() for batch in probe.batches])
    records: list[dict[str, Any]] = []
    running: dict[str, Forward] = {}
    if ONNX_VARIANTS.intersection(ordered):
        warm_onnx_export()
    for name in ordered:
        record: dict[str, Any] = {"name": name}
        records.append(record)
        try:
            built = build_variant(name, servable, builders)
        except VariantUnavailable as exc:
            record.update(applies=False, reason=str(exc))
            continue
        record["build_seconds"] = round(built.build_seconds, 4)
        if built.build_seconds > MAX_BUILD_SECONDS:
            record.update(
                applies=False,
                reason=f"building it took {built.build_seconds:.1f} s (over {MAX_BUILD_SECONDS:.0f} s, paid at "
                "every model load)",
            )
            continue
        try:
            with torch.inference_mode():
                outputs = torch.cat([built.forward(*batch) for batch in probe.batches])
                record.update(agreement_metrics(servable.output, reference, outputs, min_agreement, min_cosine))
        except Exception as exc:
            record.update(applies=False, reason=f"running it failed: {short(exc)}")
            continue
        record["applies"] = True
        running[name] = built.forward
    by_name = {record["name"]: record for record in records}
    with torch.inference_mode():
        for size, inputs in probe.latency.items():
            key = "latency_ms" if size == 1 else f"latency_ms_batch{size}"
            timings = interleaved_latency(running, inputs, max(repeats, MIN_REPEATS), MEASURE_BUDGET_S)
            for name, value in timings.items():
                by_name[name][key] = finite(round(value, 5))
    for record in records:
        score = speedup(record, by_name["eager"]) if record.get("applies") else None
        if score is not None:
            record["speedup"] = finite(round(score, 3))
    chosen = choose_variant(records)
    return {"serving_variant": chosen, "variants": records, "variants_seconds": time.perf_counter() - started}


def eager_only(reason: str, names: Sequence[str] = VARIANT_NAMES) -> dict[str, Any]:
    others = [{"name": n, "applies": False, "reason": reason} for n in dict.fromkeys(names) if n != "eager"]
    return {"serving_variant": "eager", "variants": [{"name": "eager", "applies": True}, *others]}


def choose_serving_variant(
    model: nn.Module,
    task: str,
    probe: Callable[[], Probe | None],
    evaluation: EvaluationSpec,
    threads: int | None = None,
) -> dict[str, Any]:
    """The end of a job: what ``evaluation.variants`` asks for, measured on the CPU (where models are served), as
    keys for ``result.evaluation`` (and the model's config). ``model`` must be on the CPU. ``threads``: the torch
    thread count the api serves with; the variants are timed at it (a variant that wins with the job's threads may
    lose with the api's), then the job's count is restored."""
    if threads is None or threads < 1:
        return _choose_serving_variant(model, task, probe, evaluation)
    with torch_threads(threads):
        chosen = _choose_serving_variant(model, task, probe, evaluation)
    if "variants_seconds" in chosen:
        chosen["variants_threads"] = threads
    return chosen


def lm_servable(model: nn.Module) -> Servable:
    """What a causal LM's variants are measured on: its next-token logits (``NextTokenForward``)."""
    model.eval()
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 256)
    input_ids = torch.tensor([[1, 3, 4, 5, 2], [1, 6, 2, 0, 0]], dtype=torch.int64) % vocab
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.int64)
    example = (input_ids, attention_mask)
    return Servable(NextTokenForward(model).eval(), "logits", example, ("input_ids", "attention_mask"))


def _choose_serving_variant(
    model: nn.Module, task: str, probe: Callable[[], Probe | None], evaluation: EvaluationSpec
) -> dict[str, Any]:
    if evaluation.variants is not None and set(evaluation.variants) <= {"eager"}:
        return {"serving_variant": "eager", "variants": [{"name": "eager", "applies": True}]}
    wanted = list(evaluation.variants if evaluation.variants is not None else VARIANT_NAMES)
    if task == "causal_lm" and "bf16" not in (evaluation.variants or []):  # measured only when asked for
        return eager_only(CAUSAL_LM_DEFAULT, wanted)
    made = lm_servable(model) if task == "causal_lm" else servable(model, task)
    inputs = probe()
    if made is None or inputs is None:
        return eager_only("no held-out inputs to measure variants on", wanted)
    names = [name for name in wanted if name in CAUSAL_LM_VARIANTS] if task == "causal_lm" else wanted
    measured = measure_variants(
        made,
        inputs,
        names=names,
        min_agreement=evaluation.variant_min_agreement,
        min_cosine=evaluation.variant_min_cosine,
        repeats=evaluation.latency_repeats,
    )
    if task == "causal_lm":  # the variants that do not apply, listed with the reason
        measured["variants"] += [
            {"name": name, "applies": False, "reason": CAUSAL_LM_REASON}
            for name in dict.fromkeys(wanted)
            if name not in CAUSAL_LM_VARIANTS
        ]
    return measured


SERVING_KEYS = ("serving_variant", "variants")


def serving_config(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The variant keys of a job's evaluation, for the model's stored config (what the serving loader reads)."""
    return {key: evaluation[key] for key in SERVING_KEYS if key in evaluation}
