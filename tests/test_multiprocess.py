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
TEARDOWN_GRACE = 20    # seconds a group may take to exit once every process has written its results


def make_sites(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Site(f"layer{i // 2}.{'kv'[i % 2]}", torch.randn(o, IN, generator=g), None, "g")
            for i, o in enumerate(OUTS)]


def _traced(rank, fn, args, tmp, dump_after):
    """Run ``fn(rank, *args)`` with every thread's stack written to ``tmp/stacks{rank}.txt`` if it is still
    running after ``dump_after`` seconds (what a hung group was doing, for the failure message)."""
    import faulthandler
    with open(os.path.join(tmp, f"stacks{rank}.txt"), "w") as f:
        faulthandler.dump_traceback_later(dump_after, exit=False, file=f)
        try:
            fn(rank, *args)
        finally:
            faulthandler.cancel_dump_traceback_later()


def _spawn(fn, args, results, nprocs=2, timeout=TIMEOUT, grace=TEARDOWN_GRACE):
    """``torch.multiprocessing.spawn(fn, args)`` with a deadline: hung children are killed and the test fails,
    with the children's stacks in the message.  ``args[1]`` is the test's tmp folder; ``results(rank)`` is
    the file each worker writes when its collectives are done (before ``destroy_process_group``).  Children
    that wrote every result but do not exit within ``grace`` s are stuck in torch's own teardown: they are
    killed and the test goes on to check the results they wrote.  (With torch 2.4.1, about one group in ten
    has one process hang in ``dist.destroy_process_group()`` after every collective returned on both and
    the other process exited; seen with FileStore and TCP rendezvous alike, cf. pytorch#75097.  It failed CI
    once.)"""
    import torch.multiprocessing as mp
    tmp = args[1]
    dump_after = max(timeout - 15, timeout / 2)
    ctx = mp.start_processes(_traced, args=(fn, args, tmp, dump_after), nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    all_written = None
    while True:
        try:
            if ctx.join(timeout=1.0):
                break
        except mp.ProcessExitedException:
            # a child killed by a signal after writing its results: torch's teardown again (gloo's threads after
            # an error left the group up: "terminate called without an active exception", SIGABRT, seen once in
            # a full run); the test checks what the processes wrote. Before writing them it is a failure.
            if not all(os.path.exists(results(k)) for k in range(nprocs)):
                raise
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            return
        now = time.monotonic()
        if all_written is None and all(os.path.exists(results(k)) for k in range(nprocs)):
            all_written = now
        stuck_in_teardown = all_written is not None and now > all_written + grace
        if stuck_in_teardown or now > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            if stuck_in_teardown:
                return
            stacks = []
            for k in range(nprocs):
                path = os.path.join(tmp, f"stacks{k}.txt")
                text = open(path).read() if os.path.exists(path) else ""
                stacks.append(f"--- rank {k} ---\n" + ("\n".join(text.splitlines()[-25:]) or "(no stack dump)"))
            pytest.fail(f"the {nprocs} spawned processes did not finish within {timeout} s (a hung collective?)\n"
                        + "\n".join(stacks))


def _sleeper(rank, world, tmp, write_first, abort=False):
    if write_first:
        open(os.path.join(tmp, f"done{rank}"), "w").close()
    if abort and rank == 1:
        deadline = time.monotonic() + 60
        while write_first and not os.path.exists(os.path.join(tmp, "done0")) and time.monotonic() < deadline:
            time.sleep(0.05)            # abort once both wrote (torch's join kills the others when one dies)
        os.abort()
    time.sleep(600)


def test_spawn_harness_reports_hangs_and_tolerates_a_teardown_hang(tmp_path):
    """The harness itself: processes that hang before writing their results fail the test with their stacks;
    processes that wrote them and then hang or abort (torch's teardown) are killed and the test goes on; one that
    aborts before writing them fails it."""
    results = lambda k: tmp_path / f"done{k}"        # noqa: E731
    t0 = time.monotonic()
    _spawn(_sleeper, (2, str(tmp_path), True), results, timeout=100, grace=1)
    assert time.monotonic() - t0 < 60
    for k in (0, 1):
        os.remove(results(k))
    with pytest.raises(pytest.fail.Exception, match=r"(?s)did not finish within 12 s.*rank 1 ---.*_sleeper"):
        _spawn(_sleeper, (2, str(tmp_path), False), results, timeout=12, grace=1)
    import torch.multiprocessing as mp
    t0 = time.monotonic()
    _spawn(_sleeper, (2, str(tmp_path), True, True), results, timeout=100, grace=50)     # wrote, then SIGABRT
    assert time.monotonic() - t0 < 40
    for k in (0, 1):
        os.remove(results(k))
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        _spawn(_sleeper, (2, str(tmp_path), False, True), results, timeout=100, grace=1)


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
    _spawn(_checks_worker, (2, str(tmp_path)), lambda k: tmp_path / f"checks{k}.pt")
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


def _average_worker(rank, world, tmp):
    import warnings
    _init(rank, world, tmp)
    try:
        torch.manual_seed(0)                          # the same sites and the same A on every process
        c = CLoRAController(make_sites(), rank=2, backend="reference")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c.begin_concept()                         # warns once: DDP(model) would not sync these gradients
        c.end_concept()
        torch.manual_seed(1)
        c.begin_concept()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in c.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        x = torch.randn(3, IN, generator=torch.Generator().manual_seed(10 + rank))   # each process its own data
        (sum(y.square().sum() for y in c.project_group("g", x)) + c.penalty()).backward()
        local = [p.grad.clone() for p in c.trainable_parameters()]
        held = [p.grad for p in c.trainable_parameters()]
        c.all_reduce_grads()
        torch.save({"local": local, "synced": [p.grad for p in c.trainable_parameters()],
                    "in_place": len(held) > 1 and all(p.grad is h for p, h in zip(c.trainable_parameters(), held)),
                    "warned": [w.category.__name__ for w in caught if "all_reduce_grads" in str(w.message)]},
                   os.path.join(tmp, f"average{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_grads_averages_over_processes(tmp_path):
    """Two CPU processes (gloo): the controller's gradients after all_reduce_grads() are the mean of the
    per-process gradients on both, written into the same tensors (DDP(model) would not touch them: they are
    not the model's parameters)."""
    _spawn(_average_worker, (2, str(tmp_path)), lambda k: tmp_path / f"average{k}.pt")
    r0, r1 = (torch.load(tmp_path / f"average{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["warned"] == r1["warned"] == ["DistributedGradientsWarning"]     # once, filterable by category
    assert r0["in_place"] and r1["in_place"]
    for l0, l1, s0, s1 in zip(r0["local"], r1["local"], r0["synced"], r1["synced"]):
        assert not torch.equal(l0, l1)                # different data per process
        torch.testing.assert_close(s0, (l0 + l1) / 2)
        assert torch.equal(s0, s1)


# ---------------------------------------------------------------------------- banks and several processes
def trained(n=2, active=False, seed=100):
    """A controller over make_sites() with ``n`` finished concepts (and an active one)."""
    c = CLoRAController(make_sites(), rank=2, backend="reference")
    g = torch.Generator().manual_seed(seed)
    for t in range(n + int(active)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + t)               # the same A in every process
            c.begin_concept(f"<k{t}>")
        with torch.no_grad():
            for p in c.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        if t < n:
            c.end_concept()
    return c


def _state(c):
    return ([k.idx for k in c.concepts], [None if p is None else p.clone() for p in c._past])


def _same_state(a, b):
    return a[0] == b[0] and all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                                for x, y in zip(a[1], b[1]))


def _run_child(code, timeout=60):
    """Run ``code`` in a fresh interpreter that can import this module (as ``T``); returns the CompletedProcess."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", f"import test_multiprocess as T\n{code}"], env=env, timeout=timeout,
                          capture_output=True, text=True)


def _save_and_die_before_manifest(path, n):
    """Save trained(n) into ``path`` and SIGKILL this process when the manifest is about to replace the old one:
    the data files and the manifest's temporary file are written, the manifest is not."""
    import clora_fast.bank as bank
    real = bank.os.replace

    def replace(src, dst):
        if os.path.basename(str(dst)) == bank.MANIFEST:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)

    bank.os.replace = replace
    trained(n).save(path)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_writer_killed_mid_save_leaves_the_last_complete_bank(tmp_path):
    """SIGKILL of a process in the middle of a save: the folder still loads as the last complete save.  The next
    save removes the killed writer's leftovers (the temporary files were never removed: every killed save left
    its files' size behind for good).  A *first* save killed before its manifest left data files without one,
    and every later save into that folder was refused as 'not a clora_fast bank'."""
    from clora_fast.bank import MANIFEST
    path = tmp_path / "bank"
    trained(1).save(path)
    before = sorted(os.listdir(path))
    r = _run_child(f"T._save_and_die_before_manifest({str(path)!r}, 3)")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    left = sorted(os.listdir(path))
    assert any(n.startswith(f".{MANIFEST}.") and n.endswith(".tmp") for n in left), left   # the kill was mid-save
    c = CLoRAController(make_sites(), rank=2, backend="reference")
    c.load_bank(path)
    assert _same_state(_state(c), _state(trained(1)))
    trained(2).save(path)                       # the next save completes and cleans up
    assert not [n for n in os.listdir(path) if n.endswith(".tmp")]
    c.load_bank(path)
    assert _same_state(_state(c), _state(trained(2)))
    assert len(os.listdir(path)) == len(before) + 1        # manifest, past, one file per concept

    fresh = tmp_path / "fresh"                  # killed during the first save into a folder
    r = _run_child(f"T._save_and_die_before_manifest({str(fresh)!r}, 2)")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert MANIFEST not in os.listdir(fresh) and any(n.endswith(".safetensors") for n in os.listdir(fresh))
    trained(2).save(fresh)
    c.load_bank(fresh)
    assert _same_state(_state(c), _state(trained(2)))
    assert not [n for n in os.listdir(fresh) if n.endswith(".tmp")]


def test_a_save_into_a_new_folder_while_another_first_save_runs_waits(tmp_path, monkeypatch):
    """Two processes saving into the same new bank folder: the second one checked the folder before taking the
    lock, found the first one's data files without a manifest yet and refused with 'the folder is not empty and
    is not a clora_fast bank'.  It now waits for the lock and the last save wins."""
    import threading

    import clora_fast.bank as bank
    fcntl = pytest.importorskip("fcntl")
    path = tmp_path / "bank"
    a, b = trained(1), trained(2)
    real_flock, real_write = fcntl.flock, bank.atomic_write_bytes
    b_waits = threading.Event()
    first = threading.Thread(target=lambda: a.save(path))

    def flock(fd, op):
        if threading.current_thread() is threading.main_thread():
            b_waits.set()
        return real_flock(fd, op)

    def write(p, data):
        if os.path.basename(str(p)) == bank.MANIFEST and threading.current_thread() is first:
            b_waits.wait(10)            # save A stays between its data files and its manifest until B waits
        return real_write(p, data)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(bank, "atomic_write_bytes", write)
    first.start()
    try:
        deadline = time.monotonic() + 10
        while not any(n.endswith(".safetensors") for n in (os.listdir(path) if path.exists() else [])):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        b.save(path)
    finally:
        first.join(20)
    c = CLoRAController(make_sites(), rank=2, backend="reference")
    c.load_bank(path)
    assert _same_state(_state(c), _state(b))


def test_a_data_file_removed_just_before_its_read_is_retried(tmp_path, monkeypatch):
    """A save by another process can remove the previous save's files at any moment of a load: one removed
    between the reader's existence check and its read raised a bare FileNotFoundError (not retried with the
    new manifest like a file found missing by the check)."""
    from pathlib import Path

    path = tmp_path / "bank"
    trained(1).save(path)
    newer = trained(2)
    real = Path.read_bytes
    saved = []

    def read_bytes(self):
        if self.name.startswith("past-") and not saved:      # a file the newer save does not keep
            saved.append(1)
            newer.save(path)            # "another process" replaces the bank right before this read
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    c = CLoRAController(make_sites(), rank=2, backend="reference")
    c.load_bank(path)
    assert saved and _same_state(_state(c), _state(newer))


def _saver_loop(path, seconds, ready):
    """Save two different banks into ``path`` alternately for ``seconds`` (a writer process)."""
    banks = [trained(1), trained(3)]
    open(ready, "w").close()
    end, k = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        banks[k % 2].save(path)
        k += 1
    print("saves", k)


def test_loads_while_another_process_saves_see_complete_banks(tmp_path):
    """Rank 0 saves (repeatedly, two different banks) while this process loads the same folder: every load
    gives one of the two complete banks, never an error or a mixture."""
    path = tmp_path / "bank"
    trained(1).save(path)
    here = os.path.dirname(os.path.abspath(__file__))
    ready = tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", f"import test_multiprocess as T; "
                                                   f"T._saver_loop({str(path)!r}, 4.0, {str(ready)!r})"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        states = [_state(trained(1)), _state(trained(3))]
        seen = set()
        c = CLoRAController(make_sites(), rank=2, backend="reference")
        while proc.poll() is None:
            c.load_bank(path)
            got = _state(c)
            assert any(_same_state(got, s) for s in states)
            seen.add(len(got[0]))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert int(out.split()[-1]) > 2


# ---------------------------------------------------------------------------- the CLI: two runs on one --out
def _concept_folder(root, name, seed):
    import numpy as np
    from PIL import Image
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(2):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return str(d)


CLI_FAST = ["--resolution", "16", "--steps", "2", "--samples-per-concept", "0", "--batch-size", "1",
            "--no-progress", "--backend", "reference", "--threads", "1"]


def _cli_run_paused(argv, started, go):
    """``clora-fast train`` (in this process) that stops after its first optimizer step until ``go`` exists."""
    from pathlib import Path

    from clora_fast import cli

    def hook(pos, step):
        if pos == 0 and step == 0:
            Path(started).touch()
            deadline = time.monotonic() + 60
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.05)

    cli.STEP_HOOK = hook
    sys.exit(cli.main(argv))


def test_two_train_runs_on_one_out_folder(tmp_path, capsys):
    """`clora-fast train` launched twice on the same --out: both runs trained every remaining concept and saved
    over each other's bank (the last save won; a run that started during the other's first save was refused as
    'not a concept bank').  The second run is now refused at once, naming the running one; once that one has
    finished, a rerun resumes as usual."""
    pytest.importorskip("diffusers")
    pytest.importorskip("accelerate")
    from clora_fast import cli
    concepts = [_concept_folder(tmp_path / "data", "alpha", 1)]
    out = tmp_path / "bank"
    argv = ["train", "--model", "builtin", "--concepts", *concepts, "--out", str(out), *CLI_FAST]
    started, go = tmp_path / "started", tmp_path / "go"
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    first = subprocess.Popen([sys.executable, "-c", f"import test_multiprocess as T; "
                                                    f"T._cli_run_paused({argv!r}, {str(started)!r}, {str(go)!r})"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not started.exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run did not start training"
            time.sleep(0.1)
        rc = cli.main(argv)                                  # the second run, while the first one trains
        err = capsys.readouterr().err
        assert rc == 2 and "another clora-fast train is running" in err and str(first.pid) in err, err
        go.touch()
        _, first_err = first.communicate(timeout=120)
    finally:
        go.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, first_err[-3000:]
    assert not (out / cli.TRAIN_LOCK).exists()
    m = read_manifest_names(out)
    assert m == ["<alpha>"]
    assert cli.main(argv) == 0                               # after it: a rerun resumes (nothing left to learn)
    assert "already in" in capsys.readouterr().out


def read_manifest_names(out):
    import json
    with open(os.path.join(out, "manifest.json")) as f:
        return [c["name"] for c in json.load(f)["concepts"]]


def test_train_out_folder_of_a_killed_first_save_is_a_new_bank(tmp_path):
    """A first save killed before its manifest leaves only data files: `train` refused that --out for good ('not
    empty and holds no concept bank'); it is a bank that was never finished, so the run starts it anew."""
    pytest.importorskip("diffusers")
    pytest.importorskip("accelerate")
    from clora_fast import cli
    out = tmp_path / "bank"
    r = _run_child(f"T._save_and_die_before_manifest({str(out)!r}, 1)")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert cli._bank_state(out) == "new"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(cli.CLIError, match="holds no concept bank"):
        cli._bank_state(out)


# ---------------------------------------------------------------------------- DDP around patched models
D = 32


def _vit(fw):
    torch.manual_seed(0)
    if fw == "hf":
        from transformers import ViTConfig, ViTForImageClassification
        m = ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=D,
                                                num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                                num_labels=3))
    else:
        timm = pytest.importorskip("timm")
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                              embed_dim=D, depth=2, num_heads=4, num_classes=3)
    m.eval().requires_grad_(False)
    for n, p in m.named_parameters():          # the classifier head trains (DDP needs a parameter to sync)
        p.requires_grad_(n.startswith(("classifier.", "head.")))
    return m


def _vit_setup(fw, order):
    """A patched ViT with one finished concept and the next one begun; ``order``: when DDP wraps it."""
    import clora_fast
    from torch.nn.parallel import DistributedDataParallel as DDP
    m = _vit(fw)
    ddp = DDP(m) if order == "ddp_then_patch" else None
    cl = clora_fast.patch(m, rank=2, backend="reference", penalty_weight=10.0)
    if order == "patch_then_ddp":
        ddp = DDP(m)
    for t in range(2):
        if t == 1 and order == "ddp_then_begin":
            ddp = DDP(m)
        torch.manual_seed(10 + t)              # the same A on every process
        cl.begin_concept(f"task{t}")
        with torch.no_grad():
            g = torch.Generator().manual_seed(20 + t)
            for p in cl.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        if t == 0:
            cl.end_concept()
    return m, ddp, cl


def _vit_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)


