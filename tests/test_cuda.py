"""The model and `moe_fused` on a CUDA GPU, skipped without one.

The CPU suite runs `moe_fused`'s CUDA branch on the CPU (`cuda_branch_on_cpu` in test_fast_experts.py): `grouped_mm`'s
reference kernel stands in for torch's CUTLASS one, and the sums over the slots are forced pairwise. These tests run
the same comparisons on the device itself, so that a GPU session checks the real kernels before it times them
(README, "Performance": `python -m pytest -q tests/test_cuda.py`, then `moe-bench`).
"""

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_moe import fast_experts

from .test_fast_experts import _assert_bf16_close, _assert_matches_eager, _experts, _routing
from .test_model import _ids, _model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = "cuda"


class _GroupedMmCalls(TorchDispatchMode):
    """Counts the `_grouped_mm` calls (torch's grouped kernel or its fallback) made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._grouped_mm.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("case", ["random", "empty_experts", "sentinel", "recompute"])
def test_fused_matches_eager_in_float32_on_cuda(activation, case):
    """In float32 on CUDA `moe_fused` runs one `mm` per expert over all rows (one block) and sums over the slots in
    pair order (`_sums_pairwise`): output and every gradient as eager's within 1e-5."""
    experts = _experts(activation, expert_recompute_activations=case == "recompute").to(CUDA)
    x = torch.randn(21, 16, device=CUDA)
    index, weights = _routing(21, 6, 2, experts_used=3 if case == "empty_experts" else None)
    if case == "sentinel":
        index[0, 1] = 6
        index[5] = 6  # a token with no local expert at all
    # Eager's results are on CUDA: `allclose` raises if any of `moe_fused`'s is not.
    _assert_matches_eager(experts, x, index.to(CUDA), weights.to(CUDA))


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_bf16_on_cuda_is_close_and_uses_grouped_mm_where_torch_has_its_kernel(activation):
    """bf16 on CUDA: no further from float32 than eager bf16; on compute capability 9.x / 10.x each of the six products
    of a forward+backward is one `grouped_mm` call (the CUTLASS kernel), elsewhere none is (per-expert `mm`)."""
    with _GroupedMmCalls() as mode:
        _assert_bf16_close(activation, CUDA)
    assert mode.calls == (6 if fast_experts.torch_runs_grouped_kernel(torch.device(CUDA), torch.bfloat16) else 0)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_bf16_with_1024_experts_leaves_out_grouped_mm_and_stays_close(activation):
    """torch's grouped kernel refuses 1024 groups or more ("Can't process more than 1024 groups"): there `moe_fused`
    runs per-expert matmuls instead, and stays as close to float32 as eager bf16."""
    with _GroupedMmCalls() as mode:
        _assert_bf16_close(activation, CUDA, num_experts=1024, num_tokens=700)
    assert mode.calls == 0


@pytest.mark.parametrize("expert_activation", ["relu", "swiglu"])
def test_model_on_cuda_matches_the_cpu_model(expert_activation):
    """Evaluation (no noise) gives the CPU model's loss and logits; a training step's loss and gradients are finite."""
    model = _model(expert_activation=expert_activation)
    ids = _ids(batch=2, length=12)
    with torch.no_grad():
        on_cpu = model(input_ids=ids, labels=ids)
        model.to(CUDA)
        on_cuda = model(input_ids=ids.to(CUDA), labels=ids.to(CUDA))
    assert torch.allclose(on_cpu.logits, on_cuda.logits.cpu(), atol=1e-4)
    assert torch.allclose(on_cpu.loss, on_cuda.loss.cpu(), atol=1e-5)
    model.train()
    out = model(input_ids=ids.to(CUDA), labels=ids.to(CUDA))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_greedy_generation_on_cuda_with_cache_equals_without_cache():
    model = _model().to(CUDA)
    prompt = _ids(batch=1, length=5).to(CUDA)
    with_cache = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=True)
    without_cache = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 25)
    assert torch.equal(with_cache, without_cache)


def test_training_step_under_bf16_autocast_on_cuda():
    """`Trainer(bf16=True)`: float32 weights, products in bf16 (the grouped kernel on 9.x / 10.x), the gate in
    float32; the loss is close to float32's and the weights get finite float32 gradients."""
    model = _model().to(CUDA)  # in evaluation mode
    ids = _ids(batch=2, length=12).to(CUDA)
    with torch.no_grad():
        reference = model(input_ids=ids, labels=ids).loss
        with torch.autocast(CUDA, dtype=torch.bfloat16):
            evaluated = model(input_ids=ids, labels=ids).loss
    assert abs(float(evaluated) - float(reference)) < 0.05 * float(reference)
    model.train()
    with torch.autocast(CUDA, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_benchmark_quick_runs_on_cuda(tmp_path):
    """`moe-bench` on CUDA (bf16 by default) in both modes writes its tables."""
    result = subprocess.run(
        [sys.executable, "-m", "modeling_moe.cli.benchmark", "--quick", "--mode", "both", "--device", CUDA]
        + ["--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bfloat16" in result.stdout
    assert list(tmp_path.glob("*.md"))
