"""Running a trained model: generation, the CPU decoding fast path, and evaluation.

generate.py    load a base, run, adapter(s) or merged export for inference; answer prompts (streamed, sampled)
chat.py        `generate --chat`: a conversation kept turn by turn through the model's chat template
inference.py   no second dequantization per token: dense weights, merged adapters, the fp16 GEMV fast path
evaluation.py  `eval`: mean loss per label token and perplexity over any data format, through training's loss

May import: the root modules, quant/, model/, run/, adapters/, data/, train/ (the loss). Imported by the CLI.
"""
