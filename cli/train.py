"""`qlora-kit train RECIPE [--set k=v ...] [--out DIR] [--resume] [--allow-pickle] [--trust-remote-code]`."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys

import click

from qlora_kit.cli.options import NonEmptyPath


def launcher() -> list[str]:
    """This process's own launch as a command that works in a new shell: `qlora-kit` when that script is what runs
    and the shell finds the same one on PATH; else this Python running the module (a venv not activated, an
    editable checkout, `python -m qlora_kit.cli.main`)."""
    argv0 = sys.argv[0] if sys.argv else ""
    found = shutil.which("qlora-kit")
    if found and os.path.basename(argv0) == "qlora-kit" and os.path.realpath(found) == os.path.realpath(argv0):
        return ["qlora-kit"]
    return [sys.executable, "-m", "qlora_kit.cli.main"]


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe key, e.g. --set train.steps=10 --set lora.targets=[q_proj,v_proj]. Repeatable.")
@click.option("--out", type=NonEmptyPath(file_okay=False), help="Run folder (default: the recipe's output.dir).")
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
    Several processes: torchrun --nproc_per_node N -m qlora_kit.cli.main train RECIPE (see README).
    """
    from qlora_kit.config import load_recipe
    from qlora_kit.errors import QloraKitError
    from qlora_kit.train import distributed
    from qlora_kit.train.loop import run

    world = distributed.detect()
    hint = distributed.single_process_hint()
    if hint:
        click.echo(hint, err=True)
    distributed.start(world)  # before anything can fail, so that every rank learns of any rank's bad input

    # The flags are recipe keys too (model.allow_pickle, model.trust_remote_code); a flag can only switch one on.
    flags = [f"model.{k}=true" for k, on in (("allow_pickle", allow_pickle), ("trust_remote_code", trust_remote_code))
             if on]
    try:
        cfg = world.agree(lambda: load_recipe(recipe, [*overrides, *flags]))
        run_dir = out or cfg.output.dir
        # What continues this run after Ctrl-C, a full disk or a NaN: the same recipe and overrides, plus --resume.
        launch = launcher()
        if world.distributed:  # the same launch again: this node's process count (several nodes: each its own)
            launch = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world.size)}", "-m",
                      "qlora_kit.cli.main"]
        again = [*launch, "train", recipe, *(a for o in overrides for a in ("--set", o)), "--out", str(run_dir),
                 *(["--allow-pickle"] if allow_pickle else []), *(["--trust-remote-code"] if trust_remote_code else []),
                 "--resume"]
        summary = run(cfg, run_dir, resume=resume, progress=not no_progress, resume_command=shlex.join(again),
                      world=world)
    except QloraKitError as e:  # an error every rank raised together: the group shuts down in step
        distributed.stop_after(world, e)
        raise
    distributed.stop(world)  # only after success: a failed collective can leave the group unable to shut down
    if world.is_main:
        click.echo(json.dumps(summary))
