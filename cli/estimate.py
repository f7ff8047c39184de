"""`qlora-kit estimate`: predicted training memory from config.json alone, and the longest sequence that fits."""

from __future__ import annotations

import json
import typing

import click

from qlora_kit.estimate import analytic as me
from qlora_kit.config import (ComputeDtype, IA3Config, Objective, Optimizer, load_recipe, parse_targets,
                              recipe_from_dict)
from qlora_kit.errors import ConfigError
from qlora_kit.estimate.families import MODELED_DROPOUTS
from qlora_kit.estimate.objective import step_config
from qlora_kit.estimate.recipe import from_recipe, override
from qlora_kit.cli.estimate_labels import LABELS, PHASES, seq_cell
from qlora_kit.terms import FOUR_BIT, QUANT_TYPES, human_bytes, parse_size

_D = me.EstimateConfig()  # defaults: the recipe's own (config.py), e.g. batch 4, 256 tokens, r 16, nf4
def _details(e: me.Estimate, cfg: me.EstimateConfig) -> dict[str, str]:
    """The second column: how each component was computed."""
    dq = " + double quant" if cfg.double_quant else ""
    quant = {"none": "bf16, not quantized", "int8": "int8 + fp32 scale per row"}.get(
        cfg.quant, f"{cfg.quant}, blocksize {cfg.blocksize}{dq}")
    dtype = "bf16" if cfg.compute_bytes == 2 else "fp32"
    optim = {"adamw": "fp32 master + exp_avg + exp_avg_sq", "paged_adamw": "fp32, paged: can spill to CPU RAM",
             "adamw8bit": "8-bit blockwise", "paged_adamw8bit": "8-bit, paged: can spill to CPU RAM"}[cfg.optimizer]
    kept = (f"{e.shapes.layers} checkpointed layer inputs" if cfg.checkpointing
            else f"all {e.shapes.layers} layers kept, no checkpointing")
    if cfg.offload_activations and cfg.checkpointing:
        kept = "layer inputs offloaded to the host (2 back on the GPU in backward)"
    if me.tiled(cfg):
        kept += f", MLP tiled by {cfg.mlp_chunk} tokens"
    def later(key: str) -> str:
        return f"; {human_bytes(e.sizes[key])} in another phase of the step"

    acts = {"loss_head": kept + " (the recomputed layer is not live at this peak)",
            "decoder_backward": kept + (" + 1 layer recomputed" if cfg.checkpointing else "") + " + backward workspace",
            "optimizer_step": "none: freed after backward",
            "reference_pass": "a no-grad forward's transient (nothing kept)"}[e.peak_phase]
    chunk = min(cfg.loss_chunk, me.label_tokens(step_config(cfg)))  # over the rows with gradients (2 per pair)
    logits = (f"fp32 logits + 2 gradients of {chunk} tokens (chunked over the batch)" if e.peak_phase == "loss_head"
              else "freed before this peak" + later("logits_and_loss"))
    grads = (dtype if e.components["adapter_grads"] == e.sizes["adapter_grads"] else
             "none yet at this peak (set to None every step)" + later("adapter_grads")
             if e.components["adapter_grads"] == 0 else f"{dtype}, the top layer's so far" + later("adapter_grads"))
    return {
        "quantized_weights": f"{quant}; {e.bits_per_weight:.3f} bits/weight with constants",
        "quant_constants": "absmax, codebooks" if cfg.quant in FOUR_BIT else "",
        "unquantized_params": "bf16" + ("; lm_head tied to embeddings" if e.shapes.tied else ""),
        "adapters": f"{e.adapter_params:,} params, {dtype}" + (
            "; DoRA/IA3 vectors fp32" if cfg.dora or cfg.ia3_outputs or cfg.ia3_inputs else ""),
        "adapter_grads": grads,
        "optimizer_state": f"{cfg.optimizer}: {optim}",
        "activations": acts,
        "logits_and_loss": logits,
        "cuda_context": "stated allowance" if cfg.device == "cuda" else "0 on the CPU",
    }


