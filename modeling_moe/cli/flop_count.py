"""Matmul FLOPs of a training step, counted with torch's `FlopCounterMode`, for `moe-bench --mode model`.

A count of what actually ran (every expert's rows, attention, the LM head) turns tokens/s into a utilisation: the
share of one large matmul's rate that a whole training step reaches, which bounds how much faster any implementation
of the same model could train on that machine. torch's counter knows `mm`, `bmm` and the CUDA attention kernels; the
formulas below add `_grouped_mm` (transformers' and our CUDA experts path), the CPU flash-attention kernels (PyTorch's
SDPA on CPU) and the in-place `addmm_`, with torch's own conventions: 2 FLOPs per multiply-add, attention counted
without the causal saving, and its backward with the recomputed scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def grouped_mm_flop(
    a_shape: Sequence[int], b_shape: Sequence[int], *args: Any, out_shape: Sequence[int] | None = None, **kwargs: Any
) -> int:
    """`_grouped_mm(a, b, offs)`: every output element is a dot product over `a`'s last dim, except for two 2-D
    operands, where the groups split that dim (a weight gradient `(rows, K)^T @ (rows, N)` -> `(groups, K, N)`) and the
    dot products over all groups together cover it once."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def inplace_addmm_flop(
    self_shape: Sequence[int],
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    *args: Any,
    out_shape: Sequence[int] | None = None,
    **kwargs: Any,
) -> int:
    """`self.addmm_(a, b)`: the product's FLOPs, as torch counts `addmm`."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def cpu_sdpa_flop(
    query_shape: Sequence[int],
    key_shape: Sequence[int],
    value_shape: Sequence[int],
    *args: Any,
    out_shape: Sequence[int] | None = None,
    **kwargs: Any,
) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_sdpa_backward_flop(
    grad_out_shape: Sequence[int],
    query_shape: Sequence[int],
    key_shape: Sequence[int],
    value_shape: Sequence[int],
    *args: Any,
    out_shape: Sequence[int] | None = None,
    **kwargs: Any,
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


EXTRA_FLOP_FORMULAS = {
    aten.addmm_: inplace_addmm_flop,
    aten._grouped_mm: grouped_mm_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward_flop,
}


def training_step_flops(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Matmul FLOPs of one forward + backward of `model(input_ids=input_ids, labels=input_ids).loss`; the gradients it
    leaves are dropped."""
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    with counter:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()
