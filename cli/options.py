"""Option types shared by several commands."""

from __future__ import annotations

import click


class NonEmptyPath(click.Path):
    """click.Path, but '' is refused: click takes it as a path (the current folder, or nothing at all), which is
    never what `--out ''` (an unset shell variable) meant."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; name a folder (or file), e.g. --out runs/mine.", param, ctx)
        return super().convert(value, param, ctx)
