"""Data-parallel training of the digits MLP (64-128-10) with a ZeRO-1 sharded optimizer over MPI.

    mpiexec -n 2 python examples/distributed_mlp.py            # or: mpiexec -n 2 python -m mpi4py examples/...
    python examples/distributed_mlp.py --epochs 5              # one process works too (world size 1)

Every rank builds the same model (same seed), so the params are identical everywhere, as
fastopt.distributed.ShardedOptimizer requires (it checks). Each epoch the training set is shuffled with a
seed every rank shares, and every global batch of batch_size * world examples is cut into one slice per
rank: a rank computes the gradient of the mean loss over its slice, and the sharded step applies the mean
over ranks, i.e. the gradient of the global batch. Each rank keeps the Adam state of 1/world of the
params. Rank 0 prints the loss, the validation accuracy per epoch and the test accuracy at the end.
Uses fastopt.train's data set loader and MLP (scikit-learn's bundled digits: pip install .[train]).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np
from mpi4py import MPI

import fastopt
from fastopt.distributed import ShardedOptimizer
from fastopt.train.data import load_dataset
from fastopt.train.models import MLP


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32, help="examples per rank per step")
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON line (rank 0)")
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    if args.epochs < 1:
        ap.error(f"--epochs must be at least 1, got {args.epochs}")  # (every rank checks the same values)
    if args.batch_size < 1:
        ap.error(f"--batch-size must be at least 1, got {args.batch_size}")

    data = load_dataset("digits", seed=args.seed)
    if args.batch_size * world > len(data.y_train):
        ap.error(f"--batch-size {args.batch_size} x {world} ranks is more than the {len(data.y_train)} training "
                 f"examples: no step would be taken")
    model = MLP(data.n_features, (128,), data.n_outputs, seed=args.seed)
    opt = ShardedOptimizer(args.optimizer, [model.params], comm, lr=args.lr)
    global_batch = args.batch_size * world
    n = len(data.y_train)
    history = []
    for epoch in range(1, args.epochs + 1):
        order = np.random.default_rng([args.seed, epoch]).permutation(n)  # the same on every rank
        losses = []
        for start in range(0, n - global_batch + 1, global_batch):  # full global batches only
            mine = order[start + rank * args.batch_size:start + (rank + 1) * args.batch_size]
            losses.append(float(model.loss_and_grad(data.X_train[mine], data.y_train[mine])))
            opt.step([model.grads])   # mean over ranks; model.params updated in place on every rank
        loss = comm.allreduce(float(np.mean(losses))) / world
        val = float(np.mean(model.predict(data.X_val) == data.y_val))
        history.append({"epoch": epoch, "train_loss": loss, "val_accuracy": val})
        if rank == 0 and not args.json:
            print(f"epoch {epoch:3d}  train loss {loss:.4f}  val accuracy {val:.3f}", flush=True)
    test = float(np.mean(model.predict(data.X_test) == data.y_test))
    # every rank ends with the same params: compare a checksum
    single = sum(a.nbytes for a in fastopt.init_state(opt.spec.name, model.params).values())  # one process's state
    digest = comm.allgather(hashlib.sha256(model.params.tobytes()).hexdigest())
    result = {"world_size": world, "optimizer": args.optimizer, "epochs": args.epochs, "test_accuracy": test,
              "params_identical_on_all_ranks": len(set(digest)) == 1, "state_bytes_per_rank": opt.state_bytes(),
              "state_bytes_single_process": single, "history": history}
    if rank == 0:
        if args.json:
            print(json.dumps(result))
        else:
            print(f"test accuracy {test:.3f}; optimizer state per rank {opt.state_bytes()} bytes "
                  f"(one process would hold {single}); params identical on all "
                  f"{world} ranks: {result['params_identical_on_all_ranks']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
