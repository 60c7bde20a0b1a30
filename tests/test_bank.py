"""The concept bank on disk: round trip, atomic layout, checksums, refusals (state unchanged)."""
import json
import os

import pytest
import torch

from clora_fast.bank import MANIFEST, BankError, check_identity, model_identity, read_manifest
from clora_fast.controller import CLoRAController, Site

IN = 10
OUTS = (6, 12, 6, 12)


def sites(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [Site(f"blk{i // 2}.{'kv'[i % 2]}", torch.randn(o, IN, generator=g).to(dtype),
                 torch.randn(o, generator=g).to(dtype) if i == 0 else None, "g") for i, o in enumerate(OUTS)]


def trained(n=3, active=True, rank=3, seed=0, s=None):
    c = CLoRAController(s or sites(seed), rank=rank, alpha=2.0 * rank, penalty_weight=7.0, backend="reference")
    g = torch.Generator().manual_seed(100)
    for t in range(n + int(active)):
        c.begin_concept(f"<k{t}>")
        with torch.no_grad():
            for p in c.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        if t < n:
            c.end_concept()
    return c


def snapshot(c):
    return ([None if p is None else p.clone() for p in c._past], [k.idx for k in c.concepts], c.active_concept,
            [p.detach().clone() for p in c.trainable_parameters()], c._next_idx)


def same(a, b):
    pa, ca, aa, ta, na = a
    pb, cb, ab, tb, nb = b
    return (ca == cb and aa == ab and na == nb and len(ta) == len(tb)
            and all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                    for x, y in zip(pa, pb))
            and all(torch.equal(x, y) for x, y in zip(ta, tb)))


def outputs(c, x):
    return c.project_group("g", x)


def test_round_trip_exact(tmp_path):
    c = trained()
    c.remove_concept(1)
    path = tmp_path / "bank"
    c.save(path)
    files = sorted(os.listdir(path))
    assert MANIFEST in files and all(f == MANIFEST or f.endswith(".safetensors") for f in files)
    m = read_manifest(path)
    assert m["rank"] == 3 and m["alpha"] == 6.0 and m["penalty_weight"] == 7.0
    assert [d["idx"] for d in m["concepts"]] == [0, 2, 3] and m["concepts"][-1]["active"]
    assert m["retired"] == [{"idx": 1, "name": "<k1>"}]
    for stem, entry in m["files"].items():    # sha256 per file, recorded in the manifest
        assert len(entry["sha256"]) == 64 and (path / entry["name"]).stat().st_size == entry["bytes"]
    c2 = CLoRAController.load_state(path, sites())
    assert (c2.rank, c2.alpha, c2.penalty_weight) == (3, 6.0, 7.0)
    assert same(snapshot(c), snapshot(c2))
    assert c2.active_name == "<k3>" and all(p.requires_grad for p in c2.trainable_parameters())
    x = torch.randn(4, IN)
    for a, b in zip(outputs(c, x), outputs(c2, x)):
        assert torch.equal(a, b)
    assert torch.equal(c.penalty(), c2.penalty())
    # names/indices continue where they stopped
    c2.end_concept()
    with pytest.raises(ValueError, match="already exists"):
        c2.begin_concept("<k1>")
    assert c2.begin_concept() == 4


def test_resave_replaces_files_atomically(tmp_path):
    c = trained(n=2, active=False)
    path = tmp_path / "bank"
    c.save(path)
    first = set(os.listdir(path))
    c.save(path)                                     # unchanged state: same content-addressed files
    assert set(os.listdir(path)) == first
    c.remove_concept(0)
    c.save(path)
    now = set(os.listdir(path))
    m = read_manifest(path)
    assert {e["name"] for e in m["files"].values()} | {MANIFEST} == now   # old files gone, no temp files
    assert not any(f.startswith(".") for f in now)
    c2 = CLoRAController.load_state(path, sites())
    assert [k.idx for k in c2.concepts] == [1]


def test_refuses_to_write_into_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileExistsError, match="not a clora_fast bank"):
        trained(n=1, active=False).save(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        trained(n=1, active=False).save(tmp_path / "f")


def _victim(path, kind):
    m = read_manifest(path)
    return path / m["files"][kind]["name"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest_json", "manifest_rank",
                                    "manifest_format"])
