"""Which stage checks which section of a study config: the registry :func:`learnforget.study.config.check`
walks after the JSON Schema. Each check lives in its stage's package (``<stage>/check.py``) and
takes the schema-filled config; a stage with a new section adds one entry here.

The entries run in this order, the order the checks always ran in, so a config with several
problems reports the same first one.
"""

from __future__ import annotations

from typing import Callable

from learnforget.analyze.check import check_analysis
from learnforget.compose.check import check_compose
from learnforget.data.check import check_builders, check_hub
from learnforget.evaluate.check import check_evaluation
from learnforget.train.check import (check_base_mix, check_base_train, check_finetune, check_methods,
                                     check_model, check_runs)

#: Key path -> the check of that part of the config (a ConfigError names the offending key).
SECTION_CHECKS: dict[str, Callable[[dict], None]] = {
    "data": check_builders,
    "model": check_model,
    "base.train": check_base_train,
    "data.hub": check_hub,
    "finetune": check_finetune,
    "base.mix": check_base_mix,
    "analysis": check_analysis,
    "methods": check_methods,
    "runs": check_runs,
    "evaluation": check_evaluation,
    "compose": check_compose,  # the runs it combines exist and are lora adapters of compatible ranks
}
