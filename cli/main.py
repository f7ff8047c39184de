"""Entry point of the `qlora-kit` command: one click group, one module per command.

Exit codes (docs/ARCHITECTURE.md, "Errors"): 0 success; 2 bad input or usage, one or two lines on stderr, no
traceback; 1 a bug (traceback kept, so it can be reported); 130 interrupted.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

import click

from qlora_kit.errors import QloraKitError

# File-system refusals are the user's to fix (free space, pick a writable folder), not bugs: exit 2, no traceback.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}

# Each name is a module in this folder exposing a click command called `command`.
COMMANDS = ["train", "generate", "eval", "inspect", "export", "estimate", "bench", "analyze"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="qlora-kit")
def app() -> None:
    """Fine-tune LLMs with quantized LoRA (QLoRA) on one modest GPU or a CPU.

    \b
    qlora-kit train recipes/demo.yaml            fine-tune (see the recipe reference in README.md)
    qlora-kit generate runs/demo --prompt "..."  ask the base model + adapter
    qlora-kit export runs/demo --format merged --out merged/
    qlora-kit estimate --model smollm2-135m --rank 16 --seq 512
    """


for _name in COMMANDS:
    try:
        _module = importlib.import_module(f"qlora_kit.cli.{_name}")
    except ModuleNotFoundError as _e:  # a command whose module is not written yet; never a user error
        if _e.name != f"qlora_kit.cli.{_name}":
            raise
        continue
    app.add_command(_module.command, _name)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app.main(args=argv, prog_name="qlora-kit", standalone_mode=False)
    except QloraKitError as e:
        if not getattr(e, "quiet", False):  # several processes: an error every rank hit is printed by rank 0 only
            click.echo(f"error: {e}", err=True)
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