def test_corrupted_bank_is_refused_and_nothing_changes(tmp_path, damage):
    src = trained()
    path = tmp_path / "bank"
    src.save(path)
    if damage == "truncate":
        f = _victim(path, "concept-1")
        f.write_bytes(f.read_bytes()[:-9])
        msg = "truncated or modified"
    elif damage == "flip":
        f = _victim(path, "past")
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x40
        f.write_bytes(bytes(b))
        msg = "sha256 checksum mismatch"
    elif damage == "delete":
        _victim(path, "concept-0").unlink()
        msg = "missing"
    elif damage == "manifest_json":
        (path / MANIFEST).write_text((path / MANIFEST).read_text()[:-40])
        msg = "not valid JSON"
    elif damage == "manifest_rank":
        # a consistent-looking manifest with another rank: the factors' shapes give it away
        m = json.loads((path / MANIFEST).read_text())
        m["rank"] = 2
        m["alpha"] = 6.0
        (path / MANIFEST).write_text(json.dumps(m))
        dst = CLoRAController(sites(), rank=2, alpha=6.0)
        before = snapshot(dst)
        with pytest.raises(BankError, match="rank/shape mismatch"):
            dst.load_bank(path)
        assert same(before, snapshot(dst))
        return
    else:
        m = json.loads((path / MANIFEST).read_text())
        m["format"] = "something.else"
        (path / MANIFEST).write_text(json.dumps(m))
        msg = "not a clora_fast concept bank"
    dst = trained(n=1, active=True, seed=0)              # a controller with state of its own
    before = snapshot(dst)
    with pytest.raises(BankError, match=msg):
        dst.load_bank(path, replace_active=True)
    assert same(before, snapshot(dst))


def test_rank_mismatch_and_other_model_refused(tmp_path):
    path = tmp_path / "bank"
    trained().save(path)
    dst = CLoRAController(sites(), rank=2, alpha=6.0)
    dst.begin_concept()
    before = snapshot(dst)
    with pytest.raises(BankError, match="rank mismatch: the bank .* has rank 3 but the controller has rank 2"):
        dst.load_bank(path)
    assert same(before, snapshot(dst))
    other = CLoRAController(sites(seed=1), rank=3, alpha=6.0)
    with pytest.raises(BankError, match="another base model"):
        other.load_bank(path)
    assert not other.concepts and other.active_concept is None
    with pytest.raises(BankError, match="another base model"):      # other shapes
        s = sites()
        s[1] = Site(s[1].name, torch.randn(OUTS[1] + 2, IN), None, "g")
        CLoRAController(s, rank=3, alpha=6.0).load_bank(path)
    with pytest.raises(BankError, match="alpha mismatch"):
        CLoRAController(sites(), rank=3, alpha=3.0).load_bank(path)
    with pytest.raises(BankError, match="no concept bank"):
        CLoRAController(sites(), rank=3).load_bank(tmp_path / "nowhere")


def test_same_model_in_another_dtype_is_recognised(tmp_path):
    path = tmp_path / "bank"
    trained(active=False).save(path)
    c16 = CLoRAController(sites(dtype=torch.bfloat16), rank=3, alpha=6.0)
    c16.load_bank(path)
    assert [k.idx for k in c16.concepts] == [0, 1, 2]
    ident = model_identity([("a", torch.randn(4, 4))])
    with pytest.raises(BankError, match="another base model"):
        check_identity(ident, model_identity([("a", torch.randn(4, 4))]))


def test_inconsistent_past_is_refused(tmp_path):
    """A bank whose folded past does not equal the fold of its factors (re-checksummed to pass
    the file checks) is refused."""
    import hashlib

    from safetensors.torch import load_file, save_file
    path = tmp_path / "bank"
    trained(active=False).save(path)
    f = _victim(path, "past")
    t = load_file(str(f))
    k = next(iter(t))
    t[k] = t[k] + 1.0
    save_file(t, str(f), metadata={"format": "pt"})
    m = json.loads((path / MANIFEST).read_text())
    data = f.read_bytes()
    m["files"]["past"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BankError, match="does not match the fold"):
        CLoRAController(sites(), rank=3, alpha=6.0).load_bank(path)


