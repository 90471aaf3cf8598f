"""The training recipe for transformers students — causal LMs, text classifiers and sentence embedders — top to
bottom: setup (teachers, tokenizer, data, student) → loss step → train → evaluate.

One loop serves the three tasks; what differs is the forward and the loss (``TextObjective``). Logit losses come
from ``app.distill.losses`` (token-level, masked, normalised by the trained-token count of the whole accumulated
step), several teachers combine through ``app.distill.teachers``, and intermediate layers are matched through
``FeatureMatcher``. On CUDA the student runs under bf16 autocast and the teachers are held in bf16; on the CPU the
same code runs in float32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from app.distill.artifacts import ArtifactFile
from app.distill.checkpoints import Checkpointer
from app.distill.losses import (
    chunked_distillation_loss,
    distillation_loss,
    forward_kl_from_topk,
    hard_label_loss,
    topk_teacher_logprobs,
)
from app.distill.resources import JobResources
from app.distill.spec import (
    BuiltinTeacher,
    CorpusData,
    DerivedArchitecture,
    GenerationSpec,
    InlineData,
    JobSpec,
    ObjectiveSpec,
    StageSpec,
    StoredModelTeacher,
    TeacherSpec,
    TrainingSpec,
    TransformerArchitecture,
    TransformersTeacher,
    UploadedData,
)
from app.distill.teachers import combine_teacher_losses, normalised
from app.distill.text import data as text_data
from app.distill.text import methods
from app.distill.text import models as text_models
from app.distill.text.evaluation import evaluate_text
from app.distill.text.methods import LogitCache
from app.distill.training import (
    SEED_DATA,
    SEED_DROPOUT,
    SEED_EPOCH,
    SEED_STEP,
    SEED_STUDENT,
    SEED_TEACHER,
    ProgressCallback,
    ProgressUpdate,
    build_optimizer,
    derive_seed,
    lr_multiplier,
    report_and_checkpoint,
    select_device,
)
from app.distill.variants import choose_serving_variant, text_probe


@dataclass
class Teacher:
    model: Any  # a transformers PreTrainedModel (loosely typed upstream)
    tokenizer: Any
    weight: float


@dataclass
class TextTrainingOutcome:
    student: Any  # a transformers PreTrainedModel
    tokenizer: Any
    evaluation: dict[str, Any]
    train_seconds: float
    steps: int
    final_metrics: dict[str, float]
    extra_config: dict[str, Any]

    def save(self, destination: Path, extra_config: Mapping[str, Any] | None = None) -> list[ArtifactFile]:
        return text_models.save_pretrained_dir(
            self.student, self.tokenizer, destination, extra_config={**self.extra_config, **(extra_config or {})}
        )


# --- setup ---------------------------------------------------------------------------------------------------------


def byte_tokenizer() -> Any:
    """A byte-level tokenizer that needs no files (ByT5's): 256 byte ids + pad/eos/unk, no download."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def text_task(spec: JobSpec) -> text_models.TextTask:
    if spec.task == "classification":
        raise ValueError("tabular classification is not a text task")
    return spec.task


def load_teacher(
    spec: JobSpec, index: int, teacher: TeacherSpec, resources: JobResources, num_labels: int | None
) -> Teacher:
    task = text_task(spec)
    if isinstance(teacher, BuiltinTeacher):
        architecture = teacher.architecture
        if not isinstance(architecture, TransformerArchitecture):
            raise ValueError("a text teacher is a transformer")
        seed = teacher.seed if teacher.seed is not None else derive_seed(spec.training.seed, SEED_TEACHER, index)
        tokenizer = resolve_tokenizer(architecture.tokenizer, None, resources)
        config = with_vocab(architecture.config, tokenizer)
        model = text_models.build_from_config(config, task, seed=seed, num_labels=num_labels)
        return Teacher(model, tokenizer, teacher.weight)
    if isinstance(teacher, StoredModelTeacher):
        model, tokenizer = text_models.load_saved_dir(resources.stored_teachers[index], task)
        return Teacher(model, tokenizer, teacher.weight)
    if isinstance(teacher, TransformersTeacher):
        path = text_models.resolve_model_path(
            teacher.model, model_roots=resources.model_roots, allow_hub=resources.allow_hub
        )
        model, tokenizer = text_models.load_pretrained(path, task, num_labels=num_labels)
        return Teacher(model, tokenizer, teacher.weight)
    raise ValueError(f"teacher {index} must be resolved to a stored model before training")


def resolve_tokenizer(name: str, teacher_tokenizer: Any, resources: JobResources) -> Any:
    if name == "bytes":
        return byte_tokenizer()
    if name == "teacher":
        if teacher_tokenizer is None:
            raise ValueError("tokenizer 'teacher' needs a teacher")
        return teacher_tokenizer
    from transformers import AutoTokenizer

    path = text_models.resolve_model_path(name, model_roots=resources.model_roots, allow_hub=resources.allow_hub)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def with_vocab(config: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Fill ``vocab_size`` (and pad/eos ids) from the tokenizer when the config leaves them out."""
    merged = dict(config)
    merged.setdefault("vocab_size", len(tokenizer))
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for key, value in (
        ("pad_token_id", tokenizer.pad_token_id),
        ("eos_token_id", tokenizer.eos_token_id),
        ("bos_token_id", bos),
    ):
        if value is not None:
            merged.setdefault(key, value)
    return merged


def load_records(spec: JobSpec, resources: JobResources, seed: int) -> list[dict[str, Any]]:
    return load_data_records(spec.data, resources, seed)


def load_data_records(data: Any, resources: JobResources, seed: int) -> list[dict[str, Any]]:
    if isinstance(data, UploadedData):
        parsed = text_data.parse_jsonl(resources.dataset_files[data.dataset_id].read_bytes())
        records = list(parsed.records)
    elif isinstance(data, CorpusData):
        if data.name == "sentences":
            texts = text_data.builtin_sentences(max_sentences=data.max_documents, seed=seed)
        else:
            texts = text_data.builtin_corpus(data.name, max_documents=data.max_documents, seed=seed)
        records = [{"text": text} for text in texts]
    elif isinstance(data, InlineData):
        records = [dict(record) for record in data.records]
    else:
        raise ValueError(f"data source {data.source} is not text")
    return records


def transfer_subset(records: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """At most ``limit`` of the train records (a seeded choice): the distillation's transfer set. The held-out
    split and a teacher's pretraining use the full data."""
    if limit is None or limit >= len(records):
        return records
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(records), generator=generator)[:limit]
    return [records[i] for i in sorted(order.tolist())]


def label_names_of(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({str(record["label"]) for record in records})


def tokenize(
    spec: JobSpec,
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    label_names: Sequence[str] | None,
    data: Any = None,
) -> text_data.TokenizedExamples:
    data = data if data is not None else spec.data
    assert isinstance(data, UploadedData | CorpusData | InlineData)
    if spec.task == "causal_lm":
        return text_data.tokenize_causal_lm(records, tokenizer, max_length=data.max_length, packing=data.packing)
    if spec.task == "embedding":
        return text_data.tokenize_sentences([str(r["text"]) for r in records], tokenizer, max_length=data.max_length)
    assert label_names is not None
    return text_data.tokenize_classification(records, tokenizer, max_length=data.max_length, label_names=label_names)


def build_student(
    spec: JobSpec, teachers: Sequence[Teacher], num_labels: int | None, resources: JobResources
) -> tuple[nn.Module, Any, list[int] | None]:
    """(student, its tokenizer, the teacher blocks it was derived from)."""
    architecture = spec.student.architecture
    if isinstance(architecture, DerivedArchitecture):
        student, kept = text_models.derive_student(
            teachers[0].model, keep_every=architecture.keep_every, layers=architecture.layers
        )
        return student, teachers[0].tokenizer, kept
    if not isinstance(architecture, TransformerArchitecture):
        raise ValueError("a text student is a transformer or derived from the teacher")
    teacher_tokenizer = teachers[0].tokenizer if teachers else None
    student_tokenizer = resolve_tokenizer(architecture.tokenizer, teacher_tokenizer, resources)
    seed = spec.student.seed if spec.student.seed is not None else derive_seed(spec.training.seed, SEED_STUDENT)
    config = with_vocab(architecture.config, student_tokenizer)
    student = text_models.build_from_config(config, text_task(spec), seed=seed, num_labels=num_labels)
    return student, student_tokenizer, None


# --- losses --------------------------------------------------------------------------------------------------------


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Σ CE over tokens from hidden states [N, H] and the LM head [V, H], chunk by chunk with recomputation in
    backward, so the [N, V] logits never exist at once. Returns the sum (callers normalise)."""

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((h @ weight.t()).float(), t, reduction="sum")

    total = torch.zeros((), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        part = checkpoint(
            chunk_loss, hidden[start : start + chunk], targets[start : start + chunk], use_reentrant=False
        )
        total = total + part
    return total


class FeatureMatcher(nn.Module):
    """Hidden-state (and optionally attention-map) matching at mapped layers, with learned projections where the
    widths differ. The projections train with the student but are not part of the saved student."""

    def __init__(
        self,
        layer_map: Mapping[int, int],
        student_width: int,
        teacher_width: int,
        loss: str,
        projection: bool,
    ) -> None:
        super().__init__()
        self.layer_map = dict(sorted(layer_map.items()))
        self.loss = loss
        if student_width != teacher_width and not projection:
            raise ValueError(f"hidden widths differ ({student_width} vs {teacher_width}); enable features.projection")
        self.projections = nn.ModuleDict(
            {
                str(s): nn.Linear(student_width, teacher_width, bias=False)
                for s in self.layer_map
                if student_width != teacher_width
            }
        )

    def hidden_loss(
        self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        """hidden states as returned with output_hidden_states (index 0 = embeddings, i + 1 = after block i);
        mask [B, S] of real tokens. Mean over mapped layers of the masked per-token loss."""
        weights = mask.float()
        denominator = weights.sum().clamp_min(1.0)
        total = torch.zeros((), device=mask.device)
        for s_layer, t_layer in self.layer_map.items():
            s = student_hidden[s_layer + 1].float()
            t = teacher_hidden[t_layer + 1].float()
            if str(s_layer) in self.projections:
                s = self.projections[str(s_layer)](s)
            if self.loss == "cosine":
                per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)
            else:
                per_token = (s - t).pow(2).mean(dim=-1)
            total = total + (per_token * weights).sum() / denominator
        return total / max(1, len(self.layer_map))

    def attention_loss(
        self, student_attn: Sequence[torch.Tensor], teacher_attn: Sequence[torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        """attention probabilities [B, heads, S, S] per layer; MSE over real query rows at mapped layers."""
        rows = mask.float()[:, None, :, None]
        total = torch.zeros((), device=mask.device)
        for s_layer, t_layer in self.layer_map.items():
            s, t = student_attn[s_layer].float(), teacher_attn[t_layer].float()
            if s.shape != t.shape:
                raise ValueError(
                    f"attention maps differ in shape at layers {s_layer}/{t_layer}: {s.shape} vs {t.shape}"
                )
            total = total + ((s - t).pow(2) * rows).sum() / (rows.sum() * s.shape[1] * s.shape[-1]).clamp_min(1.0)
        return total / max(1, len(self.layer_map))


def default_layer_map(student_layers: int, teacher_layers: int, kept: Sequence[int] | None) -> dict[int, int]:
    """Student block i ↔ the teacher block it was copied from (derived students), else evenly spaced blocks ending
    at the teacher's last block."""
    if kept is not None:
        return dict(enumerate(kept))
    return {i: round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)}


def shifted(output: Any, offset: int) -> Any:
    """A causal model's output with the first ``offset`` positions (the context) cut off."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            setattr(output, name, value[:, offset:])
    hidden = getattr(output, "hidden_states", None)
    if hidden is not None:
        output.hidden_states = tuple(h[:, offset:] for h in hidden)
    return output


def shift_labels(
    batch: text_data.TokenizedExamples, with_context: text_data.TokenizedExamples, offset: int
) -> text_data.TokenizedExamples:
    """``with_context`` carrying ``batch``'s labels and loss mask moved right by ``offset`` positions."""
    assert batch.labels is not None and batch.loss_mask is not None
    rows = batch.labels.shape[0]
    pad_labels = torch.full((rows, offset), -100, dtype=batch.labels.dtype, device=batch.labels.device)
    pad_mask = torch.zeros((rows, offset), dtype=torch.bool, device=batch.loss_mask.device)
    return text_data.TokenizedExamples(
        input_ids=with_context.input_ids,
        attention_mask=with_context.attention_mask,
        labels=torch.cat([pad_labels, batch.labels], dim=1),
        loss_mask=torch.cat([pad_mask, batch.loss_mask], dim=1),
    )


def hidden_width(model: nn.Module) -> int:
    config: Any = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        if config is not None and hasattr(config, key):
            return int(getattr(config, key))
    raise ValueError(f"cannot tell the hidden width of {type(model).__name__}")


def base_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
    """The body without the LM head: last hidden states (after the final norm) and optional hidden states."""
    base = getattr(model, "base_model", model)
    return base(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


# Teachers' pooled embeddings of a stage's train examples are computed once, before its steps, when they take at
# most this much memory (float32, every teacher); above it each batch runs the teachers as it comes.
TARGET_CACHE_MAX_BYTES = 1 << 30


class TextObjective:
    """The loss of one micro-batch for the job's task; returns (loss, logged terms)."""

    def __init__(
        self,
        spec: JobSpec,
        teachers: Sequence[Teacher],
        student: nn.Module,
        features: FeatureMatcher | None,
        alpha: float,
        *,
        objective: ObjectiveSpec | None = None,
        context_ids: torch.Tensor | None = None,
        cache: LogitCache | None = None,
        tokenizer: Any = None,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.objective = objective or spec.objective
        self.teachers = teachers
        self.weights = normalised([t.weight for t in teachers]) if teachers else []
        self.student = student
        self.features = features
        self.alpha = alpha
        self.context_ids = context_ids
        self.cache = cache
        self.tokenizer = tokenizer
        self.seed = seed
        self.method_totals: dict[str, float] = {}
        # the teachers' pooled embeddings or class logits of the stage's train examples [teachers, N, width]
        # (``precompute_targets``)
        self.targets: torch.Tensor | None = None
        self.want_attentions = (
            features is not None
            and self.objective.features is not None
            and (self.objective.features.attention_weight > 0)
        )

    def note(self, name: str, value: float) -> None:
        """Method counters reported with the stage (e.g. how many batches were on-policy)."""
        self.method_totals[name] = self.method_totals.get(name, 0.0) + value

    def soft(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor | None,
        normalizer: float | None,
    ) -> torch.Tensor:
        objective = self.objective
        if objective.top_k is not None:
            values, indices, tail = topk_teacher_logprobs(
                teacher_logits, objective.top_k, temperature=objective.temperature
            )
            return forward_kl_from_topk(
                student_logits,
                values,
                indices,
                tail,
                temperature=objective.temperature,
                mask=mask,
                scale_by_t2=objective.scale_by_t2,
                normalizer=normalizer,
            )
        return distillation_loss(
            student_logits,
            teacher_logits,
            divergence=objective.divergence,
            temperature=objective.temperature,
            scale_by_t2=objective.scale_by_t2,
            beta=objective.beta,
            skew_lambda=objective.skew_lambda,
            mask=mask,
            normalizer=normalizer,
            allow_vocab_padding=True,
        )

    def precompute_targets(
        self,
        examples: text_data.TokenizedExamples,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        *,
        rows_drawn: int,
        batch_rows: int,
        report: Callable[[int, int], None] = lambda done, total: None,
    ) -> bool:
        """An embedding or text-classification job's targets are, per example, the teachers' pooled embeddings or
        class logits, which do not change while the student trains (teachers are frozen, in eval mode): compute them
        once for every train example, in batches of ``batch_rows`` similar lengths, instead of a teacher forward per
        micro-batch padded to its longest example (every epoch). Only when the steps left draw at least every
        example once (``rows_drawn``), and not when a batch needs more of the teachers (feature matching, attention
        maps, a prompt context) or the targets would take over ``TARGET_CACHE_MAX_BYTES``. ``report(done, total)``
        after each batch (it may stop the run: a cancel or pause). Returns whether they were computed."""
        if self.spec.task not in ("embedding", "text_classification") or not self.teachers or self.alpha >= 1.0:
            return False
        if self.features is not None or self.want_attentions or self.context_ids is not None:
            return False
        if not len(examples) or rows_drawn < len(examples):
            return False
        targets: torch.Tensor | None = None
        order = torch.argsort(examples.attention_mask.sum(dim=1), stable=True)
        batches = math.ceil(len(order) / max(1, batch_rows))
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            for index in range(batches):
                rows = order[index * batch_rows : (index + 1) * batch_rows]
                batch = to_device(examples.batch(rows), device)
                made = [self.target_of(out, batch) for out in self.teacher_outputs(batch, hidden=False)]
                if targets is None:
                    if len({t.shape[-1] for t in made}) != 1:
                        return False
                    if len(made) * len(examples) * made[0].shape[-1] * 4 > TARGET_CACHE_MAX_BYTES:
                        return False
                    targets = torch.empty(len(made), len(examples), made[0].shape[-1], device=device)
                targets[:, rows.to(device)] = torch.stack(made)
                report(index + 1, batches)
        self.targets = targets
        return targets is not None

    def target_of(self, out: Any, batch: text_data.TokenizedExamples) -> torch.Tensor:
        """What a teacher's output on ``batch`` gives an embedding or classification loss, per example [B, width]:
        its mean-pooled last hidden state, or its class logits (float32)."""
        if self.spec.task == "embedding":
            return mean_pool(out.last_hidden_state.float(), batch.attention_mask)
        return out.logits.float()  # type: ignore[no-any-return]

    def teacher_outputs(self, batch: text_data.TokenizedExamples, hidden: bool) -> list[Any]:
        """The teachers' outputs on the batch — with the prompt-distillation context in front when there is one,
        cut back to the student's positions (so that position t compares the same input token)."""
        outputs = []
        seen = batch if self.context_ids is None else methods.with_context(batch, self.context_ids)
        offset = 0 if self.context_ids is None else len(self.context_ids)
        with torch.no_grad():
            for teacher in self.teachers:
                kwargs: dict[str, Any] = {"output_hidden_states": hidden}
                if self.want_attentions:
                    kwargs["output_attentions"] = True
                if self.spec.task == "causal_lm" and self.objective.chunk_size is not None:
                    out = base_forward(teacher.model, seen.input_ids, seen.attention_mask, **kwargs)
                else:
                    out = teacher.model(
                        input_ids=seen.input_ids, attention_mask=seen.attention_mask, return_dict=True, **kwargs
                    )
                if offset and self.spec.task == "causal_lm":
                    out = shifted(out, offset)
                outputs.append(out)
        return outputs

    def __call__(
        self,
        batch: text_data.TokenizedExamples,
        normalizer: float,
        indices: torch.Tensor | None = None,
        step: int = 0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        task = self.spec.task
        method_terms: dict[str, float] = {}
        on_policy = self.objective.on_policy
        if task == "causal_lm" and on_policy is not None and self.teachers:
            used = methods.seeded_coin(self.seed, step, on_policy.probability)
            method_terms["on_policy"] = float(used)
            self.note("on_policy_batches", float(used))
            self.note("batches", 1.0)
            if used:
                batch = self.student_generated(batch, on_policy, step)
                normalizer = float(max(1, int(batch.loss_mask.sum())))  # type: ignore[union-attr]
                method_terms["generation_length"] = normalizer / len(batch)
                indices = None  # the cache (if any) does not cover generated text
        need_hidden = self.features is not None or task == "embedding"
        kwargs: dict[str, Any] = {"output_hidden_states": need_hidden}
        if self.want_attentions:
            kwargs["output_attentions"] = True
        chunked = task == "causal_lm" and self.objective.chunk_size is not None
        if chunked or task == "embedding":
            student_out = base_forward(self.student, batch.input_ids, batch.attention_mask, **kwargs)
        else:
            student_out = self.student(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, return_dict=True, **kwargs
            )
        precomputed = self.targets is not None and indices is not None
        teacher_outs = (
            self.teacher_outputs(batch, need_hidden) if self.teachers and self.alpha < 1.0 and not precomputed else []
        )
        if self.features is not None and not teacher_outs and self.teachers:
            teacher_outs = self.teacher_outputs(batch, True)

        terms: dict[str, torch.Tensor] = {}
        if task == "causal_lm":
            terms.update(self.causal_terms(batch, student_out, teacher_outs, normalizer))
        else:
            if precomputed:
                assert self.targets is not None and indices is not None
                targets = list(self.targets[:, indices.to(self.targets.device)])
            else:
                targets = [self.target_of(out, batch) for out in teacher_outs]
            if task == "embedding":
                terms.update(self.embedding_terms(batch, student_out, targets))
            else:
                terms.update(self.classification_terms(batch, student_out, targets))

        if task == "causal_lm" and self.cache is not None and indices is not None and not teacher_outs:
            terms["kd"] = self.cached_kd(batch, student_out, indices, normalizer)
        loss = (1.0 - self.alpha) * terms.get("kd", torch.zeros((), device=batch.input_ids.device))
        loss = loss + self.alpha * terms.get("ce", torch.zeros((), device=batch.input_ids.device))
        rl = self.objective.rl
        if task == "causal_lm" and rl is not None and self.teachers:
            pg, stats = self.policy_gradient(batch, rl, step)
            terms["pg"] = pg
            loss = loss + rl.weight * pg
            method_terms.update(stats)
            for name, value in stats.items():
                self.note(name, value)
            self.note("rl_batches", 1.0)
        if self.features is not None and teacher_outs and self.objective.features is not None:
            mask = batch.attention_mask.bool()
            feature = self.features.hidden_loss(student_out.hidden_states, teacher_outs[0].hidden_states, mask)
            terms["feature"] = feature
            loss = loss + self.objective.features.weight * feature
            if self.want_attentions:
                attention = self.features.attention_loss(student_out.attentions, teacher_outs[0].attentions, mask)
                terms["attention"] = attention
                loss = loss + self.objective.features.attention_weight * attention
        logged = {name: float(value.detach()) for name, value in terms.items()} | {"loss": float(loss.detach())}
        return loss, logged | method_terms

    # --- methods ---

    def student_generated(
        self, batch: text_data.TokenizedExamples, spec: Any, step: int
    ) -> text_data.TokenizedExamples:
        """GKD's on-policy batch: the batch's prompts completed by the current student (sampled)."""
        prompts = methods.split_prompts(batch)
        completions = methods.generate(
            self.student,
            prompts,
            spec,
            pad_token_id=pad_id(self.tokenizer),
            eos_token_id=eos_id(self.tokenizer),
            device=batch.input_ids.device,
            seed=self.seed * 31 + step,
        )
        generated = methods.prompt_completion_batch(prompts, completions, pad_id(self.tokenizer))
        return to_device(generated, batch.input_ids.device)

    def policy_gradient(
        self, batch: text_data.TokenizedExamples, spec: Any, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """MiniLLM-style: the student samples completions for the batch's prompts; reward = the teacher's mean
        log-likelihood per token of the sample (with the context, when prompt-distilling)."""
        sampled = self.student_generated(batch, spec, step + 1_000_003)
        assert sampled.loss_mask is not None
        student_logp = methods.sequence_logprobs(self.student, sampled)
        with torch.no_grad():
            teacher_view = sampled if self.context_ids is None else methods.with_context(sampled, self.context_ids)
            teacher_logp = methods.sequence_logprobs(
                self.teachers[0].model,
                teacher_view
                if self.context_ids is None
                else shift_labels(sampled, teacher_view, len(self.context_ids)),
            )
            if self.context_ids is not None:
                teacher_logp = teacher_logp[:, len(self.context_ids) :]
        mask = sampled.loss_mask[:, :-1].float()
        return methods.policy_gradient_loss(
            student_logp, teacher_logp, mask, baseline=spec.baseline, clip=spec.clip, reward_kind=spec.reward
        )

    def cached_kd(
        self, batch: text_data.TokenizedExamples, student_out: Any, indices: torch.Tensor, normalizer: float
    ) -> torch.Tensor:
        """Forward KL against the stored top-k teacher log-probs of these rows (no teacher forward)."""
        assert self.cache is not None
        width = batch.input_ids.shape[1]
        ids, values, tail = self.cache.rows(indices.cpu(), width)
        device = batch.input_ids.device
        return forward_kl_from_topk(
            student_out.logits,
            values.to(device),
            ids.to(device),
            tail.to(device),
            temperature=self.cache.temperature,
            mask=batch.loss_mask,
            scale_by_t2=self.objective.scale_by_t2,
            normalizer=normalizer,
        )

    def causal_terms(
        self, batch: text_data.TokenizedExamples, student_out: Any, teacher_outs: Sequence[Any], normalizer: float
    ) -> dict[str, torch.Tensor]:
        assert batch.loss_mask is not None and batch.labels is not None
        mask = batch.loss_mask
        terms: dict[str, torch.Tensor] = {}
        if self.objective.chunk_size is not None:
            chunk = self.objective.chunk_size
            hidden = student_out.last_hidden_state[mask]  # [N, H]: only trained positions
            head = self.student.get_output_embeddings()  # type: ignore[operator]
            if teacher_outs:
                terms["kd"] = self.chunked_kd(hidden, head, teacher_outs, mask, normalizer, chunk)
            if self.alpha > 0:
                targets = batch.labels[:, 1:][mask[:, :-1]]
                terms["ce"] = chunked_cross_entropy(hidden, head.weight, targets, chunk) / normalizer
            return terms
        logits = student_out.logits
        if teacher_outs:
            terms["kd"] = combine_teacher_losses(
                logits,
                [out.logits for out in teacher_outs],
                self.weights,
                self.objective.teacher_combine,
                self.objective.temperature,
                lambda s, t: self.soft(s, t, mask, normalizer),
            )
        if self.alpha > 0:
            # logits[:, t] predict token t + 1; labels are aligned with input_ids
            terms["ce"] = hard_label_loss(logits[:, :-1], batch.labels[:, 1:], normalizer=normalizer)
        return terms

    def chunked_kd(
        self,
        hidden: torch.Tensor,
        head: nn.Module,
        teacher_outs: Sequence[Any],
        mask: torch.Tensor,
        normalizer: float,
        chunk: int,
    ) -> torch.Tensor:
        objective = self.objective
        total = torch.zeros((), device=hidden.device)
        for weight, teacher, out in zip(self.weights, self.teachers, teacher_outs, strict=True):
            teacher_head = teacher.model.get_output_embeddings()
            total = total + weight * chunked_distillation_loss(
                hidden,
                head.weight,  # type: ignore[arg-type]
                out.last_hidden_state[mask],
                teacher_head.weight,
                chunk_size=chunk,
                divergence=objective.divergence,
                temperature=objective.temperature,
                scale_by_t2=objective.scale_by_t2,
                beta=objective.beta,
                skew_lambda=objective.skew_lambda,
                normalizer=normalizer,
                student_bias=getattr(head, "bias", None),
                teacher_bias=getattr(teacher_head, "bias", None),
                allow_vocab_padding=True,
                compile_pointwise=self.spec.training.compile,
            )
        return total

    def classification_terms(
        self, batch: text_data.TokenizedExamples, student_out: Any, teacher_logits: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """KD against each teacher's class logits ([B, C] each; combined as the objective says) and the hard-label
        loss."""
        logits = student_out.logits
        terms: dict[str, torch.Tensor] = {}
        if teacher_logits:
            terms["kd"] = combine_teacher_losses(
                logits,
                list(teacher_logits),
                self.weights,
                self.objective.teacher_combine,
                self.objective.temperature,
                lambda s, t: self.soft(s, t, None, None),
            )
        if self.alpha > 0 and batch.labels is not None:
            terms["ce"] = hard_label_loss(logits, batch.labels)
        return terms

    def embedding_terms(
        self, batch: text_data.TokenizedExamples, student_out: Any, teacher_embeddings: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """MSE and cosine distance between the student's pooled embeddings and each teacher's ([B, H] each)."""
        student_embedding = mean_pool(student_out.last_hidden_state.float(), batch.attention_mask)
        mse = torch.zeros((), device=student_embedding.device)
        cosine = torch.zeros((), device=student_embedding.device)
        for weight, teacher_embedding in zip(self.weights, teacher_embeddings, strict=True):
            mse = mse + weight * F.mse_loss(student_embedding, teacher_embedding)
            cosine = cosine + weight * (1.0 - F.cosine_similarity(student_embedding, teacher_embedding, dim=-1)).mean()
        kd = self.objective.embedding_mse_weight * mse + self.objective.embedding_cosine_weight * cosine
        return {"kd": kd, "mse": mse, "cosine_distance": cosine}


# --- the recipe ------------------------------------------------------------------------------------------------------


def precision_of(spec: JobSpec, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32."""
    precision = spec.training.precision
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def text_batch_size(spec: JobSpec) -> int:
    return spec.training.batch_size or 16


def text_steps(spec: JobSpec, n_train: int) -> int:
    return text_steps_for(spec.training, n_train)


def text_steps_for(training: TrainingSpec, n_train: int) -> int:
    if training.steps is not None:
        return training.steps
    per_step = (training.batch_size or 16) * training.gradient_accumulation
    epochs = training.epochs if training.epochs is not None else 1
    return max(1, epochs * math.ceil(n_train / per_step))


def to_device(batch: text_data.TokenizedExamples, device: torch.device) -> text_data.TokenizedExamples:
    return text_data.TokenizedExamples(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        labels=None if batch.labels is None else batch.labels.to(device),
        loss_mask=None if batch.loss_mask is None else batch.loss_mask.to(device),
    )


class MicroBatches:
    """An endless stream of (row indices, micro-batch): epoch after epoch of seeded shuffles."""

    def __init__(self, examples: text_data.TokenizedExamples, batch_size: int, seed: int) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self._iterator = self.epoch_batches(0)

    def epoch_batches(self, epoch: int) -> Any:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, SEED_EPOCH, epoch))
        order = torch.randperm(len(self.examples), generator=generator)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            yield rows, self.examples.batch(rows)

    def skip(self, count: int) -> None:
        """Advance ``count`` micro-batches (to resume at a step): whole epochs are skipped arithmetically."""
        per_epoch = max(1, math.ceil(len(self.examples) / self.batch_size))
        self.epoch += count // per_epoch
        self._iterator = self.epoch_batches(self.epoch)
        for _ in range(count % per_epoch):
            next(self._iterator)

    def next(self) -> tuple[torch.Tensor, text_data.TokenizedExamples]:
        try:
            return next(self._iterator)  # type: ignore[no-any-return]
        except StopIteration:
            self.epoch += 1
            self._iterator = self.epoch_batches(self.epoch)
            return next(self._iterator)  # type: ignore[no-any-return]


def trained_units(spec: JobSpec, batch: text_data.TokenizedExamples) -> int:
    """What the loss is normalised by: trained tokens (causal LM) or examples."""
    if spec.task == "causal_lm":
        assert batch.loss_mask is not None
        return int(batch.loss_mask.sum())
    return len(batch)


def run_steps(
    spec: JobSpec,
    objective: TextObjective,
    model: nn.Module,
    trainable: nn.Module,
    training: TrainingSpec,
    total_steps: int,
    examples: text_data.TokenizedExamples,
    device: torch.device,
    report: ProgressCallback,
    stage: str,
    checkpointer: Checkpointer | None = None,
) -> tuple[dict[str, float], float]:
    """The optimisation loop: warmup/decay schedule, gradient accumulation normalised over the whole step,
    autocast where configured, clipping, a progress report per step, checkpoints (and resumption from the latest
    one: the data stream is fast-forwarded to the step). Returns (last metrics, seconds)."""
    autocast_dtype = precision_of(spec, device)
    optimizer = build_optimizer(trainable, training)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    stream = MicroBatches(examples, training.batch_size or 16, training.seed)
    modules = {"trainable": trainable}
    # float16 (unlike bf16) has float32's precision but not its range: small gradients underflow to 0 unless the loss
    # is scaled up first and the gradients down before the step (which is skipped, the scale lowered, on an overflow)
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    first_step = checkpointer.restore(modules, optimizer, scaler) if checkpointer is not None else 0
    stream.skip(first_step * training.gradient_accumulation)
    started = time.perf_counter()
    objective.precompute_targets(
        examples,
        device,
        autocast_dtype,
        rows_drawn=(total_steps - first_step) * training.gradient_accumulation * stream.batch_size,
        batch_rows=stream.batch_size,
        report=lambda done, total: report(ProgressUpdate(f"{stage}: teacher targets", done, total, {})),
    )
    metrics: dict[str, float] = {}
    for step in range(first_step, total_steps):
        multiplier = lr_multiplier(step, total_steps, training)
        for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base_lr * multiplier
        drawn = [stream.next() for _ in range(training.gradient_accumulation)]
        micro = [(rows, to_device(batch, device)) for rows, batch in drawn]
        # normalise by the whole accumulated step, so accumulation equals one big batch
        normalizer = float(max(1, sum(trained_units(spec, batch) for _, batch in micro)))
        model.train()
        step_metrics: dict[str, float] = {}
        for rows, batch in micro:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss, terms = objective(batch, normalizer, rows, step)
            if spec.task != "causal_lm":
                loss = loss * (len(batch) / normalizer)  # example-mean losses: weight by the micro-batch's share
            (loss if scaler is None else scaler.scale(loss)).backward()  # type: ignore[no-untyped-call]
            for name, value in terms.items():
                step_metrics[name] = step_metrics.get(name, 0.0) + value
        if scaler is not None:
            scaler.unscale_(optimizer)  # clipping sees the true gradients
        if training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable.parameters(), training.max_grad_norm)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        metrics = {**step_metrics, "lr": optimizer.param_groups[0]["lr"]}
        report_and_checkpoint(
            report, ProgressUpdate(stage, step + 1, total_steps, metrics), checkpointer, modules, optimizer, scaler
        )
    model.eval()
    return metrics, time.perf_counter() - started


def pretrain_teachers(
    spec: JobSpec,
    teachers: Sequence[Teacher],
    train_records: Sequence[Mapping[str, Any]],
    label_names: Sequence[str] | None,
    device: torch.device,
    report: ProgressCallback,
    checkpointer: Checkpointer | None,
) -> dict[str, float]:
    """Train builtin teachers that ask for it on the train split, hard labels only. Returns seconds per teacher.
    A finished teacher is kept with the checkpoints, so a resumed attempt does not train it again (an attempt
    interrupted during pretraining starts that stage over)."""
    seconds: dict[str, float] = {}
    for index, (teacher, spec_teacher) in enumerate(zip(teachers, spec.all_teachers(), strict=True)):
        if not isinstance(spec_teacher, BuiltinTeacher) or spec_teacher.pretrain is None:
            continue
        if checkpointer is not None and checkpointer.load_module(f"teacher-{index}", teacher.model):
            continue
        pretrain = spec_teacher.pretrain
        examples = tokenize(spec, train_records, teacher.tokenizer, label_names)
        teacher.model.to(device)
        objective = TextObjective(spec, [], teacher.model, None, alpha=1.0)
        steps = pretrain.steps or max(
            1, (pretrain.epochs or 1) * math.ceil(len(examples) / (pretrain.batch_size or 16))
        )
        _, elapsed = run_steps(
            spec,
            objective,
            teacher.model,
            teacher.model,
            pretrain,
            steps,
            examples,
            device,
            report,
            f"pretraining teacher {index}",
        )
        seconds[f"teacher_{index}_pretrain_seconds"] = elapsed
        if checkpointer is not None:
            checkpointer.save_module(f"teacher-{index}", teacher.model)
    return seconds


def stored_cache(spec: JobSpec, resources: JobResources) -> LogitCache | None:
    """A logit cache stored by an earlier job, when the spec's dataset is one: it carries its own examples."""
    if not isinstance(spec.data, UploadedData):
        return None
    path = resources.dataset_files[spec.data.dataset_id]
    return LogitCache.load(path) if path.suffix == ".safetensors" else None


def split_cache(
    cache: LogitCache, test_fraction: float, seed: int
) -> tuple[text_data.TokenizedExamples, text_data.TokenizedExamples, LogitCache]:
    """Train/held-out rows of a stored cache; the returned cache covers the train rows only."""
    rows = list(range(len(cache.examples)))
    train_rows, test_rows = text_data.split_records(rows, test_fraction, seed)
    train_index, test_index = torch.tensor(train_rows), torch.tensor(test_rows)
    train = cache.examples.batch(train_index)
    width = cache.ids.shape[1]
    full_train = text_data.TokenizedExamples(
        input_ids=cache.examples.input_ids[train_index],
        attention_mask=cache.examples.attention_mask[train_index],
        labels=None if cache.examples.labels is None else cache.examples.labels[train_index],
        loss_mask=None if cache.examples.loss_mask is None else cache.examples.loss_mask[train_index],
    )
    assert full_train.input_ids.shape[1] == width and len(train) == len(train_rows)
    train_cache = LogitCache(
        full_train,
        cache.ids[train_index],
        cache.values[train_index],
        cache.tail[train_index],
        cache.temperature,
        cache.tokenizer,
    )
    return full_train, cache.examples.batch(test_index), train_cache


@dataclass
class StageState:
    """What flows from one stage to the next: the train/held-out examples and, after a logit_cache stage (or from
    a stored cache), the teacher's cached top-k log-probs for the train examples."""

    train: text_data.TokenizedExamples
    test: text_data.TokenizedExamples
    cache: LogitCache | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a finished stage hands on, for a resumed job (examples, and the cache when there is one)."""
        out: dict[str, torch.Tensor] = {}
        for prefix, examples in (("train", self.train), ("test", self.test)):
            for name in ("input_ids", "attention_mask", "labels", "loss_mask"):
                value = getattr(examples, name)
                if value is not None:
                    out[f"{prefix}.{name}"] = value
        if self.cache is not None:
            out.update({"cache.ids": self.cache.ids, "cache.values": self.cache.values, "cache.tail": self.cache.tail})
            out["cache.temperature"] = torch.tensor(self.cache.temperature)
        return out

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        for prefix in ("train", "test"):
            if f"{prefix}.input_ids" in tensors:
                setattr(
                    self,
                    prefix,
                    text_data.TokenizedExamples(
                        input_ids=tensors[f"{prefix}.input_ids"],
                        attention_mask=tensors[f"{prefix}.attention_mask"],
                        labels=tensors.get(f"{prefix}.labels"),
                        loss_mask=tensors.get(f"{prefix}.loss_mask"),
                    ),
                )
        if "cache.ids" in tensors:
            self.cache = LogitCache(
                self.train,
                tensors["cache.ids"],
                tensors["cache.values"],
                tensors["cache.tail"],
                float(tensors["cache.temperature"]),
                None,
            )


def encode_context(teacher_prompt: str | None, tokenizer: Any) -> torch.Tensor | None:
    """Token ids of a prompt-distillation context (no special tokens: it goes in front of the input)."""
    if teacher_prompt is None:
        return None
    ids = tokenizer(teacher_prompt, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def check_context_fits(spec: JobSpec, teachers: Sequence[Teacher], context: torch.Tensor | None) -> None:
    """The prompt-distillation context plus the longest input must fit the teacher's position embeddings."""
    if context is None or not teachers:
        return
    config: Any = getattr(teachers[0].model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = int(getattr(spec.data, "max_length", 0))
    if limit is not None and len(context) + longest > int(limit):
        raise ValueError(
            f"the teacher prompt ({len(context)} tokens) plus inputs of up to {longest} tokens exceed the teacher's "
            f"{limit} positions"
        )


def generated_records(
    prompts: Sequence[torch.Tensor], completions: Sequence[torch.Tensor], tokenizer: Any
) -> list[dict[str, Any]]:
    return [
        {
            "prompt": tokenizer.decode(p, skip_special_tokens=True),
            "completion": tokenizer.decode(c, skip_special_tokens=True),
        }
        for p, c in zip(prompts, completions, strict=True)
    ]


def run_stage(
    spec: JobSpec,
    index: int,
    stage: StageSpec,
    state: StageState,
    teachers: Sequence[Teacher],
    student: Any,
    features: FeatureMatcher | None,
    tokenizer: Any,
    label_names: Sequence[str] | None,
    resources: JobResources,
    device: torch.device,
    report: ProgressCallback,
    checkpointer: Checkpointer | None,
    job_checkpointer: Checkpointer | None,
    context_ids: torch.Tensor | None,
) -> tuple[dict[str, Any], dict[str, float], float, int]:
    """One stage; returns (its result record, last metrics, training seconds, steps). A finished stage is kept
    with the checkpoints (student weights and what it produced), so a resumed job skips it."""
    objective_spec = stage.objective or spec.objective
    training = stage.training or spec.training
    label = stage.name or f"{index}:{stage.kind}"
    result: dict[str, Any] = {"index": index, "kind": stage.kind, "name": stage.name}
    report(ProgressUpdate(f"stage {label}", 0, 0))
    if stage.data is not None:
        seed = derive_seed(training.seed, SEED_DATA, index + 1)
        records = load_data_records(stage.data, resources, seed)
        train_records, test_records = text_data.split_records(records, stage.data.test_fraction, seed)  # type: ignore[union-attr]
        state.train = tokenize(spec, train_records, tokenizer, label_names, stage.data)
        state.test = tokenize(spec, test_records, tokenizer, label_names, stage.data)
        state.cache = None  # a cache belongs to the data it was made on
    done = job_checkpointer is not None and job_checkpointer.stage_finished(index)
    metrics: dict[str, float] = {}
    seconds, steps = 0.0, 0
    teacher = teachers[0] if teachers else None
    if done:
        assert job_checkpointer is not None
        if stage.kind == "drop_layers" and stage.drop is not None:
            text_models.drop_layers(student, stage.drop)  # the saved weights are of the smaller student
        tensors, saved_result = job_checkpointer.restore_stage(index, {"student": student})
        state.restore(tensors)
        # its steps and seconds count in the job's totals as they did when it ran (the progress a resumed job
        # reports, the evaluation's steps)
        steps, seconds = int(saved_result.get("steps", 0)), float(saved_result.get("seconds", 0.0))
        return {**saved_result, "resumed": True}, metrics, seconds, steps
    elif stage.kind == "generate":
        assert teacher is not None
        generation = stage.generation or GenerationSpec()
        prompts = methods.split_prompts(state.train)
        started = time.perf_counter()
        completions: list[torch.Tensor] = []
        for start in range(0, len(prompts), 16):
            completions += methods.generate(
                teacher.model,
                prompts[start : start + 16],
                generation,
                pad_token_id=pad_id(tokenizer),
                eos_token_id=eos_id(tokenizer),
                device=device,
                seed=derive_seed(training.seed, SEED_STEP, index, start),
            )
            report(ProgressUpdate(f"stage {label}: generating", min(start + 16, len(prompts)), len(prompts)))
        seconds = time.perf_counter() - started
        state.train = methods.prompt_completion_batch(prompts, completions, pad_id(tokenizer))
        state.cache = None
        lengths = [len(c) for c in completions]
        result.update({"generated": len(completions), "mean_generation_length": sum(lengths) / max(1, len(lengths))})
        if stage.save_as and resources.dataset_sink is not None:
            result["dataset_id"] = resources.dataset_sink(
                stage.save_as,
                generated_records(prompts, completions, tokenizer),
                {"kind": "teacher_generated", "generation": generation.model_dump(), "stage": index},
            )
    elif stage.kind == "logit_cache":
        assert teacher is not None
        started = time.perf_counter()
        state.cache = methods.build_logit_cache(
            teacher.model,
            state.train,
            top_k=stage.top_k,
            temperature=objective_spec.temperature,
            device=device,
            tokenizer_signature=resources.tokenizer_signature,
        )
        seconds = time.perf_counter() - started
        result.update({"top_k": stage.top_k, "bytes_per_token": state.cache.bytes_per_trained_token()})
        if stage.save_as and resources.cache_sink is not None:
            result["dataset_id"] = resources.cache_sink(stage.save_as, state.cache, {"stage": index})
    else:
        if stage.kind == "drop_layers":
            assert stage.drop is not None
            text_models.drop_layers(student, stage.drop)
            result["layers_after"] = text_models.layer_count(student)
            features = None
        if stage.kind != "drop_layers" or stage.training is not None:
            finetune = stage.kind == "finetune"
            alpha = 1.0 if finetune or (not teachers and state.cache is None) else objective_spec.alpha
            objective = TextObjective(
                spec,
                [] if finetune else teachers,
                student,
                None if finetune else features,
                alpha,
                objective=objective_spec,
                context_ids=None if finetune else encode_context(objective_spec.teacher_prompt, tokenizer),
                cache=None if finetune else state.cache,
                tokenizer=tokenizer,
                seed=training.seed,
            )
            trainable = nn.ModuleList([student, features]) if features is not None and not finetune else student
            steps = text_steps_for(training, len(state.train))
            metrics, seconds = run_steps(
                spec,
                objective,
                student,
                trainable,
                training,
                steps,
                state.train,
                device,
                report,
                f"stage {label}" if spec.stages else "training",
                checkpointer,
            )
            result["method_metrics"] = {k: v for k, v in objective.method_totals.items()}
    if spec.stages:
        student.eval()
        result["evaluation"] = evaluate_text(
            spec.task,
            student,
            [(t.model, t.weight) for t in teachers],
            state.test,
            device,
            max_examples=min(spec.evaluation.max_examples, 128),
            latency_batch_size=min(8, len(state.test)),
            latency_repeats=3,
            retrieval_k=spec.evaluation.retrieval_k,
            teacher_context=context_ids,
        )
    result.update({"steps": steps, "seconds": seconds})
    if job_checkpointer is not None:
        job_checkpointer.finish_stage(index, {"student": student}, state.tensors(), result)
    return result, metrics, seconds, steps


def pad_id(tokenizer: Any) -> int:
    return int(text_data.resolve_pad_token_id(tokenizer))


def eos_id(tokenizer: Any) -> int | None:
    value = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return None if value is None else int(value)


def train_text_model(
    spec: JobSpec,
    resources: JobResources,
    *,
    progress: ProgressCallback | None = None,
    device: torch.device | None = None,
    checkpointer: Checkpointer | None = None,
) -> TextTrainingOutcome:
    """Run a text job and evaluate it. Blocking; call it off any event loop."""
    device = device or select_device(spec.training.device)
    report = progress or (lambda update: None)
    training = spec.training
    autocast_dtype = precision_of(spec, device)

    # --- setup ---
    report(ProgressUpdate("loading", 0, 0))
    # dropout draws from the global generator: seed it so that a job is reproducible from its spec
    torch.manual_seed(derive_seed(training.seed, SEED_DROPOUT))
    data_seed = getattr(spec.data, "seed", None)
    data_seed = data_seed if data_seed is not None else derive_seed(training.seed, SEED_DATA)
    assert isinstance(spec.data, UploadedData | CorpusData | InlineData)
    initial_cache = stored_cache(spec, resources)
    records = [] if initial_cache is not None else load_records(spec, resources, data_seed)
    train_records, test_records = (
        ([], []) if initial_cache is not None else text_data.split_records(records, spec.data.test_fraction, data_seed)
    )
    label_names = label_names_of(records) if spec.task == "text_classification" else None
    num_labels = len(label_names) if label_names is not None else None

    teachers = [
        load_teacher(spec, index, teacher, resources, num_labels) for index, teacher in enumerate(spec.all_teachers())
    ]
    pretrain_seconds = pretrain_teachers(spec, teachers, train_records, label_names, device, report, checkpointer)
    student, tokenizer, kept = build_student(spec, teachers, num_labels, resources)
    train_records = transfer_subset(train_records, spec.data.max_records, data_seed)
    for teacher in teachers:
        teacher.model.requires_grad_(False)
        teacher.model.eval()
        teacher.model.to(device=device, dtype=autocast_dtype or torch.float32)
    student.to(device)
    if initial_cache is not None:
        train_examples, test_examples, initial_cache = split_cache(initial_cache, spec.data.test_fraction, data_seed)
    else:
        train_examples = tokenize(spec, train_records, tokenizer, label_names)
        test_examples = tokenize(spec, test_records, tokenizer, label_names)

    features: FeatureMatcher | None = None
    if spec.objective.features is not None and teachers:
        feature_spec = spec.objective.features
        student_layers = text_models.layer_count(student)
        teacher_layers = text_models.layer_count(teachers[0].model)
        layer_map = feature_spec.layer_map or default_layer_map(student_layers, teacher_layers, kept)
        for s_layer, t_layer in layer_map.items():
            if s_layer >= student_layers or t_layer >= teacher_layers:
                depths = f"student {student_layers}, teacher {teacher_layers} blocks"
                raise ValueError(f"layer map {s_layer}→{t_layer} is out of range ({depths})")
        features = FeatureMatcher(
            layer_map,
            hidden_width(student),
            hidden_width(teachers[0].model),
            feature_spec.loss,
            feature_spec.projection,
        ).to(device)
        if feature_spec.attention_weight > 0:
            for model in (student, teachers[0].model):
                setter: Any = getattr(model, "set_attn_implementation", None)
                if setter is not None:
                    setter("eager")  # attention probabilities are only returned by the eager kernel

    # --- stages (default: one distill stage) ---
    stages = list(spec.stages or [StageSpec(kind="distill")])
    context_ids = encode_context(spec.objective.teacher_prompt, tokenizer)
    check_context_fits(spec, teachers, context_ids)
    state = StageState(train_examples, test_examples, cache=initial_cache)
    stage_results: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    train_seconds = 0.0
    total_steps = 0
    for index, stage in enumerate(stages):
        stage_checkpointer = checkpointer.stage(index) if checkpointer is not None else None
        result, stage_metrics, seconds, steps = run_stage(
            spec,
            index,
            stage,
            state,
            teachers,
            student,
            features,
            tokenizer,
            label_names,
            resources,
            device,
            report,
            stage_checkpointer,
            checkpointer,
            context_ids,
        )
        if stage.kind == "drop_layers":
            features = None  # the layer map no longer fits the student
        metrics = stage_metrics or metrics
        train_seconds += seconds
        total_steps += steps
        stage_results.append(result)

    # --- evaluate ---
    report(ProgressUpdate("evaluating", total_steps, total_steps, metrics))
    student.eval()
    evaluation = evaluate_text(
        spec.task,
        student,
        [(t.model, t.weight) for t in teachers],
        state.test,
        device,
        max_examples=spec.evaluation.max_examples,
        latency_batch_size=spec.evaluation.latency_batch_size,
        latency_repeats=spec.evaluation.latency_repeats,
        retrieval_k=spec.evaluation.retrieval_k,
        teacher_context=context_ids,
    )
    evaluation.update({"train_seconds": train_seconds, "steps": total_steps, "train_examples": len(state.train)})
    evaluation.update(pretrain_seconds)
    if context_ids is not None:
        evaluation["prompt_tokens_saved"] = len(context_ids)
    if spec.stages:
        evaluation["stages"] = stage_results
    extra: dict[str, Any] = {"task": spec.task, "format": "transformers"}
    if kept is not None:
        extra["derived_from_layers"] = kept
    if label_names is not None:
        extra["label_names"] = label_names
    if spec.task == "embedding":
        extra["pooling"] = "mean"
        extra["normalize"] = True
    student.to("cpu")
    evaluation.update(
        choose_serving_variant(
            student,
            spec.task,
            # a causal LM's forwards cost more and its outputs are [positions, vocab]: fewer texts
            lambda: text_probe(state.test, max_examples=8 if spec.task == "causal_lm" else 32),
            spec.evaluation,
            resources.serving_threads,
        )
    )
    return TextTrainingOutcome(student, tokenizer, evaluation, train_seconds, total_steps, metrics, extra)
