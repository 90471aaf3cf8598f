"""The job spec: what a user POSTs to /v1/jobs.

Two layers of checking, both at submission time:
- the pydantic models below check shapes, types and ranges (unknown fields are rejected);
- ``check_spec`` checks what needs several fields at once (widths that must agree, a student over the size limit,
  labels the hard-label loss needs) and returns each problem with its field path, so that a spec that can never
  run is a 422 and not a job that fails an hour later.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeAlias, cast

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

Loc = tuple[str | int, ...]

SKLEARN_DATASETS: dict[str, tuple[int, int]] = {
    # name: (features, classes) — scikit-learn ships these on disk, so they work offline.
    "iris": (4, 3),
    "wine": (13, 3),
    "breast_cancer": (30, 2),
    "digits": (64, 10),
}


# bounds that keep every number storable (Postgres integer columns, JSON encoders) and every loop finite
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**32 - 1
INT64 = (-(2**63), 2**63 - 1)
MAX_JSON_DEPTH = 32
BYTES_VOCAB = 259  # the bytes tokenizer's ids (ByT5's): 256 bytes after pad, end of sequence and unknown
# the ids UTF-8 text can reach with it: its bytes go up to 0xF4 (0xF5–0xFF never occur), id = byte + 3
BYTES_MIN_VOCAB = 0xF4 + 3 + 1


def storable_json(value: Any, depth: int = 0) -> Any:
    """Free-form JSON in a spec (a transformers config, inline records) must fit what is stored and hashed: integers
    within 64 bits, finite numbers (NaN and infinities would be stored as null: a different spec), nesting at most
    MAX_JSON_DEPTH deep."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise ValueError(f"integer {value} is outside the 64-bit range")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    if isinstance(value, dict):
        for item in value.values():
            storable_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            storable_json(item, depth + 1)
    return value


JsonObject: TypeAlias = Annotated[dict[str, Any], AfterValidator(storable_json)]

# a transformers config's sizes that the service reads itself (the size limit, layer counts): whole numbers in range
CONFIG_SIZES = {
    "hidden_size": 1_000_000,
    "n_embd": 1_000_000,
    "intermediate_size": 10_000_000,
    "n_inner": 10_000_000,
    "num_hidden_layers": 10_000,
    "n_layer": 10_000,
    "num_layers": 10_000,
    "n_layers": 10_000,  # DistilBERT
    "encoder_layers": 10_000,  # BART, Whisper
    "decoder_layers": 10_000,
    "num_decoder_layers": 10_000,  # T5
    "num_attention_heads": 100_000,
    "n_head": 100_000,
    "vocab_size": 100_000_000,
}


NULLABLE_SIZES = frozenset({"n_inner", "intermediate_size", "num_decoder_layers"})


def sizes_are_counts(config: dict[str, Any]) -> dict[str, Any]:
    """``config``'s model_type a string and its sizes (``CONFIG_SIZES``) whole numbers from 1 to their bound (some may
    be null, transformers' default: GPT-2's n_inner and GPT-Neo's intermediate_size, 4 × the width; T5's
    num_decoder_layers, its num_layers)."""
    if not isinstance(config.get("model_type"), str):
        raise ValueError("model_type must be a string (gpt2, llama, bert, …)")
    for key, bound in CONFIG_SIZES.items():
        value = config.get(key)
        if key not in config or (value is None and key in NULLABLE_SIZES):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
            raise ValueError(f"{key} must be a whole number from 1 to {bound:,}, got {value!r}")
    return config


class SpecModel(BaseModel):
    # strict: no silent coercion ("3" → 3, 0 → False); what the schema says is what is accepted
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# --- architectures -------------------------------------------------------------------------------------------------


class MLPArchitecture(SpecModel):
    """A multilayer perceptron: Linear → activation, repeated, then a Linear head (the tutorial's models)."""

    type: Literal["mlp"] = "mlp"
    input_dim: int = Field(ge=1, le=1_000_000)
    hidden_dims: list[Annotated[int, Field(ge=1, le=1_000_000)]] = Field(default_factory=list, max_length=64)
    output_dim: int = Field(ge=1, le=1_000_000, description="Number of classes.")
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    def parameter_estimate(self) -> int:
        return self.parameter_count()

    def parameter_count(self) -> int:
        widths = [self.input_dim, *self.hidden_dims, self.output_dim]
        return sum(a * b + b for a, b in itertools.pairwise(widths))


class TransformerArchitecture(SpecModel):
    """A transformers model built from a config with random init (e.g. a small GPT-2 or BERT)."""

    type: Literal["transformer"]
    config: Annotated[JsonObject, AfterValidator(sizes_are_counts)] = Field(
        description="A transformers config: model_type plus its fields."
    )
    tokenizer: str = Field(
        "bytes",
        description="'bytes' (a byte-level tokenizer needing no files), 'teacher' (the teacher's), or a model "
        "reference whose tokenizer to use.",
        max_length=500,
    )

    def parameter_estimate(self) -> int:
        """Rough parameter count from the config (embeddings + 12·h² per layer), for the size limit check."""
        config: dict[str, Any] = self.config
        hidden = int(config.get("hidden_size", config.get("n_embd", 768)))
        layers = blocks(config) or 12
        # the tokenizer fixes the vocabulary when the config leaves it out
        vocab = int(config.get("vocab_size", 384 if self.tokenizer == "bytes" else 50_000))
        intermediate = int(config.get("intermediate_size") or config.get("n_inner") or 4 * hidden)
        return vocab * hidden + layers * (4 * hidden * hidden + 2 * hidden * intermediate)


class DerivedArchitecture(SpecModel):
    """The student is the teacher with fewer layers, initialised from the teacher's weights (DistilBERT recipe)."""

    type: Literal["derived"]
    keep_every: int | None = Field(None, ge=1, le=1000, description="Keep teacher blocks 0, k, 2k, …")
    layers: list[Annotated[int, Field(ge=0, le=10_000)]] | None = Field(
        None, min_length=1, max_length=1000, description="Teacher blocks to keep."
    )


def architecture_type(value: Any) -> str:
    """The union tag; ``type`` may be left out for the tutorial's MLPs."""
    if isinstance(value, dict):
        return str(value.get("type", "mlp"))
    return str(getattr(value, "type", "mlp"))


Architecture = MLPArchitecture
StudentArchitecture = Annotated[
    Annotated[MLPArchitecture, Tag("mlp")]
    | Annotated[TransformerArchitecture, Tag("transformer")]
    | Annotated[DerivedArchitecture, Tag("derived")],
    Discriminator(architecture_type),
]
TeacherArchitecture = Annotated[
    Annotated[MLPArchitecture, Tag("mlp")] | Annotated[TransformerArchitecture, Tag("transformer")],
    Discriminator(architecture_type),
]