def _rewrite_past(path, change):
    """Apply ``change(dict of past tensors)`` to the bank's past file and re-checksum it in the manifest."""
    import hashlib

    from safetensors.torch import load_file, save_file
    f = _victim(path, "past")
    t = load_file(str(f))
    change(t)
    save_file(t, str(f), metadata={"format": "pt"})
    m = json.loads((path / MANIFEST).read_text())
    data = f.read_bytes()
    m["files"]["past"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (path / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("chunk", [256, 3])
def test_past_check_accepts_every_real_fold_and_refuses_a_missing_concept(tmp_path, monkeypatch, chunk):
    """The load's check of P against its factors (float64 GEMMs over chunks of concepts, elementwise rounding
    bound): a long stack whose updates nearly cancel (P tiny next to the partial sums, the worst case for
    the fp32 running sum) loads, whatever the chunking; P without its last concept, or off by 1e-3 of its
    largest entry, is refused."""
    from clora_fast import bank as bank_mod
    monkeypatch.setattr(bank_mod, "_FOLD_CHUNK", chunk)
    c = CLoRAController(sites(), rank=3, alpha=6.0, backend="reference")
    g = torch.Generator().manual_seed(5)
    for t in range(24):
        c.begin_concept(f"<c{t}>")
        with torch.no_grad():
            if t % 2 == 0:
                prev = [torch.randn(p.shape, generator=g) * 30 for p in c.trainable_parameters()]
                for p, v in zip(c.trainable_parameters(), prev):
                    p.copy_(v)
            else:   # A the same, B negated (+0.1%): this concept takes the previous one back out of P
                for j, (p, v) in enumerate(zip(c.trainable_parameters(), prev)):
                    p.copy_(v if j < len(prev) // 2 else -1.001 * v)
        c.end_concept()
    path = tmp_path / "bank"
    c.save(path)
    fresh = CLoRAController(sites(), rank=3, alpha=6.0)
    fresh.load_bank(path)
    assert len(fresh.concepts) == 24

    last = c.concepts[-1]

    def drop_last(t):
        for i, site in enumerate(c.sites):
            t[site.name] = t[site.name] - (last.scale * last.lora_B[i].double() @ last.lora_A[i].double()).float()

    bad = tmp_path / "bad"
    c.save(bad)
    _rewrite_past(bad, drop_last)
    with pytest.raises(BankError, match="does not match the fold"):
        CLoRAController(sites(), rank=3, alpha=6.0).load_bank(bad)

    # no cancellation: a small error in one entry is caught too
    plain = trained(n=3, active=False)
    path2 = tmp_path / "plain"
    plain.save(path2)
    CLoRAController(sites(), rank=3, alpha=6.0).load_bank(path2)

    def nudge(t):
        k = next(iter(t))
        t[k][0, 0] += 1e-3 * float(t[k].abs().max())

    _rewrite_past(path2, nudge)
    with pytest.raises(BankError, match="does not match the fold"):
        CLoRAController(sites(), rank=3, alpha=6.0).load_bank(path2)


def test_a_load_starved_by_back_to_back_saves_reads_under_the_save_lock(tmp_path, monkeypatch):
    """Loads take no lock and re-read a save that replaced the one they were reading; when that happens
    _READ_TRIES times in a row (another process saving back to back), the load reads under the save lock
    instead of failing (the multi-process test of loads during saves failed about one run in four)."""
    from pathlib import Path

    from clora_fast import bank as B
    path = tmp_path / "bank"
    c = trained(active=False)
    c.save(path)
    real_files, real_manifest = B.read_files, B.read_manifest
    seen = {"unlocked": 0, "locked": 0, "saves": 0}

    def racing_files(p, m):
        if (Path(p) / B.LOCK).exists():
            seen["locked"] += 1
            return real_files(p, m)
        seen["unlocked"] += 1
        raise B._BankFileMissing("removed by a newer save")          # every unlocked read loses the race

    def newer_each_time(p):
        seen["saves"] += 1
        return dict(real_manifest(p), producer=f"save {seen['saves']}")  # another save replaced the manifest

    monkeypatch.setattr(B, "read_files", racing_files)
    monkeypatch.setattr(B, "read_manifest", newer_each_time)
    fresh = CLoRAController(sites(), rank=3, alpha=6.0)
    fresh.load_bank(path)
    assert seen["unlocked"] == B._READ_TRIES and seen["locked"] == 1
    assert [k.idx for k in fresh.concepts] == [k.idx for k in c.concepts]
    assert not (path / B.LOCK).exists()


class _Rows:
    """A minimal adapter with per-concept extra state (as the diffusers integration's token rows)."""

    def __init__(self):
        self.rows = {}

    def on_begin_concept(self, name, idx):
        self.rows[idx] = torch.full((4,), float(idx))

    def extra_state(self, idx):
        return {"row": self.rows[idx]} if idx in self.rows else {}


def test_a_save_serializes_only_what_changed(tmp_path, monkeypatch):
    """Saves remember which files hold which tensors: an unchanged past and unchanged finished concepts keep
    their files (a save with T concepts no longer serializes and hashes all T); whatever changed is written:
    the active concept every time, a factor written in place, a token row written through .data, a file
    touched or removed on disk, another folder. Every bank reloads to the controller's state."""
    from clora_fast import bank as B
    written = []
    real = B._serialize

    def counting(tensors):
        written.append(sorted(tensors)[0].split(".")[0] if tensors else "?")
        return real(tensors)

    monkeypatch.setattr(B, "_serialize", counting)
    ad = _Rows()
    c = CLoRAController(sites(), rank=3, alpha=6.0, backend="reference", adapter=ad)
    g = torch.Generator().manual_seed(3)
    for t in range(3):
        c.begin_concept(f"<k{t}>")
        with torch.no_grad():
            for p_ in c.trainable_parameters():
                p_.add_(torch.randn(p_.shape, generator=g) * 0.3)
        c.end_concept()
    path = tmp_path / "bank"

    def save():
        written.clear()
        c.save(path)
        fresh = CLoRAController(sites(), rank=3, alpha=6.0)
        fresh.load_bank(path)
        assert [k.idx for k in fresh.concepts] == [k.idx for k in c.concepts]
        for i in range(c.num_sites):
            assert torch.equal(fresh.past(i), c.past(i))
        return len(written)

    assert save() == 4                              # past + 3 concepts
    assert save() == 0                              # nothing changed
    c.begin_concept("<k3>")
    assert save() == 1                              # the active concept only
    assert save() == 1                              # (always: it changes every step)
    c.end_concept()
    assert save() == 2                              # the new past and the concept just finished
    with torch.no_grad():
        ad.rows[1].data.add_(1.0)                   # a token row written through .data (no version change)
    assert save() == 1
    with torch.no_grad():
        c.concepts[0].lora_A[0].mul_(1.0)           # a factor written in place (same values, a new version)
    assert save() == 1
    os.utime(next(path.glob("concept-0-*.safetensors")), ns=(1, 1))    # touched on disk
    assert save() == 1
    next(path.glob("concept-2-*.safetensors")).unlink()                # removed on disk
    assert save() == 1
    c.remove_concept(3)                             # a new past; concept 3's file goes
    assert save() == 1
    assert not list(path.glob("concept-3-*"))
    written.clear()
    c.save(tmp_path / "other")                      # another folder: everything
    assert len(written) == 4


def test_empty_controller_round_trip(tmp_path):
    c = CLoRAController(sites(), rank=2)
    c.save(tmp_path / "b")
    c2 = CLoRAController.load_state(tmp_path / "b", sites())
    assert c2.pristine and not c2.concepts


def test_load_does_not_discard_an_active_concept_silently(tmp_path):
    path = tmp_path / "bank"
    trained(active=False).save(path)
    dst = CLoRAController(sites(), rank=3, alpha=6.0)
    dst.begin_concept("<mine>")
    before = snapshot(dst)
    with pytest.raises(RuntimeError, match="would discard it"):
        dst.load_bank(path)
    assert same(before, snapshot(dst))
    dst.load_bank(path, replace_active=True)
    assert dst.active_concept is None and [k.idx for k in dst.concepts] == [0, 1, 2]
    # reloading the checkpoint of the concept being learned (same index and name) is a rollback
    src = trained(active=True)
    src.save(tmp_path / "ckpt")
    with torch.no_grad():
        src.trainable_parameters()[1].add_(1.0)
    src.load_bank(tmp_path / "ckpt")
    assert same(snapshot(src), snapshot(CLoRAController.load_state(tmp_path / "ckpt", sites())))


def test_files_get_the_umask_mode_not_0600(tmp_path):
    """Bank files (and exports, which use the same atomic write) are created like open() creates
    files: mode 0o666 & ~umask (the temporary file of the atomic write is 0600)."""
    import stat

    from clora_fast.bank import atomic_write_bytes
    old = os.umask(0o027)
    try:
        c = trained(n=2, active=True)
        c.save(tmp_path / "bank")
        c.export_lora(tmp_path / "lora.safetensors")
        atomic_write_bytes(tmp_path / "x.bin", b"x")
    finally:
        os.umask(old)
    files = sorted((tmp_path / "bank").iterdir()) + [tmp_path / "lora.safetensors", tmp_path / "x.bin"]
    assert len(files) == 7          # manifest, past, 3 concepts (one active), 2 exports
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f
    os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "x.bin", b"y")       # replacing an existing file
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == 0o644


_MALFORMED = {
    # name: (edit of the manifest dict, the field the error must name)
    "file_list": (lambda m: m["concepts"][0].__setitem__("file", []), "'concepts[0].file'"),
    "file_dict": (lambda m: m["concepts"][1].__setitem__("file", {}), "'concepts[1].file'"),
    "file_of_past": (lambda m: m["concepts"][0].__setitem__("file", "past"), "'past'"),
    "file_shared": (lambda m: m["concepts"][1].__setitem__("file", m["concepts"][0]["file"]), "'concepts[1].file'"),
    "past_list": (lambda m: m.__setitem__("past", []), "'past'"),
    "past_dict": (lambda m: m.__setitem__("past", {"a": 1}), "'past'"),
    "alpha_nan": (lambda m: m.__setitem__("alpha", float("nan")), "'alpha'"),
    "alpha_inf": (lambda m: m.__setitem__("alpha", float("inf")), "'alpha'"),
    "alpha_zero": (lambda m: m.__setitem__("alpha", 0.0), "'alpha'"),
    "penalty_nan": (lambda m: m.__setitem__("penalty_weight", float("nan")), "'penalty_weight'"),
    "penalty_negative": (lambda m: m.__setitem__("penalty_weight", -1.0), "'penalty_weight'"),
    "next_idx_negative": (lambda m: m.__setitem__("next_idx", -1), "'next_idx'"),
    "idx_negative": (lambda m: m["concepts"][0].__setitem__("idx", -5), "'concepts[0].idx'"),
    "idx_bool": (lambda m: m["concepts"][0].__setitem__("idx", False), "'concepts[0].idx'"),
    "idx_repeated": (lambda m: m["concepts"][1].__setitem__("idx", 0), "'concepts[1].idx'"),
    "idx_of_retired": (lambda m: m["concepts"][1].__setitem__("idx", 1), "'retired[0].idx'"),
    "scale_nan": (lambda m: m["concepts"][0].__setitem__("scale", float("nan")), "'concepts[0].scale'"),
    "name_repeated": (lambda m: m["concepts"][1].__setitem__("name", m["concepts"][0]["name"]),
                      "'concepts[1].name'"),
    "name_empty": (lambda m: m["concepts"][0].__setitem__("name", ""), "'concepts[0].name'"),
    "retired_name_of_concept": (lambda m: m["retired"][0].__setitem__("name", m["concepts"][0]["name"]),
                                "'retired[0].name'"),
    "retired_not_object": (lambda m: m.__setitem__("retired", [1]), "'retired[0]'"),
    "token_twice": (lambda m: m.__setitem__("adapter", {"tokens": {"0": "<k0>", "2": "<k0>"}}),
                    "'adapter.tokens[2]'"),
    "token_of_unheld_concept": (lambda m: m.__setitem__("adapter", {"tokens": {"1": "<k1>"}}),
                                "'adapter.tokens[1]'"),
    "token_also_retired": (lambda m: m.__setitem__("adapter", {"tokens": {"0": "<k0>"},
                                                               "retired_tokens": ["<k0>"]}),
                           "'adapter.retired_tokens'"),
    "tokens_list": (lambda m: m.__setitem__("adapter", {"tokens": ["<k0>"]}), "'adapter.tokens'"),
    "adapter_list": (lambda m: m.__setitem__("adapter", []), "'adapter'"),
    "source_empty": (lambda m: m["concepts"][0].__setitem__("source", ""), "'concepts[0].source'"),
    "source_number": (lambda m: m["concepts"][0].__setitem__("source", 3), "'concepts[0].source'"),
}


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_malformed_manifest_values_are_a_bank_error_naming_the_field(tmp_path, case):
    """Unhashable, non-finite, negative or repeated manifest values: a BankError that names the
    field (not a TypeError, not a silent load), and the controller is left as it was."""
    import re as _re
    src = trained()
    src.remove_concept(1)
    path = tmp_path / "bank"
    src.save(path)
    m = json.loads((path / MANIFEST).read_text())
    edit, field = _MALFORMED[case]
    edit(m)
    (path / MANIFEST).write_text(json.dumps(m))
    dst = trained(n=1, active=True, seed=0)
    before = snapshot(dst)
    with pytest.raises(BankError, match=_re.escape(f"manifest field {field}") + "|" + _re.escape(f"field {field}")):
        dst.load_bank(path, replace_active=True)
    assert same(before, snapshot(dst))


_FOREIGN_MANIFESTS = {
    # name: what the folder's manifest.json is (it must survive a save into the folder unchanged)
    "web_app": '{"name": "my web app", "version": "1.0"}\n',
    "other_format": '{"format": "something.else", "version": 1}\n',
    "json_list": '[1, 2, 3]\n',
    "not_json": "<html>not json</html>\n",
    "folder": None,
}


@pytest.mark.parametrize("case", sorted(_FOREIGN_MANIFESTS))
def test_refuses_to_overwrite_a_foreign_manifest(tmp_path, case):
    """A folder with another tool's manifest.json is not a bank: a save refuses it (FileExistsError naming
    the manifest) like any other foreign folder, and the folder is left as it was."""
    import re as _re
    text = _FOREIGN_MANIFESTS[case]
    mf = tmp_path / MANIFEST
    if text is None:
        mf.mkdir()
    else:
        mf.write_text(text)
    (tmp_path / "index.html").write_text("<html>precious</html>")
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="not a clora_fast bank.*" + _re.escape(repr(str(mf)))):
        trained(n=1, active=False).save(tmp_path)
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in tmp_path.iterdir()} == before
    if text is not None:                              # alone in its folder: refused too
        (tmp_path / "index.html").unlink()
        with pytest.raises(FileExistsError, match="not a clora_fast bank"):
            trained(n=1, active=False).save(tmp_path)
        assert mf.read_text() == text


