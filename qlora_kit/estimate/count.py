"""count_params: a config.json dict -> ModelShapes, by its model_type's rule (families.py, families_moe.py)."""

from __future__ import annotations

import difflib

from ..errors import ModelError
from ..terms import bad_config_sizes
from .families import DENSE
from .families_moe import MOE
from .shapes import ModelShapes

FAMILIES = {**DENSE, **MOE}  # model_type -> (rule, the config.json keys it cannot do without)
KNOWN_TYPES = tuple(FAMILIES)
_NULL_MEANS_NONE = ("q_lora_rank",)


def count_params(config: dict) -> ModelShapes:
    """Shapes from a config.json dict; tied embeddings count once. Keys absent from the file take the defaults
    of transformers' own config class for that model_type."""
    model_type = config.get("model_type") or "llama"
    families = FAMILIES
    if model_type not in families:
        near = difflib.get_close_matches(str(model_type), families, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ModelError(f"model_type {model_type!r} is not a layout estimate knows{hint}; its memory would be "
                         f"miscounted. Known: {', '.join(families)}")
    rule, required = families[model_type]
    missing = [k for k in required if not isinstance(config.get(k), int)]
    if missing:
        raise ModelError(f"config.json lacks {', '.join(missing)}: estimate needs them for a {model_type} model "
                         "(a config.json saved by transformers has them)")
    bad = bad_config_sizes(config)
    if bad:
        raise ModelError(f"config.json has sizes that are not positive integers: {', '.join(bad)}")
    # null means "the default" for every key but those where null is a layout: DeepSeek-V2-Lite's q_lora_rank
    # null is a plain q_proj instead of the q_a/q_b latent pair
    return rule({k: v for k, v in config.items() if v is not None or k in _NULL_MEANS_NONE})
