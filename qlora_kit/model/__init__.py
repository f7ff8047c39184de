"""The frozen quantized base: a Hugging Face causal LM built on the meta device, its weights streamed in and
quantized as they arrive.

load.py   load_base, load_config, resolve (folders and built-in names), weight_files, frozen_dtype

May import: the root modules and quant/. Imported by everything that loads a base.
"""
