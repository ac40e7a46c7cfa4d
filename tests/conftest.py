"""Shared helpers: tiny models that build and run in milliseconds on a CPU, and a remote-code load without the package."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from modeling_moe import MoEConfig

# Tests never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config(**overrides) -> MoEConfig:
    settings = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=2,
        expert_intermediate_size=24,
        moe_layers=[1],
        max_position_embeddings=128,
        pad_token_id=0,
    )
    settings.update(overrides)
    return MoEConfig(**settings)


def tiny_olmoe(seed: int = 0):
    """transformers' own MoE model (`OlmoeForCausalLM`) at a tiny size, the reference for library behaviour."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    return OlmoeForCausalLM(config)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class HideModelingMoE(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "modeling_moe" or name.startswith("modeling_moe."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, HideModelingMoE())
    try:
        import modeling_moe  # noqa: F401
        raise SystemExit("modeling_moe should not be importable here")
    except ModuleNotFoundError:
        pass

    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    ids = torch.load(sys.argv[1])
    for folder in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        torch.save(model(input_ids=ids).logits, folder + "/remote_logits.pt")
        # The base model loads by AutoModel too, with the same decoder weights.
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(base).__name__ == "MoEModel", type(base)
        assert torch.equal(base(input_ids=ids).last_hidden_state, model.model(input_ids=ids).last_hidden_state)
    """
)


def run_remote_code_load(folders: list, ids: torch.Tensor, tmp_path: Path) -> list[torch.Tensor]:
    """Load each folder with trust_remote_code in one fresh process where `modeling_moe` cannot be imported."""
    script, ids_path = tmp_path / "load.py", tmp_path / "ids.pt"
    script.write_text(REMOTE_CODE_SCRIPT)
    torch.save(ids, ids_path)
    # The same thread count as this process: bitwise-equal logits need the same matmul reduction order.
    threads = str(torch.get_num_threads())
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=threads)
    result = subprocess.run(
        [sys.executable, str(script), str(ids_path), *map(str, folders)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(f"{folder}/remote_logits.pt") for folder in folders]
