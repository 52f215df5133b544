"""DistributedDataParallel over a fused SHViT in training mode (BatchNorm on batch statistics): 2 CPU processes,
gloo backend, two SGD steps; gradients, parameters and BN buffers on every rank equal a single-process replay.

DDP without SyncBatchNorm normalises each rank's half with that rank's own statistics, all-reduces (averages)
the gradients and, before each forward, broadcasts rank 0's buffers. The replay does exactly that with two
replicas in one process, so any disagreement is the fused ops' (or their autograd's) under DDP."""
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import shvit_kernels as sk
from shvit_kernels.models.shvit import SHViT
from shvit_kernels.nn import ResidualDWConvBN, ResidualSHSA
from tests.helpers import randomize_bn

WORLD, STEPS, BATCH = 2, 2, 8


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = SHViT(num_classes=5, embed_dim=(16, 24, 32), partial_dim=(8, 8, 12), qk_dim=(4, 4, 4), depth=(1, 1, 1),
                  types=("i", "s", "s"))
    return sk.convert(randomize_bn(model)).double().train()  # float64: the replay must agree to rounding


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 64, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (BATCH,), generator=g)
    return x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]


def _snapshot(model: torch.nn.Module) -> dict:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"grad": {n: p.grad.clone() for n, p in model.named_parameters()}, "state": state}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        x, y = _data(rank)
        record = []
        for _ in range(STEPS):
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            record.append(_snapshot(model))
        torch.save(record, os.path.join(out, f"rank{rank}.pt"))
        # SyncBatchNorm needs cross-rank statistics the fused ops do not compute: refused, never silently local
        # (stock SyncBatchNorm itself runs on GPUs only, so call a fused block directly)
        sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_model())
        block = next(m for m in sync.modules() if isinstance(m, ResidualDWConvBN))
        try:
            block(torch.randn(2, block.m.c.in_channels, 8, 8, dtype=torch.float64))
        except NotImplementedError as e:
            assert "SyncBatchNorm" in str(e)
        else:
            raise AssertionError("a fused block ran SyncBatchNorm with per-rank statistics")
    finally:
        dist.destroy_process_group()


def _replay() -> list[list[dict]]:
    """Per rank, per step: what DDP should have produced, computed in this one process."""
    replicas = [_model() for _ in range(WORLD)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in replicas]
    records = [[] for _ in range(WORLD)]
    for _ in range(STEPS):
        for m in replicas[1:]:  # broadcast_buffers: every rank starts its forward from rank 0's BN buffers
            for b, b0 in zip(m.buffers(), replicas[0].buffers()):
                b.copy_(b0)
        for rank, (m, opt) in enumerate(zip(replicas, opts)):
            opt.zero_grad()
            x, y = _data(rank)
            F.cross_entropy(m(x), y).backward()
        local = [[p.grad.clone() for p in m.parameters()] for m in replicas]
        for ps in zip(*(m.parameters() for m in replicas)):  # the all-reduce: average of the ranks' grads
            mean = torch.stack([p.grad for p in ps]).mean(0)
            for p in ps:
                p.grad.copy_(mean)
        for rank, (m, opt) in enumerate(zip(replicas, opts)):
            opt.step()
            records[rank].append(_snapshot(m))
    # the test means something only if the ranks' own gradients differ (else no all-reduce is needed)
    assert any(not torch.allclose(a, b) for a, b in zip(*local))
    return records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_equal_single_process_replay(tmp_path):
    assert any(isinstance(m, ResidualSHSA) for m in _model().modules())
    assert any(isinstance(m, ResidualDWConvBN) for m in _model().modules())
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    expected = _replay()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for step, (g, e) in enumerate(zip(got, expected[rank])):
            for kind in ("grad", "state"):
                assert list(g[kind]) == list(e[kind])
                for k in e[kind]:
                    torch.testing.assert_close(g[kind][k], e[kind][k], msg=f"rank {rank} step {step} {kind} {k}")
