"""``layers.sync.differentiable_all_reduce`` on two gloo processes: the sum forward, the
gradient of a sum of per-process losses backward (what the similarity-BN statistics need), and
the same numbers as torch's ``torch.distributed.nn.functional.all_reduce``, which it is kept
beside (deprecated in torch 2.13, a FutureWarning per call, refused under torch.compile)."""

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from axial_deeplab.layers.sync import differentiable_all_reduce

        torch.manual_seed(rank)
        results = {}
        caught = {}
        for name in ("ours", "torch"):
            x = torch.randn(5, dtype=torch.float64, requires_grad=True)
            w = torch.arange(1.0, 6.0, dtype=torch.float64) * (rank + 1)  # each process's loss differs
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                if name == "ours":
                    y = differentiable_all_reduce(x)
                else:
                    from torch.distributed.nn.functional import all_reduce

                    y = all_reduce(x)
                # a non-linear loss of the sum, so the gradient depends on the summed value
                (w * y.pow(2)).sum().backward()
            caught[name] = sum(issubclass(m.category, FutureWarning) for m in seen)
            results[name] = (x.detach().clone(), y.detach().clone(), x.grad.clone())
            torch.manual_seed(rank)  # the same x for the second function
        torch.save({"results": results, "warnings": caught}, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # neither process tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()
    # the results are written and the group is down: leave without the interpreter's finalisation,
    # where gloo's worker threads can still hold objects and abort the process (SIGABRT,
    # "terminate called without an active exception": once in a loaded CI run, pytorch/pytorch#179291)
    os._exit(0)


@pytest.mark.slow  # two spawned processes: ~30 s of start-up
def test_differentiable_all_reduce_matches_torch_and_the_global_gradient(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    xs = [r["results"]["ours"][0] for r in ranks]
    total = sum(xs)
    # d/dx_p of sum_r (w_r * (sum_q x_q)^2) = sum_r 2 * w_r * S: the same on every process
    w_sum = sum(torch.arange(1.0, 6.0, dtype=torch.float64) * (r + 1) for r in range(world))
    want_grad = 2 * w_sum * total
    for r in ranks:
        x, y, g = r["results"]["ours"]
        assert torch.equal(y, total)
        torch.testing.assert_close(g, want_grad, rtol=1e-12, atol=0)
        tx, ty, tg = r["results"]["torch"]
        assert torch.equal(tx, x) and torch.equal(ty, y) and torch.equal(tg, g)
        assert r["warnings"]["ours"] == 0