def _vit_loss(model, cl, x, y):
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    return torch.nn.functional.cross_entropy(logits, y) + cl.penalty()


def _grads(m, cl):
    return {"ctrl": [p.grad.clone() for p in cl.trainable_parameters()],
            "head": [p.grad.clone() for p in m.parameters() if p.requires_grad]}


def _ddp_vit_worker(rank, world, tmp, cases):
    import warnings
    warnings.simplefilter("ignore")
    _init(rank, world, tmp)
    res = {}
    try:
        x, y = _vit_batch()
        for fw, order in cases:
            m, ddp, cl = _vit_setup(fw, order)
            _vit_loss(ddp, cl, x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2]).backward()
            cl.all_reduce_grads()
            res[(fw, order)] = _grads(m, cl)
            torch.optim.SGD(cl.trainable_parameters(), lr=0.5).step()
            cl.end_concept()
            bank = os.path.join(tmp, f"bank-{fw}-{order}")
            if rank == 0:
                cl.save(bank)                  # one process saves ...
            dist.barrier()
            c2 = _vit_setup(fw, "none")[2]
            c2.end_concept()
            c2.load_bank(bank)                 # ... every process loads: the same state as its own
            res[(fw, order, "same_as_bank")] = all(
                torch.equal(cl.past(i), c2.past(i)) for i in range(cl.num_sites))
            dist.barrier()
    finally:
        torch.save(res, os.path.join(tmp, f"vit{rank}.pt"))
        dist.destroy_process_group()