def model_dropouts(config: dict) -> tuple[dict[str, float], dict[str, float]]:
    """The config's own dropout probabilities above 0 (GPT-2's attn/resid/embd_pdrop, attention_dropout,
    hidden_dropout ...), active in training: (counted, uncounted): those the family's estimate models (its masks,
    and on the CPU the SDPA math path attention dropout takes) and the rest. Heads other than the LM head
    (classifier_, summary_) are not run."""
    own = {k: v for k, v in config.items() if (k.endswith("dropout") or k.endswith("pdrop"))
           and not k.startswith(("classifier", "summary")) and isinstance(v, (int, float)) and v > 0}
    modeled = MODELED_DROPOUTS.get(config.get("model_type"), ())
    return ({k: v for k, v in own.items() if k in modeled}, {k: v for k, v in own.items() if k not in modeled})


def _objective(cfg: me.EstimateConfig) -> str:
    """The objective line: what a step runs for it."""
    o = cfg.objective
    if o == "sft":
        return "sft: one row per example"
    rows = f"{2 * cfg.batch} rows with gradients (chosen and rejected of {cfg.batch} pairs)" if o != "kto" else \
        f"{cfg.batch} answers with gradients, their {cfg.batch} mismatched pairs without"
    ref = ("no reference (reference-free)" if o in ("orpo", "simpo") else
           "reference precomputed before training: no reference pass" if cfg.precompute_reference else
           "a no-grad reference pass (adapters off) before the policy's forward")
    return f"{o}: {rows}; {ref}"


def _names(text: str | None, default) -> tuple[str, ...]:
    return tuple(default) if text is None else tuple(n.strip() for n in text.split(",") if n.strip())


def _ia3_names(on: bool, outputs: str | None, inputs: str | None) -> dict:
    """--ia3 (the recipe's defaults) and/or explicit lists; either list alone turns IA3 on, the other empty."""
    if not on and outputs is None and inputs is None:
        return {}
    d = IA3Config() if on else IA3Config(outputs=[], inputs=[])
    return {"ia3_outputs": _names(outputs, d.outputs), "ia3_inputs": _names(inputs, d.inputs)}


def _config_source(model: str) -> str:
    """A Hub id -> its config.json in the Hugging Face cache (fetched alone: no weights); anything else as is."""
    from qlora_kit.model import hub

    if model not in me.BUILTIN_CONFIGS and hub.is_hub_id(model):
        return str(hub.file(model, "config.json"))
    return model


def _help(text: str, default) -> str:
    return f"{text} [recipe's value; without a recipe: {default}]"


@click.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe key, as `train --set` does (repeatable).")
@click.option("--model", default=None, help="A Hugging Face model folder or Hub id (org/name[@revision]; only "
              "config.json is read), or a built-in name: " + ", ".join(me.BUILTIN_CONFIGS) + ". Default: the "
              "recipe's model.path.")
@click.option("--quant", type=click.Choice(QUANT_TYPES), default=None, help=_help("quant.type.", _D.quant))
@click.option("--blocksize", type=int, default=None, help=_help("Weights per absmax constant (4-bit).", _D.blocksize))
@click.option("--double-quant/--no-double-quant", default=None, help=_help("quant.double_quant.", _D.double_quant))
@click.option("--rank", "-r", type=int, default=None, help=_help("LoRA rank.", _D.rank))
@click.option("--targets", default=None, help=_help("all-linear, or a comma list: q_proj,v_proj.", _D.targets))
@click.option("--lora-dropout", type=float, default=None,
              help=_help("> 0 keeps a dropped copy of each adapter's input.", _D.lora_dropout))
@click.option("--optimizer", type=click.Choice(typing.get_args(Optimizer)), default=None,
              help=_help("train.optimizer.", _D.optimizer))
@click.option("--seq", type=int, default=None, help=_help("Tokens per example (data.max_length).", _D.seq))
@click.option("--batch", type=int, default=None, help=_help("Examples per micro-batch.", _D.batch))
@click.option("--checkpointing/--no-checkpointing", default=None, help=_help("", _D.checkpointing))
@click.option("--offload-activations/--no-offload-activations", default=None,
              help=_help("Checkpointed layer inputs in host memory (train.offload_activations): 2 on the GPU "
                         "instead of all layers'; the host needs the rest.", _D.offload_activations))
