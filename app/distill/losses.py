"""Knowledge-distillation losses: pure functions over student and teacher logits.

Conventions (shared by every function here):

- Logits and log-probabilities have shape ``[..., V]``: ``[B, V]`` for classification, ``[B, S, V]`` for
  tokens. "Per-position" values have the leading shape ``[...]``.
- Everything is computed in at least float32: bf16/fp16 inputs are upcast before any softmax, float64 stays
  float64 (the gradient checks in the tests rely on that).
- Names follow the distillation literature, not ``F.kl_div``'s argument order: ``forward_kl`` is
  KL(teacher ‖ student) (mode covering, the Hinton loss), ``reverse_kl`` is KL(student ‖ teacher) (mode
  seeking).
- A log-probability of ``-inf`` (probability 0, e.g. a vocab entry padded by :func:`pad_vocab`) contributes
  exactly 0 to a KL term when it is on the left of the ‖ (0 · log 0 = 0) and the gradients stay finite. When
  it is on the right where the left has mass, the divergence is ``+inf``, which is the mathematically right
  answer; the mixture divergences (``jsd``, ``skew_kl``, ``skew_reverse_kl``) and ``tvd`` stay finite in that
  case.
- ``mask`` is a bool tensor of the leading shape (True = real position). Masked positions contribute exactly 0
  and receive exactly zero gradient, whatever their logits hold (padding may be garbage, even nan).
- ``normalizer`` is the number of real positions of the whole gradient-accumulation step (across
  micro-batches, and across ranks under data parallelism): with it a micro-batch returns ``sum / normalizer``,
  so summing the micro-batch losses gives the full batch's mean, however the real positions are spread over
  micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "REDUCTIONS",
    "Divergence",
    "Reduction",
    "align_vocab",
    "chunked_distillation_loss",
    "combined_kd_loss",
    "distillation_loss",
    "forward_kl",
    "forward_kl_from_topk",
    "generalized_jsd",
    "hard_label_loss",
    "pad_vocab",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "topk_teacher_logprobs",
    "total_variation",
]

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
DIVERGENCES: Final[tuple[Divergence, ...]] = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_kl",
    "skew_reverse_kl",
    "tvd",
)

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: Final[tuple[Reduction, ...]] = ("mean", "sum", "none")

_NEG_INF: Final = float("-inf")


# --- validation and dtype helpers ---------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_unit_interval(name: str, value: float) -> None:
    # Written so that nan fails too.
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_divergence(divergence: str) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")


def _check_reduction(reduction: str, normalizer: float | Tensor | None) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    if normalizer is not None and reduction != "mean":
        raise ValueError(f"normalizer only applies to reduction='mean', got reduction={reduction!r}")


def _check_normalizer(normalizer: float | Tensor | None) -> None:
    if normalizer is None:
        return
    if isinstance(normalizer, Tensor):
        # The value is not checked: that would force a device sync on every micro-batch.
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a 0-dim tensor, got shape {tuple(normalizer.shape)}")
        return
    if isinstance(normalizer, bool) or not (math.isfinite(normalizer) and normalizer > 0):
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")


def _check_logits(name: str, logits: Tensor) -> None:
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")


def _check_same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher {what} must have the same shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )


def _as_mask(mask: Tensor | None, shape: torch.Size) -> Tensor | None:
    """Check a mask against the leading shape; integer 0/1 masks (an HF attention_mask) become bool."""
    if mask is None:
        return None
    if mask.shape != shape:
        raise ValueError(f"mask must have the leading shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"mask must be a bool (or integer 0/1) tensor, got dtype {mask.dtype}")
    return mask != 0


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 at least (bf16/fp16 softmaxes lose too much), float64 when any input is float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _upcast(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    dtype = _compute_dtype(student, teacher)
    return student.to(dtype), teacher.to(dtype)


# --- numerically safe building blocks -----------------------------------------------------------------------


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ p (log p - log q) over the last dim, with 0 · log 0 = 0.

    The difference is replaced *before* the product where p == 0, not after: ``-inf - -inf`` is nan, and a nan
    that is multiplied by 0 in the forward pass still poisons the backward pass.
    """
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, 0.0)
    return (p * diff).sum(dim=-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1 - w)·b) from log a and log b, elementwise.

    Computed as ``larger + log1p(w_smaller · expm1(smaller - larger))`` rather than a stacked logsumexp: the
    gap is <= 0, so nothing overflows, and for a == b the result is exactly log a (expm1(0) == 0), which makes
    every mixture divergence exactly 0 on identical inputs. Ties pick ``a`` as the larger one, which keeps the
    gradient at a tie equal to (w, 1 - w). Entries where both are -inf are swapped for 0 before the arithmetic
    (and the result put back to -inf) so that no nan reaches the backward pass.
    """
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    both_empty = (log_a == _NEG_INF) & (log_b == _NEG_INF)
    log_a = torch.where(both_empty, 0.0, log_a)
    log_b = torch.where(both_empty, 0.0, log_b)
    a_larger = log_a >= log_b
    larger = torch.where(a_larger, log_a, log_b)
    gap = torch.expm1(torch.where(a_larger, log_b - log_a, log_a - log_b))
    correction = torch.where(a_larger, torch.log1p((1.0 - weight_a) * gap), torch.log1p(weight_a * gap))
    return torch.where(both_empty, _NEG_INF, larger + correction)


def _logsumexp_or_neg_inf(x: Tensor) -> Tensor:
    """logsumexp over the last dim that is -inf (not nan, also in backward) for rows that are all -inf."""
    empty = (x == _NEG_INF).all(dim=-1)
    safe = torch.where(empty.unsqueeze(-1), 0.0, x)
    return torch.where(empty, _NEG_INF, torch.logsumexp(safe, dim=-1))


# --- per-position divergences -------------------------------------------------------------------------------


def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(teacher ‖ student) = Σ_v p_t (log p_t - log p_s): the classic (Hinton) distillation divergence.

    Args:
        student_logp: ``[..., V]`` student log-probabilities.
        teacher_logp: ``[..., V]`` teacher log-probabilities; ``-inf`` entries (p_t = 0) contribute 0.

    Returns:
        ``[...]`` per-position values, float32 (float64 for float64 inputs).
    """
    _check_same_shape(student_logp, teacher_logp, "log-probs")
    student_logp, teacher_logp = _upcast(student_logp, teacher_logp)
    return _kl(teacher_logp, student_logp)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(student ‖ teacher) = Σ_v p_s (log p_s - log p_t): mode seeking.

    ``[..., V]`` → ``[...]``. Infinite where the student puts mass on an entry that has teacher probability 0.
    """
    _check_same_shape(student_logp, teacher_logp, "log-probs")
    student_logp, teacher_logp = _upcast(student_logp, teacher_logp)
    return _kl(student_logp, teacher_logp)


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized Jensen-Shannon divergence, with TRL's ``generalized_jsd_loss`` conventions exactly.

    With the mixture m = β·p_t + (1 - β)·p_s (TRL: ``logsumexp([log p_s + log(1 - β), log p_t + log β])``)::

        jsd = β · KL(p_t ‖ m) + (1 - β) · KL(p_s ‖ m)

    and, as in TRL, the end points are special-cased: ``beta == 0`` returns KL(p_t ‖ p_s) (forward KL) and
    ``beta == 1`` returns KL(p_s ‖ p_t) (reverse KL). Note that those are *not* the limits of the formula,
    which goes to 0 at both ends; the formula divided by β tends to forward KL as β → 0, and divided by
    (1 - β) to reverse KL as β → 1. β = 0.5 is the symmetric (classic) JSD, bounded by log 2.

    ``[..., V]`` → ``[...]``.
    """
    _check_unit_interval("beta", beta)
    _check_same_shape(student_logp, teacher_logp, "log-probs")
    student_logp, teacher_logp = _upcast(student_logp, teacher_logp)
    if beta == 0.0:
        return _kl(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl(student_logp, teacher_logp)
    log_m = _log_mixture(teacher_logp, student_logp, beta)
    return beta * _kl(teacher_logp, log_m) + (1.0 - beta) * _kl(student_logp, log_m)


def skew_forward_kl(student_logp: Tensor, teacher_logp: Tensor, lam: float = 0.1) -> Tensor:
    """Skew KL (DistiLLM): KL(p_t ‖ λ·p_t + (1 - λ)·p_s).

    λ = 0 is plain forward KL, λ = 1 is 0. Mixing some teacher into the student keeps the log-ratio bounded by
    -log λ, so the gradient cannot blow up where the student assigns almost no mass. ``[..., V]`` → ``[...]``.
    """
    _check_unit_interval("lam", lam)
    _check_same_shape(student_logp, teacher_logp, "log-probs")
    student_logp, teacher_logp = _upcast(student_logp, teacher_logp)
    return _kl(teacher_logp, _log_mixture(teacher_logp, student_logp, lam))


def skew_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, lam: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(p_s ‖ λ·p_s + (1 - λ)·p_t).

    λ = 0 is plain reverse KL, λ = 1 is 0. ``[..., V]`` → ``[...]``.
    """
    _check_unit_interval("lam", lam)
    _check_same_shape(student_logp, teacher_logp, "log-probs")
    student_logp, teacher_logp = _upcast(student_logp, teacher_logp)
    return _kl(student_logp, _log_mixture(student_logp, teacher_logp, lam))


def total_variation(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Total variation distance 0.5 · Σ_v |p_t - p_s|, in [0, 1]. ``[..., V]`` → ``[...]``."""
    _check_same_shape(student_logp, teacher_logp, "log-probs")
    student_logp, teacher_logp = _upcast(student_logp, teacher_logp)
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(dim=-1)


def _divergence(
    student_logp: Tensor, teacher_logp: Tensor, divergence: Divergence, beta: float, skew_lambda: float
) -> Tensor:
    if divergence == "forward_kl":
        return forward_kl(student_logp, teacher_logp)
    if divergence == "reverse_kl":
        return reverse_kl(student_logp, teacher_logp)
    if divergence == "jsd":
        return generalized_jsd(student_logp, teacher_logp, beta)
    if divergence == "skew_kl":
        return skew_forward_kl(student_logp, teacher_logp, skew_lambda)
    if divergence == "skew_reverse_kl":
        return skew_reverse_kl(student_logp, teacher_logp, skew_lambda)
    return total_variation(student_logp, teacher_logp)


# --- vocab alignment ----------------------------------------------------------------------------------------


def pad_vocab(logits: Tensor, size: int) -> Tensor:
    """Pad the last dim of ``[..., V]`` logits to ``[..., size]`` with -inf (new ids get probability 0)."""
    _check_logits("logits", logits)
    vocab = logits.shape[-1]
    if size < vocab:
        raise ValueError(f"cannot pad a vocab of {vocab} down to {size}")
    if size == vocab:
        return logits
    return F.pad(logits, (0, size - vocab), value=_NEG_INF)


def align_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Pad the smaller of the two vocabularies (last dim) to the larger one with -inf.

    Only meaningful when the two models share token ids on the common prefix (e.g. a teacher whose embedding
    matrix is padded to a multiple of 64). A padded *student* has probability 0 on entries where the teacher
    may have mass, so forward and reverse KL can then be infinite; the mixture divergences and TVD stay
    finite.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    size = max(student_logits.shape[-1], teacher_logits.shape[-1])
    return pad_vocab(student_logits, size), pad_vocab(teacher_logits, size)


# --- distillation loss --------------------------------------------------------------------------------------


def _check_hyperparameters(divergence: str, temperature: float, beta: float, skew_lambda: float) -> None:
    _check_divergence(divergence)
    _check_temperature(temperature)
    _check_unit_interval("beta", beta)
    _check_unit_interval("skew_lambda", skew_lambda)


def _pointwise_distillation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: Divergence,
    temperature: float,
    scale_by_t2: bool,
    beta: float,
    skew_lambda: float,
    mask: Tensor | None,
    allow_vocab_padding: bool,
) -> tuple[Tensor, Tensor | None]:
    """Per-position (T²-scaled) divergence ``[...]`` and the bool mask; hyperparameters are checked before."""
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            "student and teacher logits must have the same leading shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        if not allow_vocab_padding:
            raise ValueError(
                f"student vocab ({student_logits.shape[-1]}) and teacher vocab ({teacher_logits.shape[-1]}) "
                "differ; pad them with align_vocab() (or pass allow_vocab_padding=True) if they share token "
                "ids"
            )
        student_logits, teacher_logits = align_vocab(student_logits, teacher_logits)
    mask = _as_mask(mask, student_logits.shape[:-1])

    student, teacher = _upcast(student_logits, teacher_logits)
    if mask is not None:
        # Identical (all-zero) logits at padding make the divergence exactly 0 there, and the where() gives
        # the original logits an exact zero gradient even if the padding holds inf or nan.
        keep = mask.unsqueeze(-1)
        student = torch.where(keep, student, 0.0)
        teacher = torch.where(keep, teacher, 0.0)
    if temperature != 1.0:
        student = student / temperature
        teacher = teacher / temperature
    values = _divergence(
        F.log_softmax(student, dim=-1),
        F.log_softmax(teacher, dim=-1),
        divergence,
        beta,
        skew_lambda,
    )
    if scale_by_t2 and temperature != 1.0:
        # Hinton et al.: soft-target gradients scale as 1/T², so T² keeps their size comparable across T.
        values = values * (temperature * temperature)
    if mask is not None:
        values = torch.where(mask, values, 0.0)
    return values, mask