def test_overlapping_saves_into_one_bank_leave_a_loadable_bank(tmp_path, monkeypatch):
    """Save B starts while save A is between its data files and its manifest (two processes or threads):
    without a lock B completes and deletes A's new data files, then A's manifest names missing files.
    B must wait for A's lock; the last save wins and the bank loads."""
    import threading
    import time

    fcntl = pytest.importorskip("fcntl")
    import clora_fast.bank as bank
    path = tmp_path / "bank"
    trained(n=1, active=False).save(path)
    a, b = trained(n=2, active=False), trained(n=1, active=True)
    writer = bank.atomic_write_bytes
    real_flock = fcntl.flock
    waiting = threading.Event()
    errors = []

    def save_b():
        try:
            b.save(path)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    other = threading.Thread(target=save_b)

    def flock(fd, op):              # B announces that it is about to wait for the bank's lock
        if threading.current_thread() is other:
            waiting.set()
        return real_flock(fd, op)

    def write(p, data):
        if os.path.basename(p) == MANIFEST and threading.current_thread() is threading.main_thread() \
                and not other.ident:
            other.start()           # A wrote its data files and is about to write its manifest
            deadline = time.monotonic() + 60
            while not waiting.is_set() and other.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
        return writer(p, data)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(bank, "atomic_write_bytes", write)
    a.save(path)
    other.join(60)
    assert not other.is_alive() and not errors
    assert sorted(os.listdir(path)) == sorted([MANIFEST] + [e["name"] for e in read_manifest(path)["files"].values()])
    assert same(snapshot(b), snapshot(CLoRAController.load_state(path, sites())))   # B saved last


