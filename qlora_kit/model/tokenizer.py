"""A model's tokenizer alone (no weights): what training, generation and the data preview tokenize with."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    """The tokenizer of model folder `folder`, its pad token set (EOS when it has none: pad positions are masked)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, TypeError, KeyError, AttributeError) as e:  # no or broken tokenizer files
        why = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(": .")
        raise ModelError(f"{folder}: the tokenizer cannot be loaded ({why}). "
                         "Copy tokenizer.json and tokenizer_config.json from the original model.") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