def _reduce(
    values: Tensor,
    mask: Tensor | None,
    reduction: Reduction,
    normalizer: float | Tensor | None,
) -> Tensor:
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if isinstance(normalizer, Tensor):
        return total / normalizer.to(total.dtype)
    if normalizer is not None:
        return total / normalizer
    if mask is None:
        return total / max(values.numel(), 1)
    # An all-padding micro-batch gives 0, not 0/0.
    return total / mask.sum().clamp(min=1)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: Divergence = "forward_kl",
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    beta: float = 0.5,
    skew_lambda: float = 0.1,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
    normalizer: float | Tensor | None = None,
    allow_vocab_padding: bool = False,
) -> Tensor:
    """Soft-target distillation loss between student and teacher logits.

    Both logits are divided by ``temperature``, turned into log-probabilities in float32 and compared with
    ``divergence``; the per-position values are multiplied by T² when ``scale_by_t2`` (Hinton's convention,
    applied to every divergence for uniformity). With the defaults on ``[B, V]`` logits this is exactly the
    classic ``F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T**2``.

    Args:
        student_logits: ``[..., V]``, any float dtype.
        teacher_logits: ``[..., V]``, same leading shape. Not detached here: compute it under
            ``torch.no_grad``.
        divergence: one of :data:`DIVERGENCES` (see the per-position functions above).
        beta: mixture weight of ``jsd`` (0 = forward KL, 1 = reverse KL, TRL's convention).
        skew_lambda: λ of ``skew_kl`` / ``skew_reverse_kl``.
        mask: ``[...]`` bool (or integer 0/1), True = real position. Masked positions give exactly 0 and get
            zero gradient.
        reduction: ``"mean"`` = sum over real positions / their number (``batchmean`` for unmasked ``[B, V]``;
            0 when there are none); ``"sum"``; ``"none"`` = the ``[...]`` per-position values, 0 where masked.
        normalizer: with ``reduction="mean"``, divide the sum by this instead (a number or 0-dim tensor: the
            real positions of the whole accumulation step), so micro-batch losses add up to the full-batch
            mean.
        allow_vocab_padding: when the vocab sizes differ, pad the smaller with -inf (:func:`align_vocab`)
            instead of raising.

    Returns:
        a 0-dim tensor (``[...]`` for ``reduction="none"``), float32 or float64.

    Raises:
        ValueError: unknown divergence/reduction, temperature <= 0, beta or skew_lambda outside [0, 1], shape
            or vocab mismatch, a bad mask or normalizer.
    """
    _check_hyperparameters(divergence, temperature, beta, skew_lambda)
    _check_reduction(reduction, normalizer)
    _check_normalizer(normalizer)
    values, bool_mask = _pointwise_distillation(
        student_logits,
        teacher_logits,
        divergence=divergence,
        temperature=temperature,
        scale_by_t2=scale_by_t2,
        beta=beta,
        skew_lambda=skew_lambda,
        mask=mask,
        allow_vocab_padding=allow_vocab_padding,
    )
    return _reduce(values, bool_mask, reduction, normalizer)


