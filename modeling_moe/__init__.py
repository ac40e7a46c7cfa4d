"""Sparsely-gated Mixture-of-Experts (Shazeer et al., 2017) as a Hugging Face Transformers model.

Importing the package registers `MoEConfig` with `AutoConfig` and the models with `AutoModel` /
`AutoModelForCausalLM`, and marks them for remote code so `save_pretrained` writes a folder that loads with
`trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .balanced_gating import BalancedRouter
from .configuration_moe import MoEConfig
from .gating import RouterOutput, TopKRouter, cv_squared, kth_excluding, load_probability
from .hierarchical_gating import HierarchicalRouter
from .modeling_moe import MoECausalLMOutputWithPast, MoEForCausalLM, MoEModel, MoEPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(MoEConfig.model_type, MoEConfig, exist_ok=True)
AutoModel.register(MoEConfig, MoEModel, exist_ok=True)
AutoModelForCausalLM.register(MoEConfig, MoEForCausalLM, exist_ok=True)
MoEConfig.register_for_auto_class()
MoEModel.register_for_auto_class("AutoModel")
MoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "BalancedRouter",
    "HierarchicalRouter",
    "MoECausalLMOutputWithPast",
    "MoEConfig",
    "MoEForCausalLM",
    "MoEModel",
    "MoEPreTrainedModel",
    "RouterOutput",
    "TopKRouter",
    "cv_squared",
    "kth_excluding",
    "load_probability",
]
