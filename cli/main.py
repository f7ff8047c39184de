"""Entry point of the `qlora-kit` command: one click group, one module per command.

Exit codes (docs/ARCHITECTURE.md, "Errors"): 0 success; 2 bad input or usage, one or two lines on stderr, no
traceback; 1 a bug (traceback kept, so it can be reported); 130 interrupted.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import sys

import click

from qlora_kit.errors import QloraKitError, TrainingInterrupted

# File-system refusals are the user's to fix (free space, pick a writable folder), not bugs: exit 2, no traceback.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}

# Each name is a module in this folder exposing a click command called `command`, imported only when that command
# runs (`qlora-kit --help` then imports no torch): its one-line summary for the command list is kept here.
COMMANDS = {
    "train": "Fine-tune a model as RECIPE (YAML) says.",
    "data": "Preview what RECIPE trains on: rendered examples, the tokens that take loss, lengths, packing.",
    "generate": "Answer prompts (or chat) with a model, a run or an adapter.",
    "eval": "Mean loss per token and perplexity of a model, run or adapter on a data set.",
    "inspect": "Describe a model, adapter, run, quantized export or GGUF file.",
    "export": "Export a run or adapter: PEFT adapter, merged, quantized or GGUF.",
    "estimate": "Predict the GPU memory of QLoRA training from config.json alone.",
    "bench": "Measure training memory component by component over a grid of settings.",
    "analyze": "What an adapter learned: spectrum, stable rank, amplification, similarity.",
}


class _LazyGroup(click.Group):
    """Commands are imported when run (or asked for their own --help), never to print the command list."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        # a command whose module is not written yet is left out (never a user error); nothing is imported here
        return [name for name in COMMANDS if importlib.util.find_spec(f"qlora_kit.cli.{name}") is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.list_commands(ctx):
            return None
        return importlib.import_module(f"qlora_kit.cli.{name}").command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name]) for name in self.list_commands(ctx)])


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="qlora-kit")
def app() -> None:
    """Fine-tune LLMs with quantized LoRA (QLoRA) on one modest GPU or a CPU.

    \b
    qlora-kit train recipes/demo.yaml            fine-tune (see the recipe reference in README.md)
    qlora-kit data recipes/demo.yaml             what it trains on: examples, loss tokens, lengths
    qlora-kit generate runs/demo --chat          talk to the base model + adapter
    qlora-kit export runs/demo --format merged --out merged/
    qlora-kit estimate --model HuggingFaceTB/SmolLM2-135M-Instruct --rank 16 --seq 512
    """


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app.main(args=argv, prog_name="qlora-kit", standalone_mode=False)
    except QloraKitError as e:
        if not getattr(e, "quiet", False):  # several processes: an error every rank hit is printed by rank 0 only
            # a run stopped as asked (Ctrl-C, SIGTERM) and checkpointed is no error: its message says how to resume
            click.echo(f"{'' if isinstance(e, TrainingInterrupted) else 'error: '}{e}", err=True)
        return getattr(e, "exit_code", 2)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:  # usage errors: unknown option, missing argument
        e.show()
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        click.echo(f"error: {e.strerror or e}{where}. Free disk space, or use a folder you may read and write; "
                   "a training run then continues from its last checkpoint with --resume.", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