@click.option("--mlp-chunk", type=click.IntRange(0), default=None,
              help=_help("Tiled MLP (train.mlp_chunk): tokens per tile, 0 = off.", _D.mlp_chunk))
@click.option("--dora/--no-dora", default=None, help=_help("lora.dora: a trained (out,) fp32 magnitude per LoRA "
              "target, and what its forward saves for backward.", _D.dora))
@click.option("--ia3", "ia3", is_flag=True, help="An `ia3: {}` section: output scaling of k_proj, v_proj and input "
              "scaling of down_proj (the recipe's defaults; see --ia3-outputs/--ia3-inputs).")
@click.option("--ia3-outputs", default=None,
              help="IA3 output scaling of these modules (comma list), e.g. k_proj,v_proj.")
@click.option("--ia3-inputs", default=None, help="IA3 input scaling of these modules (comma list), e.g. down_proj.")
@click.option("--compute-dtype", type=click.Choice(typing.get_args(ComputeDtype)), default=None,
              help=_help("quant.compute_dtype.", "bf16"))
@click.option("--loss-chunk", type=int, default=None, help=_help("Label tokens per cross-entropy chunk.",
                                                                  _D.loss_chunk))
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help=_help("cuda adds the CUDA context allowance (train.device auto -> cuda).", _D.device))
@click.option("--gpu-mem", default=None, help="Does it fit in this much memory? e.g. 24GiB, 24GB, 16G.")
@click.option("--gpus", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="Processes (one GPU each) of a torchrun / accelerate launch; --batch is per GPU.")
@click.option("--parallel", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="With --gpus > 1: ddp replicates the frozen base; fsdp shards it (train.parallel).")
@click.option("--objective", type=click.Choice(typing.get_args(Objective)), default=None,
              help=_help("train.objective: dpo, ipo, orpo, simpo run 2 rows per pair (--batch counts pairs); dpo, "
                         "ipo, kto add a no-grad reference pass.", _D.objective))
@click.option("--precompute-reference/--no-precompute-reference", default=None,
              help=_help("train.precompute_reference (dpo, ipo): no reference pass in the step.",
                         _D.precompute_reference))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (sizes in bytes) instead of tables.")