def hard_label_loss(
    student_logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Cross-entropy against hard labels, in float32, averaged over real positions.

    Args:
        student_logits: ``[..., V]``.
        labels: ``[...]`` integer class ids; ``ignore_index`` marks positions without a label.
        mask: ``[...]`` bool, True = real position; a position counts only if it is real *and* labelled.
        normalizer: as in :func:`distillation_loss` (the labelled positions of the whole accumulation step).

    Returns:
        0-dim tensor: sum of per-position cross-entropies / number of real labelled positions (0 if none).
    """
    _check_logits("student_logits", student_logits)
    _check_normalizer(normalizer)
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels must have the leading shape of the logits {tuple(student_logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    real = labels != ignore_index
    bool_mask = _as_mask(mask, labels.shape)
    if bool_mask is not None:
        real = real & bool_mask
    logits = torch.where(real.unsqueeze(-1), student_logits.to(_compute_dtype(student_logits)), 0.0)
    safe_labels = torch.where(real, labels, 0).long()
    vocab = logits.shape[-1]
    per_position = F.cross_entropy(logits.reshape(-1, vocab), safe_labels.reshape(-1), reduction="none")
    per_position = torch.where(real.reshape(-1), per_position, 0.0)
    return _reduce(per_position.reshape(labels.shape), real, "mean", normalizer)


def combined_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    alpha: float = 0.0,
    divergence: Divergence = "forward_kl",
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    beta: float = 0.5,
    skew_lambda: float = 0.1,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    ignore_index: int = -100,
    allow_vocab_padding: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """``(1 - alpha) · kd + alpha · ce``, plus the terms as Python floats for logging.

    ``kd`` is :func:`distillation_loss` (reduction "mean"), ``ce`` is :func:`hard_label_loss` at temperature
    1; ``mask`` and ``normalizer`` go to both. Without labels the loss is just ``kd`` and the dict has no
    ``"ce"`` (``alpha`` must then be 0: a silently dropped hard-label weight would be a misconfiguration). At
    ``alpha`` 0 or 1 the unused term is left out of the graph, so an infinite KL cannot turn into
    0 · inf = nan.

    Returns:
        ``(loss, {"kd": ..., "ce": ..., "loss": ...})``; the floats cost one device sync each.
    """
    _check_unit_interval("alpha", alpha)
    if labels is None and alpha > 0.0:
        raise ValueError(f"alpha={alpha} weighs a hard-label loss, but no labels were given")
    kd = distillation_loss(
        student_logits,
        teacher_logits,
        divergence=divergence,
        temperature=temperature,
        scale_by_t2=scale_by_t2,
        beta=beta,
        skew_lambda=skew_lambda,
        mask=mask,
        normalizer=normalizer,
        allow_vocab_padding=allow_vocab_padding,
    )
    if labels is None:
        return kd, {"kd": kd.item(), "loss": kd.item()}
    ce = hard_label_loss(student_logits, labels, ignore_index=ignore_index, mask=mask, normalizer=normalizer)
    if alpha == 0.0:
        loss = kd
    elif alpha == 1.0:
        loss = ce
    else:
        loss = (1.0 - alpha) * kd + alpha * ce
    return loss, {"kd": kd.item(), "ce": ce.item(), "loss": loss.item()}


# --- top-k teacher (offline logit caches) -------------------------------------------------------------------


def topk_teacher_logprobs(
    teacher_logits: Tensor,
    k: int,
    *,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's top-k log-probabilities and the log of the mass left outside them, for a logit cache.

    Args:
        teacher_logits: ``[..., V]``.
        k: 1 <= k <= V.
        temperature: the softmax temperature; the cache is only exact for this temperature, so pass the same
            one to :func:`forward_kl_from_topk`.

    Returns:
        ``values`` ``[..., k]`` (log-probabilities, descending, float32), ``indices`` ``[..., k]`` (int64) and
        ``tail_logmass`` ``[...]`` = log(1 - Σ exp(values)), computed as a logsumexp over the other V - k
        entries so that it stays accurate when the tail is tiny (-inf when k == V). So
        ``exp(values).sum(-1) + exp(tail_logmass)`` is 1.
    """
    _check_logits("teacher_logits", teacher_logits)
    _check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V={vocab}], got {k}")
    logp = F.log_softmax(teacher_logits.to(_compute_dtype(teacher_logits)) / temperature, dim=-1)
    values, indices = logp.topk(k, dim=-1)
    tail_logmass = _logsumexp_or_neg_inf(logp.scatter(-1, indices, _NEG_INF))
    return values, indices, tail_logmass


