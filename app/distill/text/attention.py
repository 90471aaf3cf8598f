"""Attention for text encoders served on a CPU: PyTorch's SDPA with the keys padded to a multiple of 16.

PyTorch's CPU flash-attention kernel is fast when the key length is a multiple of 16 and slow in between: on one core
of an Intel Xeon with AMX (torch 2.13, ``python -m benchmarks.attention``), 16 sentences × 12 heads took 0.32 ms of
attention at 16 keys, 1.14 ms at 28, 0.56 ms at 32, 1.68 ms at 40 and 1.17 ms at 48 in bf16 (float32 shows a shallower
sawtooth). Padding the keys and values with zeros up to the next multiple, and the mask with False for them, gives
the same output (a masked key's weight is exactly 0) at about the aligned length's cost: 28 keys → 0.66 ms, 40 →
1.24 ms, 63 → 1.83 ms instead of 3.30. The padding is done inside the attention call only, so the projections and
feed-forward layers still run on the batch's own length.

``align_attention`` switches a transformers encoder (``_attn_implementation == "sdpa"``) to this attention; the bf16
variants do (``build_bf16``). In float32 the sawtooth is shallower and the padding measured no faster traced and
slower eager (the Python around the call), so the float32 variants keep plain SDPA. The attention
is registered with transformers' ``AttentionInterface`` under ``KEY_ALIGNED_SDPA`` together with SDPA's mask function
(without a mask function transformers would build no padding mask at all). It keeps plain SDPA where the padding
does not apply: causal attention (SDPA's ``is_causal`` path), tensors off the CPU (the GPU kernels have no such
sawtooth), a mask that is not boolean, a call with another tensor over the keys (a position bias) and ONNX export
(ONNX Runtime has its own kernels). The padding is a TorchScript function, so that a traced variant keeps its
branches (no copy for a batch already at a multiple of 16, a mask made only where there is none); the tracer
records the shape arithmetic itself, so where scripting is unavailable the plain Python function still pads each
traced batch by its own length.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

KEY_ALIGNED_SDPA = "sdpa_key_aligned"
KEY_MULTIPLE = 16


def _pad_keys(
    key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``key`` and ``value`` [batch, heads, length, dim] padded with zeros along the length to a multiple of
    ``multiple``, and the boolean ``mask`` [batch|1, 1, queries|1, length] with False for the added keys (a mask of
    all True first where there is none). Unchanged when the length is a multiple already."""
    length = key.size(2)
    pad = (multiple - length % multiple) % multiple
    if pad == 0:
        return key, value, mask
    if mask is None:
        mask = torch.ones([1, 1, 1, length], dtype=torch.bool, device=key.device)
    key = torch.nn.functional.pad(key, [0, 0, 0, pad])
    value = torch.nn.functional.pad(value, [0, 0, 0, pad])
    mask = torch.nn.functional.pad(mask, [0, pad], value=0.0)
    return key, value, mask


def _scripted() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated; traced variants need the shape arithmetic
        try:
            return torch.jit.script(_pad_keys)
        except Exception as exc:  # a torch without TorchScript must still serve, padding as traced
            log.warning("key-aligned attention pads in Python (TorchScript unavailable: %s)", exc)
            return _pad_keys


pad_keys = _scripted()


def key_aligned_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention, called with the keys padded (``pad_keys``) where that applies."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    aligned = (
        key.device.type == "cpu"
        and getattr(module, "is_causal", True) is False
        and kwargs.get("is_causal") is not True
        and (attention_mask is None or attention_mask.dtype == torch.bool)
        # a tensor beside the mask (a position bias over the keys, say) would need the same padding: left alone
        and not any(isinstance(argument, torch.Tensor) for argument in kwargs.values())
        and not torch.onnx.is_in_onnx_export()
    )
    if aligned:
        key, value, attention_mask = pad_keys(key, value, attention_mask, KEY_MULTIPLE)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> bool:
    """Register ``KEY_ALIGNED_SDPA`` with transformers (idempotent); False where this transformers has no attention
    interface (before 4.48)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(KEY_ALIGNED_SDPA, key_aligned_sdpa)
    AttentionMaskInterface.register(KEY_ALIGNED_SDPA, sdpa_mask)
    return True


def align_attention(model: nn.Module) -> bool:
    """Switch every transformers model in ``model`` whose attention is ``sdpa`` to ``KEY_ALIGNED_SDPA`` (same outputs,
    faster on a CPU; see the module's docstring). True if one was switched. The choice is not saved with the model:
    transformers does not write the attention implementation into config.json."""
    switched = False
    for module in model.modules():
        config = getattr(module, "config", None)
        setter = getattr(module, "set_attn_implementation", None)
        if setter is None or getattr(config, "_attn_implementation", None) != "sdpa":
            continue
        if not register():
            return False
        setter(KEY_ALIGNED_SDPA)
        # transformers may refuse (a model whose code fails its interface check) with a warning only
        switched = switched or getattr(config, "_attn_implementation", None) == KEY_ALIGNED_SDPA
    return switched
