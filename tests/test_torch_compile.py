"""fastopt.torch under torch.compile: a compiled training step that calls opt.step() gives the eager step's
numbers bit for bit, for every class, without recompiling per step (the update runs as it is: a graph break),
and a closure passed to step() is compiled as with torch.optim (LBFGS aside, as torch's)."""
from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402
from torch_support import torch_classes  # noqa: E402

if not torch._dynamo.is_dynamo_supported():
    pytest.skip(f"torch {torch.__version__} has no torch.compile on this Python", allow_module_level=True)

CLASSES = torch_classes()
STEPS = 4


def _run(name, compiled, seed, closure_in_step=False, graphs=None):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7, bias=name != "Muon"), torch.nn.Tanh(),
                                torch.nn.Linear(7, 3, bias=name != "Muon"))
    x, y = torch.randn(9, 5), torch.randn(9, 3)
    if name == "SparseAdam":
        model = torch.nn.Embedding(11, 4, sparse=True)
        x, y = torch.randint(0, 11, (9,)), torch.randn(9, 4)
    opt = getattr(ft, name)(model.parameters(), lr=0.1 if name == "LBFGS" else 1e-2)
    if hasattr(opt, "train"):
        opt.train()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    def train_step():
        if name == "LBFGS" or closure_in_step:
            return opt.step(closure)
        loss = closure()
        opt.step()
        return loss

    def backend(graph, example_inputs):  # dynamo's "eager", counting what it captured
        graphs.append(graph)
        return graph.forward

    step = torch.compile(train_step, backend=backend) if compiled else train_step
    losses = [step().item() for _ in range(STEPS)]
    return losses, [p.detach().clone() for p in model.parameters()], opt.state_dict()


@pytest.mark.parametrize("closure_in_step", [False, True], ids=["step()", "step(closure)"])
@pytest.mark.parametrize("name", CLASSES)
def test_a_compiled_training_step_equals_the_eager_one(name, closure_in_step):
    torch._dynamo.reset()
    seed = int(torch.randint(0, 2**31, ()).item())
    eager = _run(name, False, seed, closure_in_step)
    graphs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes on the graph break and on the profiler's record_function
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = _run(name, True, seed, closure_in_step, graphs)
    # the model's forward and backward are compiled, the update is not (LBFGS: nothing, as torch's LBFGS)
    assert (len(graphs) > 0) == (name != "LBFGS"), graphs
    assert compiled[0] == eager[0], f"seed {seed}"
    for a, b in zip(compiled[1], eager[1]):
        assert torch.equal(a, b), f"seed {seed}"
    assert compiled[2]["param_groups"] == eager[2]["param_groups"]
