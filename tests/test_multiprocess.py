"""Several processes: torch.distributed (gloo, 2 CPU processes) around patched models and the controller,
concurrent bank saves and loads, a writer killed mid-save, DataLoader workers, concurrent CLI runs.

Every process-spawning test has a hard timeout (a hung collective fails the test instead of the CI job), uses
a FileStore rendezvous in tmp_path (no ports) and keeps its imports inside the workers (a spawned child
re-imports this module)."""
import datetime
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from clora_fast.controller import CLoRAController, Site

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available here", allow_module_level=True)

IN = 12
OUTS = (8, 16, 8, 24)
TIMEOUT = 120          # seconds per spawned group (the children import torch and the model libraries)


def make_sites(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Site(f"layer{i // 2}.{'kv'[i % 2]}", torch.randn(o, IN, generator=g), None, "g")
            for i, o in enumerate(OUTS)]


def _spawn(fn, args, nprocs=2, timeout=TIMEOUT):
    """``torch.multiprocessing.spawn(fn, args)`` with a deadline: hung children are killed and the test fails."""
    import torch.multiprocessing as mp
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {nprocs} spawned processes did not finish within {timeout} s (a hung collective?)")


def _init(rank, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))


def _error(fn):
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------- all_reduce_grads checks
def _checks_worker(rank, world, tmp):
    import warnings
    warnings.simplefilter("ignore")
    _init(rank, world, tmp)
    out = {}
    try:
        x = torch.randn(3, IN, generator=torch.Generator().manual_seed(rank))

        def backward(c):
            sum(y.square().sum() for y in c.project_group("g", x)).backward()

        # 1. begin_concept without seeding every process alike: different A on each process
        c = CLoRAController(make_sites(), rank=2, backend="reference")
        torch.manual_seed(100 + rank)
        c.begin_concept()
        backward(c)
        out["unseeded"] = _error(c.all_reduce_grads)
        # the documented remedy: make them equal once (broadcast from rank 0), then it averages
        for p in c.trainable_parameters():
            dist.broadcast(p.data, src=0)
        out["after_broadcast"] = _error(c.all_reduce_grads)
        out["synced"] = [p.grad.clone() for p in c.trainable_parameters()]
        # 2. a concept begun on one process only: the other has nothing to reduce
        c = CLoRAController(make_sites(), rank=2, backend="reference")
        torch.manual_seed(0)
        if rank == 0:
            c.begin_concept()
            backward(c)
        out["one_sided"] = _error(c.all_reduce_grads)
        dist.barrier()              # both processes are still in step after the refusal
        out["barrier"] = True
    finally:
        torch.save(out, os.path.join(tmp, f"checks{rank}.pt"))
        dist.destroy_process_group()


def test_all_reduce_grads_refuses_processes_out_of_step(tmp_path):
    """all_reduce_grads() averaged whatever each process held: a concept begun with differently seeded RNGs
    trained a different A on every process (silently), and a concept begun on some processes only left the
    others outside the all-reduce (a hang, or a mismatched collective).  Both are now one clear error, raised
    on every process alike (so they stay in step)."""
    _spawn(_checks_worker, (2, str(tmp_path)))
    r = [torch.load(tmp_path / f"checks{k}.pt", weights_only=True) for k in (0, 1)]
    for k in (0, 1):
        assert r[k]["unseeded"] is not None and "differ between the processes" in r[k]["unseeded"]
        assert "manual_seed" in r[k]["unseeded"]
        assert r[k]["after_broadcast"] is None
        assert r[k]["one_sided"] is not None and "do not train the same parameters" in r[k]["one_sided"]
        assert "rank 1: no active concept" in r[k]["one_sided"]
        assert r[k]["barrier"]
    for a, b in zip(r[0]["synced"], r[1]["synced"]):
        assert torch.equal(a, b)
