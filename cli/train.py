"""`qlora-kit train RECIPE [--set k=v ...] [--out DIR] [--resume] [--allow-pickle] [--trust-remote-code]`."""

from __future__ import annotations

import json
import shlex

import click


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe key, e.g. --set train.steps=10 --set lora.targets=[q_proj,v_proj]. Repeatable.")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default: the recipe's output.dir).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last complete checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar (metrics still go to metrics.jsonl).")
@click.option("--allow-pickle", is_flag=True,
              help="Accept a model stored only as pickle (.bin); read with torch.load(weights_only=True).")
@click.option("--trust-remote-code", is_flag=True, help="Run model code shipped inside the model folder.")
def command(recipe: str, overrides: tuple[str, ...], out: str | None, resume: bool, no_progress: bool,
            allow_pickle: bool, trust_remote_code: bool) -> None:
    """Fine-tune with QLoRA as RECIPE says (a YAML file; see recipes/demo.yaml and README.md).

    \b
    Writes RUN_DIR/recipe.yaml, metrics.jsonl, checkpoints/step-N/ and, at the end, adapter/ (PEFT format).
    Ctrl-C saves a checkpoint; continue with the same command plus --resume.
    """
    from qlora_kit.config import load_recipe
    from qlora_kit.train import run

    # The flags are recipe keys too (model.allow_pickle, model.trust_remote_code); a flag can only switch one on.
    flags = [f"model.{k}=true" for k, on in (("allow_pickle", allow_pickle), ("trust_remote_code", trust_remote_code))
             if on]
    cfg = load_recipe(recipe, [*overrides, *flags])
    run_dir = out or cfg.output.dir
    # What continues this run after Ctrl-C, a full disk or a NaN: the same recipe and overrides, plus --resume.
    again = ["qlora-kit", "train", recipe, *(a for o in overrides for a in ("--set", o)), "--out", str(run_dir),
             *(["--allow-pickle"] if allow_pickle else []), *(["--trust-remote-code"] if trust_remote_code else []),
             "--resume"]
    summary = run(cfg, run_dir, resume=resume, progress=not no_progress, resume_command=shlex.join(again))
    click.echo(json.dumps(summary))
