"""Spreading the model over ranks, from outside the model (torchtitan's `parallelize.py`): FSDP2, context parallelism.

    shard_with_fsdp2(model, world_size, device, fp32_master_weights=False, use_gradient_checkpointing=False)
    data_ranks, cp_rank = set_up_context_parallel(model, dist_config, cp_size=2, cp_comm_type="p2p", device=device)

DDP needs no helper: `train_ddp.py` wraps the model in `DistributedDataParallel` itself.
"""

import torch
import torch.distributed as dist

from runtime.distributed import DistributedConfig


def shard_with_fsdp2(
    model, world_size: int, device: torch.device, *, fp32_master_weights: bool, use_gradient_checkpointing: bool
) -> None:
    """FSDP2 (`fully_shard`): each decoder layer, then the root (embedding, final norm, LM head).

    With `fp32_master_weights` the parameters are kept in FP32 and gathered in BF16. On a single rank the
    gathered parameters stay from forward to backward (`reshard_after_forward=False`): with nothing to gather
    from other ranks, resharding would only copy every layer's parameters again in backward. That holds one
    more copy of the parameters, so with `use_gradient_checkpointing` (memory first) it keeps resharding.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (world_size,))
    mp_policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if fp32_master_weights
        else MixedPrecisionPolicy()
    )
    reshard = world_size > 1 or use_gradient_checkpointing
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)


def set_up_context_parallel(
    model, dist_config: DistributedConfig, cp_size: int, cp_comm_type: str, device: torch.device
) -> tuple[DistributedConfig, int]:
    """Give every TE layer its context-parallel group; returns (this rank's data-parallel place, its CP rank).

    Ranks [k * cp_size, (k + 1) * cp_size) share sequences (one CP group); there are world / cp_size data-parallel
    groups. The loader reads by data-parallel place: the CP ranks of a group read the same batches.
    """
    mesh = dist.device_mesh.init_device_mesh(
        device.type, (dist_config.world_size // cp_size, cp_size), mesh_dim_names=("dp", "cp")
    )
    cp_group = mesh["cp"].get_group()
    model.model.set_context_parallel_group(
        cp_group, dist.get_process_group_ranks(cp_group), torch.cuda.Stream(), cp_comm_type
    )
    data_ranks = DistributedConfig(mesh.get_local_rank("dp"), dist_config.local_rank, mesh["dp"].size())
    return data_ranks, mesh.get_local_rank("cp")
