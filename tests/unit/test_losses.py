"""Tests for app.distill.losses.

Expected values come from outside the module under test: hard-coded constants (computed once with plain Python
``math``), a straightforward numpy float64 reference written with explicit probabilities, TRL's
``generalized_jsd_loss`` formula re-typed from its description, and the classic ``F.kl_div`` tutorial formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import get_args

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from app.distill.losses import (
    DIVERGENCES,
    Divergence,
    align_vocab,
    chunked_distillation_loss,
    combined_kd_loss,
    distillation_loss,
    forward_kl,
    forward_kl_from_topk,
    generalized_jsd,
    hard_label_loss,
    pad_vocab,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    topk_teacher_logprobs,
    total_variation,
)

PROPERTY = settings(max_examples=25, deadline=None)
BETA = 0.5
LAM = 0.1


# --- independent references ---------------------------------------------------------------------------------


def ref_softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def ref_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Σ p log(p / q) with 0 log 0 = 0 and +inf where q = 0 < p."""
    with np.errstate(divide="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0)
    return np.asarray(terms.sum(axis=-1))


def ref_divergence(
    name: str,
    ps: np.ndarray,
    pt: np.ndarray,
    beta: float = BETA,
    lam: float = LAM,
) -> np.ndarray:
    if name == "forward_kl":
        return ref_kl(pt, ps)
    if name == "reverse_kl":
        return ref_kl(ps, pt)
    if name == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * ref_kl(pt, m) + (1 - beta) * ref_kl(ps, m)
    if name == "skew_kl":
        return ref_kl(pt, lam * pt + (1 - lam) * ps)
    if name == "skew_reverse_kl":
        return ref_kl(ps, lam * ps + (1 - lam) * pt)
    assert name == "tvd"
    return np.asarray(0.5 * np.abs(pt - ps).sum(axis=-1))


def trl_generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """TRL's GKDTrainer.generalized_jsd_loss (reduction="batchmean"), typed in from its published formula."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]),
            dim=0,
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    if labels is not None:
        mask = labels != -100
        return jsd[mask].sum() / mask.sum()
    return jsd.sum() / (jsd.size(0) * jsd.size(1))


PER_POSITION: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": lambda s, t: generalized_jsd(s, t, BETA),
    "skew_kl": lambda s, t: skew_forward_kl(s, t, LAM),
    "skew_reverse_kl": lambda s, t: skew_reverse_kl(s, t, LAM),
    "tvd": total_variation,
}
# Divergences that stay finite when the teacher gives probability 0 to entries where the student has mass.
FINITE_WITH_TEACHER_ZEROS = ["forward_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def logp(x: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(x, dim=-1)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype) * scale


@st.composite
def logit_pairs(
    draw: st.DrawFn,
    max_rows: int = 4,
    max_vocab: int = 8,
    bound: float = 8.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(2, max_vocab))
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False)
    student = draw(arrays(np.float64, (rows, vocab), elements=elements))
    teacher = draw(arrays(np.float64, (rows, vocab), elements=elements))
    return torch.from_numpy(student), torch.from_numpy(teacher)


# --- names --------------------------------------------------------------------------------------------------


def test_divergence_names_match_the_literal() -> None:
    assert get_args(Divergence) == DIVERGENCES
    assert set(PER_POSITION) == set(DIVERGENCES)


# --- golden values ------------------------------------------------------------------------------------------

GOLDEN_STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
GOLDEN_TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, 1.5]]


@pytest.mark.parametrize(
    ("divergence", "temperature", "expected"),
    [
        # Plain Python math on the 2x3 logits above: mean over rows, times T², beta 0.5, lambda 0.1.
        ("forward_kl", 1.0, 0.5032034978546018),
        ("forward_kl", 2.0, 0.6035594169585546),
        ("reverse_kl", 1.0, 0.3757796409456031),
        ("reverse_kl", 2.0, 0.548410308667942),
        ("jsd", 1.0, 0.10019692080365535),
        ("jsd", 2.0, 0.14117809674786597),
        ("skew_kl", 1.0, 0.35404246493156866),
        ("skew_kl", 2.0, 0.47267526731144616),
        ("skew_reverse_kl", 1.0, 0.3083271364975408),
        ("skew_reverse_kl", 2.0, 0.447584577931721),
        ("tvd", 1.0, 0.39706986263167465),
        ("tvd", 2.0, 0.9979727795235842),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_golden_values(
    divergence: Divergence,
    temperature: float,
    expected: float,
    dtype: torch.dtype,
) -> None:
    loss = distillation_loss(
        torch.tensor(GOLDEN_STUDENT, dtype=dtype),
        torch.tensor(GOLDEN_TEACHER, dtype=dtype),
        divergence=divergence,
        temperature=temperature,
        beta=0.5,
        skew_lambda=0.1,
    )
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(expected, rel=1e-6 if dtype == torch.float32 else 1e-12)


def test_golden_hard_label_loss() -> None:
    loss = hard_label_loss(torch.tensor(GOLDEN_STUDENT), torch.tensor([0, 2]))
    assert loss.item() == pytest.approx(0.765126343932687, rel=1e-6)


def test_golden_top1_forward_kl() -> None:
    values, indices, tail = topk_teacher_logprobs(torch.tensor(GOLDEN_TEACHER), 1)
    loss = forward_kl_from_topk(torch.tensor(GOLDEN_STUDENT), values, indices, tail)
    assert indices.squeeze(-1).tolist() == [0, 2]
    assert loss.item() == pytest.approx(0.47395973220196147, rel=1e-6)


# --- against the references ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_forward_kl_is_the_classic_tutorial_formula(temperature: float) -> None:
    student, teacher = randn(16, 10, dtype=torch.float32), randn(16, 10, seed=1, dtype=torch.float32)
    classic = (
        F.kl_div(
            F.log_softmax(student / temperature, 1),
            F.softmax(teacher / temperature, 1),
            reduction="batchmean",
        )
        * temperature**2
    )
    loss = distillation_loss(student, teacher, divergence="forward_kl", temperature=temperature)
    torch.testing.assert_close(loss, classic, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("shape", [(5,), (4, 7), (2, 3, 6)])
def test_per_position_divergence_matches_reference(divergence: str, shape: tuple[int, ...]) -> None:
    student, teacher = randn(*shape), randn(*shape, seed=1)
    values = PER_POSITION[divergence](logp(student), logp(teacher))
    expected = ref_divergence(divergence, ref_softmax(student.numpy()), ref_softmax(teacher.numpy()))
    assert values.shape == shape[:-1]
    torch.testing.assert_close(values, torch.from_numpy(np.asarray(expected)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_zero_probabilities_match_reference(divergence: str) -> None:
    student = randn(3, 4, 8).requires_grad_()
    teacher = randn(3, 4, 8, seed=1)
    teacher[..., 5:] = -math.inf  # masked vocab entries: teacher probability exactly 0
    values = PER_POSITION[divergence](logp(student), logp(teacher))
    expected = ref_divergence(divergence, ref_softmax(student.detach().numpy()), ref_softmax(teacher.numpy()))
    torch.testing.assert_close(
        values.detach(),
        torch.from_numpy(np.asarray(expected)),
        rtol=1e-10,
        atol=1e-12,
    )
    if divergence in FINITE_WITH_TEACHER_ZEROS:
        assert torch.isfinite(values).all()
        (grad,) = torch.autograd.grad(values.sum(), student)
        assert torch.isfinite(grad).all()
    else:
        assert torch.isinf(values).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_both_zero_probabilities_give_finite_values_and_gradients(divergence: str) -> None:
    student = randn(3, 8).requires_grad_()
    teacher = randn(3, 8, seed=1)
    padded_student, padded_teacher = pad_vocab(student, 11), pad_vocab(teacher, 11)
    values = PER_POSITION[divergence](logp(padded_student), logp(padded_teacher))
    (grad,) = torch.autograd.grad(values.sum(), student)
    assert torch.isfinite(values).all()
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_matches_trl_generalized_jsd_loss(beta: float, temperature: float) -> None:
    student, teacher = randn(2, 5, 9), randn(2, 5, 9, seed=1)
    expected = trl_generalized_jsd_loss(student, teacher, beta=beta, temperature=temperature)
    loss = distillation_loss(
        student,
        teacher,
        divergence="jsd",
        beta=beta,
        temperature=temperature,
        scale_by_t2=False,
    )
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_matches_trl_with_label_mask(beta: float) -> None:
    student, teacher = randn(2, 5, 9), randn(2, 5, 9, seed=1)
    labels = torch.tensor([[1, 2, -100, 3, -100], [-100, 4, 5, 6, 7]])
    expected = trl_generalized_jsd_loss(student, teacher, labels, beta=beta)
    loss = distillation_loss(student, teacher, divergence="jsd", beta=beta, mask=labels != -100)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


# --- properties ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@PROPERTY
@given(pair=logit_pairs(), temperature=st.sampled_from([0.5, 1.0, 3.0]))
def test_zero_on_identical_inputs(
    divergence: Divergence, pair: tuple[torch.Tensor, torch.Tensor], temperature: float
) -> None:
    logits = pair[0].float()
    values = distillation_loss(
        logits,
        logits,
        divergence=divergence,
        temperature=temperature,
        reduction="none",
    )
    assert torch.equal(values, torch.zeros_like(values))
    # Also with probability-0 entries on both sides.
    padded = pad_vocab(logits, logits.shape[-1] + 2)
    values = PER_POSITION[divergence](logp(padded), logp(padded))
    assert torch.equal(values, torch.zeros_like(values))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@PROPERTY
@given(pair=logit_pairs())
def test_non_negative_and_matches_reference(
    divergence: Divergence,
    pair: tuple[torch.Tensor, torch.Tensor],
) -> None:
    student, teacher = pair
    values = distillation_loss(student, teacher, divergence=divergence, reduction="none")
    expected = torch.from_numpy(
        np.asarray(ref_divergence(divergence, ref_softmax(student.numpy()), ref_softmax(teacher.numpy())))
    )
    assert (values >= -1e-12).all()
    torch.testing.assert_close(values, expected, rtol=1e-8, atol=1e-10)


@PROPERTY
@given(pair=logit_pairs())
def test_jsd_is_symmetric_at_half(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    student, teacher = logp(pair[0]), logp(pair[1])
    torch.testing.assert_close(
        generalized_jsd(student, teacher, 0.5), generalized_jsd(teacher, student, 0.5), rtol=1e-9, atol=1e-12
    )
    assert (generalized_jsd(student, teacher, 0.5) <= math.log(2) + 1e-12).all()


@PROPERTY
@given(pair=logit_pairs(bound=3.0))
def test_jsd_end_points_and_limits(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    student, teacher = logp(pair[0]), logp(pair[1])
    # TRL's special cases at exactly 0 and 1.
    assert torch.equal(generalized_jsd(student, teacher, 0.0), forward_kl(student, teacher))
    assert torch.equal(generalized_jsd(student, teacher, 1.0), reverse_kl(student, teacher))
    # The formula itself vanishes at the ends; divided by the vanishing weight it tends to forward / reverse
    # KL. The next term is O(eps * chi²) relative (chi² < 1e4 for logits in [-3, 3]) and rounding adds
    # O(1e-16 / eps) absolute, hence the bounded logits and this eps.
    eps = 1e-7
    torch.testing.assert_close(
        generalized_jsd(student, teacher, eps) / eps, forward_kl(student, teacher), rtol=1e-3, atol=1e-8
    )
    torch.testing.assert_close(
        generalized_jsd(student, teacher, 1 - eps) / eps, reverse_kl(student, teacher), rtol=1e-3, atol=1e-8
    )


@PROPERTY
@given(pair=logit_pairs())
def test_skew_kl_end_points(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    student, teacher = logp(pair[0]), logp(pair[1])
    assert torch.equal(skew_forward_kl(student, teacher, 0.0), forward_kl(student, teacher))
    assert torch.equal(skew_reverse_kl(student, teacher, 0.0), reverse_kl(student, teacher))
    assert torch.equal(
        skew_forward_kl(student, teacher, 1.0),
        torch.zeros(student.shape[:-1], dtype=torch.float64),
    )
    assert torch.equal(
        skew_reverse_kl(student, teacher, 1.0),
        torch.zeros(student.shape[:-1], dtype=torch.float64),
    )
    # Skewing bounds the log-ratio by -log(lam), so the skew KL is at most that and at most the plain KL.
    assert (skew_forward_kl(student, teacher, LAM) <= forward_kl(student, teacher) + 1e-12).all()
    assert (skew_forward_kl(student, teacher, LAM) <= -math.log(LAM) + 1e-12).all()


@PROPERTY
@given(pair=logit_pairs())
def test_tvd_is_in_unit_interval(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    values = total_variation(logp(pair[0]), logp(pair[1]))
    assert ((values >= 0) & (values <= 1)).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@PROPERTY
@given(pair=logit_pairs(), temperature=st.floats(0.25, 8.0))
def test_t_squared_scaling(
    divergence: Divergence,
    pair: tuple[torch.Tensor, torch.Tensor],
    temperature: float,
) -> None:
    student, teacher = pair
    scaled = distillation_loss(student, teacher, divergence=divergence, temperature=temperature)
    unscaled = distillation_loss(
        student,
        teacher,
        divergence=divergence,
        temperature=temperature,
        scale_by_t2=False,
    )
    torch.testing.assert_close(scaled, unscaled * temperature**2, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("low_precision", [torch.bfloat16, torch.float16])
@PROPERTY
@given(pair=logit_pairs())
def test_low_precision_inputs_are_computed_in_float32(
    divergence: Divergence, low_precision: torch.dtype, pair: tuple[torch.Tensor, torch.Tensor]
) -> None:
    student, teacher = pair[0].to(low_precision), pair[1].to(low_precision)
    loss = distillation_loss(student, teacher, divergence=divergence, temperature=2.0)
    assert loss.dtype == torch.float32
    # Upcasting first means the result is exactly the float32 result on the rounded logits.
    assert torch.equal(
        loss,
        distillation_loss(student.float(), teacher.float(), divergence=divergence, temperature=2.0),
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bf16_close_to_fp32(divergence: Divergence) -> None:
    student, teacher = randn(8, 32, dtype=torch.float32, scale=1.0), randn(8, 32, seed=1, dtype=torch.float32)
    fp32 = distillation_loss(student, teacher, divergence=divergence)
    bf16 = distillation_loss(student.bfloat16(), teacher.bfloat16(), divergence=divergence)
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=2e-3)


# --- masking, reductions, gradient accumulation -------------------------------------------------------------


def token_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    student, teacher = randn(3, 5, 7, seed=seed), randn(3, 5, 7, seed=seed + 1)
    mask = torch.tensor(
        [
            [True, True, True, False, False],
            [True, False, True, True, False],
            [False, False, False, False, False],
        ]
    )
    return student, teacher, mask


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("garbage", [1e4, -1e4, math.inf, math.nan])
def test_masked_positions_do_not_matter_and_get_zero_gradient(divergence: Divergence, garbage: float) -> None:
    student, teacher, mask = token_batch()
    student.requires_grad_()
    loss = distillation_loss(student, teacher, divergence=divergence, temperature=2.0, mask=mask)
    (grad,) = torch.autograd.grad(loss, student)

    dirty_student = torch.where(mask.unsqueeze(-1), student.detach(), garbage).requires_grad_()
    dirty_teacher = torch.where(mask.unsqueeze(-1), teacher, -garbage)
    dirty_loss = distillation_loss(
        dirty_student,
        dirty_teacher,
        divergence=divergence,
        temperature=2.0,
        mask=mask,
    )
    (dirty_grad,) = torch.autograd.grad(dirty_loss, dirty_student)

    torch.testing.assert_close(dirty_loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(dirty_grad, grad, rtol=0, atol=0)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert grad[mask].abs().sum() > 0


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reductions(divergence: Divergence) -> None:
    student, teacher, mask = token_batch()
    values = distillation_loss(student, teacher, divergence=divergence, mask=mask, reduction="none")
    reference = ref_divergence(divergence, ref_softmax(student.numpy()), ref_softmax(teacher.numpy()))
    expected = torch.from_numpy(np.where(mask.numpy(), reference, 0.0))
    torch.testing.assert_close(values, expected, rtol=1e-10, atol=1e-12)
    total = distillation_loss(student, teacher, divergence=divergence, mask=mask, reduction="sum")
    mean = distillation_loss(student, teacher, divergence=divergence, mask=mask)
    torch.testing.assert_close(total, expected.sum())
    torch.testing.assert_close(mean, expected.sum() / mask.sum())


def test_mean_without_mask_is_batchmean_and_all_masked_is_zero() -> None:
    student, teacher, _ = token_batch()
    values = distillation_loss(student, teacher, reduction="none")
    torch.testing.assert_close(distillation_loss(student, teacher), values.sum() / 15)
    nothing = torch.zeros(3, 5, dtype=torch.bool)
    assert distillation_loss(student, teacher, mask=nothing).item() == 0.0
    assert hard_label_loss(student, torch.zeros(3, 5, dtype=torch.long), mask=nothing).item() == 0.0


def test_integer_attention_mask_is_accepted() -> None:
    student, teacher, mask = token_batch()
    torch.testing.assert_close(
        distillation_loss(student, teacher, mask=mask.long()), distillation_loss(student, teacher, mask=mask)
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@PROPERTY
@given(
    splits=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    mask_seed=st.integers(0, 2**16),
    tensor_normalizer=st.booleans(),
)
def test_accumulation_invariance(
    divergence: Divergence, splits: list[int], mask_seed: int, tensor_normalizer: bool
) -> None:
    rows = sum(splits)
    student, teacher = randn(rows, 4, 6).requires_grad_(), randn(rows, 4, 6, seed=1)
    mask = torch.rand(rows, 4, generator=torch.Generator().manual_seed(mask_seed)) < 0.6
    full = distillation_loss(student, teacher, divergence=divergence, mask=mask)
    (full_grad,) = torch.autograd.grad(full, student)

    normalizer: float | torch.Tensor = float(max(int(mask.sum()), 1))
    if tensor_normalizer:
        normalizer = torch.tensor(normalizer)
    accumulated = torch.zeros((), dtype=torch.float64)
    start = 0
    for size in splits:
        rows_of_micro_batch = slice(start, start + size)
        start += size
        accumulated = accumulated + distillation_loss(
            student[rows_of_micro_batch],
            teacher[rows_of_micro_batch],
            divergence=divergence,
            mask=mask[rows_of_micro_batch],
            normalizer=normalizer,
        )
    (accumulated_grad,) = torch.autograd.grad(accumulated, student)
    torch.testing.assert_close(accumulated, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(accumulated_grad, full_grad, rtol=1e-10, atol=1e-12)


# --- vocab alignment ----------------------------------------------------------------------------------------


def test_pad_vocab() -> None:
    logits = randn(2, 3)
    padded = pad_vocab(logits, 5)
    assert padded.shape == (2, 5)
    assert torch.equal(padded[:, :3], logits)
    assert torch.isneginf(padded[:, 3:]).all()
    assert pad_vocab(logits, 3) is logits
    torch.testing.assert_close(F.softmax(padded, -1)[:, :3], F.softmax(logits, -1))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padding_both_sides_leaves_the_loss_unchanged(divergence: Divergence) -> None:
    student, teacher = randn(4, 6), randn(4, 6, seed=1)
    plain = distillation_loss(student, teacher, divergence=divergence, temperature=2.0)
    padded = distillation_loss(
        pad_vocab(student, 9),
        pad_vocab(teacher, 9),
        divergence=divergence,
        temperature=2.0,
    )
    torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_align_vocab_pads_the_smaller_teacher(divergence: Divergence) -> None:
    student, teacher = randn(4, 9), randn(4, 6, seed=1)
    aligned_student, aligned_teacher = align_vocab(student, teacher)
    assert aligned_student is student
    assert aligned_teacher.shape == (4, 9)
    expected = ref_divergence(divergence, ref_softmax(student.numpy()), ref_softmax(aligned_teacher.numpy()))
    loss = distillation_loss(student, teacher, divergence=divergence, allow_vocab_padding=True)
    torch.testing.assert_close(
        loss,
        torch.tensor(expected.mean(), dtype=torch.float64),
        rtol=1e-10,
        atol=1e-12,
    )
    assert torch.isfinite(loss) == (divergence != "reverse_kl")


def test_align_vocab_pads_the_smaller_student() -> None:
    student, teacher = randn(4, 6), randn(4, 9, seed=1)
    aligned_student, aligned_teacher = align_vocab(student, teacher)
    assert aligned_student.shape == (4, 9)
    assert aligned_teacher is teacher
    # The student cannot reach the teacher's extra ids: forward KL is infinite, JSD finite.
    assert torch.isinf(distillation_loss(student, teacher, allow_vocab_padding=True))
    assert torch.isfinite(distillation_loss(student, teacher, divergence="jsd", allow_vocab_padding=True))


# --- hard labels and the combined loss ----------------------------------------------------------------------


def test_hard_label_loss_matches_cross_entropy() -> None:
    student = randn(3, 5, 7, dtype=torch.bfloat16)
    labels = torch.tensor([[1, 2, -100, 3, 0], [6, -100, -100, 4, 5], [0, 1, 2, 3, 4]])
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    expected_labels = torch.where(mask, labels, -100)
    expected = F.cross_entropy(student.float().reshape(-1, 7), expected_labels.reshape(-1), ignore_index=-100)
    loss = hard_label_loss(student, labels, mask=mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    real = int((expected_labels != -100).sum())
    torch.testing.assert_close(
        hard_label_loss(student, labels, mask=mask, normalizer=2.0 * real),
        expected / 2,
    )


def test_hard_label_loss_ignores_garbage_at_ignored_positions() -> None:
    student = randn(2, 4).requires_grad_()
    labels = torch.tensor([3, -100])
    loss = hard_label_loss(torch.where(torch.tensor([[True], [False]]), student, math.nan), labels)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss)
    assert torch.equal(grad[1], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_combined_kd_loss(alpha: float) -> None:
    student, teacher = randn(6, 5), randn(6, 5, seed=1)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss, terms = combined_kd_loss(student, teacher, labels, alpha=alpha, divergence="jsd", temperature=2.0)
    kd = distillation_loss(student, teacher, divergence="jsd", temperature=2.0)
    ce = hard_label_loss(student, labels)
    torch.testing.assert_close(loss, (1 - alpha) * kd + alpha * ce)
    assert set(terms) == {"kd", "ce", "loss"}
    assert all(isinstance(value, float) for value in terms.values())
    assert terms == pytest.approx({"kd": kd.item(), "ce": ce.item(), "loss": loss.item()})


def test_combined_kd_loss_without_labels_is_kd() -> None:
    student, teacher = randn(6, 5), randn(6, 5, seed=1)
    loss, terms = combined_kd_loss(student, teacher)
    torch.testing.assert_close(loss, distillation_loss(student, teacher))
    assert terms == {"kd": loss.item(), "loss": loss.item()}


def test_combined_kd_loss_keeps_an_infinite_kd_out_of_a_pure_ce_loss() -> None:
    student, teacher = randn(2, 4), randn(2, 4, seed=1)
    teacher[:, 0] = -math.inf
    loss, terms = combined_kd_loss(student, teacher, torch.tensor([1, 2]), alpha=1.0, divergence="reverse_kl")
    assert math.isinf(terms["kd"])
    assert torch.isfinite(loss)


# --- top-k teacher ------------------------------------------------------------------------------------------


@PROPERTY
@given(
    pair=logit_pairs(max_vocab=12),
    k_fraction=st.floats(0.0, 1.0),
    temperature=st.sampled_from([1.0, 2.0]),
)
def test_topk_buckets_form_a_distribution(
    pair: tuple[torch.Tensor, torch.Tensor], k_fraction: float, temperature: float
) -> None:
    teacher = pair[1]
    vocab = teacher.shape[-1]
    k = max(1, round(k_fraction * vocab))
    values, indices, tail = topk_teacher_logprobs(teacher, k, temperature=temperature)
    assert values.shape == indices.shape == (*teacher.shape[:-1], k)
    assert tail.shape == teacher.shape[:-1]
    torch.testing.assert_close(values.exp().sum(-1) + tail.exp(), torch.ones_like(tail))
    torch.testing.assert_close(values, logp(teacher / temperature).gather(-1, indices))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_k_equal_v_is_the_exact_forward_kl(temperature: float) -> None:
    student, teacher = randn(3, 4, 9).requires_grad_(), randn(3, 4, 9, seed=1)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(3)) < 0.7
    values, indices, tail = topk_teacher_logprobs(teacher, 9, temperature=temperature)
    assert torch.isneginf(tail).all()
    topk = forward_kl_from_topk(student, values, indices, tail, temperature=temperature, mask=mask)
    exact = distillation_loss(student, teacher, temperature=temperature, mask=mask)
    (topk_grad,) = torch.autograd.grad(topk, student)
    (exact_grad,) = torch.autograd.grad(exact, student)
    torch.testing.assert_close(topk, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(topk_grad, exact_grad, rtol=1e-10, atol=1e-12)


@PROPERTY
@given(pair=logit_pairs(max_vocab=12), k=st.integers(1, 12))
def test_topk_is_a_lower_bound_on_forward_kl(pair: tuple[torch.Tensor, torch.Tensor], k: int) -> None:
    student, teacher = pair
    k = min(k, teacher.shape[-1])
    values, indices, tail = topk_teacher_logprobs(teacher, k)
    topk = forward_kl_from_topk(student, values, indices, tail, reduction="none")
    assert (topk <= distillation_loss(student, teacher, reduction="none") + 1e-10).all()
    assert (topk >= -1e-12).all()


def test_topk_is_close_to_exact_for_a_peaked_teacher() -> None:
    student, teacher = randn(8, 50, scale=1.0), randn(8, 50, seed=1, scale=1.0)
    teacher[torch.arange(8), torch.arange(8) * 3] += 12.0
    values, indices, tail = topk_teacher_logprobs(teacher, 4)
    topk = forward_kl_from_topk(student, values, indices, tail)
    exact = distillation_loss(student, teacher)
    assert exact > 1.0
    assert 0 <= (exact - topk).item() < 1e-3


def test_topk_ignores_garbage_cache_rows_at_masked_positions() -> None:
    student, teacher = randn(2, 3, 6).requires_grad_(), randn(2, 3, 6, seed=1)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    values, indices, tail = topk_teacher_logprobs(teacher, 2)
    clean = forward_kl_from_topk(student, values, indices, tail, mask=mask)
    (clean_grad,) = torch.autograd.grad(clean, student)
    dirty = forward_kl_from_topk(
        student,
        torch.where(mask.unsqueeze(-1), values, math.nan),
        torch.where(mask.unsqueeze(-1), indices, -1),
        torch.where(mask, tail, 0.0),
        mask=mask,
    )
    (dirty_grad,) = torch.autograd.grad(dirty, student)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    torch.testing.assert_close(dirty_grad, clean_grad, rtol=0, atol=0)
    assert torch.equal(dirty_grad[~mask], torch.zeros_like(dirty_grad[~mask]))


# --- chunked loss from hidden states ------------------------------------------------------------------------

N_TOKENS, H_STUDENT, H_TEACHER, VOCAB = 10, 4, 6, 7


def hidden_problem(dtype: torch.dtype = torch.float64, bias: bool = True) -> dict[str, torch.Tensor | None]:
    return {
        "student_hidden": randn(N_TOKENS, H_STUDENT, seed=10, dtype=dtype).requires_grad_(),
        "student_lm_head_weight": randn(VOCAB, H_STUDENT, seed=11, dtype=dtype, scale=0.5).requires_grad_(),
        "student_bias": randn(VOCAB, seed=12, dtype=dtype).requires_grad_() if bias else None,
        "teacher_hidden": randn(N_TOKENS, H_TEACHER, seed=13, dtype=dtype),
        "teacher_lm_head_weight": randn(VOCAB, H_TEACHER, seed=14, dtype=dtype, scale=0.5).requires_grad_(),
        "teacher_bias": randn(VOCAB, seed=15, dtype=dtype) if bias else None,
    }


def full_logit_loss(problem: dict[str, torch.Tensor | None], **kwargs: object) -> torch.Tensor:
    student_hidden, teacher_hidden = problem["student_hidden"], problem["teacher_hidden"]
    student_weight, teacher_weight = problem["student_lm_head_weight"], problem["teacher_lm_head_weight"]
    assert student_hidden is not None and teacher_hidden is not None
    assert student_weight is not None and teacher_weight is not None
    student_logits = F.linear(student_hidden, student_weight, problem["student_bias"])
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden, teacher_weight, problem["teacher_bias"])
    return distillation_loss(student_logits, teacher_logits, **kwargs)  # type: ignore[arg-type]


def student_tensors(problem: dict[str, torch.Tensor | None]) -> list[torch.Tensor]:
    names = ("student_hidden", "student_lm_head_weight", "student_bias")
    return [tensor for name in names if (tensor := problem[name]) is not None]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [1, 3, 5, 10, 64])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_full_logits(divergence: Divergence, chunk_size: int, masked: bool) -> None:
    problem = hidden_problem()
    mask = torch.tensor([True, True, False, True, False, False, True, True, True, False]) if masked else None
    kwargs = {"divergence": divergence, "temperature": 2.0, "mask": mask}
    full = full_logit_loss(problem, **kwargs)
    full_grads = torch.autograd.grad(full, student_tensors(problem))
    chunked = chunked_distillation_loss(**problem, chunk_size=chunk_size, **kwargs)  # type: ignore[arg-type]
    chunked_grads = torch.autograd.grad(chunked, student_tensors(problem))
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-12)
    for chunked_grad, full_grad in zip(chunked_grads, full_grads, strict=True):
        torch.testing.assert_close(chunked_grad, full_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_chunked_float32_and_normalizer(divergence: Divergence) -> None:
    problem = hidden_problem(torch.float32, bias=False)
    kwargs = {"divergence": divergence, "normalizer": 25.0}
    full = full_logit_loss(problem, **kwargs)
    full_grads = torch.autograd.grad(full, student_tensors(problem))
    chunked = chunked_distillation_loss(**problem, chunk_size=4, **kwargs)  # type: ignore[arg-type]
    chunked_grads = torch.autograd.grad(chunked, student_tensors(problem))
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    for chunked_grad, full_grad in zip(chunked_grads, full_grads, strict=True):
        torch.testing.assert_close(chunked_grad, full_grad, rtol=1e-5, atol=1e-6)


def test_chunked_gives_no_gradient_to_the_teacher_and_follows_requires_grad() -> None:
    problem = hidden_problem()
    weight = problem["student_lm_head_weight"]
    assert weight is not None
    weight.requires_grad_(False)  # a frozen lm_head, e.g. under LoRA
    torch.autograd.backward(chunked_distillation_loss(**problem, chunk_size=3))  # type: ignore[arg-type]
    teacher_weight, student_hidden = problem["teacher_lm_head_weight"], problem["student_hidden"]
    assert teacher_weight is not None and student_hidden is not None
    assert teacher_weight.grad is None
    assert weight.grad is None
    assert student_hidden.grad is not None


def test_chunked_without_autograd() -> None:
    problem = hidden_problem()
    with torch.no_grad():
        chunked = chunked_distillation_loss(**problem, chunk_size=4)  # type: ignore[arg-type]
        full = full_logit_loss(problem)
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-12)


def test_chunked_accepts_batch_by_sequence_hidden_states() -> None:
    problem = hidden_problem()
    mask = torch.rand(N_TOKENS, generator=torch.Generator().manual_seed(5)) < 0.5
    flat = chunked_distillation_loss(**problem, mask=mask, chunk_size=3)  # type: ignore[arg-type]
    student_hidden, teacher_hidden = problem["student_hidden"], problem["teacher_hidden"]
    assert student_hidden is not None and teacher_hidden is not None
    shaped = dict(
        problem,
        student_hidden=student_hidden.reshape(2, 5, -1),
        teacher_hidden=teacher_hidden.reshape(2, 5, -1),
    )
    batched = chunked_distillation_loss(**shaped, mask=mask.reshape(2, 5), chunk_size=3)  # type: ignore[arg-type]
    torch.testing.assert_close(batched, flat, rtol=1e-12, atol=1e-12)


def test_chunked_low_precision_gradients_keep_their_dtype() -> None:
    def to_bf16(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        return tensor.detach().to(torch.bfloat16).requires_grad_(tensor.requires_grad)

    problem = {name: to_bf16(tensor) for name, tensor in hidden_problem().items()}
    loss = chunked_distillation_loss(**problem, chunk_size=4, temperature=2.0)  # type: ignore[arg-type]
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, student_tensors(problem))
    full_grads = torch.autograd.grad(full_logit_loss(problem, temperature=2.0), student_tensors(problem))
    for grad, full_grad in zip(grads, full_grads, strict=True):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad.float(), full_grad.float(), rtol=2e-2, atol=2e-2)


def test_chunked_never_keeps_full_logits_for_backward() -> None:
    tokens, vocab, chunk = 64, 50, 8
    student_hidden = randn(tokens, 4).requires_grad_()
    student_weight = randn(vocab, 4, seed=1).requires_grad_()
    teacher_hidden, teacher_weight = randn(tokens, 5, seed=2), randn(vocab, 5, seed=3)
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunked_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            chunk_size=chunk,
        )
    assert saved
    assert max(saved) < chunk * vocab * 2 < tokens * vocab
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        distillation_loss(F.linear(student_hidden, student_weight), F.linear(teacher_hidden, teacher_weight))
    assert max(saved) >= tokens * vocab  # the full-logit path does keep [N, V]


# --- errors -------------------------------------------------------------------------------------------------

S, T = randn(2, 3), randn(2, 3, seed=1)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: distillation_loss(S, T, temperature=0.0), "temperature"),
        (lambda: distillation_loss(S, T, temperature=-1.0), "temperature"),
        (lambda: distillation_loss(S, T, temperature=math.nan), "temperature"),
        (lambda: distillation_loss(S, T, divergence="jsd", beta=1.5), "beta"),
        (lambda: distillation_loss(S, T, beta=-0.1), "beta"),
        (lambda: distillation_loss(S, T, skew_lambda=2.0), "skew_lambda"),
        (lambda: distillation_loss(S, T, divergence="kl"), "unknown divergence"),  # type: ignore[arg-type]
        (lambda: distillation_loss(S, T, reduction="avg"), "unknown reduction"),  # type: ignore[arg-type]
        (lambda: distillation_loss(S, T, reduction="sum", normalizer=4.0), "normalizer"),
        (lambda: distillation_loss(S, T, normalizer=0.0), "normalizer"),
        (lambda: distillation_loss(S, T, normalizer=torch.ones(2)), "normalizer"),
        (lambda: distillation_loss(S, randn(3, 3)), "leading shape"),
        (lambda: distillation_loss(S, randn(2, 4)), "vocab"),
        (lambda: distillation_loss(S, T, mask=torch.ones(3, dtype=torch.bool)), "mask"),
        (lambda: distillation_loss(S, T, mask=torch.ones(2)), "mask"),
        (lambda: distillation_loss(torch.zeros(()), torch.zeros(())), r"\[\.\.\., V\]"),
        (lambda: generalized_jsd(logp(S), logp(T), 1.2), "beta"),
        (lambda: skew_forward_kl(logp(S), logp(T), -0.5), "lam"),
        (lambda: forward_kl(logp(S), logp(randn(2, 4))), "same shape"),
        (lambda: pad_vocab(S, 2), "pad"),
        (lambda: hard_label_loss(S, torch.zeros(3, dtype=torch.long)), "labels"),
        (lambda: hard_label_loss(S, torch.zeros(2)), "integer"),
        (lambda: combined_kd_loss(S, T, alpha=0.5), "labels"),
        (lambda: combined_kd_loss(S, T, torch.zeros(2, dtype=torch.long), alpha=1.5), "alpha"),
        (lambda: topk_teacher_logprobs(T, 0), "k must be"),
        (lambda: topk_teacher_logprobs(T, 4), "k must be"),
        (lambda: forward_kl_from_topk(S, *topk_teacher_logprobs(randn(3, 3), 2)), "leading shape"),
        (lambda: forward_kl_from_topk(S, *topk_teacher_logprobs(T, 2)[:2], torch.zeros(3)), "tail_logmass"),
        (lambda: chunked_distillation_loss(S, randn(3, 3), T, randn(3, 3), chunk_size=0), "chunk_size"),
        (lambda: chunked_distillation_loss(S, randn(3, 4), T, randn(3, 3)), "do not match"),
        (lambda: chunked_distillation_loss(S, randn(3, 3), randn(4, 3), randn(3, 3)), "leading shape"),
        (lambda: chunked_distillation_loss(S, randn(3, 3), T, randn(5, 3)), "vocab"),
        (
            lambda: chunked_distillation_loss(S, randn(3, 3), T, randn(3, 3), student_bias=randn(4)),
            "student_bias",
        ),
    ],
)
def test_value_errors(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
