"""The run folder: what `qlora-kit train --out RUN_DIR` writes, and the checks before writing into one.

folder.py       RUN_DIR's files (recipe.yaml, metrics.jsonl, adapter/, summary.json), check_run_dir, open_run,
                adapter_source (a run or adapter folder -> its adapter and recipe)
checkpoint.py   checkpoints/step-N: adapter + optimizer + RNG + data position, written atomically

May import: the root modules. Imported by train/ (writing) and by export/, infer/, analysis/ (reading a run).
"""
