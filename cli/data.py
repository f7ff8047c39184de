"""`qlora-kit data RECIPE [--set k=v ...] [--examples N] [--json]`: what the recipe trains on, no weights loaded."""

from __future__ import annotations

import json
import sys

import click

LOSS_OPEN, LOSS_CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around the text that takes loss (when not coloured)


def _show(segments: list, color: bool) -> str:
    out = []
    for text, loss in segments:
        if not loss:
            out.append(text)
        elif color:
            out.append(click.style(text, fg="green", underline=True))
        else:
            out.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}")
    return "".join(out)


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a recipe key, as "
              "for train (e.g. --set data.max_length=512). Repeatable.")
@click.option("--examples", "show", type=click.IntRange(0), default=3, show_default=True,
              help="How many examples to print, from the start of the data.")
@click.option("--color/--no-color", default=None, help="Mark the loss tokens in colour (default: when a terminal).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--trust-remote-code", is_flag=True, help="Run tokenizer code shipped inside the model folder.")
def command(recipe: str, overrides: tuple[str, ...], show: int, color: bool | None, as_json: bool,
            trust_remote_code: bool) -> None:
    """Preview what RECIPE trains on, exactly as `train` reads it (same tokenizer, template, split and packing):
    the first examples with the tokens that take loss marked, counts of records / truncated / dropped, a histogram
    of token lengths, and how full the rows are (packing). Loads the tokenizer only, never the weights."""
    from qlora_kit.config import load_recipe
    from qlora_kit.data.preview import preview
    from qlora_kit.model.load import resolve
    from qlora_kit.model.tokenizer import load_tokenizer

    flags = ["model.trust_remote_code=true"] if trust_remote_code else []
    cfg = load_recipe(recipe, [*overrides, *flags])
    tokenizer = load_tokenizer(resolve(cfg.model.path, cfg.model.allow_pickle), cfg.model.trust_remote_code)
    report = preview(cfg.data, tokenizer, cfg.train.seed, show)
    if as_json:
        click.echo(json.dumps(report))
        return
    color = sys.stdout.isatty() if color is None else color
    marks = "underlined in green" if color else f"between {LOSS_OPEN} and {LOSS_CLOSE}"
    click.echo(f"{report['path']} ({report['format']}): {report['records']:,} records -> {report['examples']:,} "
               f"examples; {report['truncated']:,} truncated to max_length {report['max_length']}, "
               f"{report['dropped']:,} dropped (no loss token left)")
    click.echo(f"tokens: {report['tokens']:,}, of which {report['loss_tokens']:,} take loss; "
               f"{report['train_rows']:,} training rows, {report['val_examples']:,} validation examples")
    for ex in report["shown"]:
        click.echo(f"\n--- record {ex['record']}: {ex['tokens']} tokens, {ex['loss_tokens']} take loss ({marks})")
        click.echo(_show(ex["segments"], color))
    if report["lengths"]:
        ln = report["lengths"]
        click.echo(f"\ntoken lengths (min {ln['min']}, median {ln['median']}, max {ln['max']}):")
        top = max(c for _, _, c in report["histogram"]) or 1
        for lo, hi, c in report["histogram"]:
            click.echo(f"  {lo + 1:>6}-{hi:<6} {c:>7,}  {'#' * round(40 * c / top)}")
    p = report["packing"]
    if p["on"]:
        click.echo(f"\npacking: {p['documents']:,} examples in {p['rows']:,} rows of {report['max_length']} tokens, "
                   f"{p['fill']:.1%} of the row slots hold tokens")
    else:
        click.echo(f"\npacking off: {p['rows']:,} rows, {p['fill']:.1%} of max_length used on average; "
                   f"data.packing=true would make {p['if_packed_rows']:,} rows, {p['if_packed_fill']:.1%} full")