# --- models ---------------------------------------------------------------------------------------------------------


TeacherWeight = Field(1.0, gt=0.0, le=1000.0, description="Weight among several teachers (normalised).")


class BuiltinTeacher(SpecModel):
    """A teacher built from an architecture and a seed (random init, as in the tutorial)."""

    source: Literal["builtin"] = "builtin"
    architecture: TeacherArchitecture
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Init seed; default derived from training.seed.")
    weight: float = TeacherWeight
    pretrain: TrainingSpec | None = Field(
        None,
        description="Text tasks: first train this teacher on the job's train split with hard labels (next tokens "
        "or classes), then distil it: a realistic teacher → student chain in one job.",
    )


class StoredModelTeacher(SpecModel):
    """A model the service already holds: uploaded, or produced by an earlier job."""

    source: Literal["model"]
    model_id: str = Field(min_length=1, max_length=64)
    weight: float = TeacherWeight


class JobOutputTeacher(SpecModel):
    """The model produced by an earlier (succeeded) job."""

    source: Literal["job"]
    job_id: str = Field(min_length=1, max_length=64)
    weight: float = TeacherWeight


class TransformersTeacher(SpecModel):
    """A transformers model by local path (under a configured model root) or hub name (offline copies shipped by
    installed packages, e.g. sentence-transformers/all-MiniLM-L6-v2; downloads only where the operator allows)."""

    source: Literal["transformers"]
    model: str = Field(min_length=1, max_length=500)
    weight: float = TeacherWeight


TeacherSpec = Annotated[
    BuiltinTeacher | StoredModelTeacher | JobOutputTeacher | TransformersTeacher, Field(discriminator="source")
]


class StudentSpec(SpecModel):
    architecture: StudentArchitecture
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Init seed; default derived from training.seed.")


# --- data -----------------------------------------------------------------------------------------------------------


class SyntheticData(SpecModel):
    """Inputs drawn from a fixed distribution (the tutorial's ``torch.randn``). No labels: the teacher provides them."""

    source: Literal["synthetic"] = "synthetic"
    distribution: Literal["gaussian", "uniform"] = "gaussian"
    n_train: int = Field(128, ge=1, le=MAX_COUNT)
    n_test: int = Field(64, ge=1, le=MAX_COUNT)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Data seed; default derived from training.seed.")


class SklearnData(SpecModel):
    """One of scikit-learn's bundled datasets (offline), with its labels, split into train and held-out test."""

    source: Literal["sklearn"]
    name: Literal["iris", "wine", "breast_cancer", "digits"]
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    standardize: bool = Field(True, description="Bake per-feature mean/std of the train split into the models.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Split seed; default derived from training.seed.")


class TextOptions(SpecModel):
    max_length: int = Field(128, ge=4, le=32_768, description="Tokens per example (truncation/packing length).")
    packing: bool = Field(False, description="Causal LM: concatenate documents into full rows (no padding).")
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_records: int | None = Field(
        None,
        ge=1,
        le=MAX_COUNT,
        description="Distil on at most this many train records (a seeded subset: the transfer set). The held-out "
        "split and a teacher's pretraining use all records.",
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Split seed; default derived from training.seed.")


class UploadedData(TextOptions):
    """A dataset uploaded with POST /v1/datasets (JSONL text, prompt/completion or text/label)."""

    source: Literal["dataset"]
    dataset_id: str = Field(min_length=1, max_length=64)


class CorpusData(TextOptions):
    """Real text that ships with Python, offline: the standard library's source files, its docstrings, or single
    sentences from them."""

    source: Literal["corpus"]
    name: Literal["python-stdlib", "python-docstrings", "sentences"]
    max_documents: int = Field(2000, ge=2, le=1_000_000)


class InlineData(TextOptions):
    """Records in the request itself (small sets: prompts, a handful of labelled texts)."""

    source: Literal["inline"]
    records: list[JsonObject] = Field(min_length=2, max_length=10_000)


DataSpec = Annotated[
    SyntheticData | SklearnData | UploadedData | CorpusData | InlineData, Field(discriminator="source")
]
TEXT_DATA = (UploadedData, CorpusData, InlineData)


class AugmentationSpec(SpecModel):
    """Teacher-labelled data augmentation: fresh inputs drawn every step, labelled by the teacher's soft outputs."""

    enabled: bool = False
    distribution: Literal["gaussian", "uniform", "jitter", "mixup"] = Field(
        "gaussian",
        description="gaussian/uniform: the synthetic distribution (in standardized feature space for real data); "
        "jitter: train inputs plus Gaussian noise of noise_std (standardized units); mixup: convex mixes of pairs.",
    )
    samples_per_step: int = Field(256, ge=1, le=1_000_000)
    noise_std: float = Field(0.3, gt=0.0, le=100.0)
    mix_with_train: bool = Field(True, description="Also train on the real train batch each step.")


# --- objective and training -----------------------------------------------------------------------------------------

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def block_keys(value: Any) -> Any:
    """JSON object keys are strings: a layer map's "0": 2 is block 0 → block 2. The spec is strict, and a request's
    body (and the stored spec the worker reads) is validated from Python objects, where a string is no integer: every
    map was refused (strict=False on the field does not reach dict keys)."""
    if isinstance(value, dict):
        return {
            int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key: v for key, v in value.items()
        }
    return value


# a block index: below the most layers a config may have (checked against the models' depths where they are known)
LayerIndex: TypeAlias = Annotated[int, Field(lt=CONFIG_SIZES["n_layer"])]


class FeatureLossSpec(SpecModel):
    """Intermediate-layer distillation: match student hidden states to the teacher's at mapped layers."""

    layer_map: Annotated[dict[LayerIndex, LayerIndex] | None, BeforeValidator(block_keys)] = Field(
        None,
        description="Student block → teacher block (0-based). Default: student block i ↔ the teacher block its "
        "derived copy came from, or evenly spaced blocks.",
    )
    loss: Literal["mse", "cosine"] = "mse"
    weight: float = Field(1.0, ge=0.0, le=1000.0)
    projection: bool = Field(True, description="Learn a linear map when widths differ (not saved with the student).")
    attention_weight: float = Field(
        0.0, ge=0.0, le=1000.0, description="Weight of attention-map MSE at mapped layers (same head count)."
    )


MAX_NEW_TOKENS = 2048


class GenerationSpec(SpecModel):
    """Sampling for text the teacher or the student generates."""

    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 = no top-k filter.")


class OnPolicySpec(GenerationSpec):
    """GKD-style on-policy distillation: with probability ``probability`` (λ) a batch's completions are generated by
    the current student from the batch's prompts, then scored by the teacher with the objective's divergence."""

    probability: float = Field(0.5, ge=0.0, le=1.0, description="λ: the share of batches the student generates.")


class RLSpec(GenerationSpec):
    """Policy-gradient distillation (MiniLLM-style): the student samples completions; the reward is the teacher's
    mean log-likelihood per token of the sample (minus the student's with ``reward: reverse_kl``); advantage =
    reward − baseline; the PG term is added to the distillation loss with ``weight``."""

    weight: float = Field(1.0, ge=0.0, le=1000.0)
    reward: Literal["teacher_logprob", "reverse_kl"] = Field(
        "teacher_logprob",
        description="teacher_logprob: the teacher's mean log-likelihood per token of the sample; reverse_kl: that "
        "minus the student's own (log p_teacher − log q_student per token, MiniLLM's reward: the policy gradient then "
        "estimates the reverse KL's, and the student's entropy is not rewarded away).",
    )
    baseline: Literal["batch_mean", "none"] = "batch_mean"
    clip: float = Field(5.0, gt=0.0, le=1000.0, description="Advantages are clipped to ±clip.")


class ObjectiveSpec(SpecModel):
    divergence: Divergence = "forward_kl"
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    scale_by_t2: bool = Field(True, description="Multiply the soft loss by T² (Hinton) to keep gradient scale.")
    alpha: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Weight of the hard-label cross-entropy; 1 − alpha weighs the soft loss.",
    )
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD mixture weight (0 = forward KL, 1 = reverse KL).")
    skew_lambda: float = Field(0.1, ge=0.0, le=1.0, description="Skew KL mixing weight.")
    teacher_combine: Literal["mixture", "sum"] = Field(
        "mixture",
        description="Several teachers: distil from the weighted mixture of their distributions, or sum the "
        "weighted per-teacher losses.",
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Causal LM: compute the token loss from hidden states this many tokens at a time, so full "
        "[batch, seq, vocab] logits never exist in float32.",
    )
    top_k: int | None = Field(
        None, ge=1, le=1_000_000, description="Use only the teacher's top-k probabilities (plus the tail mass)."
    )
    features: FeatureLossSpec | None = None
    teacher_prompt: str | None = Field(
        None,
        min_length=1,
        max_length=100_000,
        description="Prompt (context) distillation: the teacher sees this text before every input; the student "
        "sees the input alone and learns the teacher's distribution with it.",
    )
    on_policy: OnPolicySpec | None = None
    rl: RLSpec | None = None
    embedding_mse_weight: float = Field(1.0, ge=0.0, le=1000.0, description="Embedding task: weight of MSE.")
    embedding_cosine_weight: float = Field(1.0, ge=0.0, le=1000.0, description="Embedding task: weight of 1−cos.")


