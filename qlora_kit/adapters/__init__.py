"""What trains on top of the frozen base, and its on-disk format.

lora.py         LoraSpec, LoRALinear, inject(model, targets), merge (a pure function), adapter state dict
dora.py         DoRALinear: LoRA plus a trained magnitude per output row (arXiv 2402.09353)
ia3.py          IA3Linear: a learned vector scaling a layer's output or input (arXiv 2205.05638)
loftq.py        LoftQ initialisation: alternating quantization and truncated SVD (arXiv 2310.08659)
methods.py      a run's methods together: inject, PEFT-named state dict, counts, save, attach, merge_rows
multi_lora.py   several named adapters over one base, routed per batch row (generate)
peft_format.py  PEFT adapter folders read and written without importing peft
expert_format.py  per-expert LoRA pairs <-> PEFT's fused expert-parameter pairs (target_parameters)

May import: the root modules, quant/, lowmem/ (dropout replay) and model/ (moe).
Imported by train/, infer/, export/, analysis/.
"""
