"""A prepared model and the collapse regularizer under DistributedDataParallel (gloo, 2 CPU ranks).

Each rank trains on its half of every batch with ``mean task loss + reg()``. DDP averages the
gradients over ranks, so the step equals one process on the whole batch: the mean of the two
half-batch means is the full-batch mean, and ``reg()`` is the same on every rank.
"""
from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lc_kernels as lc

WORLD = 2
STEPS = 6
BATCH = 16

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available in this build")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 4),
                          nn.ReLU(), nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 3)))
    lc.prepare_(model, alpha_init=0.1)
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 8, generator=g), torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]


def train(model: nn.Module, reg_model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """SGD over alpha_param_groups, ``loss = cross_entropy (mean) + reg()``.

    SGD, not Adam: Adam is blind to the gradient's scale, so summed instead of averaged
    gradients would still match; SGD steps would double.
    """
    opt = torch.optim.SGD(lc.alpha_param_groups(model, lr=0.2, alpha_lr=1.0, weight_decay=1e-3), momentum=0.9)
    reg = lc.CollapseRegularizer(reg_model, strength=1.0, warmup_steps=3)
    for x, y in data:
        loss = nn.functional.cross_entropy(model(x), y) + reg()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        half = BATCH // WORLD
        shard = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]) for x, y in batches()]
        train(ddp, ddp, shard)  # the regularizer reads alpha through the wrapper ("module." paths)
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        del ddp  # its reducer holds the process group
        dist.barrier()  # neither rank tears down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # The result is on disk. gloo's threads can abort the process in interpreter finalization
    # ("terminate called without an active exception", SIGABRT) after all of the above succeeded:
    # in about 1 run in 5 on 2 loaded cores, barrier or not. Leave without finalizing.
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_single_process(tmp_path, monkeypatch):
    if sys.platform == "linux":  # gloo picks its interface from the hostname; stay on loopback
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = make_model()
    train(single, single, batches())
    ref = single.state_dict()

    alphas = [k for k in ref if k.endswith("alpha")]
    assert len(alphas) == 3
    assert all(ref[k].item() > 0.2 for k in alphas)  # the slopes moved from 0.1
    for k, v in ref.items():
        assert torch.equal(states[0][k], states[1][k]), f"{k} differs between ranks"
        # float32 all-reduce averaging vs one full-batch gradient: rounding only.
        torch.testing.assert_close(states[0][k], v, rtol=1e-5, atol=1e-6, msg=f"{k} differs from one process")