def test_ddp_patched_vit_gradients_match_the_single_process_batch(tmp_path):
    """transformers and timm ViTs patched before or after DistributedDataParallel wraps them (and a concept begun
    after wrapping): with all_reduce_grads(), both processes hold the same gradients, equal to those of one
    process on the concatenated batch; after end_concept both hold the same state, which rank 0's bank holds."""
    pytest.importorskip("transformers")
    cases = [("hf", "ddp_then_patch"), ("timm", "ddp_then_begin")]
    try:
        import timm  # noqa: F401
    except ImportError:
        cases = [("hf", "ddp_then_patch"), ("hf", "ddp_then_begin")]
    _spawn(_ddp_vit_worker, (2, str(tmp_path), cases), lambda k: tmp_path / f"vit{k}.pt")
    r = [torch.load(tmp_path / f"vit{k}.pt", weights_only=False) for k in (0, 1)]
    x, y = _vit_batch()
    for fw, order in cases:
        m, _, cl = _vit_setup(fw, "none")
        _vit_loss(m, cl, x, y).backward()
        want = _grads(m, cl)
        for kind in ("ctrl", "head"):
            for a, b, w in zip(r[0][(fw, order)][kind], r[1][(fw, order)][kind], want[kind]):
                assert torch.equal(a, b), (fw, order, kind)
                torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)
        assert r[0][(fw, order, "same_as_bank")] and r[1][(fw, order, "same_as_bank")]


