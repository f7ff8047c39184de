"""`qlora-kit export`: a run or adapter folder out in the formats the ecosystem reads.

formats.py   the formats (adapter, merged, quantized, gguf, gguf-adapter) and export(): options -> one folder or file
source.py    what an export reads: run or PEFT folder -> adapter stack, base, trained-with quantization
files.py     the export folder's non-weight files (config, generation config, tokenizer)
shards.py    safetensors read and written one tensor at a time; shard planning; index
moe_merged.py  the merged export of a mixture-of-experts base (per expert, in transformers' converted layout)
gguf/        GGUF files for llama.cpp and Ollama

May import: the root modules, quant/, model/, run/, adapters/, data/. Imported by the CLI.
"""
