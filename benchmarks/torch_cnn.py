"""PyTorch contenders for the CNN speed benchmarks (benchmarks/cnn.py, benchmarks/device_report.py):
the same CNN with jaxeif's weights, the per-sample loop a PyTorch user writes, and torch.func's vmap."""

from __future__ import annotations

import copy

import numpy as np


def torch_net(params):
    """The same CNN in PyTorch with jaxeif's weights (NHWC flatten order kept)."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c0, self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 3, padding=1)
            self.d0, self.d1 = torch.nn.Linear(1568, 64), torch.nn.Linear(64, 10)

        def forward(self, x):  # x: [b, 28, 28, 1] like the JAX model
            h = x.permute(0, 3, 1, 2)
            h = torch.nn.functional.max_pool2d(torch.relu(self.c0(h)), 2)
            h = torch.nn.functional.max_pool2d(torch.relu(self.c1(h)), 2)
            h = torch.relu(self.d0(h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)))
            return self.d1(h)

    net = Net()
    t = lambda a: torch.from_numpy(np.array(a, np.float32))
    with torch.no_grad():
        for mod, key in ((net.c0, "Conv_0"), (net.c1, "Conv_1")):
            mod.weight.copy_(t(params[key]["kernel"]).permute(3, 2, 0, 1))
            mod.bias.copy_(t(params[key]["bias"]))
        for mod, key in ((net.d0, "Dense_0"), (net.d1, "Dense_1")):
            mod.weight.copy_(t(params[key]["kernel"]).T)
            mod.bias.copy_(t(params[key]["bias"]))
    return net


def torch_loop(net, train, evals, lr: float) -> np.ndarray:
    """What a PyTorch user writes: per sample deepcopy, one SGD step, evaluate all evals."""
    import torch

    F = torch.nn.functional
    (xt, yt), (xe, ye) = train, evals
    with torch.no_grad():
        base = F.cross_entropy(net(xe), ye, reduction="none")
    rows = []
    for i in range(len(xt)):
        tuned = copy.deepcopy(net)
        opt = torch.optim.SGD(tuned.parameters(), lr=lr)
        opt.zero_grad()
        F.cross_entropy(tuned(xt[i : i + 1]), yt[i : i + 1]).backward()
        opt.step()
        with torch.no_grad():
            rows.append(F.cross_entropy(tuned(xe), ye, reduction="none") - base)
    return torch.stack(rows).cpu().numpy()


def torch_func_vmap(net, train, evals, lr: float, chunk: int = 8) -> np.ndarray:
    """torch.func: vmap over rows of (grad, update, functional_call on all evals), `chunk` rows at a time."""
    import torch
    from torch.func import functional_call, grad, vmap

    F = torch.nn.functional
    params = {k: v.detach() for k, v in net.named_parameters()}
    (xt, yt), (xe, ye) = train, evals
    base = F.cross_entropy(functional_call(net, params, (xe,)), ye, reduction="none")

    def row(x, y):
        g = grad(lambda p: F.cross_entropy(functional_call(net, p, (x[None],)), y[None]))(params)
        tuned = {k: params[k] - lr * g[k] for k in params}
        return F.cross_entropy(functional_call(net, tuned, (xe,)), ye, reduction="none") - base

    return (
        torch.cat([vmap(row)(xt[s : s + chunk], yt[s : s + chunk]).detach() for s in range(0, len(xt), chunk)])
        .cpu()
        .numpy()
    )
