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

    import clora_fast.bank as bank
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
