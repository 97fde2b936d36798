"""Training over several processes (torchrun) and activation checkpointing: the pieces
trainer.train uses.

    Processes.from_env(device, timeout)   this process's rank among torchrun's, its device,
                                          the process groups (None entries outside torchrun)
    checkpoint_blocks(model)              activation checkpointing of every encoder block
                                          that holds Conv-LoRA layers
    shard_blocks(model, device)           FSDP2: fully_shard per encoder block, then the rest

Under torchrun (WORLD_SIZE > 1) the process group is torch.distributed's (NCCL on GPUs,
gloo on CPUs) with a timeout, so that a process that waits for a peer that is gone or
was started with other settings fails with an error instead of hanging. Gradients are
averaged by DistributedDataParallel; the loss's batch statistics (the soft Dice's, the
routers' load balance) are summed over the processes through a second group, so that
every process computes the loss of the whole batch (gating.routing_scope, losses.step_loss).
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.nn as nn

from ..gating import SumOverProcesses, current_scope, routing_scope

__all__ = ["Processes", "checkpoint_blocks", "encoder_blocks", "shard_blocks"]


def _env_int(name: str) -> Optional[int]:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}: expected an integer in the environment (torchrun sets it), "
                         f"got {text!r}") from None


@dataclass
class Processes:
    """This process among those of a run: rank and world size (0 and 1 alone), its
    device, the group DDP uses and the group the loss's statistics are summed over."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    group: Any = None   # the default group (DDP), None alone
    stats: Any = None   # the loss statistics' group, None alone

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: torch.device, timeout_s: float = 1800) -> "Processes":
        """Alone (world 1) unless torchrun's WORLD_SIZE > 1; then the process group is
        initialised here (if it is not yet) with ``timeout_s``, and the device is the
        LOCAL_RANK-th GPU when ``device`` is a CUDA device (cuda without an index), else
        the CPU."""
        import torch.distributed as dist

        world = _env_int("WORLD_SIZE")
        if world is None or world <= 1:
            return cls(device=device)
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1, but this PyTorch has no torch.distributed")
        rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
        if rank is None or local is None:
            raise ValueError("WORLD_SIZE > 1 without RANK and LOCAL_RANK: start the run with "
                             "torchrun (torchrun --nproc_per_node=N -m "
                             "convlora_kernels.finetune train ...)")
        if device.type == "cuda":
            if device.index is not None:
                raise ValueError(f"device: {device} names one GPU, but torchrun runs one "
                                 f"process per GPU; pass --device cuda (or auto): each "
                                 f"process takes the GPU of its LOCAL_RANK")
            if local >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local}: this machine has "
                                 f"{torch.cuda.device_count()} GPU(s); start at most that "
                                 f"many processes per node (--nproc_per_node)")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(timeout_s))
        if not dist.is_initialized():
            kw = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, timeout=timeout, **kw)
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError(f"the process group has rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, the environment {rank} of {world}")
        stats = dist.new_group(backend=backend, timeout=timeout)
        return cls(rank, world, device, dist.group.WORLD, stats)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def sum(self, values: List[float]) -> List[float]:
        """values summed over the processes (float64), in one collective."""
        if not self.distributed:
            return list(values)
        return self.sum_tensor(torch.tensor(values, dtype=torch.float64,
                                            device=self.device)).tolist()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the processes (no autograd), in one collective; t alone."""
        if not self.distributed:
            return t
        import torch.distributed as dist

        t = t.detach().clone()
        dist.all_reduce(t, group=self.stats)
        return t

    def sum_over(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the processes, differentiable (gating.SumOverProcesses); t alone."""
        return SumOverProcesses.apply(t, self.stats) if self.distributed else t

    def scope(self, noise=None, stats=None, passes: int = 1):
        """gating.routing_scope with this run's noise source and either the statistics of
        the whole batch measured before its passes (``stats``) or, over several processes,
        the statistics group."""
        if stats is not None:
            return routing_scope(noise=noise, stats=stats, world=self.world, passes=passes)
        return routing_scope(noise=noise, group=self.stats if self.distributed else None)

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# --- Activation checkpointing ---------------------------------------------------------

def encoder_blocks(model: nn.Module) -> List[nn.Module]:
    """The blocks of every nn.ModuleList in ``model`` whose entries hold Conv-LoRA layers
    (the image encoder's transformer blocks), outermost lists only."""
    from ..modules import ConvLoRALinear

    blocks: List[nn.Module] = []
    taken: set = set()
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or any(name.startswith(t + ".") for t in taken):
            continue
        holding = [b for b in m if any(isinstance(x, ConvLoRALinear) for x in b.modules())]
        if holding:
            blocks.extend(holding)
            taken.add(name)
    return blocks


def _checkpointed(forward, *args, **kwargs):
    """forward under torch.utils.checkpoint (use_reentrant=False), recomputed in the
    routing_scope it first ran in, so the routers draw the same noise and sum the same
    statistics again."""
    scope = current_scope()

    def run(*a, **k):
        with routing_scope(scope=scope):
            return forward(*a, **k)

    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing per encoder block (encoder_blocks): each block keeps only
    its input for backward and recomputes its forward there. The blocks' forward is
    wrapped in place (their parameters and state dict keep their names); returns how many
    blocks were wrapped (0 when it was done before)."""
    count = 0
    for block in encoder_blocks(model):
        if getattr(block, "_convlora_checkpointed", False):
            continue
        block.forward = functools.partial(_checkpointed, block.forward)
        block._convlora_checkpointed = True
        count += 1
    return count


# --- Sharding (FSDP2) -----------------------------------------------------------------

def shard_blocks(model: nn.Module, device: torch.device) -> int:
    """torch.distributed.fsdp.fully_shard on every encoder block (encoder_blocks), then on
    the model for what is left (the neck, the decoder): each process holds 1/world of
    every weight, frozen or trained, and gathers a block's weights for its forward and
    backward only. Gradients are averaged over the processes, as DDP averages them.
    Returns the number of blocks sharded. Needs the default process group (torchrun)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import torch.distributed as dist

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = encoder_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks)