# ---------------------------------------------------------------------------- the CLI's training loop
def _cli_train_worker(rank, world, tmp, port):
    import warnings
    warnings.simplefilter("ignore")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="true",
                      HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    res = {}
    try:
        from accelerate import Accelerator

        import clora_fast
        from clora_fast import cli
        acc = Accelerator(cpu=True)
        res["processes"] = acc.num_processes
        pipe = cli._load_model("builtin", acc.device)
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False)
        cl = clora_fast.patch(pipe, rank=2, backend="reference")
        torch.manual_seed(1)                      # the same init on every process (as the CLI seeds it)
        cl.begin_concept("<x>")
        res["init"] = [p.detach().clone() for p in cl.trainable_parameters()]
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        g = torch.Generator().manual_seed(100 + rank)        # each process its own images and noise
        imgs = torch.rand(2, 3, size, size, generator=g) * 2 - 1
        with torch.no_grad():
            lat = pipe.vae.encode(imgs).latent_dist
        cli.train_concept(pipe, cl, lat.mean, lat.std, "a photo of <x>", steps=2, lr=1e-2, batch_size=1,
                          generator=g, accelerator=acc)
        res["trained"] = [p.detach().clone() for p in cl.trainable_parameters()]
    finally:
        torch.save(res, os.path.join(tmp, f"cli{rank}.pt"))


