"""Expert parallelism (EP) and data parallelism on ``torch.distributed``.

Launch with ``torchrun --nproc_per_node W -m xmoe train ... --set parallel.expert_parallel=P``
(gloo on CPU, NCCL on GPU). A single process needs none of this. See ``docs/distributed.md``.
"""

from .collectives import all_reduce_sum, all_to_all, exchange_counts
from .data_parallel import all_reduce_mean, clip_grad_norm_, reduce_gradients
from .ep_layer import ExpertParallelMoE, global_load_balance_loss, use_global_router_stats
from .groups import (
    ParallelContext,
    check_expert_parallel,
    init_parallel,
    launched_world_size,
    make_context,
    run_on_main,
)
from .model import expert_parameters, global_num_params, parallelize_model

__all__ = [
    "ExpertParallelMoE",
    "ParallelContext",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_to_all",
    "check_expert_parallel",
    "clip_grad_norm_",
    "exchange_counts",
    "expert_parameters",
    "global_load_balance_loss",
    "global_num_params",
    "init_parallel",
    "launched_world_size",
    "make_context",
    "parallelize_model",
    "reduce_gradients",
    "run_on_main",
    "use_global_router_stats",
]
