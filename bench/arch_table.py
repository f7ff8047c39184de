"""The README's table of supported architectures, generated from the test matrix's own list (tests/archs.py).

    python bench/arch_table.py          print the table
    python bench/arch_table.py --write  replace the table between the README's markers

Every cell is computed from qlora-kit's code on the matrix's tiny model of that architecture (built on the meta
device: no weights), and every "yes" is what tests/test_arch_matrix.py checks for that architecture; the test
`test_readme_table_matches` fails when the README and this output differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- arch-table: begin (bench/arch_table.py --write) -->", "<!-- arch-table: end -->"


def rows() -> list[list[str]]:
    sys.path.insert(0, str(ROOT / "tests"))
    import archs
    from accelerate import init_empty_weights

    from qlora_kit.export.gguf.families import FAMILIES
    from qlora_kit.lowmem import lean_norm
    from qlora_kit.model.conv1d import transposed_names
    from qlora_kit.train.loss import POST_HEAD, post_head

    names = {"multiply": "× {k}", "divide": "÷ {k}", "softcap": "tanh softcap {k}"}
    out = []
    for name in archs.ARCHS:
        with init_empty_weights():
            model = archs.tiny_model(name, 303, 0, 1, 2)
        keys = [k for k, _ in POST_HEAD if getattr(model.config, k, None) is not None]
        loss = ", ".join(names[op].format(k=f"`{k}`") for (op, _), k in zip(post_head(model.config), keys)) or "-"
        conv = bool(transposed_names(model))
        lean = any(type(m).__name__ in lean_norm.LEAN for m in model.modules())
        waits = "no: " + archs.NEEDS_HUB_LAYOUT[name].split(";")[0] if name in archs.NEEDS_HUB_LAYOUT else "yes"
        out.append([name, f"`{model.config.model_type}`", loss,
                    "Conv1D, as Linear (no `--format quantized`)" if conv else "Linear", waits,
                    "all" + ("" if lean else "; own norms, not lean") +
                    ("; layer 0 keeps its input" if name in archs.KEEPS_LAYER0_INPUT else ""),
                    "yes" if waits == "yes" else "no",
                    "yes" if type(model).__name__ in FAMILIES else "-"])
    return out + moe_rows()


def moe_rows() -> list[list[str]]:
    """The mixtures of experts (tests/moe_models.py): tests/test_moe_train.py (train, eval, merged, PEFT) and
    tests/test_moe_options.py (long-context options, DoRA/IA3 beside the experts, LoftQ on them) check each."""
    import moe_models
    from accelerate import init_empty_weights

    from qlora_kit.lowmem import lean_norm

    out = []
    for arch in moe_models.MOE:
        with init_empty_weights():
            model = moe_models.tiny_model(arch, 303, 0, 1, 2)
        lean = any(type(m).__name__ in lean_norm.LEAN for m in model.modules())
        out.append([moe_models.NAMES[arch], f"`{arch}`", "-", "Linear; experts, one Linear each", "yes",
                    "all" + ("" if lean else "; own norms, not lean"), "LoftQ; DoRA, IA3 not on experts",
                    _moe_gguf(type(model).__name__)])
    return out


def _moe_gguf(cls: str) -> str:
    """What the GGUF exports write for a MoE family: every type (K-quants and mxfp4 on every MoE family), expert LoRA
    where export/gguf/experts.py LORA_FAMILIES has it, and families.Family.lora: the weights llama.cpp's graph applies
    an adapter GGUF to."""
    from qlora_kit.export.gguf import experts
    from qlora_kit.export.gguf.families import FAMILIES

    if cls not in FAMILIES:
        return "-"
    only = FAMILIES[cls].lora
    lora = "expert LoRA too" if cls in experts.LORA_FAMILIES else "LoRA off the experts"
    if only and any(n.startswith("ffn_") for n in only):  # every MLP/expert tensor of the family: ffn_*
        only = tuple(sorted({"ffn_*" if n.startswith("ffn_") else n for n in only}))
    return f"all types (K-quants, mxfp4), {lora}" + (f" (adapter GGUF: {', '.join(only)} only)" if only else "")


def table() -> str:
    head = ["Architecture", "model_type", "Loss after lm_head", "Quantized layers", "Train, eval, merged, PEFT",
            "Long-context options", "DoRA, IA3, LoftQ", "GGUF"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows()]
    return "\n".join(lines)


def readme_block(text: str) -> str | None:
    """The table currently between the README's markers, or None when the markers are missing."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str]) -> int:
    t = table()
    if "--write" not in argv:
        print(t)
        return 0
    readme = ROOT / "README.md"
    text = readme.read_text()
    if readme_block(text) is None:
        print(f"README.md has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    before, rest = text.split(BEGIN, 1)
    readme.write_text(before + BEGIN + "\n" + t + "\n" + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
