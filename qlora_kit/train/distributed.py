"""Several processes, one run: who we are, talking to the others, and agreeing on errors and stops.

A multi-process launch is `torchrun --nproc_per_node N ...` or `accelerate launch --multi_gpu --num_processes N ...`
(which runs torchrun); both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process, and so
can a multi-node launcher. Without them this is one process and nothing here talks to anyone.

Design (docs: README "Several GPUs or machines"):
- Data parallel, one global batch of `batch_size x grad_accum x world_size` examples per optimizer step; rank r
  takes rows [r*b, (r+1)*b) of every micro-batch drawn for the whole world (`shard_batch`), so the data position
  is the same on every rank and N ranks x batch b compute exactly the step of one process with batch N*b.
- Adapters and their optimizer are replicated on every rank (they are small: 70B at r=16 on all linears is 0.2B
  parameters). Their flat fp32 gradients (optim.py) are summed across ranks in place ONCE per optimizer step,
  after all micro-batches (`all_reduce_`), with the step's loss, token count and stop flag: accumulation
  micro-steps never communicate. Each micro-batch's loss is weighted by n_i / N with N the label tokens of the whole
  world's step, so the SUM over ranks is the mean over every label token of the step (no averaging over ranks to
  undo).
- The frozen base is replicated (ddp) or sharded per parameter by FSDP2 (fsdp, see fsdp.py).
- Only rank 0 writes the run folder; every rank reads it (on several machines: a shared file system for --resume).
- Errors: setup runs inside `agree()` on every rank; if any rank fails, every rank stops with exit 2 and rank 0
  alone prints the message (naming the ranks when they disagree). A collective that fails or times out (a rank
  died or hangs) becomes `RankLost`, naming the ranks that no longer answer in the rendezvous store.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch

from ..errors import ConfigError, QloraKitError, RankLost

T = TypeVar("T")
BOOT_TIMEOUT_S = 600  # rendezvous and the first agreement, before the recipe's train.dist_timeout_s is known
LIVENESS_WAIT_S = 3.0  # after a failed collective: how long survivors wait for each other's stamp in the store


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer; it is set by the launcher "
                          "(torchrun / accelerate launch): launch through one of them.") from None


def _peer_failure(e: RuntimeError) -> bool:
    """A communication failure (a peer died or went silent), not a bug: torch.distributed's DistError, or the plain
    RuntimeError gloo's TCP transport raises from inside a collective ("[.../gloo/transport/tcp/pair.cc:537] Read
    error ...: Connection reset by peer", seen when rank 1 was SIGKILLed during an FSDP all-gather)."""
    text = str(e)
    return isinstance(e, torch.distributed.DistError) or "gloo/transport" in text \
        or "Connection reset by peer" in text or "Connection closed by peer" in text


