"""fastopt.distributed: ZeRO stage 1 (sharded optimizer state) over MPI, NCCL or torch.distributed.

    ShardedOptimizer(name_or_class, params, comm, **hyperparameters)   see fastopt.distributed.sharded
    save / load / gather / scatter                                     sharded checkpoints (.checkpoint)
    as_communicator(comm), Communicator                                the engine adapters (.comm)

Modules: layout (which rank owns which elements), comm (the adapter interface) with comm_mpi, comm_torch
and comm_nccl (one per engine, imported only when a communicator of that engine is given), sharded (the
optimizer), checkpoint (sharded files and conversion to and from fastopt.save's format). Importing this
package imports neither mpi4py, torch nor CuPy.
"""
from fastopt.distributed.comm import Communicator, as_communicator
from fastopt.distributed.layout import ShardLayout
from fastopt.distributed.sharded import DEFAULT_BUCKET_BYTES, ShardedOptimizer, unsupported_reason
from fastopt.distributed.checkpoint import CheckpointError, gather, load, read_manifest, save, scatter

__all__ = ["ShardedOptimizer", "DEFAULT_BUCKET_BYTES", "unsupported_reason", "Communicator", "as_communicator",
           "ShardLayout",
           "save", "load", "gather", "scatter", "read_manifest", "CheckpointError"]