def command(recipe, overrides, model, quant, blocksize, double_quant, rank, targets, lora_dropout, optimizer, seq,
            batch, checkpointing, offload_activations, mlp_chunk, dora, ia3, ia3_outputs, ia3_inputs,
            compute_dtype, loss_chunk, device, gpu_mem, gpus, parallel, objective, precompute_reference, as_json):
    """Predict the GPU memory of QLoRA training from config.json alone (no weights are loaded): of RECIPE (a
    training recipe, its model and settings; --set and the flags override them), or of --model with the flags."""
    if recipe is not None or overrides:
        r = load_recipe(recipe, overrides) if recipe is not None else recipe_from_dict({}, overrides)
        cfg, model = from_recipe(r), model or r.model.path
    elif model is None:
        raise ConfigError("estimate needs a recipe (qlora-kit estimate recipes/demo.yaml) or --model (a model "
                          "folder or a built-in name: " + ", ".join(me.BUILTIN_CONFIGS) + ")")
    else:
        cfg = _D
    config = me.load_model_config(_config_source(model))
    names = parse_targets(targets) if targets is not None else None
    cfg = override(cfg, quant=quant, blocksize=blocksize, double_quant=double_quant, rank=rank,
                   targets=names if names is None or isinstance(names, str) else tuple(names), optimizer=optimizer,
                   batch=batch, seq=seq, checkpointing=checkpointing, device=device, loss_chunk=loss_chunk,
                   compute_bytes=None if compute_dtype is None else 2 if compute_dtype == "bf16" else 4,
                   lora_dropout=lora_dropout, offload_activations=offload_activations, mlp_chunk=mlp_chunk,
                   dora=dora, objective=objective, precompute_reference=precompute_reference,
                   **_ia3_names(ia3, ia3_outputs, ia3_inputs))
    device = cfg.device
    limit = parse_size(gpu_mem, "--gpu-mem") if gpu_mem is not None else None
    if gpus > 1:
        from qlora_kit.cli.estimate_devices import report

        report(model, config, cfg, gpus, parallel, gpu_mem, limit, as_json)
        return
    e = me.estimate(config, cfg)
    table = me.max_seq_table(config, cfg)
    if as_json:
        d = {"model": model, "config": {**vars(cfg), "targets": list(e.adapted)}, **e.to_dict(),
             "gpu_mem": limit, "fits": None if limit is None else e.total <= limit, "max_seq": table,
             **dict(zip(("counted_model_dropout", "uncounted_model_dropout"), model_dropouts(config)))}
        click.echo(json.dumps(d))
        return
    s = e.shapes
    moe = (f" ({s.active / 1e6:,.1f}M active per token: {s.moe.top_k} of {s.moe.experts} experts in "
           f"{s.moe.layers} layers)" if s.moe else "")
    click.echo(f"{model}: {s.model_type}, {s.total / 1e6:,.1f}M params{moe}, {s.layers} layers, hidden {s.hidden}, "
               f"vocab {s.vocab}{', tied embeddings' if s.tied else ''}")
    click.echo(f"LoRA r={cfg.rank} on {', '.join(e.adapted)} ({e.adapter_params / s.total:.2%} of the base); "
               f"batch {cfg.batch} x seq {cfg.seq}; checkpointing {'on' if cfg.checkpointing else 'off'}; {device}")
    click.echo(f"objective {_objective(cfg)}\n")
    details = _details(e, cfg)
    width = max(map(len, LABELS.values()))
    click.echo(f"{'component (at the peak)':<{width}}  {'size':>11}  {'%':>6}  how")
    for key, value in e.components.items():
        click.echo(f"{LABELS[key]:<{width}}  {human_bytes(value):>11}  {value / e.total:>6.1%}  {details[key]}")
    click.echo(f"{'total':<{width}}  {human_bytes(e.total):>11}  {1:>6.1%}")
    others = ", ".join(f"{PHASES[k]} {human_bytes(v)}" for k, v in e.phases.items() if k != e.peak_phase)
    click.echo(f"\nthe peak is in the {PHASES[e.peak_phase]}; the other phases of a step need {others}")
    click.echo(f"an unchunked fp32 cross-entropy (B, S, V) x3 would take {human_bytes(e.unchunked_loss)} "
               f"instead of {human_bytes(e.sizes['logits_and_loss'])}")
    if e.host:
        click.echo(f"host memory for offloaded layer inputs (pinned, not counted above): "
                   f"{human_bytes(e.host['offloaded_activations'])}")
    if e.pageable:
        click.echo(f"{human_bytes(e.pageable)} of optimizer state is paged (unified memory): counted above, "
                   "but it can spill to CPU RAM when the GPU runs short")
    counted, uncounted = model_dropouts(config)
    for own, how in ((counted, "counted above (its masks; on the CPU, attention dropout's fp32 (B, nh, S, S) "
                               "probabilities of SDPA's math path)"),
                     (uncounted, "its masks are not counted above")):
        if own:
            click.echo(f"the model's own dropout is on while training "
                       f"({', '.join(f'{k} {v}' for k, v in own.items())}): {how}")
    if limit is not None:
        gpu = gpu_mem.strip()
        verdict = (f"yes ({e.total / limit:.0%} used)" if e.total <= limit
                   else f"no (needs {human_bytes(e.total)}, {human_bytes(e.total - limit)} more)")
        click.echo(f"fits in {gpu}: {verdict}")
    click.echo(f"\nlongest sequence that fits at batch {cfg.batch} (max_position_embeddings {s.max_positions:,}):")
    for row in table:
        click.echo(f"  {row['gpu_gib']:>3} GiB  {seq_cell(row)}")
