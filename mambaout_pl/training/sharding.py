"""Fully sharded data parallel training (PyTorch's FSDP2) of a task's network, as Lightning's
``ModelParallelStrategy`` expects it to be applied in ``configure_model``.

Each unit :func:`~mambaout_pl.models.sharding.shard_units` names (a block, a head) is wrapped with
``fully_shard``, then the network itself: weights, gradients and optimizer states are split
across the data-parallel processes, and a unit's weights are gathered only while it computes.
Evaluation gathers every weight once per loop (:func:`gather_for_evaluation`), because the
processes may evaluate different numbers of batches (each image is evaluated once) and a gather
needs every process.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from mambaout_pl.models.sharding import shard_units

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "BATCH_NORMS",
    "data_parallel_mesh",
    "gather_for_evaluation",
    "is_sharded",
    "mixed_precision_policy",
    "release_after_evaluation",
    "shard_network",
]


#: Modules that keep float32 weights under ``bf16-mixed`` (each its own unit).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for a Lightning precision: ``bf16-mixed`` computes with bfloat16 copies of the
    weights and reduces gradients in float32; any other precision computes in the weights' own dtype."""
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ``data_parallel`` dimension of ``ModelParallelStrategy``'s mesh; raises if the mesh asks
    for tensor parallelism, which the networks here do not implement."""
    tensor_parallel = mesh["tensor_parallel"].size()
    if tensor_parallel != 1:
        data_parallel = mesh["data_parallel"].size()
        raise ValueError(
            f"ModelParallelStrategy was given tensor_parallel_size={tensor_parallel} (data_parallel_size="
            f"{data_parallel}); mambaout-pl shards its networks by data parallelism only (FSDP2). Set "
            f"--trainer.strategy.data_parallel_size {tensor_parallel * data_parallel} and "
            "--trainer.strategy.tensor_parallel_size 1 (Lightning's 'auto' gives tensor parallelism the devices "
            "of each node)."
        )
    return mesh["data_parallel"]


def shard_network(network: nn.Module, mesh: DeviceMesh, precision: str, forward_methods: Sequence[str] = ()) -> None:
    """Shard ``network`` in place over the 1-D ``mesh``: each of its units, then the network itself.

    The weights are first broadcast from the mesh's first process, as DDP does, so that every
    process shards the same network whatever its random seed. Under ``bf16-mixed`` batch norms
    are units of their own that keep float32 weights. ``forward_methods`` are the methods
    other than ``forward`` that callers run the network by (a segmentor's ``forward_heads``): they
    gather the network's own weights as ``forward`` does.
    """
    group = mesh.get_group()
    for tensor in chain(network.parameters(), network.buffers()):
        dist.broadcast(tensor.detach(), group=group, group_src=0)
    policy = mixed_precision_policy(precision)
    if policy.param_dtype is not None:
        # As FSDP1 does by default: batch norms compute with their float32 weights, like their running statistics.
        for module in network.modules():
            if isinstance(module, BATCH_NORMS):
                fully_shard(module, mesh=mesh, reshard_after_forward=True)
    for unit in shard_units(network):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    # The root's weights would be gathered again at once for the backward: kept until then.
    fully_shard(network, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    for name in forward_methods:
        register_fsdp_forward_method(network, name)


def is_sharded(network: nn.Module) -> bool:
    """True when :func:`shard_network` (or any ``fully_shard``) has been applied to ``network``."""
    return isinstance(network, FSDPModule)


def _units(network: nn.Module) -> list[FSDPModule]:
    return [module for module in network.modules() if isinstance(module, FSDPModule) and module is not network]


def gather_for_evaluation(network: nn.Module) -> None:
    """Gather every weight of a sharded ``network`` and keep it gathered until
    :func:`release_after_evaluation`, so that forwards need no other process."""
    for unit in _units(network):
        unit.set_reshard_after_forward(False, recurse=False)
    for module in network.modules():
        if isinstance(module, FSDPModule):
            module.unshard()


def release_after_evaluation(network: nn.Module) -> None:
    """Free the weights :func:`gather_for_evaluation` gathered and shard the units after each forward again."""
    for module in network.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    for unit in _units(network):
        unit.set_reshard_after_forward(True, recurse=False)