def test_a_save_inside_a_save_of_the_same_bank_is_refused(tmp_path, monkeypatch):
    """One thread cannot wait for its own lock: a save into a bank started from inside a save into the
    same bank (a hook) is a clear RuntimeError, not a hang, and the bank on disk stays loadable."""
    import clora_fast.bank as bank
    path = tmp_path / "bank"
    first = trained(n=1, active=False)
    first.save(path)
    writer = bank.atomic_write_bytes
    inner = []

    def write(p, data):
        if os.path.basename(p) == MANIFEST and not inner:
            inner.append(1)
            trained(n=2, active=False).save(path)
        return writer(p, data)

    monkeypatch.setattr(bank, "atomic_write_bytes", write)
    with pytest.raises(RuntimeError, match="already in progress in this thread"):
        trained(n=2, active=True).save(path)
    monkeypatch.setattr(bank, "atomic_write_bytes", writer)
    assert same(snapshot(first), snapshot(CLoRAController.load_state(path, sites())))
    trained(n=2, active=True).save(path)              # the lock was released: the next save works
    assert not [f for f in os.listdir(path) if f.startswith(".")]


_BAD_FINGERPRINTS = {
    # name: (edit of the stored fingerprint [sites x 9 numbers], the field the error must name)
    "strings": (lambda f: [["x"] * len(s) for s in f], "'identity.fingerprint[0]'"),
    "nan": (lambda f: f[:1] + [[float("nan")] * len(s) for s in f[1:]], "'identity.fingerprint[1]'"),
    "bool": (lambda f: f[:2] + [[True] + s[1:] for s in f[2:]], "'identity.fingerprint[2]'"),
    "short_site": (lambda f: [s[:-1] for s in f], "'identity.fingerprint[0]'"),
    "site_not_list": (lambda f: [{"a": 1}] + f[1:], "'identity.fingerprint[0]'"),
    "too_few_sites": (lambda f: f[:-1], "'identity.fingerprint'"),
    "not_list": (lambda f: "abc", "'identity.fingerprint'"),
}


