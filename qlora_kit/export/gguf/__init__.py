"""GGUF for llama.cpp, Ollama and LM Studio, written with the `gguf` package.

writer.py    plan every tensor's GGUF type and size from headers; write the header, then tensors one at a time
adapter.py   the LoRA adapter GGUF (gguf-adapter): llama.cpp's lora_a / lora_b tensors, experts stacked
arch.py      Hugging Face architecture -> llama.cpp's: hparam keys, tensor names, row reorders, MoE expert stacks
families.py  the architectures llama.cpp runs: layout changes, extra hparams, refusals naming what is missing
rope.py      RoPE base, rotated dims and scaling (linear, llama3 rope_freqs, YaRN, longrope factors)
vocab.py     the tokenizer as GGUF metadata (tokens, types, merges, special ids, pre-tokenizer, chat template)
reader.py    reading back: a GGUF model as transformers' model + tokenizer (eval, generate; the CLI passes it in)
read_config.py  the metadata back to config.json, each family's keys inverted
kquant.py    K-quant types through llama.cpp's own ggml quantizer (the llama-cpp extra), llama.cpp's type mix
experts.py   LoRA on mixture-of-experts weights: merged per expert, or as llama.cpp's stacked adapter tensors
ollama.py    the Modelfile beside a merged GGUF: chat template -> Ollama TEMPLATE, SYSTEM, stop tokens

May import: what export/ may import, and export/'s own modules below it (merge, shards). Imported by export/formats;
reader by the CLI (eval, generate, export's check).
"""