def test_cli_training_loop_on_two_processes_keeps_them_in_step(tmp_path):
    """clora-fast train's loop under accelerate with two CPU processes, each on its own data: the controller's
    parameters (LoRA factors and the token row: not the UNet's, so no DDP syncs them) get averaged gradients
    and stay identical on both processes."""
    pytest.importorskip("accelerate")
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _spawn(_cli_train_worker, (2, str(tmp_path), port), lambda k: tmp_path / f"cli{k}.pt")
    r = [torch.load(tmp_path / f"cli{k}.pt", weights_only=False) for k in (0, 1)]
    assert r[0]["processes"] == r[1]["processes"] == 2
    assert len(r[0]["trained"]) == len(r[1]["trained"]) >= 3          # flat A, flat B, the token row
    for a, b, init in zip(r[0]["trained"], r[1]["trained"], r[0]["init"]):
        assert torch.equal(a, b)
        assert not torch.equal(a, init)


# ---------------------------------------------------------------------------- DataLoader workers
class _Prompts(torch.utils.data.Dataset):
    """Tokenizes prompts with the tokenizer it was given (a patched pipeline's, holding a concept's token)."""

    def __init__(self, tokenizer, prompts):
        self.tokenizer, self.prompts = tokenizer, prompts

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return torch.tensor(self.tokenizer(self.prompts[i], add_special_tokens=False).input_ids)


