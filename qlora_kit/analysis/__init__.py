"""Looking at what exists: what is this folder, and what did the adapter learn.

inspect.py   what is this folder (model, adapter, run): facts from headers, no weights loaded
artifacts.py what an export is: bitsandbytes-quantized folders, GGUF files (model or adapter)
analyze.py   what the adapter learned: spectrum, stable rank, amplification, subspace similarity
plots.py     analyze's PNGs (matplotlib imported here only, never its global backend)

May import: the root modules, quant/, model/, run/, adapters/. Imported by the CLI.
"""