class OptimizerSpec(SpecModel):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD only.")


class ScheduleSpec(SpecModel):
    name: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=MAX_COUNT)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Final lr as a fraction of lr (cosine/linear).")


class TrainingSpec(SpecModel):
    epochs: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Passes over the train split; give epochs or steps."
    )
    steps: int | None = Field(None, ge=1, le=MAX_COUNT, description="Optimizer steps; overrides epochs.")
    batch_size: int | None = Field(None, ge=1, le=MAX_COUNT, description="Default: the whole train split (full batch).")
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    max_grad_norm: float | None = Field(None, gt=0.0, le=1e6)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast on CUDA (teacher held in bf16), fp32 on the CPU. fp16: float16 autocast with "
        "a gradient scaler (the loss scaled up so that small gradients do not underflow; for GPUs without bf16).",
    )
    gradient_accumulation: int = Field(1, ge=1, le=4096)
    time_limit_s: float | None = Field(
        None,
        gt=0,
        le=366 * 24 * 3600,
        description="Soft time limit of one attempt (seconds): past it the job stops between steps and fails with "
        "code time_limit. The hard limit, which kills the attempt, is the worker's DISTILLERY_JOB_TIME_LIMIT_S.",
    )
    compile: bool = Field(False, description="torch.compile the student (worth it on GPUs for long jobs).")
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        le=MAX_COUNT,
        description="Checkpoint every N steps (also every DISTILLERY_CHECKPOINT_INTERVAL_S seconds).",
    )


VariantName = Literal[
    "eager",
    "torchscript",
    "int8_dynamic",
    "onnx",
    "onnx_int8",
    "bf16",
    "torchscript_bf16",
    "torchscript_bf16_packed",
]


class EvaluationSpec(SpecModel):
    latency_batch_size: int = Field(64, ge=1, le=65_536)
    latency_repeats: int = Field(30, ge=1, le=10_000)
    max_examples: int = Field(512, ge=1, le=1_000_000, description="Text tasks: held-out examples evaluated.")
    retrieval_k: int = Field(5, ge=1, le=1000, description="Embedding task: neighbours compared for top-k overlap.")
    variants: list[VariantName] | None = Field(
        None,
        max_length=16,
        description="Serving variants measured at the end of the job (latency on the CPU, agreement with the eager "
        "student on held-out inputs); the fastest within tolerance is recorded and served. Default: every variant "
        "that applies; [] serves the eager student without measuring. eager is always a candidate. For causal LMs "
        "only eager and bf16 apply (compared on next-token logits).",
    )
    variant_min_agreement: float = Field(
        0.99,
        ge=0.0,
        le=1.0,
        description="Classifiers: a variant is a candidate when it picks the eager student's class on at least this "
        "share of the held-out inputs.",
    )
    variant_min_cosine: float = Field(
        0.99,
        ge=-1.0,
        le=1.0,
        description="Embedders: a variant is a candidate when its embedding of every held-out input has at least "
        "this cosine similarity to the eager student's.",
    )


class StageSpec(SpecModel):
    """One stage of a text job. Stages run in order on the same student; what a stage leaves out comes from the job
    (data, objective, training). Evaluation after each stage is recorded in ``result.stages``."""

    kind: Literal["distill", "finetune", "generate", "logit_cache", "drop_layers"] = Field(
        description="distill: the job's method; finetune: hard labels only (task data); generate: the teacher "
        "completes the prompts (sequence-level KD: later stages train on its text); logit_cache: the teacher's "
        "top-k log-probs over the train data are stored once and later stages train from them without the teacher; "
        "drop_layers: remove student blocks, then train on."
    )
    name: str | None = Field(None, max_length=200)
    data: DataSpec | None = None
    objective: ObjectiveSpec | None = None
    training: TrainingSpec | None = None
    generation: GenerationSpec | None = None
    save_as: str | None = Field(
        None, max_length=200, description="generate/logit_cache: store the result as a dataset."
    )
    top_k: int = Field(32, ge=1, le=4096, description="logit_cache: teacher probabilities kept per token.")
    drop: list[Annotated[int, Field(ge=0, le=10_000)]] | None = Field(
        None, min_length=1, max_length=1000, description="drop_layers: the student blocks to remove."
    )