@dataclass
class World:
    """This process's place among the ranks of one run. size 1: a plain single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: object = None  # the process group the run's collectives use (recipe timeout); None: default group
    timeout_s: float = BOOT_TIMEOUT_S

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- collectives ------------------------------------------------------------------------------------------
    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        """Run a collective; a peer that died or went silent becomes RankLost naming it, not a hang or a trace."""
        try:
            return fn()
        except (RuntimeError, ValueError, ConnectionError) as e:  # gloo/nccl raise DistBackendError (RuntimeError)
            raise RankLost(self._lost_message(what, e)) from None

    @contextmanager
    def guarded(self, what: str):
        """Around code whose collectives are not ours (FSDP's all-gathers inside forward and backward): a peer that
        died there becomes RankLost too. Only torch.distributed's own errors: a bug stays a bug, with its trace."""
        try:
            yield
        except RuntimeError as e:  # DistError is one; gloo's transport also raises a plain RuntimeError
            if not self.distributed or not _peer_failure(e):
                raise
            raise RankLost(self._lost_message(what, e)) from None

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum `tensors` across ranks, in place: no extra copy of the optimizer's flat fp32 gradient (one tensor
        per parameter group), so summing needs no memory beyond what one process has."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for t in tensors:
            self._guard("all_reduce", lambda t=t: dist.all_reduce(t, group=self.group))

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        self._guard("all_gather_object", lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def _lost_message(self, what: str, error: Exception) -> str:
        """Name the ranks that stopped: every surviving rank stamps the rendezvous store, waits a moment, and
        lists the ranks without a fresh stamp (dead, or hung in something else). Best effort: when the store
        itself is gone (it lives in rank 0's process unless torchrun hosts it), say so."""
        silent = None
        try:
            import torch.distributed as dist

            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(timedelta(seconds=10))
            store.set(f"qlora_kit/alive/{self.rank}", repr(time.time()))
            time.sleep(LIVENESS_WAIT_S)
            now, silent = time.time(), []
            for r in range(self.size):
                key = f"qlora_kit/alive/{r}"
                if not store.check([key]) or now - float(store.get(key).decode()) > 3 * LIVENESS_WAIT_S:
                    silent.append(r)
        except Exception:
            silent = None
        if silent:
            who = f"Rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped answering"
        elif silent is None:
            who = "Another rank stopped answering (the rendezvous store is gone too: rank 0, which holds it, may be it)"
        else:
            who = "Another rank stopped answering"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return (f"rank {self.rank}: {who} ({what} failed or waited longer than train.dist_timeout_s="
                f"{int(self.timeout_s)} s: {first}). Look for that rank's own message above; the last checkpoint is "
                "intact: continue with --resume on the same number of processes.")

    # ---- errors -------------------------------------------------------------------------------------------------
    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if it raised a QloraKitError on any rank, raise on all of them. Rank 0 prints
        the message (with the ranks that hit it when not all did); the others stop quietly with the same exit."""
        value, failure = None, None
        try:
            value = fn()
        except QloraKitError as e:
            if not self.distributed:
                raise
            failure = e
        outcomes = self.all_gather_object(None if failure is None else (type(failure).__name__, str(failure)))
        failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
        if not failed:
            return value
        messages = {}
        for r, (_, msg) in failed:
            messages.setdefault(msg, []).append(r)
        if len(failed) == self.size and len(messages) == 1:
            text = failed[0][1][1]
        else:
            text = "; ".join(f"on rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {m}"
                             for m, rs in messages.items())
        error = failure if failure is not None and str(failure) == text else QloraKitError(text)
        error.agreed = True  # every rank raises it here, after a collective that worked: the group can shut down
        raise self.quiet_unless_main(error) from None

    def quiet_unless_main(self, error: QloraKitError) -> QloraKitError:
        """Mark an error every rank raises alike (a step's non-finite loss, a stop): printed by rank 0 only."""
        error.quiet = self.distributed and not self.is_main
        return error


def detect() -> World:
    """This process's rank and world size from the launcher's environment (1 process when none is set)."""
    size = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={size} do not describe a process of a run; launch with "
                          "torchrun --nproc_per_node N or accelerate launch --multi_gpu --num_processes N.")
    return World(rank, size, local)


def parallel_mode(choice: str, world: World) -> str:
    """train.parallel (`choice`) for this world: auto is ddp with several processes; one process is always a plain
    run (fsdp on one process is the no-op shard, so a recipe runs unchanged on one device)."""
    if not world.distributed:
        return "single"
    return "ddp" if choice == "auto" else choice


def single_process_hint() -> str | None:
    """`accelerate launch --num_processes N` on a machine without several GPUs runs ONE process (its simple
    launcher), silently. We cannot see N, but we can see accelerate's environment without torchrun's."""
    if os.environ.get("ACCELERATE_MIXED_PRECISION") is not None and "WORLD_SIZE" not in os.environ:
        return ("note: accelerate launch started a single process. For N processes use `accelerate launch "
                "--multi_gpu --num_processes N -m qlora_kit.cli.main train ...` (also on CPUs), or torchrun.")
    return None


def start(world: World) -> None:
    """Join the other ranks (the rendezvous MASTER_ADDR:MASTER_PORT names). gloo on CPUs, nccl on GPUs."""
    if not world.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank {world.rank} has LOCAL_RANK {world.local_rank} but this machine shows "
                              f"{torch.cuda.device_count()} CUDA GPU(s); launch at most one process per GPU "
                              "(--nproc_per_node / --num_processes).")
        torch.cuda.set_device(world.local_rank)
    try:
        dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                                timeout=timedelta(seconds=BOOT_TIMEOUT_S))
    except (RuntimeError, ValueError, OSError) as e:
        raise ConfigError(f"rank {world.rank} could not join the other ranks at {os.environ.get('MASTER_ADDR')}:"
                          f"{os.environ.get('MASTER_PORT')} ({(str(e).splitlines() or [''])[0][:200]}); check the "
                          "launcher's --master_addr/--master_port (or --rdzv_endpoint) and the network.") from None


def use_timeout(world: World, seconds: int) -> None:
    """From now on, collectives give up after `seconds` (the recipe's train.dist_timeout_s)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    world.group = world._guard("new_group", lambda: dist.new_group(timeout=timedelta(seconds=seconds)))
    world.timeout_s = seconds


def stop(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def stop_after(world: World, error: Exception) -> None:
    """Shut the group down on an error every rank raised together (World.agree): the ranks meet once more, then
    each destroys its group, so none exits with gloo's threads still running (which aborted a rank at exit, SIGABRT
    instead of the error's exit code, in about one run in seven). Any other error leaves the group as it is: after
    a failed collective, shutting down could wait on a rank that is gone."""
    if not (world.distributed and getattr(error, "agreed", False)):
        return
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier(group=world.group)
        except Exception:  # noqa: BLE001 (a rank gone since the agreement: exit as before)
            return
        dist.destroy_process_group()


def shard_batch(batch: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """Rows [rank*b, (rank+1)*b) of a micro-batch of world*b rows drawn for the whole world, with the padding
    columns no row of this share needs trimmed away (right padding: causal attention never looks at them).
    input_ids/attention_mask/labels (world*b, T) -> (b, T') with T' <= T."""
    if not world.distributed:
        return batch
    rows = next(iter(batch.values())).shape[0]
    assert rows % world.size == 0, (rows, world.size)
    b = rows // world.size
    part = {k: v[world.rank * b : (world.rank + 1) * b] for k, v in batch.items()}
    used = part["attention_mask"].ne(0).any(dim=0).nonzero()  # columns some row of this share uses
    width = int(used.max()) + 1 if used.numel() else 1
    return {k: v[:, :width].contiguous() if v.dim() == 2 else v.contiguous() for k, v in part.items()}