@pytest.mark.parametrize("case", sorted(_BAD_FINGERPRINTS))
def test_malformed_identity_fingerprint_is_a_bank_error(tmp_path, case):
    """The fingerprint (read when the model's dtype differs from the bank's) is type-checked: a BankError
    naming the field, not a TypeError, and a NaN does not pass every comparison."""
    import re as _re
    path = tmp_path / "bank"
    trained(active=False).save(path)
    m = json.loads((path / MANIFEST).read_text())
    edit, field = _BAD_FINGERPRINTS[case]
    m["identity"]["fingerprint"] = edit(m["identity"]["fingerprint"])
    (path / MANIFEST).write_text(json.dumps(m))
    dst = CLoRAController(sites(dtype=torch.bfloat16), rank=3, alpha=6.0)
    with pytest.raises(BankError, match=_re.escape(f"field {field} is malformed")):
        dst.load_bank(path)
    assert not dst.concepts and dst.active_concept is None


def test_a_load_during_a_save_by_another_process_reads_the_new_bank(tmp_path, monkeypatch):
    """Loads take no lock: a save that replaces the manifest and removes the previous save's files between a
    reader's manifest read and its file reads made the load fail ("bank file ... is missing", which looks like
    corruption). The reader reads the new manifest again and loads the new bank."""
    import clora_fast.bank as bank
    path = tmp_path / "bank"
    trained(n=1, active=False).save(path)
    newer = trained(n=2, active=False)
    real = bank.read_files
    calls = []

    def read_files(p, m):
        if not calls:
            newer.save(path)          # "another process" saves right after this reader read the manifest
        calls.append(1)
        return real(p, m)

    monkeypatch.setattr(bank, "read_files", read_files)
    c = CLoRAController(sites(), rank=3, alpha=6.0, backend="reference")
    c.load_bank(path)
    assert len(calls) == 2 and [k.idx for k in c.concepts] == [0, 1]
    x = torch.randn(2, IN)
    for got, want in zip(outputs(c, x), outputs(newer, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    monkeypatch.setattr(bank, "read_files", real)
    (path / read_manifest(path)["files"]["past"]["name"]).unlink()     # a really missing file is still an error
    with pytest.raises(BankError, match="is missing"):
        CLoRAController(sites(), rank=3, alpha=6.0, backend="reference").load_bank(path)


def test_a_load_during_saves_of_banks_a_b_a_reads_under_the_lock(tmp_path, monkeypatch):
    """Saves of bank A, then B, then A again between a reader's file read and its second manifest read: the
    manifest reads the same as before although the file it missed exists again (the multi-process test of
    loads during saves failed in CI when a load took that for a missing file). A missing file with an
    unchanged manifest is settled by a read under the save lock: bank A here; a really missing file still
    raises, and the lock file is gone afterwards either way."""
    import clora_fast.bank as bank
    path = tmp_path / "bank"
    a, b = trained(n=1, active=False), trained(n=2, active=False)
    a.save(path)
    real = bank.read_files
    calls = []

    def read_files(p, m):
        calls.append((p / bank.LOCK).exists())
        if len(calls) == 1:
            b.save(path)              # B removes A's files ...
            try:
                return real(p, m)     # ... so this read misses one
            finally:
                a.save(path)          # and A is saved again before the reader looks at the manifest again
        return real(p, m)

    monkeypatch.setattr(bank, "read_files", read_files)
    c = CLoRAController(sites(), rank=3, alpha=6.0, backend="reference")
    c.load_bank(path)
    assert calls == [False, True] and [k.idx for k in c.concepts] == [0]
    x = torch.randn(2, IN)
    for got, want in zip(outputs(c, x), outputs(a, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not (path / bank.LOCK).exists()
    monkeypatch.setattr(bank, "read_files", real)
    (path / read_manifest(path)["files"]["past"]["name"]).unlink()
    with pytest.raises(BankError, match="is missing"):
        CLoRAController(sites(), rank=3, alpha=6.0, backend="reference").load_bank(path)
    assert not (path / bank.LOCK).exists()


def test_inspect_bank_lists_the_concepts_and_verify_checks_what_a_load_checks(tmp_path):
    """inspect_bank reads what a bank holds without a model (finished, active and removed concepts, settings,
    file sizes); verify=True catches a damaged file and a past that is not the fold of its factors."""
    from clora_fast.bank import inspect_bank
    path = tmp_path / "bank"
    c = trained(3, active=True)
    c.remove_concept(1)
    c.save(path)
    info = inspect_bank(path)
    assert [(k["idx"], k["name"], k["active"]) for k in info["concepts"]] == \
        [(0, "<k0>", False), (2, "<k2>", False), (3, "<k3>", True)]
    assert info["retired"] == [{"idx": 1, "name": "<k1>"}]
    assert (info["rank"], info["alpha"], info["penalty_weight"], info["sites"], info["next_idx"]) == (3, 6.0, 7.0, 4, 4)
    data = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert info["files"] == len(data) == 4
    assert info["bytes"] == sum(os.path.getsize(path / f) for f in data)
    assert all(k["bytes"] == os.path.getsize(_victim(path, f"concept-{k['idx']}")) for k in info["concepts"])
    assert info["verified"] is False and inspect_bank(path, verify=True)["verified"] is True

    _rewrite_past(path, lambda t: t.update({k: t[k] * 1.001 for k in t}))     # checksums fine, fold not
    assert inspect_bank(path)["verified"] is False                              # the manifest alone: fine
    with pytest.raises(BankError, match="does not match the fold"):
        inspect_bank(path, verify=True)
    trained(2, active=False).save(path)
    f = _victim(path, "concept-1")
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(BankError, match="sha256 checksum mismatch"):
        inspect_bank(path, verify=True)
    with pytest.raises(BankError, match="manifest.json is missing"):
        inspect_bank(tmp_path)


def test_remove_from_bank_redoes_the_removal_when_the_bank_changed_meanwhile(tmp_path, monkeypatch):
    """A save by someone else between remove_from_bank's read and its write is not overwritten: the
    removal is redone on the new bank (its result: the model path's removal from that new bank)."""
    import clora_fast.bank as bank
    path, want = tmp_path / "bank", tmp_path / "want"
    trained(2, active=False).save(path)
    newer = trained(4, active=False)
    newer.save(want)
    c = CLoRAController(sites(), rank=3, alpha=6.0, penalty_weight=7.0, backend="reference")
    c.load_bank(want)
    c.remove_concept(1)
    c.save(want)
    real, calls = bank._verify_tensors, []

    def verify(*a, **kw):
        out = real(*a, **kw)
        if not calls:
            newer.save(path)                 # "another process" saves after the first read
        calls.append(1)
        return out

    monkeypatch.setattr(bank, "_verify_tensors", verify)
    assert bank.remove_from_bank(path, "<k1>") == {"idx": 1, "name": "<k1>", "unfinished": False}
    assert len(calls) == 2
    assert read_manifest(path) == read_manifest(want)
    assert {p.name for p in path.iterdir()} == {p.name for p in want.iterdir()}


def test_an_imported_concept_keeps_its_source_through_save_load_remove_and_state_dict(tmp_path):
    """import_concept's source (what marks a concept as imported) is in the manifest, survives load_bank,
    remove_from_bank of another concept and the controller's state_dict; learned concepts write no field
    (their manifests are unchanged)."""
    from clora_fast.bank import inspect_bank, remove_from_bank
    c = trained(2, active=False)
    g = torch.Generator().manual_seed(4)
    factors = {s.name: (torch.randn(2, s.in_features, generator=g), torch.randn(s.out_features, 2, generator=g))
               for s in c.sites}
    idx = c.import_concept(factors, "<ext>", scale=0.25, source="ext.safetensors")
    assert c.concept(idx).source == "ext.safetensors" and c.concept(0).source is None
    c.save(tmp_path / "bank")
    m = read_manifest(tmp_path / "bank")
    assert [x.get("source") for x in m["concepts"]] == [None, None, "ext.safetensors"]
    assert "source" not in m["concepts"][0]
    assert [x["source"] for x in inspect_bank(tmp_path / "bank", verify=True)["concepts"]] == \
        [None, None, "ext.safetensors"]
    d = CLoRAController(sites(), rank=3, alpha=6.0, penalty_weight=7.0, backend="reference")
    d.load_bank(tmp_path / "bank")
    assert [k.source for k in d.concepts] == [None, None, "ext.safetensors"]
    remove_from_bank(tmp_path / "bank", "<k0>")
    assert [x.get("source") for x in read_manifest(tmp_path / "bank")["concepts"]] == [None, "ext.safetensors"]
    e = CLoRAController(sites(), rank=3, alpha=6.0, penalty_weight=7.0, backend="reference")
    e.load_state_dict(d.state_dict())
    assert [k.source for k in e.concepts] == [None, None, "ext.safetensors"]
    for i in range(e.num_sites):
        assert torch.equal(e.past(i), d.past(i))
