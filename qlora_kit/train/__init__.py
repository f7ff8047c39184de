"""Training: everything a step needs, the step, and the loop written out (no Trainer, no callbacks).

prepare.py       prepare(recipe) -> Prepared: checks, quantized base, memory options, adapters, data, optimizer, loss
loop.py          train_step (bench/ reuses it), evaluate, run: logging, validation, checkpoints, resume, clean stops
loss.py          CausalLMLoss: chunked cross-entropy over label positions only
optim.py         fp32 master weights per parameter group, LoRA+ learning rates, LossScaler, lr schedule
distributed.py   several processes (torchrun): World, batch shards, one gradient sum per step, rank 0 writes
fsdp.py          FSDP2 sharding of decoder layers and the loss head, quantized weights included
trackers.py      tensorboard / wandb / mlflow (optional extras)
stop_signals.py  SIGINT/SIGTERM finish the step and checkpoint

May import: the root modules, quant/, lowmem/, model/, run/, adapters/, data/. Imported by infer/ (the loss),
measure/ and the CLI.
"""
