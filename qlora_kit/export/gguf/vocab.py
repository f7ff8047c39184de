"""The tokenizer as GGUF metadata, so llama.cpp and Ollama tokenize and stop exactly as the trained model does
(unsloth #2860, #3899: a lost chat template or EOS token makes the GGUF answer differently).

    tokenizer.ggml.model        "gpt2": byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM ...)
    tokenizer.ggml.pre          llama.cpp's name for the text-splitting regex, read off tokenizer.json's
                                pre_tokenizer (the same regex, not a guess from the model name)
    tokenizer.ggml.tokens       id -> token text, padded to the model's vocab_size with [PAD<id>] (type UNUSED)
    tokenizer.ggml.token_type   NORMAL, CONTROL (special added tokens: <|im_end|> ...), USER_DEFINED (other added)
    tokenizer.ggml.merges, bos/eos/unk/pad ids, add_bos/add_eos, tokenizer.chat_template
                                through the `gguf` package's SpecialVocab (tokenizer.json, tokenizer_config.json,
                                chat_template.jinja), the reader llama.cpp's converter uses.

SentencePiece tokenizers (Llama 2, Mistral v0.1/v0.3, Gemma: a tokenizer.model beside a tokenizer.json that is not
byte-level BPE) are written as llama.cpp's `llama` vocabulary, as its converter does: every piece of tokenizer.model
with its score and type (NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE), added tokens after it (CONTROL when special,
USER_DEFINED otherwise), padding to vocab_size as [PAD<id>] (score -1000, UNUSED); pre "default", no merges, and
add_space_prefix from what the model itself does to "a". Needs the `sentencepiece` package to read the model.
A pre-tokenizer whose regex llama.cpp has no name for is refused with a message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import ExportError

# The splitting regexes llama.cpp knows by name (its llama-vocab.cpp pre-tokenizer types). The GPT-2 one is what a
# plain ByteLevel(use_regex=True) pre-tokenizer applies.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# o200k (gpt-4o, gpt-oss): cased words with their contraction, 1-3 digits, punctuation runs with trailing newlines or /
O200K_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
               r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2", O200K_REGEX: "gpt-4o"}


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json `pre_tokenizer`."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # each digit alone, then GPT-2's regex (SmolLM/SmolLM2)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLITS.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise ExportError(f"GGUF export: this tokenizer splits text with {kinds or 'no pre-tokenizer'}, which has no "
                      "llama.cpp pre-tokenizer name here (known: GPT-2, Llama 3, Qwen2, SmolLM, o200k). Use --format "
                      "merged and llama.cpp's convert_hf_to_gguf.py.")


def _check_utf8(text: str, what: str) -> None:
    """GGUF stores strings as UTF-8: a lone surrogate (JSON "\\ud800") cannot be written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ExportError(f"{what} holds a character UTF-8 cannot encode ({text[e.start]!r}, a lone surrogate); "
                          "GGUF stores UTF-8. Fix that escape in the base's tokenizer files.") from None


def add_tokenizer(writer: Any, base: Path, vocab_size: int) -> dict[str, Any]:
    """Write the tokenizer keys; returns {'eos': text, 'bos': text, 'chat_template': str|None, 'stop': [text...]}
    for the Modelfile."""
    import gguf

    path = base / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"GGUF export needs the base's tokenizer.json (a fast tokenizer); {base} has none. "
                          "Save the tokenizer with transformers (tokenizer.save_pretrained) into the base folder.")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if (base / "tokenizer.model").is_file() and (model.get("type") != "BPE" or model.get("byte_fallback")):
        return _add_sentencepiece(writer, base, data, vocab_size)
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"GGUF export writes byte-level BPE and SentencePiece tokenizers; this one is "
                          f"{model.get('type')}"
                          f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''} and "
                          "the base has no tokenizer.model: put the SentencePiece tokenizer.model in the base folder, "
                          "or use --format merged and llama.cpp's convert_hf_to_gguf.py.")
    pre = pre_tokenizer_name(data.get("pre_tokenizer"))
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(tokens)} but the model's vocab_size is {vocab_size}; "
                          "the base's tokenizer and config.json do not belong together.")
    texts = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    kinds = [types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(texts)
    writer.add_token_types(kinds)
    special = gguf.SpecialVocab(base, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ExportError(f"{path} has no BPE merges; the tokenizer cannot be written for llama.cpp.")
    _check_utf8("".join(texts), f"a token of {path.name}")
    _check_utf8(json.dumps(special.chat_template, ensure_ascii=False), f"the chat template in {base}")
    special.add_to_gguf(writer, quiet=True)
    return _summary(special, texts)


def _summary(special, texts: list[str]) -> dict[str, Any]:
    ids = special.special_token_ids
    stop = sorted({texts[ids["eos"]]} if "eos" in ids else set())
    template = special.chat_template if isinstance(special.chat_template, str) else None
    return {"bos": texts[ids["bos"]] if "bos" in ids else None, "eos": texts[ids["eos"]] if "eos" in ids else None,
            "chat_template": template, "stop": stop}


def _add_sentencepiece(writer: Any, base: Path, data: dict, vocab_size: int) -> dict[str, Any]:
    import gguf

    try:
        import sentencepiece
    except ImportError:
        raise ExportError("GGUF export of a SentencePiece tokenizer (tokenizer.model) reads it with the sentencepiece "
                          "package: pip install sentencepiece.") from None
    sp = sentencepiece.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    T = gguf.TokenType
    texts, scores, kinds = [], [], []
    for i in range(sp.vocab_size()):
        kind = (T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.UNUSED if sp.is_unused(i)
                else T.BYTE if sp.is_byte(i) else T.NORMAL)
        texts.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kinds.append(kind)
    for added in sorted(data.get("added_tokens", []), key=lambda a: a["id"]):
        i = added["id"]
        kind = T.CONTROL if added.get("special") else T.USER_DEFINED
        if i < len(texts):
            if texts[i] != added["content"]:
                raise ExportError(f"added token {added['content']!r} has id {i}, which tokenizer.model gives to "
                                  f"{texts[i]!r}; tokenizer.json and tokenizer.model do not belong together.")
            kinds[i] = kind if kinds[i] == T.NORMAL else kinds[i]
        elif i == len(texts):
            texts.append(added["content"])
            scores.append(0.0)
            kinds.append(kind)
        else:
            raise ExportError(f"added token {added['content']!r} has id {i}, past the {len(texts)} tokens before it.")
    if len(texts) > vocab_size:
        raise ExportError(f"the tokenizer has {len(texts)} tokens but the model's vocab_size is {vocab_size}; "
                          "the base's tokenizer and config.json do not belong together.")
    for i in range(len(texts), vocab_size):
        texts.append(f"[PAD{i}]")
        scores.append(-1000.0)
        kinds.append(T.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(texts)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    # SentencePiece's dummy prefix: "a" encodes as "▁a" when the model adds one (Llama 2), as "a" when not (Gemma)
    writer.add_add_space_prefix(sp.id_to_piece(sp.encode("a")[0]).startswith("\u2581"))
    special = gguf.SpecialVocab(base, load_merges=False, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    return _summary(special, texts)
