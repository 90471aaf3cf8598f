"""Key-aligned SDPA (app/distill/text/attention.py): the keys padded to a multiple of 16 inside the attention call give
the outputs plain SDPA gives, for any length, with and without a mask, through a traced variant, and never for causal
attention; the bf16 variants of a text encoder use it, the float32 ones and causal LMs do not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.distill.text.attention import KEY_ALIGNED_SDPA, KEY_MULTIPLE, align_attention, key_aligned_sdpa, pad_keys
from app.distill.text.models import build_from_config, tiny_config
from app.distill.variants import build_variant, lm_servable, onednn_bf16_supported, servable


def qkv(batch: int, length: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 4, length, 8, generator=generator).to(dtype) for _ in range(3)]


def padding_mask(lengths: list[int], width: int) -> torch.Tensor:
    """A bidirectional padding mask [batch, 1, width, width] as transformers' sdpa_mask builds it (True = attend)."""
    keys = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    return keys[:, None, None, :].expand(-1, 1, width, -1)


class Encoder(torch.nn.Module):
    is_causal = False


class Decoder(torch.nn.Module):
    is_causal = True


def test_pad_keys_pads_keys_values_and_mask_to_the_next_multiple() -> None:
    key, value, _ = qkv(2, 5)
    mask = padding_mask([5, 3], 5)
    k, v, m = pad_keys(key, value, mask, KEY_MULTIPLE)
    assert k.shape == v.shape == (2, 4, 16, 8) and m is not None and m.shape == (2, 1, 5, 16)
    assert torch.equal(k[:, :, :5], key) and not k[:, :, 5:].any() and not v[:, :, 5:].any()
    assert torch.equal(m[..., :5], mask) and not m[..., 5:].any()
    # no mask: one is made that keeps every real key
    _, _, made = pad_keys(key, value, None, KEY_MULTIPLE)
    assert made is not None and made.shape == (1, 1, 1, 16) and made[..., :5].all() and not made[..., 5:].any()
    # already a multiple: unchanged, the missing mask stays missing
    key, value, _ = qkv(2, 32)
    k, v, m = pad_keys(key, value, None, KEY_MULTIPLE)
    assert k is key and v is value and m is None


@pytest.mark.parametrize("length", [1, 5, 16, 17, 30, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_aligned_attention_equals_sdpa_at_any_length(length: int, dtype: torch.dtype) -> None:
    query, key, value = qkv(3, length, dtype, seed=length)
    lengths = [length, max(1, length - 3), max(1, length // 2)]
    for mask in (padding_mask(lengths, length), None):
        expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)
        got, _ = key_aligned_sdpa(Encoder(), query, key, value, mask, scaling=None)
        assert got.shape == expected.shape
        tolerance = 1e-6 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got.float(), expected.float(), atol=tolerance), (length, mask is None)


def test_causal_attention_is_left_to_sdpa() -> None:
    # padding the keys would give SDPA a mask, and a mask turns its causal path off: the keys are left alone
    query, key, value = qkv(2, 7)
    expected = F.scaled_dot_product_attention(query, key, value, is_causal=True).transpose(1, 2)
    got, _ = key_aligned_sdpa(Decoder(), query, key, value, None)
    assert torch.allclose(got, expected, atol=1e-6)


def test_a_call_with_a_position_bias_is_left_to_sdpa() -> None:
    # the bias covers the keys as they are: padded keys would not match its shape
    query, key, value = qkv(2, 7)
    bias = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=bias).transpose(1, 2)
    got, _ = key_aligned_sdpa(Encoder(), query, key, value, None, position_bias=bias)
    assert torch.allclose(got, expected, atol=1e-6)


def bert(task: str = "embedding") -> torch.nn.Module:
    config = tiny_config("bert", vocab_size=128, hidden_size=32, num_layers=2, max_positions=64)
    return build_from_config(config, task, seed=0).eval()  # type: ignore[arg-type]


def right_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(3, 128, (len(lengths), width), generator=torch.Generator().manual_seed(seed)) * mask
    return ids, mask


def test_a_switched_encoder_gives_the_outputs_of_eager_attention_on_padded_batches() -> None:
    reference = bert()
    reference.set_attn_implementation("eager")  # the plain matmul-softmax-matmul, mask added as given
    model = bert()
    assert align_attention(model) and model.config._attn_implementation == KEY_ALIGNED_SDPA
    assert not align_attention(model)  # already switched
    with torch.inference_mode():
        for lengths in ([17, 9, 3], [16, 16], [1], [30, 5]):
            ids, mask = right_padded(lengths)
            expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
            got = model(input_ids=ids, attention_mask=mask).last_hidden_state
            real = mask.bool()
            assert torch.allclose(got[real], expected[real], atol=1e-5), lengths


def key_lengths(profiler: torch.profiler.profile) -> list[int]:
    """The key length of each SDPA call the profiler saw (its key input is [batch, heads, keys, dim])."""
    calls = [e for e in profiler.events() if e.name == "aten::scaled_dot_product_attention"]
    # the 4-D inputs are query, key, value, mask (a graph called unfrozen records an empty entry before them)
    return [int([shape for shape in call.input_shapes if len(shape) == 4][1][2]) for call in calls]


@pytest.mark.parametrize(
    "name",
    [
        "bf16",
        "torchscript_bf16",
        pytest.param(
            "torchscript_bf16_packed",
            marks=pytest.mark.skipif(not onednn_bf16_supported(), reason="oneDNN has no bf16 kernels on this CPU"),
        ),
        "torchscript",
        "eager",
    ],
)
def test_the_bf16_variants_pad_each_batch_by_its_own_length_and_the_others_do_not_pad(name: str) -> None:
    # the servable's example is 5 tokens wide (padded to 16 when traced); batches of other widths must still match.
    # Only the bf16 variants switch: in float32 the padding measured no faster (eager slower)
    model = bert()
    made = servable(model, "embedding")
    assert made is not None
    reference = bert()
    reference.set_attn_implementation("eager")
    expected_made = servable(reference, "embedding")
    assert expected_made is not None
    built = build_variant(name, made)
    assert model.config._attn_implementation == "sdpa"  # the student itself is never switched
    with torch.inference_mode():
        for lengths in ([5, 2], [16, 16, 4], [17, 1], [33, 20, 7]):
            ids, mask = right_padded(lengths, seed=len(lengths))
            expected = expected_made.module(ids, mask)
            with torch.profiler.profile(record_shapes=True) as profiler:
                got = built.forward(ids, mask).float()
            width = max(lengths)
            keys = -(-width // KEY_MULTIPLE) * KEY_MULTIPLE if "bf16" in name else width
            assert key_lengths(profiler) == [keys, keys], lengths  # two layers, each at this batch's padding
            if "bf16" in name:
                assert float(F.cosine_similarity(got, expected, dim=-1).min()) > 0.999, lengths
            else:
                assert torch.allclose(got, expected, atol=1e-5), lengths


def test_a_causal_lms_bf16_variant_keeps_sdpa() -> None:
    # generation's engine batches only models on sdpa or eager attention: a causal LM is never switched
    lm = build_from_config(tiny_config("gpt2"), "causal_lm", seed=0).eval()  # type: ignore[arg-type]
    built = build_variant("bf16", lm_servable(lm))
    converted = [m for m in built.forward.modules() if getattr(m, "config", None) is not None]  # type: ignore[attr-defined]
    assert converted and all(m.config._attn_implementation == "sdpa" for m in converted)
