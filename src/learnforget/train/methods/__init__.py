"""The finetuning methods, one module per family (as peft's ``tuners``).

Each method is a config dataclass (fields documented in ``metadata["help"]``, validated in
``__post_init__``) registered under a name with :func:`register` (:mod:`.registry`). A method
knows how to turn a base model into the model to train (:meth:`MethodConfig.prepare`), how to
save what it trained (:meth:`MethodConfig.save`) and how to load that again to continue
(:meth:`MethodConfig.load`), and says what it is through ClassVars (``is_adapter``,
``full_finetuning``, ``shards_with_fsdp``, ...) and :meth:`MethodConfig.adapter_shape`. Adding a
method is one new module in this package plus its import line below; nothing else in the code
names methods.

A config file names a method by ``type`` plus its fields::

    method: {type: lora, rank: 16, target: all}   # alpha defaults to 2 * rank (as the paper)
    method: {type: full, dropout: 0.1}            # or wd: 0.1 (the regularised full baselines)
    method: {type: adalora, init_r: 12, target_r: 8}
    method: {type: relora, rank: 16, merge_every: 100}

Importing this package does not import torch (the hooks import it when they run), so config
validation and the memory planner stay light.
"""

from learnforget.train.methods.registry import (METHODS, TARGET_GROUPS, AdapterShape, MethodConfig, as_method,
                                                method_from_dict, register, state_files)

# the method families: importing a module registers its methods (registration order is the
# order of :data:`METHODS`)
from learnforget.train.methods.full import FullConfig
from learnforget.train.methods.lora import DoraMethodConfig, LoraMethodConfig
from learnforget.train.methods.adalora import ADALORA_STATE, AdaLoraMethodConfig
from learnforget.train.methods.relora import RELORA_STATE, ReLoraMethodConfig

__all__ = ["METHODS", "TARGET_GROUPS", "AdapterShape", "MethodConfig", "as_method", "method_from_dict", "register",
           "state_files", "FullConfig", "LoraMethodConfig", "DoraMethodConfig", "AdaLoraMethodConfig",
           "ADALORA_STATE", "ReLoraMethodConfig", "RELORA_STATE"]
