"""The frozen quantized base: a Hugging Face causal LM built on the meta device, its weights streamed in and
quantized as they arrive.

load.py       load_base, load_config, resolve (folders, Hub ids and built-in names), weight_files, frozen_dtype
hub.py        Hub ids org/name[@revision] -> a snapshot in the user's Hugging Face cache (huggingface_hub); no torch
tokenizer.py  load_tokenizer: a model's tokenizer alone
prequant.py   pre-quantized (bitsandbytes-serialised) bases: stored codes -> QuantLinear, never re-quantized
convert.py    transformers' own checkpoint conversion rules (renames, fused experts), one layer at a time
moe.py        Experts: a 3-D experts module as one frozen (quantized) Linear per expert and projection
conv1d.py     transformers' Conv1D (GPT-2) as Linear: weights transposed as they stream in, and back on export

May import: the root modules and quant/. Imported by everything that loads a base.
"""
