"""Tiled MLP (`train.mlp_chunk`): a decoder layer's MLP over the sequence in chunks of N tokens.

The MLP acts on each position independently, and its intermediates are the largest tensors of a layer: for Llama
down(silu(gate(x)) * up(x)) autograd keeps gate's output, silu's output, up's output and their product, 4 x
(B, S, I) with I = 3.5 H, plus LoRA inputs, and backward allocates gradients of the same (B, S, I) size. Here the
MLP is one autograd Function:

    forward   with no_grad, chunk by chunk over the sequence; saves only x (B, S, H) and the RNG state
    backward  restores the RNG state (LoRA dropout draws the same masks) and, chunk by chunk, recomputes the chunk
              with autograd and differentiates it at once: only one chunk's (B, N, I) intermediates are alive

Parameter gradients are summed over the chunks and returned to autograd as the Function's own input gradients, so
hooks and accumulation behave as for any parameter. Results equal the untiled MLP up to float summation order
(tests/test_long_context.py, fp32; with dropout the masks are drawn per chunk, so they differ from an untiled
run's). Cost: none in FLOPs under checkpointing for Llama-like layers (the recompute skips the MLP, the tiles
recompute it with gradients); a Python loop over the tiles.

A mixture-of-experts block (MOE_BLOCKS) is tiled the same way: its router scores each token alone (softmax/top-k,
DeepSeek's group-limited top-k, Qwen2-MoE's shared-expert sigmoid gate: all per token, no capacity limit), so the
block over a tile of tokens computes those tokens' rows of the whole block's output. Inside a tile the experts run
on the tile's tokens only. gpt-oss' block also returns its router scores, which its decoder layer discards: they are
returned without gradient (the frozen router's own forward on the whole input), the hidden states tiled.
"""

from __future__ import annotations

import types

import torch
from torch import nn


RESIDUAL_ONLY = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                 "MixtralDecoderLayer", "Qwen2MoeDecoderLayer", "Qwen3MoeDecoderLayer", "DeepseekV2DecoderLayer",
                 "DeepseekV3DecoderLayer", "GptOssDecoderLayer")
# transformers' MoE blocks whose routing is per token (see the module docstring): tiling them is exact
MOE_BLOCKS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "DeepseekV2Moe",
              "DeepseekV3MoE", "GptOssMLP")
WITH_ROUTER_SCORES = ("GptOssMLP",)  # forward returns (hidden (B, S, H), router scores (B*S, k))


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, chunk, *params):  # x (B, S, H); fn: the MLP's own forward; params: its trainables
        ctx.fn, ctx.chunk, ctx.rng, ctx.params = fn, chunk, _rng_state(x.device), params
        ctx.skip_recompute = getattr(fn.__self__, "skip_in_recompute", False)
        # a tile of a (B, S, H) batch is a strided view; MoE blocks .view() their input, so they get a copy (a
        # dense MLP keeps the view: its matmuls, hence its bits, stay those of the untiled run's pieces)
        ctx.contiguous = getattr(fn.__self__, "tile_contiguous", False)
        ctx.save_for_backward(x)
        if ctx.skip_recompute and torch._C._current_graph_task_id() != -1:
            # Inside backward: this is the checkpoint's recompute of the layer, which stops as soon as the layer's
            # last saved tensor (our x) is packed; the output is never read (the layer only adds it to the
            # residual, which saves nothing). Skip the MLP's FLOPs; our backward recomputes per tile anyway.
            return torch.empty_like(x)
        with torch.no_grad():
            pieces = [p.contiguous() if ctx.contiguous else p for p in x.split(chunk, dim=1)]
            return torch.cat([fn(piece) for piece in pieces], dim=1)  # (B, S, H)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (B, S, H)
        (x,) = ctx.saved_tensors
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:]) if need]
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        sums = [None] * len(params)
        cpu_state, dev_state = ctx.rng
        ctx.rng = None  # the graph's nodes outlive backward while the loss is referenced: drop the state now
        devices = [x.device] if dev_state is not None else []
        with torch.random.fork_rng(devices=devices, device_type=x.device.type):
            torch.set_rng_state(cpu_state)
            if dev_state is not None:
                torch.cuda.set_rng_state(dev_state, x.device)
            for start in range(0, x.shape[1], ctx.chunk):
                piece = x[:, start : start + ctx.chunk].detach()
                piece = (piece.contiguous() if ctx.contiguous else piece).requires_grad_(grad_x is not None)
                with torch.enable_grad():
                    y = ctx.fn(piece)  # (B, N, H): this chunk's intermediates only
                wanted = ([piece] if grad_x is not None else []) + params
                grads = torch.autograd.grad(y, wanted, grad_out[:, start : start + ctx.chunk], allow_unused=True)
                if grad_x is not None:
                    grad_x[:, start : start + ctx.chunk] = grads[0]
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is not None:
                        sums[i] = g if sums[i] is None else sums[i] + g
                del y, grads
        it = iter(sums)
        param_grads = [next(it) if need else None for need in ctx.needs_input_grad[3:]]
        return (grad_x, None, None, *param_grads)


