"""Long-context memory techniques, each exact (the same loss and gradients as without it).

offload.py         activation checkpoints kept in host memory between forward and recompute
tiled_mlp.py       a decoder MLP run over the sequence in tiles
lean_norm.py       RMSNorm that saves its 16-bit input + rsqrt, not an fp32 copy; the final norm per loss chunk
reembed.py         layer 0's checkpoint keeps the token ids and looks its input up again in backward
dropout_replay.py  LoRA dropout without saved dropped copies (a bool mask, or the RNG state on CUDA)
host_memory.py     glibc returns freed tensors to the OS (train.return_freed_memory)

May import: the root modules only (torch aside). Imported by adapters/ (dropout replay), train/ and measure/.
"""