@pytest.mark.parametrize("start", ["spawn", "fork"])
def test_dataloader_workers_get_the_patched_tokenizer(start):
    """A patched pipeline's tokenizer (with a concept's token and clora_fast's save guard) in DataLoader workers
    (num_workers=2): it pickles, and the workers tokenize the concept's token to its one id."""
    import multiprocessing
    pytest.importorskip("diffusers")
    if start not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {start!r} start method here")
    import clora_fast
    from clora_fast.builtin import build_pipeline
    pipe = build_pipeline()
    pipe.unet.requires_grad_(False)
    cl = clora_fast.patch(pipe, rank=2, backend="reference")
    torch.manual_seed(0)
    cl.begin_concept("<zq>")
    tid = pipe.tokenizer.convert_tokens_to_ids("<zq>")
    copy = pickle.loads(pickle.dumps(pipe.tokenizer))
    with pytest.raises(RuntimeError, match="personalized tokens"):
        copy.save_pretrained("never-written")          # the guard travels with the tokenizer
    data = _Prompts(pipe.tokenizer, ["a photo of <zq>", "<zq>"] * 2)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2, multiprocessing_context=start)
    got = [t.tolist() for t in loader]
    assert all(ids[-1] == tid for ids in got) and got[1] == [tid], got


def _cli_rank(rank, port, tmp, argv, crash_at=None):
    """One process of a 2-process ``clora-fast train`` under accelerate (CPU, gloo): the environment that
    ``accelerate launch --cpu --num_processes 2`` gives each process.  Records a hash of the trained tensors at
    each end_concept, and the exit status."""
    import hashlib
    import warnings

    os.environ.update(ACCELERATE_USE_CPU="true", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    from clora_fast import cli
    from clora_fast.controller import CLoRAController

    end = CLoRAController.end_concept

    def recording_end(self):
        h = hashlib.sha256()
        for p in self.trainable_parameters():
            h.update(p.detach().float().numpy().tobytes())
        with open(os.path.join(tmp, f"hash{rank}_{self.active_concept}"), "w") as f:
            f.write(h.hexdigest())
        return end(self)

    CLoRAController.end_concept = recording_end
    if crash_at is not None:                    # the same step on both processes (after its all-reduce)
        def crash(pos, step):
            if (pos, step) == tuple(crash_at):
                raise RuntimeError("boom: simulated crash")
        cli.STEP_HOOK = crash
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rc = cli.main(argv)
        except RuntimeError as e:
            rc = f"crash: {e}"
    ours = [str(w.message) for w in caught if "clora_fast" in str(w.message)]
    with open(os.path.join(tmp, f"rc{rank}"), "w") as f:
        f.write(f"{rc}\n" + "\n".join(ours))


def test_cli_train_with_two_accelerate_processes(tmp_path):
    """`clora-fast train` in 2 processes (accelerate, CPU, gloo): each process draws other batches (its own
    data generator), the gradients are averaged every step, so both hold the same factors and token rows at
    every concept's end; only the main process writes the bank and logs; no warning tells the CLI to call the
    all-reduce it calls.  With --checkpoint-every, a run stopped mid-concept goes on from the checkpoint (each
    process with its own data generator's state) to the bank the uninterrupted run wrote, bit for bit."""
    pytest.importorskip("diffusers")
    pytest.importorskip("accelerate")
    import json
    import socket

    concepts = [_concept_folder(tmp_path / "data", "alpha", 1), _concept_folder(tmp_path / "data", "beta", 2)]
    out = tmp_path / "bank"
    argv = ["train", "--model", "builtin", "--concepts", *concepts, "--out", str(out), *CLI_FAST,
            "--batch-size", "2", "--steps", "3"]

    def run(args, crash_at=None):
        for f in tmp_path.glob("rc*"):
            f.unlink()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        _spawn(_cli_rank, (port, str(tmp_path), args, crash_at), lambda k: str(tmp_path / f"rc{k}"), timeout=240)
        return [[line for line in (tmp_path / f"rc{k}").read_text().split("\n") if line] for k in range(2)]

    got = run(argv)
    assert [g[0] for g in got] == ["0", "0"], got
    assert [g[1:] for g in got] == [[], []], got                  # no clora_fast warning on either process
    assert read_manifest_names(out) == ["<alpha>", "<beta>"]
    for c in (0, 1):
        hashes = {(tmp_path / f"hash{k}_{c}").read_text() for k in range(2)}
        assert len(hashes) == 1, f"concept {c}: the processes' factors differ"
    with open(out / "clora_fast_train.json") as f:
        assert sorted(json.load(f)) == ["<alpha>", "<beta>"]
    ck = ["train", "--model", "builtin", "--concepts", *concepts, "--out", str(tmp_path / "ck"), *CLI_FAST,
          "--batch-size", "2", "--steps", "3", "--checkpoint-every", "2"]
    got = run(ck, crash_at=(1, 2))
    assert [g[0] for g in got] == ["crash: boom: simulated crash"] * 2, got
    assert read_manifest_names(tmp_path / "ck") == ["<alpha>"]
    assert (tmp_path / "ck" / ".clora_fast_resume.safetensors").is_file()
    got = run(ck)
    assert [g[0] for g in got] == ["0", "0"], got
    assert (tmp_path / "ck" / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