Task = Literal["classification", "text_classification", "causal_lm", "embedding"]
TEXT_TASKS = ("text_classification", "causal_lm", "embedding")


class JobSpec(SpecModel):
    """A distillation job. Without a teacher, the job trains its model on labels only (a supervised job), which is
    how a realistic teacher is made for a later job without uploads."""

    name: str | None = Field(None, min_length=1, max_length=200)
    task: Task = "classification"
    teacher: TeacherSpec | None = None
    teachers: list[TeacherSpec] | None = Field(
        None, min_length=1, max_length=16, description="Several teachers (same tokenizer); see objective."
    )
    stages: list[StageSpec] | None = Field(
        None, min_length=1, max_length=16, description="Text tasks: stages run in order (default: one distill stage)."
    )
    student: StudentSpec
    data: DataSpec = SyntheticData()
    augmentation: AugmentationSpec = AugmentationSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    training: TrainingSpec = TrainingSpec(epochs=20)
    evaluation: EvaluationSpec = EvaluationSpec()

    def all_teachers(self) -> list[TeacherSpec]:
        if self.teachers:
            return list(self.teachers)
        return [self.teacher] if self.teacher is not None else []

    def uploaded_datasets(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Every stored dataset the spec names, with the path of its ``dataset_id``: the job's data and each
        stage's."""
        named: list[tuple[tuple[str | int, ...], str]] = []
        if isinstance(self.data, UploadedData):
            named.append((("data", "dataset_id"), self.data.dataset_id))
        for index, stage in enumerate(self.stages or []):
            if isinstance(stage.data, UploadedData):
                named.append((("stages", index, "data", "dataset_id"), stage.data.dataset_id))
        return named

    @property
    def is_text(self) -> bool:
        return self.task in TEXT_TASKS


# --- semantic checks --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecLimits:
    max_student_params: int
    max_steps: int
    max_dataset_rows: int
    max_time_limit_s: float | None = None  # the workers' hard limit: a soft limit above it could never apply


@dataclass(frozen=True)
class SpecProblem:
    loc: Loc
    msg: str


@dataclass(frozen=True)
class ModelShape:
    """What the checks need to know of a stored teacher (read by the caller from its record)."""

    input_dim: int | None = None
    output_dim: int | None = None
    format: str = "distillery.mlp/v1"
    task: str = "classification"
    num_layers: int | None = None  # transformers models
    tokenizer: str | None = None  # tokenizer signature (artifacts.tokenizer_signature); None = unknown

    @property
    def is_text(self) -> bool:
        return self.task in TEXT_TASKS


# the deepest config built (on the meta device) at submission: ~2.6 ms a block to build, so 0.7 s at most per model
# (the deepest LLMs have ~130 blocks); a job may name 17 models, and 10,000 blocks each held a request for minutes.
# Deeper configs are left to the worker (which reports what fails in the job's error)
MAX_CHECKED_DEPTH = 256


def blocks(config: dict[str, Any]) -> int:
    """The most blocks any stack of a config has (encoder, decoder, …), 0 where it names none."""
    counts = [config.get(key) for key in CONFIG_SIZES if key.endswith(("layer", "layers"))]
    return max((count for count in counts if isinstance(count, int)), default=0)


def config_depth(config: dict[str, Any]) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    return None


def data_dims(data: Any) -> tuple[int | None, int | None]:
    """(features, classes) a dataset fixes; None where the models decide (synthetic data)."""
    if isinstance(data, SklearnData):
        return SKLEARN_DATASETS[data.name]
    return None, None


def planned_steps(spec: JobSpec, n_train: int) -> int:
    return training_steps(spec.training, n_train)


def training_steps(training: TrainingSpec, n_train: int) -> int:
    if training.steps is not None:
        return training.steps
    batch = min(training.batch_size or n_train, n_train)
    epochs = training.epochs if training.epochs is not None else 20
    return epochs * -(-n_train // batch)


def train_rows(data: Any, stored_rows: Mapping[str, int] | None = None) -> int:
    """Rows the train split will have, near enough for a limit check (``stored_rows``: an uploaded dataset's
    records, by id, where the caller knows them)."""
    if isinstance(data, SyntheticData):
        return data.n_train
    if isinstance(data, SklearnData):
        sizes = {"iris": 150, "wine": 178, "breast_cancer": 569, "digits": 1797}
        return max(1, int(sizes[data.name] * (1.0 - data.test_fraction)))
    if isinstance(data, InlineData):
        return max(1, int(len(data.records) * (1.0 - data.test_fraction)))
    if isinstance(data, CorpusData):
        return max(1, int(data.max_documents * (1.0 - data.test_fraction)))
    known = (stored_rows or {}).get(data.dataset_id)  # an uploaded dataset: its size is known only to the caller
    if known is None:
        return data.max_records or 1_000
    rows = max(1, int(known * (1.0 - data.test_fraction)))
    return min(rows, data.max_records) if data.max_records else rows


class SpecChecker:
    """Collects the problems of one spec; each check adds (loc, message)."""

    def __init__(
        self,
        spec: JobSpec,
        limits: SpecLimits,
        teacher_shapes: dict[int, ModelShape],
        dataset_kind: str | None,
        dataset_tokenizer: str | None = None,
        student_tokenizer: str | None = None,
        dataset_dims: tuple[int, int] | None = None,
        dataset_rows: Mapping[str, int] | None = None,
        dataset_kinds: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.dataset_rows = dict(dataset_rows or {})
        self.dataset_kinds = dict(dataset_kinds or {})
        self.limits = limits
        self.teacher_shapes = teacher_shapes
        self.dataset_kind = dataset_kind
        self.dataset_tokenizer = dataset_tokenizer
        self.student_tokenizer = student_tokenizer
        self.dataset_dims = dataset_dims
        self.problems: list[SpecProblem] = []
        self.student_depth: int | None = None  # the student's blocks, where known at submission (check_text_shapes)

    def add(self, loc: Loc, msg: str) -> None:
        self.problems.append(SpecProblem(loc, msg))

    def teacher_loc(self, index: int) -> Loc:
        return ("teachers", index) if self.spec.teachers else ("teacher",)

    def run(self) -> list[SpecProblem]:
        spec = self.spec
        if spec.teacher is not None and spec.teachers:
            self.add(("teachers",), "give either teacher or teachers, not both")
        self.check_size()
        if spec.is_text:
            self.check_text()
            self.check_stages()
        else:
            self.check_tabular()
            if spec.stages:
                self.add(("stages",), "stages apply to text tasks")
        self.check_dataset_sizes()
        self.check_steps()
        return self.problems

    def check_size(self) -> None:
        student = self.spec.student.architecture
        if isinstance(student, DerivedArchitecture):
            return  # never larger than its teacher
        params = student.parameter_estimate()
        if params > self.limits.max_student_params:
            self.add(
                ("student", "architecture"),
                f"student has {params:,} parameters; the limit is {self.limits.max_student_params:,}",
            )
        for index, teacher in enumerate(self.spec.all_teachers()):
            too_large = self.limits.max_student_params * 100
            if isinstance(teacher, BuiltinTeacher) and teacher.architecture.parameter_estimate() > too_large:
                self.add((*self.teacher_loc(index), "architecture"), "teacher is too large to build")

    def check_dataset_sizes(self) -> None:
        """Uploaded datasets too small to split: a text dataset of one record (split_records needs two), a tabular one
        whose every class has one row (each such row goes to the train half: the test half was empty). Both failed
        in the worker."""
        named: list[tuple[Loc, Any]] = [(("data",), self.spec.data)]
        named += [(("stages", index, "data"), stage.data) for index, stage in enumerate(self.spec.stages or [])]
        for loc, data in named:
            if not isinstance(data, UploadedData) or data.dataset_id not in self.dataset_rows:
                continue
            records = self.dataset_rows[data.dataset_id]
            if self.spec.is_text and records < 2:
                self.add((*loc, "dataset_id"), f"the dataset has {records} record; a train and a test split need 2")
            classes = self.dataset_dims[1] if self.dataset_dims is not None and loc == ("data",) else None
            if not self.spec.is_text and classes is not None and records <= classes:
                self.add(
                    (*loc, "dataset_id"),
                    f"every one of the {classes} classes has a single row, which the split keeps for training: "
                    "no row is left to evaluate on",
                )

    def check_steps(self) -> None:
        """Every training run of the job within the step limit: the job's, each stage's own, each builtin teacher's
        pretraining (those two were not counted: a stage of 2³¹ steps passed), on the data it trains on."""
        spec = self.spec
        training = spec.training
        runs: list[tuple[Loc, TrainingSpec, Any]] = [(("training",), training, spec.data)]
        for index, stage in enumerate(spec.stages or []):
            if stage.training is not None:
                runs.append((("stages", index, "training"), stage.training, stage.data or spec.data))
        for index, teacher in enumerate(spec.all_teachers()):
            if isinstance(teacher, BuiltinTeacher) and teacher.pretrain is not None:
                runs.append(((*self.teacher_loc(index), "pretrain"), teacher.pretrain, spec.data))
        planned = [training_steps(run, train_rows(data, self.dataset_rows)) for _, run, data in runs]
        for (loc, run, _), steps in zip(runs, planned, strict=True):
            if steps > self.limits.max_steps:
                field = "steps" if run.steps is not None else "epochs"
                self.add((*loc, field), f"{steps:,} optimizer steps requested; the limit is {self.limits.max_steps:,}")
        steps = planned[0]  # the job's own run
        limit = self.limits.max_time_limit_s
        if training.time_limit_s is not None and limit is not None and training.time_limit_s > limit:
            self.add(
                ("training", "time_limit_s"),
                f"above the workers' hard limit of {limit:g} s (DISTILLERY_JOB_TIME_LIMIT_S), which stops it first",
            )
        if training.schedule.warmup_steps > steps:
            self.add(("training", "schedule", "warmup_steps"), f"warmup is longer than the {steps} steps")

    # --- tabular classification -------------------------------------------------------------------------------

    def check_tabular(self) -> None:
        spec = self.spec
        student = spec.student.architecture
        if not isinstance(student, MLPArchitecture):
            self.add(("student", "architecture", "type"), "task classification (tabular) takes an mlp student")
            return
        if not isinstance(spec.data, SyntheticData | SklearnData | UploadedData):
            self.add(("data", "source"), "task classification (tabular) takes synthetic, sklearn or uploaded CSV data")
            return
        if spec.objective.features is not None:
            self.add(("objective", "features"), "feature distillation applies to transformer students")
        if isinstance(spec.data, UploadedData):
            if self.dataset_kind is not None and self.dataset_kind != "tabular":
                self.add(
                    ("data", "dataset_id"),
                    f"the dataset holds {self.dataset_kind} records; task classification takes a tabular (CSV) one",
                )
                return
            features, classes = self.dataset_dims or (None, None)
        else:
            features, classes = data_dims(spec.data)
        for index, teacher in enumerate(spec.all_teachers()):
            loc = self.teacher_loc(index)
            shape = self.teacher_shapes.get(index)
            if isinstance(teacher, BuiltinTeacher):
                if not isinstance(teacher.architecture, MLPArchitecture):
                    self.add((*loc, "architecture", "type"), "a tabular teacher is an mlp")
                    continue
                shape = ModelShape(teacher.architecture.input_dim, teacher.architecture.output_dim)
                loc = (*loc, "architecture")
            elif isinstance(teacher, TransformersTeacher) or (shape is not None and shape.is_text):
                self.add(loc, "a transformers model cannot teach a tabular classifier")
                continue
            if shape is None:
                continue
            self.check_widths(loc, shape, student, features, classes)
        self.check_widths(("student", "architecture"), None, student, features, classes)

        has_labels = classes is not None or isinstance(spec.data, UploadedData)  # a CSV upload always has labels
        if not spec.all_teachers():
            if not has_labels:
                self.add(("teacher",), "a job without a teacher trains on labels; its data must have labels")
            if spec.augmentation.enabled:
                self.add(("augmentation", "enabled"), "augmentation needs a teacher to label inputs")
        elif spec.objective.alpha > 0 and not has_labels:
            self.add(("objective", "alpha"), "alpha > 0 needs labelled data; synthetic data has no labels")
        if isinstance(spec.data, SyntheticData):
            rows = spec.data.n_train + spec.data.n_test
            if rows > self.limits.max_dataset_rows:
                self.add(("data",), f"{rows:,} rows requested; the limit is {self.limits.max_dataset_rows:,}")

    def check_widths(
        self,
        loc: Loc,
        teacher: ModelShape | None,
        student: MLPArchitecture,
        features: int | None,
        classes: int | None,
    ) -> None:
        if teacher is None:  # the student against the dataset
            if features is not None and student.input_dim != features:
                self.add((*loc, "input_dim"), f"dataset has {features} features; the student takes {student.input_dim}")
            if classes is not None and student.output_dim != classes:
                self.add(
                    (*loc, "output_dim"), f"dataset has {classes} classes; the student outputs {student.output_dim}"
                )
            return
        if teacher.input_dim != student.input_dim:
            self.add(
                ("student", "architecture", "input_dim"),
                f"student input_dim {student.input_dim} differs from the teacher's {teacher.input_dim}",
            )
        if teacher.output_dim != student.output_dim:
            self.add(
                ("student", "architecture", "output_dim"),
                f"student output_dim {student.output_dim} differs from the teacher's {teacher.output_dim}",
            )
        if features is not None and teacher.input_dim != features:
            self.add((*loc, "input_dim"), f"dataset has {features} features; the teacher takes {teacher.input_dim}")
        if classes is not None and teacher.output_dim != classes:
            self.add((*loc, "output_dim"), f"dataset has {classes} classes; the teacher outputs {teacher.output_dim}")

    # --- text tasks ----------------------------------------------------------------------------------------------

    def check_text(self) -> None:
        spec = self.spec
        task = spec.task
        student = spec.student.architecture
        teachers = spec.all_teachers()
        if isinstance(student, MLPArchitecture):
            self.add(("student", "architecture", "type"), f"task {task} takes a transformer or derived student")
        if not isinstance(spec.data, TEXT_DATA):
            self.add(("data", "source"), f"task {task} takes text data: dataset, corpus or inline")
        if spec.augmentation.enabled:
            self.add(("augmentation", "enabled"), "teacher-labelled augmentation applies to tabular data")
        for index, teacher in enumerate(teachers):
            loc = self.teacher_loc(index)
            if isinstance(teacher, BuiltinTeacher) and isinstance(teacher.architecture, MLPArchitecture):
                self.add((*loc, "architecture", "type"), f"task {task} takes a transformer teacher")
            shape = self.teacher_shapes.get(index)
            if shape is not None and not shape.is_text:
                self.add(loc, f"model is a {shape.task} model; task {task} needs a transformers model")
            elif shape is not None and shape.task != task:
                self.add(loc, f"model was made for task {shape.task}; this job's task is {task}")
            elif shape is not None and task == "text_classification" and shape.output_dim is not None:
                classes = self.text_classes()
                if classes is not None and classes != shape.output_dim:  # found at the evaluation, after training
                    self.add(loc, f"the teacher has {shape.output_dim} classes; the job's data has {classes}")
        if isinstance(student, DerivedArchitecture):
            if (student.keep_every is None) == (student.layers is None):
                self.add(("student", "architecture"), "give exactly one of keep_every or layers")
            if not teachers:
                self.add(("student", "architecture", "type"), "a derived student needs a teacher to derive from")
        self.check_text_shapes(student, teachers)
        self.check_configs(student, teachers)
        if isinstance(student, TransformerArchitecture) and "model_type" not in student.config:
            self.add(("student", "architecture", "config", "model_type"), "the config needs a model_type")
        for index, teacher in enumerate(teachers):
            architecture = teacher.architecture if isinstance(teacher, BuiltinTeacher) else None
            if isinstance(architecture, TransformerArchitecture) and "model_type" not in architecture.config:
                self.add((*self.teacher_loc(index), "architecture", "config", "model_type"), "needs a model_type")
        if not spec.stages:
            self.check_methods(spec.objective, ("objective",))
        if not teachers and task == "embedding":
            self.add(("teacher",), "an embedding job distils a teacher's embeddings; give a teacher")
        variants = spec.evaluation.variants
        if task == "causal_lm" and variants and not set(variants) <= {"eager", "bf16"}:
            self.add(
                ("evaluation", "variants"),
                "a causal LM generates with the transformers model itself: only eager and bf16 apply",
            )
        if task == "embedding" and spec.objective.alpha > 0:
            self.add(("objective", "alpha"), "the embedding task has no hard labels")
        if task == "embedding":  # hard labels only: with none, such a run has no loss to train on (the worker failed)
            for index, teacher in enumerate(teachers):
                if isinstance(teacher, BuiltinTeacher) and teacher.pretrain is not None:
                    self.add(
                        (*self.teacher_loc(index), "pretrain"), "pretraining uses hard labels; embeddings have none"
                    )
            for index, stage in enumerate(spec.stages or []):
                if stage.kind == "finetune":
                    self.add(("stages", index, "kind"), "a finetune stage trains on hard labels; embeddings have none")
                if stage.objective is not None and stage.objective.alpha > 0:
                    self.add(("stages", index, "objective", "alpha"), "the embedding task has no hard labels")
        if isinstance(spec.data, CorpusData) and task == "text_classification":
            self.add(("data", "source"), "corpora have no labels; upload a {text, label} dataset")
        objective = spec.objective
        if isinstance(spec.data, InlineData):
            self.check_inline_records(spec.data)
        if isinstance(spec.data, UploadedData) and self.dataset_kind is not None:
            accepted = DATASET_KINDS_BY_TASK[task]
            if self.dataset_kind not in accepted:
                self.add(
                    ("data", "dataset_id"),
                    f"the dataset holds {self.dataset_kind} records; task {task} takes {' or '.join(accepted)}",
                )
        if objective.teacher_combine == "mixture" and len(teachers) > 1 and objective.chunk_size is not None:
            self.add(("objective", "teacher_combine"), "chunked losses combine several teachers by sum")
        if objective.chunk_size is not None and task != "causal_lm":
            self.add(("objective", "chunk_size"), "chunked token loss applies to causal_lm")
        if objective.top_k is not None and task == "embedding":
            self.add(("objective", "top_k"), "top-k teacher probabilities apply to logit tasks")
        if objective.features is not None and not teachers:
            self.add(("objective", "features"), "feature distillation needs a teacher")
        if objective.features is not None and objective.features.layer_map is not None:
            if not objective.features.layer_map:
                self.add(("objective", "features", "layer_map"), "the layer map is empty")
            for student_layer, teacher_layer in objective.features.layer_map.items():
                if student_layer < 0 or teacher_layer < 0:
                    self.add(("objective", "features", "layer_map", str(student_layer)), "layers are 0-based indices")

    def text_classes(self) -> int | None:
        """The classes of a text classification job's data, where known at submission."""
        data = self.spec.data
        if isinstance(data, InlineData):
            return len({str(record.get("label")) for record in data.records})
        if isinstance(data, UploadedData) and self.dataset_dims is not None:
            return self.dataset_dims[1]
        return None

    def check_configs(self, student: Any, teachers: list[TeacherSpec]) -> None:
        """The transformer configs a job builds, built at submission on the meta device (no memory, no weights): a
        config that cannot be built (an unknown model_type, a width the heads do not divide), a vocabulary smaller
        than the ids UTF-8 text reaches with the bytes tokenizer, or examples longer than the model's learned
        position embeddings failed in the worker (an IndexError; on a GPU a device-side assert)."""
        import torch

        from app.distill.text.models import ModelSourceError, build_from_config, learned_positions

        spec = self.spec
        built: list[tuple[Loc, TransformerArchitecture]] = []
        if isinstance(student, TransformerArchitecture):
            built.append((("student", "architecture"), student))
        for index, teacher in enumerate(teachers):
            if isinstance(teacher, BuiltinTeacher) and isinstance(teacher.architecture, TransformerArchitecture):
                built.append(((*self.teacher_loc(index), "architecture"), teacher.architecture))
        lengths: list[tuple[Loc, int]] = []
        if isinstance(spec.data, TEXT_DATA):
            lengths.append((("data", "max_length"), spec.data.max_length))
        for index, stage in enumerate(spec.stages or []):
            if isinstance(stage.data, TEXT_DATA):
                lengths.append((("stages", index, "data", "max_length"), stage.data.max_length))
        vocabularies: list[tuple[Loc, int, TransformerArchitecture]] = []
        for loc, architecture in built:
            config = architecture.config
            if "model_type" not in config:
                continue  # check_text says so
            vocab = config.get("vocab_size")
            if architecture.tokenizer == "bytes" and isinstance(vocab, int) and vocab < BYTES_MIN_VOCAB:
                self.add(
                    (*loc, "config", "vocab_size"),
                    f"UTF-8 text reaches id {BYTES_MIN_VOCAB - 1} of the bytes tokenizer; vocab_size is {vocab}",
                )
                continue
            if blocks(config) > MAX_CHECKED_DEPTH:
                continue  # building its modules, even on the meta device, would hold the request for seconds
            try:
                with torch.device("meta"):
                    model = build_from_config(config, cast(Any, spec.task), num_labels=2)
            except ModelSourceError as exc:
                self.add((*loc, "config"), str(exc))
                continue
            vocabularies.append((loc, int(getattr(model.config, "vocab_size", 0) or 0), architecture))
            positions = learned_positions(model)
            for data_loc, length in lengths:
                if positions is not None and length > positions:
                    self.add(
                        data_loc,
                        f"examples of {length} tokens are longer than the {positions} positions the model at "
                        f"{'.'.join(str(part) for part in loc)} has learned embeddings for",
                    )
        teachers_built = [(loc, vocab, a) for loc, vocab, a in vocabularies if loc[0] != "student"]
        for loc, vocab, architecture in teachers_built[1:]:
            first_loc, first_vocab, first = teachers_built[0]
            # the bytes tokenizer fills a missing vocab_size with its 259: compare what the worker will build
            sizes = [
                BYTES_VOCAB if a.tokenizer == "bytes" and "vocab_size" not in a.config else v
                for v, a in ((first_vocab, first), (vocab, architecture))
            ]
            if sizes[0] != sizes[1]:  # their logits are combined token by token (a stack of unequal sizes failed)
                where = ".".join(str(part) for part in first_loc)
                self.add((*loc, "config", "vocab_size"), f"{sizes[1]} ids; {where} has {sizes[0]}: teachers share one")

    def teacher_facts(self, index: int, teacher: TeacherSpec) -> ModelShape | None:
        if isinstance(teacher, BuiltinTeacher) and isinstance(teacher.architecture, TransformerArchitecture):
            return ModelShape(
                format="transformers",
                task=self.spec.task,
                num_layers=config_depth(teacher.architecture.config),
                tokenizer="byt5" if teacher.architecture.tokenizer == "bytes" else None,
            )
        return self.teacher_shapes.get(index)

    def check_text_shapes(self, student: Any, teachers: list[TeacherSpec]) -> None:
        """Depths and tokenizers that are known at submission: layer indices in range, one shared vocabulary."""
        facts = [self.teacher_facts(index, teacher) for index, teacher in enumerate(teachers)]
        first = facts[0] if facts else None
        student_layers: int | None = None
        student_tokenizer: str | None = None
        if isinstance(student, DerivedArchitecture) and first is not None and first.num_layers is not None:
            depth = first.num_layers
            if student.layers is not None:
                bad = [layer for layer in student.layers if not 0 <= layer < depth]
                if bad:
                    self.add(
                        ("student", "architecture", "layers"), f"layers {bad} are out of range: the teacher has {depth}"
                    )
                student_layers = len(set(student.layers))
                if any(b <= a for a, b in itertools.pairwise(student.layers)):
                    self.add(("student", "architecture", "layers"), "list each teacher block once, in increasing order")
            elif student.keep_every is not None:
                student_layers = -(-depth // student.keep_every)
            student_tokenizer = first.tokenizer
        elif isinstance(student, TransformerArchitecture):
            student_layers = config_depth(student.config)
            if student.tokenizer == "bytes":
                student_tokenizer = "byt5"
            elif student.tokenizer == "teacher" and first is not None:
                student_tokenizer = first.tokenizer
            elif student.tokenizer != "teacher":
                student_tokenizer = self.student_tokenizer  # a named tokenizer, when the caller could resolve it
        known = [(index, f.tokenizer) for index, f in enumerate(facts) if f is not None and f.tokenizer is not None]
        for index, signature in known[1:]:
            if signature != known[0][1]:
                self.add(self.teacher_loc(index), f"teacher {index}'s tokenizer differs from teacher {known[0][0]}'s")
        if self.dataset_tokenizer and student_tokenizer and self.dataset_tokenizer != student_tokenizer:
            self.add(("data", "dataset_id"), "the logit cache was made with another tokenizer than the student's")
        if known and student_tokenizer is not None and student_tokenizer != known[0][1]:
            self.add(
                ("student", "architecture", "tokenizer"),
                "the student's tokenizer differs from the teacher's: logit distillation needs a shared vocabulary",
            )
        self.student_depth = student_layers
        features = self.spec.objective.features
        if features is not None and features.layer_map:
            teacher_layers = first.num_layers if first is not None else None
            for student_layer, teacher_layer in features.layer_map.items():
                loc: Loc = ("objective", "features", "layer_map", str(student_layer))
                if student_layers is not None and student_layer >= student_layers:
                    self.add(loc, f"student block {student_layer} is out of range: the student has {student_layers}")
                if teacher_layers is not None and teacher_layer >= teacher_layers:
                    self.add(loc, f"teacher block {teacher_layer} is out of range: the teacher has {teacher_layers}")

    def check_methods(self, objective: ObjectiveSpec, loc: Loc) -> None:
        teachers = self.spec.all_teachers()
        task = self.spec.task
        for name in ("on_policy", "rl"):
            if getattr(objective, name) is None:
                continue
            if task != "causal_lm":
                self.add((*loc, name), f"{name} distillation applies to causal_lm")
            if not teachers:
                self.add((*loc, name), f"{name} distillation needs a teacher (it scores the student's samples)")
        if objective.teacher_prompt is not None:
            if task not in ("causal_lm", "text_classification"):
                self.add((*loc, "teacher_prompt"), "prompt distillation applies to causal_lm and text_classification")
            if not teachers:
                self.add((*loc, "teacher_prompt"), "prompt distillation needs a teacher")

    def check_stages(self) -> None:
        """A stage order that can run: producers before consumers, a teacher where one is needed."""
        spec = self.spec
        if not spec.stages:
            return
        teachers = spec.all_teachers()
        cache_ready = self.dataset_kind == "logit_cache"
        depth = self.student_depth
        for index, stage in enumerate(spec.stages):
            loc: Loc = ("stages", index)
            if stage.data is not None:
                cache_ready = False  # a cache belongs to the data it was made on
                if not isinstance(stage.data, TEXT_DATA):
                    self.add((*loc, "data", "source"), "stage data is text: dataset, corpus or inline")
                self.check_stage_data(stage.data, (*loc, "data"))
            if stage.kind in ("generate", "logit_cache"):
                if not teachers:
                    self.add((*loc, "kind"), f"a {stage.kind} stage needs a teacher")
                if spec.task != "causal_lm":
                    self.add((*loc, "kind"), f"a {stage.kind} stage applies to causal_lm")
            if stage.kind == "generate":
                cache_ready = False
            if stage.kind == "logit_cache":
                cache_ready = True
                if index == len(spec.stages) - 1 and stage.save_as is None:
                    self.add((*loc, "save_as"), "a last logit_cache stage is only useful stored: give save_as")
            if stage.kind == "distill" and not teachers and not cache_ready:
                self.add((*loc, "kind"), "a distill stage needs a teacher, or a logit cache made before it")
            if stage.kind == "drop_layers" and not stage.drop:
                self.add((*loc, "drop"), "list the student blocks to remove")
            elif stage.kind == "drop_layers" and stage.drop:
                depth = self.check_drop(stage.drop, depth, (*loc, "drop"))
            if stage.kind != "generate" and stage.generation is not None:
                self.add((*loc, "generation"), "generation settings apply to a generate stage")
            self.check_methods(stage.objective or spec.objective, (*loc, "objective"))

    def check_stage_data(self, data: Any, loc: Loc) -> None:
        """A stage's own data is held to the job's task as the job's data is (it was only checked to exist, and a
        stage on records the task cannot use failed after the stages before it had trained)."""
        task = self.spec.task
        if isinstance(data, InlineData):
            self.check_inline_records(data, loc)
        elif isinstance(data, CorpusData) and task == "text_classification":
            self.add((*loc, "source"), "corpora have no labels; upload a {text, label} dataset")
        elif isinstance(data, UploadedData) and data.dataset_id in self.dataset_kinds:
            kind = self.dataset_kinds[data.dataset_id]
            accepted = DATASET_KINDS_BY_TASK[task]
            if kind not in accepted:
                self.add(
                    (*loc, "dataset_id"), f"the dataset holds {kind} records; task {task} takes {' or '.join(accepted)}"
                )

    def check_drop(self, drop: list[int], depth: int | None, loc: Loc) -> int | None:
        """A drop_layers stage's blocks: each once, in range of the student as the stages before left it, not all of
        them (the worker refused them after the earlier stages had trained). The student's depth after it."""
        if len(set(drop)) != len(drop):
            self.add(loc, "a block is listed more than once")
            return depth
        if depth is None:
            return None
        bad = [block for block in drop if not 0 <= block < depth]
        if bad:
            self.add(loc, f"blocks {bad} are out of range: the student has {depth} here")
        elif len(drop) >= depth:
            self.add(loc, f"removes all {depth} blocks of the student")
        return depth - len(drop)

    def check_inline_records(self, data: InlineData, loc: Loc = ("data",)) -> None:
        expected = {
            "causal_lm": ({"text"}, {"prompt", "completion"}),
            "embedding": ({"text"},),
            "text_classification": ({"text", "label"},),
        }[self.spec.task]
        for index, record in enumerate(data.records):
            if set(record) not in expected:
                shapes = " or ".join(str(sorted(keys)) for keys in expected)
                self.add(
                    (*loc, "records", index),
                    f"record has keys {sorted(record)}; task {self.spec.task} takes {shapes}",
                )
                return
            # as an uploaded dataset's records (app/distill/text/data.py): texts are strings (a number failed in the
            # worker's tokenizer), labels strings or integers; none empty
            for field, value in record.items():
                label = field == "label"
                whole = isinstance(value, int) and not isinstance(value, bool)
                if not (isinstance(value, str) or (label and whole)):
                    kinds = "a string or an integer" if label else "a string"
                    self.add((*loc, "records", index, field), f"{field} must be {kinds}, got {type(value).__name__}")
                    return
                if isinstance(value, str) and not value.strip():
                    self.add((*loc, "records", index, field), f"{field} is empty")
                    return


DATASET_KINDS_BY_TASK: dict[str, tuple[str, ...]] = {
    "causal_lm": ("text", "prompt_completion", "logit_cache"),
    "embedding": ("text",),
    "text_classification": ("text_label",),
    "classification": ("tabular",),
}


def check_spec(
    spec: JobSpec,
    limits: SpecLimits,
    teacher_shape: ModelShape | None = None,
    *,
    teacher_shapes: dict[int, ModelShape] | None = None,
    dataset_kind: str | None = None,
    dataset_tokenizer: str | None = None,
    student_tokenizer: str | None = None,
    dataset_dims: tuple[int, int] | None = None,
    dataset_rows: Mapping[str, int] | None = None,
    dataset_kinds: Mapping[str, str] | None = None,
) -> list[SpecProblem]:
    """Problems that make ``spec`` impossible to run; empty when it can run.

    ``teacher_shapes`` (index in ``all_teachers()`` → shape) describes stored teachers, which the caller looks up;
    ``teacher_shape`` is the shorthand for a single teacher. Builtin teachers carry their own architecture.
    ``student_tokenizer`` is the signature of a tokenizer the student names by reference, when it could be resolved.
    ``dataset_dims`` (features, classes) of an uploaded tabular dataset, as recorded at upload ((0, classes) of a
    text_label one); ``dataset_rows`` the records and ``dataset_kinds`` the kind of each uploaded dataset the spec
    names, by id.
    """
    shapes = dict(teacher_shapes or {})
    if teacher_shape is not None:
        shapes.setdefault(0, teacher_shape)
    return SpecChecker(
        spec,
        limits,
        shapes,
        dataset_kind,
        dataset_tokenizer,
        student_tokenizer,
        dataset_dims,
        dataset_rows,
        dataset_kinds,
    ).run()


BuiltinTeacher.model_rebuild()
JobSpec.model_rebuild()