def _tiled_forward(self, x: torch.Tensor) -> torch.Tensor:  # bound to a tiled MLP module as its forward
    fn = self._untiled_forward
    if not (torch.is_grad_enabled() and self.training) or x.dim() != 3 or x.shape[1] <= self.mlp_chunk:
        return fn(x)
    params = [p for p in self.parameters() if p.requires_grad]
    if type(self).__name__ not in WITH_ROUTER_SCORES:
        return _TiledMLP.apply(x, fn, self.mlp_chunk, *params)
    hidden = _TiledMLP.apply(x, self._hidden_only, self.mlp_chunk, *params)
    with torch.no_grad():  # the block's second output: the (frozen) router's scores for every token, no tiles
        scores = self.router(x.reshape(-1, x.shape[-1]))[1]
    return hidden, scores


def _hidden_only(self, x: torch.Tensor) -> torch.Tensor:  # a block returning (hidden, router scores): hidden
    return self._untiled_forward(x)[0]


def tile_mlps(model: nn.Module, chunk: int) -> int:
    """Make every decoder layer's MLP (its `mlp` child: a function of each position alone in every dense
    architecture transformers has) tiled over the sequence in chunks of `chunk` tokens (in training, with
    gradients). Module names and parameters stay as they are (adapters, checkpoints, export are unaffected).
    Returns the number of MLPs tiled; ValueError when a decoder layer has no `mlp` to tile (the caller's user
    error: the option would silently do nothing there)."""
    if chunk <= 0:
        return 0
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
    lacking = [type(m).__name__ for _, m in layers if not isinstance(getattr(m, "mlp", None), nn.Module)]
    if not layers or lacking:
        raise ValueError(f"train.mlp_chunk tiles each decoder layer's `mlp` module; {type(model).__name__} has "
                         f"{'no decoder layers qlora-kit recognises' if not layers else lacking[0] + ' without one'}")
    n = 0
    for _, layer in layers:
        m = layer.mlp
        if hasattr(m, "_untiled_forward"):
            continue
        m.tile_contiguous = _check_moe(m)
        m._untiled_forward = m.forward
        m._hidden_only = types.MethodType(_hidden_only, m)
        m.mlp_chunk = chunk
        # Layers whose MLP output only meets the residual add (no op after it saves anything): safe to skip
        # the MLP in a checkpoint's recompute (see _TiledMLP.forward).
        m.skip_in_recompute = type(layer).__name__ in RESIDUAL_ONLY
        m.forward = types.MethodType(_tiled_forward, m)
        n += 1
    return n


def _check_moe(m: nn.Module) -> bool:
    """Is `m` a mixture-of-experts block (tiled as one)? ValueError for one tiling would change: one qlora-kit does
    not know routes per token, or Mixtral's router jitter (an in-place random scaling of the input, per tile)."""
    if not any(c in ("experts", "router", "gate") for c, _ in m.named_children()):
        return False
    name = type(m).__name__
    if name not in MOE_BLOCKS:
        raise ValueError(f"train.mlp_chunk: {name} routes tokens to experts, and qlora-kit does not know that it "
                         "routes each token alone (tiling would change its result); set train.mlp_chunk: 0")
    if getattr(m, "jitter_noise", 0) > 0:
        raise ValueError(f"train.mlp_chunk: {name} multiplies its input in place by router jitter noise "
                         f"(router_jitter_noise={m.jitter_noise}) in training, which tiles would draw and apply "
                         "per tile on the saved input; set train.mlp_chunk: 0 or router_jitter_noise to 0 in "
                         "config.json")
    return True