def forward_kl_from_topk(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    tail_logmass: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    scale_by_t2: bool = True,
    reduction: Reduction = "mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Forward KL against a top-k teacher cache, with everything outside the top k lumped into one bucket.

    Both distributions are coarse-grained onto k + 1 buckets: the teacher's k cached ids, and "the rest". The
    teacher's buckets are ``exp(topk_values)`` and ``exp(tail_logmass)``; the student's are its probabilities
    on the same ids and 1 - their sum (computed as a logsumexp over the other ids). The loss is KL between
    these two (k + 1)-point distributions: exact when k == V, and otherwise a lower bound on the full forward
    KL (data processing inequality) that misses only how the student spreads its tail, which is small when the
    teacher is peaked. The tail bucket is what keeps the student from piling mass outside the teacher's top k.

    Args:
        student_logits: ``[..., V]``.
        topk_values, topk_indices: ``[..., k]`` from :func:`topk_teacher_logprobs` (the ids must be distinct
            and < V; they are not checked, to avoid a device sync).
        tail_logmass: ``[...]``.
        temperature: applied to the student; must be the temperature the cache was made at.
        mask, scale_by_t2, reduction, normalizer: as in :func:`distillation_loss`.
    """
    _check_logits("student_logits", student_logits)
    _check_temperature(temperature)
    _check_reduction(reduction, normalizer)
    _check_normalizer(normalizer)
    leading = student_logits.shape[:-1]
    if topk_values.shape != topk_indices.shape or topk_values.shape[:-1] != leading:
        raise ValueError(
            "topk_values and topk_indices must both have shape [..., k] with leading shape "
            f"{tuple(leading)}, got {tuple(topk_values.shape)} and {tuple(topk_indices.shape)}"
        )
    if tail_logmass.shape != leading:
        raise ValueError(f"tail_logmass must have shape {tuple(leading)}, got {tuple(tail_logmass.shape)}")
    k = topk_values.shape[-1]
    if not 1 <= k <= student_logits.shape[-1]:
        raise ValueError(f"k must be in [1, V={student_logits.shape[-1]}], got {k}")
    bool_mask = _as_mask(mask, leading)

    dtype = _compute_dtype(student_logits, topk_values, tail_logmass)
    student = student_logits.to(dtype)
    teacher_buckets = torch.cat([topk_values.to(dtype), tail_logmass.to(dtype).unsqueeze(-1)], dim=-1)
    indices = topk_indices.long()
    if bool_mask is not None:
        # Cache padding may hold garbage ids (e.g. -1); any k distinct valid ids will do there.
        keep = bool_mask.unsqueeze(-1)
        student = torch.where(keep, student, 0.0)
        indices = torch.where(keep, indices, torch.arange(k, device=indices.device))
    student_logp = F.log_softmax(student / temperature, dim=-1)
    student_buckets = torch.cat(
        [
            student_logp.gather(-1, indices),
            _logsumexp_or_neg_inf(student_logp.scatter(-1, indices, _NEG_INF)).unsqueeze(-1),
        ],
        dim=-1,
    )
    if bool_mask is not None:
        teacher_buckets = torch.where(bool_mask.unsqueeze(-1), teacher_buckets, student_buckets.detach())
    values = _kl(teacher_buckets, student_buckets)
    if scale_by_t2 and temperature != 1.0:
        values = values * (temperature * temperature)
    if bool_mask is not None:
        values = torch.where(bool_mask, values, 0.0)
    return _reduce(values, bool_mask, reduction, normalizer)


# --- chunked loss from hidden states ------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChunkConfig:
    divergence: Divergence
    temperature: float
    scale_by_t2: bool
    beta: float
    skew_lambda: float
    allow_vocab_padding: bool
    chunk_size: int
    needs_grad: tuple[bool, bool, bool]  # student hidden, weight, bias
    compile_pointwise: bool = False


_COMPILED_POINTWISE: dict[str, Any] = {}


def _pointwise_kernel(compile_pointwise: bool) -> Any:
    """The per-chunk divergence, optionally under torch.compile: on GPUs the dozen [chunk, V] elementwise passes
    (softmaxes, logs, products) and their backward fuse into a few kernels, which is where the loss spends its
    memory bandwidth. Compiled once per process (and once more for the last, shorter chunk)."""
    if not compile_pointwise:
        return _pointwise_distillation
    if "kernel" not in _COMPILED_POINTWISE:
        _COMPILED_POINTWISE["kernel"] = torch.compile(_pointwise_distillation, dynamic=False)
    return _COMPILED_POINTWISE["kernel"]


class _ChunkedDistillation(torch.autograd.Function):
    """Loss and its gradients in one pass over token chunks (as Liger's fused linear losses do).

    The forward pass differentiates each chunk right away and keeps only the gradients w.r.t. the student's
    hidden states, weight and bias (sizes of the inputs, not of the logits), so no ``[N, V]`` tensor is ever
    alive, and nothing has to be recomputed: backward just scales the stored gradients by
    ``grad_output / denominator``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
        mask: Tensor | None,
        denominator: Tensor,
        config: _ChunkConfig,
    ) -> Tensor:
        need_hidden, need_weight, need_bias = config.needs_grad
        any_grad = need_hidden or need_weight or need_bias
        # Leaves that share storage with the inputs: each chunk's graph ends at them.
        weight_leaf = student_weight.detach().requires_grad_(need_weight)
        bias_leaf = None if student_bias is None else student_bias.detach().requires_grad_(need_bias)
        accumulate_dtype = _compute_dtype(student_weight)
        grad_hidden = torch.zeros_like(student_hidden) if need_hidden else None
        grad_weight = torch.zeros_like(student_weight, dtype=accumulate_dtype) if need_weight else None
        grad_bias = None
        if need_bias and student_bias is not None:
            grad_bias = torch.zeros_like(student_bias, dtype=accumulate_dtype)
        total = student_hidden.new_zeros((), dtype=_compute_dtype(student_hidden, teacher_hidden))

        pointwise = _pointwise_kernel(config.compile_pointwise)
        for start in range(0, student_hidden.shape[0], config.chunk_size):
            rows = slice(start, start + config.chunk_size)
            teacher_logits = F.linear(teacher_hidden[rows], teacher_weight, teacher_bias)
            hidden_leaf = student_hidden[rows].detach().requires_grad_(need_hidden)
            with torch.set_grad_enabled(any_grad):
                values, _ = pointwise(
                    F.linear(hidden_leaf, weight_leaf, bias_leaf),
                    teacher_logits,
                    divergence=config.divergence,
                    temperature=config.temperature,
                    scale_by_t2=config.scale_by_t2,
                    beta=config.beta,
                    skew_lambda=config.skew_lambda,
                    mask=None if mask is None else mask[rows],
                    allow_vocab_padding=config.allow_vocab_padding,
                )
                chunk_total = values.sum()
            if any_grad:
                targets = [
                    leaf
                    for leaf, needed in (
                        (hidden_leaf, need_hidden),
                        (weight_leaf, need_weight),
                        (bias_leaf, need_bias),
                    )
                    if leaf is not None and needed
                ]
                grads = iter(torch.autograd.grad(chunk_total, targets))
                if grad_hidden is not None:
                    grad_hidden[rows] = next(grads)
                if grad_weight is not None:
                    grad_weight += next(grads)
                if grad_bias is not None:
                    grad_bias += next(grads)
            total = total + chunk_total.detach()

        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, denominator)
        ctx.student_dtypes = (
            student_hidden.dtype,
            student_weight.dtype,
            None if student_bias is None else student_bias.dtype,
        )
        return total / denominator

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias, denominator = ctx.saved_tensors
        scale = grad_output / denominator
        grads: list[Tensor | None] = []
        for grad, dtype in zip((grad_hidden, grad_weight, grad_bias), ctx.student_dtypes, strict=True):
            grads.append(None if grad is None else (grad * scale).to(dtype))
        return (*grads, None, None, None, None, None, None)


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_lm_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_lm_head_weight: Tensor,
    *,
    chunk_size: int = 1024,
    divergence: Divergence = "forward_kl",
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    beta: float = 0.5,
    skew_lambda: float = 0.1,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    allow_vocab_padding: bool = False,
    compile_pointwise: bool = False,
) -> Tensor:
    """:func:`distillation_loss` (reduction "mean") from final hidden states, never holding all logits.

    Equal to ``distillation_loss(F.linear(student_hidden, W_s, b_s), F.linear(teacher_hidden, W_t, b_t),
    ...)``, in value and in gradients w.r.t. the student's hidden states, weight and bias, but the logits only
    ever exist for ``chunk_size`` tokens at a time: peak extra memory is O(chunk_size · V) instead of
    O(N · V), which for LLM vocabularies is what decides the batch size. The teacher side runs without
    autograd and gets no gradients.

    Args:
        student_hidden: ``[N, H_s]`` (or ``[..., H_s]``, flattened) final hidden states of the student.
        student_lm_head_weight: ``[V, H_s]``; student_bias: optional ``[V]``.
        teacher_hidden: ``[N, H_t]`` (same leading shape); teacher_lm_head_weight: ``[V_t, H_t]``;
            teacher_bias: optional ``[V_t]``.
        chunk_size: tokens per chunk (>= 1; need not divide N).
        mask: ``[N]`` (or the leading shape) bool, True = real token.
        divergence, temperature, scale_by_t2, beta, skew_lambda, normalizer, allow_vocab_padding: as in
            :func:`distillation_loss`.
        compile_pointwise: run the per-chunk divergence under torch.compile (GPU training; same values).

    Returns:
        0-dim tensor. The gradients are computed during this call (one pass, no recomputation) when grad
        mode is on and a student tensor requires grad; backward only rescales them (no double backward).
    """
    _check_hyperparameters(divergence, temperature, beta, skew_lambda)
    _check_normalizer(normalizer)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for name, hidden, weight in (
        ("student", student_hidden, student_lm_head_weight),
        ("teacher", teacher_hidden, teacher_lm_head_weight),
    ):
        if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"{name} hidden states [..., H] and lm_head weight [V, H] do not match: "
                f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
            )
    for name, bias, weight in (
        ("student_bias", student_bias, student_lm_head_weight),
        ("teacher_bias", teacher_bias, teacher_lm_head_weight),
    ):
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"{name} must have shape {tuple(weight.shape[:1])}, got {tuple(bias.shape)}")
    leading = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != leading:
        raise ValueError(
            "student and teacher hidden states must have the same leading shape, got "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    if student_lm_head_weight.shape[0] != teacher_lm_head_weight.shape[0] and not allow_vocab_padding:
        raise ValueError(
            f"student vocab ({student_lm_head_weight.shape[0]}) and teacher vocab "
            f"({teacher_lm_head_weight.shape[0]}) differ; pass allow_vocab_padding=True if they share token "
            "ids"
        )
    bool_mask = _as_mask(mask, leading)

    student_flat = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    flat_mask = None if bool_mask is None else bool_mask.reshape(-1)
    dtype = _compute_dtype(student_hidden, teacher_hidden)
    if normalizer is not None:
        denominator = torch.as_tensor(normalizer, dtype=dtype, device=student_hidden.device).detach()
    elif flat_mask is not None:
        denominator = flat_mask.sum().clamp(min=1).to(dtype)
    else:
        denominator = torch.tensor(max(student_flat.shape[0], 1), dtype=dtype, device=student_hidden.device)

    grad_on = torch.is_grad_enabled()
    config = _ChunkConfig(
        divergence=divergence,
        temperature=temperature,
        scale_by_t2=scale_by_t2,
        beta=beta,
        skew_lambda=skew_lambda,
        allow_vocab_padding=allow_vocab_padding,
        chunk_size=chunk_size,
        compile_pointwise=compile_pointwise,
        needs_grad=(
            grad_on and student_hidden.requires_grad,
            grad_on and student_lm_head_weight.requires_grad,
            grad_on and student_bias is not None and student_bias.requires_grad,
        ),
    )
    # Function.apply is untyped in torch's stubs.
    apply: Any = _ChunkedDistillation.apply
    loss = apply(
        student_flat,
        student_lm_head_weight,
        student_bias,
        teacher_flat.detach(),
        teacher_lm_head_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        flat_mask,
        denominator,
        config,
    )
    return cast(Tensor, loss)
