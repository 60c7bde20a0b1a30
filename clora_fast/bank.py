"""The concept bank on disk: one folder per bank.

Layout::

    <bank>/manifest.json                      format, config, identity, concepts, file checksums
    <bank>/past-<sha12>.safetensors           the folded past P per site (float32)
    <bank>/concept-<idx>-<sha12>.safetensors  per concept: "<site>.lora_A", "<site>.lora_B",
                                              and "extra.<key>" tensors of the integration (tokens)

Only safetensors and JSON are ever read (no pickle). Data file names carry a prefix of
their content's sha256, so a new save never overwrites a file the previous manifest
references: every file is written to a temporary file, fsynced and ``os.replace``d into
place, the manifest last; files of the previous save that the new manifest no longer
references are deleted only after the new manifest is in place. A crash at any point
leaves a complete bank (the old or the new one): a killed save leaves at most unreferenced
data files and dot-prefixed temporary files, which the next save removes (a folder holding only
data files, from a first save killed before its manifest, is taken as a bank to complete).
Overlapping saves into one folder are serialised by a lock file (``.clora_fast.lock``, there
only while a save runs; see ``_bank_lock``); loading takes no lock.

Loading reads the manifest, checks every file's size and sha256, parses the tensors,
checks shapes, the base model identity (site names and shapes, a hash of the adapted
base weights' bytes) and the rank, and only then changes the controller.

A concept added by ``import_concept`` / ``import_lora`` (a LoRA trained elsewhere) carries ``"source"`` (the file's
name) in its manifest entry; learned concepts have no such field.

Extra state of the integration that a load finds but the adapter does not take up (token
embeddings of a bank opened with a bare UNet or without an adapter) is kept with the
controller and written back by the next save (see ``_remember_unloaded_extra``).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

try:                           # POSIX: saves into one bank folder are serialised with flock (see _bank_lock)
    import fcntl
except ImportError:            # pragma: no cover - Windows: no advisory lock (see _bank_lock)
    fcntl = None

FORMAT = "clora_fast.bank"
VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".clora_fast.lock"     # a dot file: not a data file (_DATA_RE), ignored by the foreign-folder check
_DATA_RE = re.compile(r"^(past|concept-\d+)-[0-9a-f]{12}\.safetensors$")
# atomic_write_bytes' temporary files of a bank's files: left behind only by a writer killed mid-save
_TMP_RE = re.compile(r"^\.(manifest\.json|(past|concept-\d+)-[0-9a-f]{12}\.safetensors)\..+\.tmp$")
_MAX_MANIFEST_BYTES = 64 << 20


class BankError(ValueError):
    """A concept bank that cannot be loaded (corrupt, tampered, incompatible)."""


class _BankFileMissing(BankError):
    """A data file the manifest names is not there (also what a reader sees when a save into the same
    folder replaced the manifest and removed the previous save's files in between: see load_into_controller)."""


# ---------------------------------------------------------------------------- identity
def _weight_bytes(t: Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def model_identity(named_weights: List[Tuple[str, Tensor]]) -> Dict[str, Any]:
    """Identity of a base model as the bank sees it: the adapted sites' names and shapes
    (``structure``), a sha256 over their exact bytes (``weights_sha256``, with ``dtype``) and
    a small dtype-independent fingerprint (a few float64 samples and the norm per site) to
    recognise the same weights cast to another dtype."""
    hs = hashlib.sha256()
    hw = hashlib.sha256()
    fingerprint = []
    dtypes = set()
    for name, w in named_weights:
        hs.update(f"{name}:{tuple(w.shape)};".encode())
        hw.update(name.encode())
        hw.update(str(w.dtype).encode())
        hw.update(_weight_bytes(w))
        dtypes.add(str(w.dtype).replace("torch.", ""))
        flat = w.detach().reshape(-1)
        n = flat.numel()
        idx = torch.linspace(0, n - 1, steps=min(8, n)).long().to(flat.device)
        fingerprint.append([float(v) for v in flat[idx].double().cpu()] + [float(flat.double().norm().cpu())])
    return {"structure": hs.hexdigest(), "weights_sha256": hw.hexdigest(), "dtype": sorted(dtypes),
            "fingerprint": fingerprint}


def check_identity(stored: Dict[str, Any], current: Dict[str, Any]) -> None:
    """Raise :class:`BankError` unless ``stored`` (from a bank) is the same base model as ``current``."""
    if not isinstance(stored, dict) or "structure" not in stored:
        raise BankError("bank manifest has no valid 'identity' section")
    if stored["structure"] != current["structure"]:
        raise BankError("the bank was made for another base model: its adapted projections (names/shapes) "
                        "differ from this model's")
    if stored.get("adapter") is not None and current.get("adapter") is not None \
            and stored.get("dtype") == current.get("dtype") and stored["adapter"] != current["adapter"]:
        raise BankError("the bank was made for another base model (the integration's model hash differs)")
    if stored.get("weights_sha256") == current["weights_sha256"]:
        return
    if stored.get("dtype") == current["dtype"]:
        raise BankError("the bank was made for another base model: the adapted base weights differ "
                        f"(sha256 {str(stored.get('weights_sha256'))[:12]}... in the bank, "
                        f"{current['weights_sha256'][:12]}... here)")
    # same structure, other dtype: compare the fingerprint with a dtype-sized tolerance
    fs, fc = stored.get("fingerprint"), current["fingerprint"]
    if not isinstance(fs, list) or len(fs) != len(fc):
        raise BankError(f"bank manifest field 'identity.fingerprint' is malformed: expected a list of {len(fc)} "
                        f"lists (one per adapted projection), got {fs!r:.80}")
    for j, (a_site, b_site) in enumerate(zip(fs, fc)):
        # finite numbers only: a string would raise a bare TypeError below, and a NaN would pass every
        # comparison (a NaN difference is never "> tolerance")
        if not isinstance(a_site, list) or len(a_site) != len(b_site) or not all(_is_num(a) for a in a_site):
            raise BankError(f"bank manifest field 'identity.fingerprint[{j}]' is malformed: expected a list of "
                            f"{len(b_site)} finite numbers, got {a_site!r:.80}")
        for a, b in zip(a_site, b_site):
            if abs(a - b) > 1e-2 * max(abs(a), abs(b)) + 1e-3:
                raise BankError(
                    f"the bank was made for another base model: the adapted base weights differ "
                    f"(bank dtype {stored.get('dtype')}, model dtype {current['dtype']}, values disagree)")


# ---------------------------------------------------------------------------- atomic I/O
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read without changing it where the OS allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)      # elsewhere: the classic read-by-setting (briefly process-wide)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, os.replace.
    The file gets the mode a plain ``open(path, "wb")`` would give it (``0o666 & ~umask``), not
    the private 0600 of the temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError:                      # file systems without modes (some FUSE/CIFS mounts): keep going
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serialize(tensors: Dict[str, Tensor]) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()},
                metadata={"format": "pt"})  # one key: safetensors orders metadata randomly


def _parse_manifest(mf: Path) -> Dict[str, Any]:
    """The JSON object of a bank's ``manifest.json`` ``mf`` (size-bounded, a clora_fast bank's format); a
    :class:`BankError` whose message completes "<mf> ..." otherwise."""
    raw = mf.read_bytes()
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise BankError(f"is implausibly large for a bank manifest ({len(raw)} bytes)")
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BankError(f"is not valid JSON (truncated or modified?): {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        fmt = m.get("format") if isinstance(m, dict) else None
        raise BankError(f"is not a clora_fast concept bank (format {fmt!r:.80}, not {FORMAT!r})")
    return m


def _not_a_bank_manifest(mf: Path) -> Optional[str]:
    """Why the existing ``mf`` (a folder's manifest.json) is not a clora_fast bank's manifest, or None
    when it is one: another tool's manifest.json (a web app's) must not be overwritten by a save."""
    if not mf.is_file():
        return "is not a file"
    try:
        _parse_manifest(mf)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except BankError as e:
        return str(e)
    return None


def only_data_files(path: Path) -> bool:
    """Whether the folder ``path`` holds nothing but bank data files (dot files aside): empty, or the files
    of a first save into it that is running (under the lock) or was killed before its manifest."""
    return all(_DATA_RE.match(p.name) for p in path.iterdir() if not p.name.startswith("."))


_HELD: Dict[str, int] = {}          # bank folder (real path) -> the thread of this process saving into it
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def _held(key: str, me: int):
    with _HELD_GUARD:
        _HELD[key] = me
    try:
        yield
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)


@contextlib.contextmanager
def _bank_lock(path: Path):
    """Hold an exclusive lock of the bank folder ``path`` (``flock`` of ``path/.clora_fast.lock``) for a save.

    Two overlapping saves into one folder (two processes, or two threads) would otherwise interleave: save B
    completes and deletes save A's new data files as unreferenced, then A writes the manifest that names
    them, and the bank cannot be loaded.  A second save waits for the first (a blocking lock) and then runs
    whole: the last save wins and the folder always holds a complete bank.  It waits rather than fails
    because a failed checkpoint save would lose the state it was saving.  Loading takes no lock: a save
    replaces every file atomically, the manifest last, so readers never wait.

    The lock file is removed before the lock is released (the folder keeps its documented layout); a save
    that was waiting then holds the lock of a removed file, sees that the path is gone (or is a newer lock
    file) and locks again.  Where ``fcntl`` is missing (Windows), or the file system cannot lock (ENOLCK,
    some network mounts), no lock is taken and overlapping saves into one folder are the caller's to avoid.
    """
    # one thread cannot wait for itself: a save started from inside another save of the same folder (a
    # callback, a hook) would block forever on the flock; refuse it clearly instead
    key, me = os.path.realpath(path), threading.get_ident()
    with _HELD_GUARD:
        if _HELD.get(key) == me:
            raise RuntimeError(f"a save into the bank {str(path)!r} is already in progress in this thread (a save "
                               f"started from inside another save would wait for itself forever)")
    with _flock(path / LOCK) as fd, _held(key, me):
        yield fd is not None


class LockBusy(OSError):
    """A non-blocking :func:`_flock` found the lock held by another process."""


@contextlib.contextmanager
def _flock(lock: Path, *, blocking: bool = True):
    """Hold an exclusive ``flock`` of the file ``lock`` (created if missing); yields its descriptor, or None where
    no lock can be taken (no ``fcntl``: Windows; a file system without flock: ENOLCK, some network mounts).
    Non-blocking, a lock held elsewhere raises :class:`LockBusy`.  The file is removed before the lock is
    released, so a process that was waiting holds the lock of a removed file: it sees that (the path is gone or
    is a newer file) and locks again."""
    if fcntl is None:
        yield None
        return
    while True:
        fd = os.open(str(lock), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BaseException as e:                       # held elsewhere, interrupted while waiting, no locking
            os.close(fd)
            if isinstance(e, OSError) and e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                try:
                    os.unlink(lock)
                except OSError:
                    pass
                fd = None                                # a file system without flock: go on unlocked
                break
            if not blocking and isinstance(e, OSError) and e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockBusy(e.errno, f"{str(lock)!r} is locked by another process") from None
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)                                     # the lock of a removed lock file: lock again
    try:
        yield fd
    finally:
        if fd is not None:
            try:
                os.unlink(lock)
            except OSError:
                pass
            os.close(fd)                                 # releases the lock


class _BankChanged(BankError):
    """A compare-and-swap save (``write_bank(..., expect=m)``) found another manifest than ``m``."""


def write_bank(path, manifest: Dict[str, Any], files: Dict[str, Dict[str, Tensor]],
               reuse: Optional[Dict[str, Dict[str, Any]]] = None,
               expect: Optional[Dict[str, Any]] = None) -> Dict[str, Dict[str, Any]]:
    """Write a bank folder. ``files`` maps a stem ("past", "concept-3") to its tensors; the
    manifest gets ``files`` = {stem: {"name", "sha256", "bytes"}}. Returns stem -> {"name", "sha256", "bytes",
    "stat"} (the file's :func:`_stat_key` after the save). Overlapping saves into one folder are serialised
    (see :func:`_bank_lock`).

    ``reuse`` (stem -> such an entry): files an earlier save in this process wrote or verified for the very
    same tensors; one still there with the same :func:`_stat_key` is kept without serializing and hashing its
    tensors again.

    ``expect``: write only if the folder's manifest is still this one, checked under the save lock (a
    read-modify-write such as :func:`remove_from_bank`); :class:`_BankChanged` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"bank path {str(path)!r} exists and is not a folder")
    if path.is_dir():
        has_manifest = os.path.lexists(path / MANIFEST)
        # only data files and no manifest: a first save into the folder is running (another process, under the
        # lock) or was killed before its manifest; this save completes the bank (and removes the orphans)
        if not has_manifest and not only_data_files(path):
            raise FileExistsError(f"refusing to write a bank into {str(path)!r}: the folder is not empty and is "
                                  f"not a clora_fast bank (no {MANIFEST})")
        why = _not_a_bank_manifest(path / MANIFEST) if has_manifest else None
        if why is not None:
            raise FileExistsError(f"refusing to write a bank into {str(path)!r}: the folder is not a clora_fast "
                                  f"bank (its {str(path / MANIFEST)!r} {why}; if it is a damaged bank of yours, "
                                  f"delete it first)")
    path.mkdir(parents=True, exist_ok=True)
    with _bank_lock(path) as locked:
        if locked:     # no other save runs: temporary files here are a killed writer's (never read, often large)
            for p in path.iterdir():
                if _TMP_RE.match(p.name):
                    try:
                        p.unlink()
                    except OSError:
                        pass
        if expect is not None and (not (path / MANIFEST).is_file() or _parse_manifest(path / MANIFEST) != expect):
            raise _BankChanged(f"the bank at {str(path)!r} was saved by someone else meanwhile")
        return _write_bank_locked(path, manifest, files, reuse or {})


def _stat_key(p: Path) -> Optional[Tuple[int, int, int, int]]:
    """(size, mtime_ns, inode, device) of a file, None when it is not there: a file replaced, rewritten or
    touched since the key was taken has another key."""
    try:
        st = p.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _write_bank_locked(path: Path, manifest: Dict[str, Any], files: Dict[str, Dict[str, Tensor]],
                       reuse: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """:func:`write_bank`'s writes, under the folder's lock: data files, the manifest, then the cleanup."""
    table, stats = {}, {}
    for stem, tensors in files.items():
        known = reuse.get(stem)
        if known is not None and known["stat"] is not None and _stat_key(path / known["name"]) == known["stat"]:
            table[stem] = {k: known[k] for k in ("name", "sha256", "bytes")}
            stats[stem] = known["stat"]
            continue
        data = _serialize(tensors)
        digest = _sha256(data)
        name = f"{stem}-{digest[:12]}.safetensors"
        target = path / name
        if not (target.exists() and target.stat().st_size == len(data) and _sha256(target.read_bytes()) == digest):
            atomic_write_bytes(target, data)
        table[stem] = {"name": name, "sha256": digest, "bytes": len(data)}
        stats[stem] = _stat_key(target)
    manifest = dict(manifest)
    manifest["files"] = table
    atomic_write_bytes(path / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    keep = {v["name"] for v in table.values()}
    for p in path.iterdir():
        if _DATA_RE.match(p.name) and p.name not in keep:
            try:
                p.unlink()
            except OSError:
                pass
    return {k: dict(v, stat=stats[k]) for k, v in table.items()}


def read_manifest(path) -> Dict[str, Any]:
    """Read and sanity-check ``manifest.json`` of the bank folder ``path``."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise BankError(f"no concept bank at {str(path)!r}: not a folder")
    if not mf.is_file():
        raise BankError(f"no concept bank at {str(path)!r}: {MANIFEST} is missing")
    try:
        m = _parse_manifest(mf)
    except BankError as e:
        raise BankError(f"{mf} {e}") from None
    if m.get("version") != VERSION:
        raise BankError(f"{mf}: bank format version {m.get('version')!r} is not supported (this clora_fast reads "
                        f"version {VERSION})")
    for key, typ in (("rank", int), ("alpha", (int, float)), ("penalty_weight", (int, float)), ("sites", list),
                     ("concepts", list), ("files", dict), ("identity", dict), ("next_idx", int),
                     ("retired", list)):
        if not isinstance(m.get(key), typ) or isinstance(m.get(key), bool):
            raise BankError(f"{mf}: field {key!r} is missing or malformed (got {m.get(key)!r:.80})")
    if m["rank"] < 1:
        raise BankError(f"{mf}: rank must be >= 1, got {m['rank']}")
    if not (math.isfinite(m["alpha"]) and m["alpha"] > 0):
        raise BankError(f"{mf}: field 'alpha' must be a positive finite number, got {m['alpha']!r}")
    if not (math.isfinite(m["penalty_weight"]) and m["penalty_weight"] >= 0):
        raise BankError(f"{mf}: field 'penalty_weight' must be a finite number >= 0, got {m['penalty_weight']!r}")
    if m["next_idx"] < 0:
        raise BankError(f"{mf}: field 'next_idx' must be >= 0, got {m['next_idx']}")
    if m.get("past") is not None and not isinstance(m["past"], str):
        raise BankError(f"{mf}: field 'past' must be a file stem (a string) or null, got {m['past']!r:.80}")
    if m.get("adapter") is not None and not isinstance(m["adapter"], dict):
        raise BankError(f"{mf}: field 'adapter' must be an object or null, got {m['adapter']!r:.80}")
    return m


def read_files(path, manifest: Dict[str, Any]) -> Dict[str, Dict[str, Tensor]]:
    """Read every data file of the manifest, verifying size and sha256, into CPU tensors."""
    from safetensors.torch import load
    path = Path(path)
    out = {}
    for stem, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not _DATA_RE.match(entry["name"]) or not isinstance(entry.get("sha256"), str):
            raise BankError(f"{path / MANIFEST}: file entry {stem!r} is malformed")
        f = path / entry["name"]
        try:
            data = f.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            # (also removed by a concurrent save between a check and the read: the caller reads the new manifest)
            raise _BankFileMissing(f"bank file {str(f)!r} is missing") from None
        if len(data) != entry.get("bytes"):
            raise BankError(f"bank file {str(f)!r} has {len(data)} bytes, the manifest says {entry.get('bytes')} "
                            f"(truncated or modified)")
        if _sha256(data) != entry["sha256"]:
            raise BankError(f"bank file {str(f)!r}: sha256 checksum mismatch (the file was modified or corrupted)")
        try:
            out[stem] = load(data)
        except Exception as e:  # safetensors raises its own error types
            raise BankError(f"bank file {str(f)!r} is not a valid safetensors file: {e}") from None
    return out


# ---------------------------------------------------------------------------- controller <-> bank
def _site_table(ctrl) -> List[Dict[str, Any]]:
    return [{"name": s.name, "out": s.out_features, "in": s.in_features, "group": s.group} for s in ctrl.sites]


# save_controller's memory of the files it wrote or verified, per controller (weakly: it dies with the
# controller) and per (bank folder, stem): {"name", "sha256", "bytes", "stat", "of"}, where "of" says what the
# file holds: the tensors themselves (a weak reference, the autograd version, the data pointer: a tensor freed
# since, written in place or moved no longer matches) for the past and the finished concepts' factors (the
# controller's own tensors, replaced, never written in place), and the exact bytes of a concept's extra state
# (token rows: small, and writable through .data without a version change). The active concept is never
# reused (its parameters change every step). A save then serializes and hashes only what changed: with T
# concepts a save no longer costs O(T) hashing.
_SAVED_FILES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SAVED_FILES_GUARD = threading.Lock()        # saves of one controller from several threads


def _tensor_state(tensors) -> List[Tuple[Any, int, int]]:
    return [(weakref.ref(t), t._version, t.data_ptr()) for t in tensors]


def _same_state(recorded, tensors) -> bool:
    """Whether ``tensors`` are the very tensors ``recorded`` (by :func:`_tensor_state`), unchanged."""
    tensors = list(tensors)
    return len(recorded) == len(tensors) and all(
        ref() is t and version == t._version and ptr == t.data_ptr() for (ref, version, ptr), t in zip(recorded, tensors))


def _extra_bytes(extra: Dict[str, Tensor]) -> bytes:
    return b"".join(repr((k, str(v.dtype), tuple(v.shape))).encode() + _weight_bytes(v)
                    for k, v in sorted(extra.items()))


def save_controller(ctrl, path, expect: Optional[Dict[str, Any]] = None) -> None:
    """Write ``ctrl``'s full state as a bank folder (see the module docstring); ``expect``: see
    :func:`write_bank`."""
    files: Dict[str, Dict[str, Tensor]] = {}
    made_of: Dict[str, Any] = {}             # stem -> what its file holds, for files a later save may reuse
    past = {}
    for i, s in enumerate(ctrl.sites):
        if ctrl._past[i] is not None:
            past[s.name] = ctrl._past[i].float()
    if past:
        files["past"] = past
        made_of["past"] = ([s.name for s in ctrl.sites], [p for p in ctrl._past if p is not None])
    extra_state = getattr(ctrl.adapter, "extra_state", None)
    carry = getattr(ctrl, _CARRY_ATTR, None)
    concepts = []
    entries = [(c.idx, c.name, c.scale, c.lora_A, c.lora_B, False, c.source) for c in ctrl.concepts]
    if ctrl._active is not None:
        idx, name = ctrl._active
        As, Bs = [], []
        for i in range(ctrl.num_sites):
            A, B = ctrl.current_factors(i)
            As.append(A.detach().float())
            Bs.append(B.detach().float())
        entries.append((idx, name, ctrl.scale, As, Bs, True, None))
    for idx, name, scale, As, Bs, active, source in entries:
        t = {}
        for i, s in enumerate(ctrl.sites):
            t[f"{s.name}.lora_A"] = As[i]
            t[f"{s.name}.lora_B"] = Bs[i]
        extra = extra_state(idx) if extra_state is not None else {}
        if not extra and carry is not None:
            extra = carry[1].get(idx, {})       # loaded from a bank, not taken up by the adapter
        for k, v in extra.items():
            t[f"extra.{k}"] = v.detach().float()
        stem = f"concept-{idx}"
        files[stem] = t
        if not active:
            made_of[stem] = ((idx, name, scale, [s.name for s in ctrl.sites]), [*As, *Bs], _extra_bytes(extra))
        concepts.append({"idx": idx, "name": name, "scale": scale, "active": active, "file": stem,
                         **({"source": source} if source else {})})
    from . import __version__
    extra_meta = getattr(ctrl.adapter, "extra_meta", None)
    adapter_meta = extra_meta() if extra_meta is not None else None
    if carry is not None:
        adapter_meta = _carried_meta(carry[0], {e[0] for e in entries})
    manifest = {
        "format": FORMAT, "version": VERSION, "producer": f"clora_fast {__version__}",
        "rank": ctrl.rank, "alpha": ctrl.alpha, "penalty_weight": ctrl.penalty_weight,
        "sites": _site_table(ctrl), "identity": ctrl._identity(),
        "concepts": concepts, "past": "past" if past else None,
        "retired": list(ctrl._retired), "next_idx": ctrl._next_idx,
        "adapter": adapter_meta,
    }
    folder = os.path.realpath(path)
    with _SAVED_FILES_GUARD:
        records = _SAVED_FILES.setdefault(ctrl, {})
        reuse = {}
        for stem, (what, tensors, *rest) in made_of.items():
            rec = records.get((folder, stem))
            if rec is not None and rec["of"][0] == what and _same_state(rec["of"][1], tensors) and \
                    rec["of"][2] == rest:
                reuse[stem] = rec
    written = write_bank(path, manifest, files, reuse=reuse, expect=expect)
    with _SAVED_FILES_GUARD:
        for key in [k for k in records if k[0] == folder]:
            del records[key]                 # this save replaced the folder's files
        for stem, (what, tensors, *rest) in made_of.items():
            records[(folder, stem)] = dict(written[stem], of=(what, _tensor_state(tensors), rest))


# The integration's per-concept extra state (token embeddings) that a load found in the bank but
# the adapter did not take up (a bank with tokens opened with a bare UNet, or with no adapter):
# kept on the controller as (bank's adapter meta, {concept idx: {key: tensor}}) so that saving
# the controller again writes it back instead of silently dropping every concept's tokens.
_CARRY_ATTR = "_bank_unloaded_extra"


def _remember_unloaded_extra(ctrl, meta, extras: Dict[int, Dict[str, Tensor]]) -> None:
    ext = getattr(ctrl.adapter, "extra_state", None)
    kept = {idx: {k: v.detach().float().cpu().clone() for k, v in t.items()}
            for idx, t in extras.items() if t and not (ext(idx) if ext is not None else {})}
    # no adapter (or one without extra state) ignores the bank's adapter meta too: keep it as well
    ignored = meta is not None and getattr(ctrl.adapter, "load_extra_state", None) is None
    object.__setattr__(ctrl, _CARRY_ATTR, (meta, kept) if kept or ignored else None)


def _carried_meta(meta, held) -> Any:
    """The kept adapter meta for the concepts now ``held``: a concept removed since the load gives
    its token up (``tokens`` {idx: token} -> ``retired_tokens``), as the adapter does on removal."""
    import copy
    meta = copy.deepcopy(meta)
    if isinstance(meta, dict) and isinstance(meta.get("tokens"), dict):
        gone = [k for k in meta["tokens"] if not (k.isdigit() and int(k) in held)]
        if gone:
            retired = meta.get("retired_tokens")
            retired = list(retired) if isinstance(retired, list) else []
            for k in gone:
                tok = meta["tokens"].pop(k)
                if tok not in retired:
                    retired.append(tok)
            meta["retired_tokens"] = retired
    return meta


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise BankError(msg)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_entries(m: Dict[str, Any], data: Dict[str, Any], where: str) -> None:
    """Type and consistency checks of the manifest's concept, retired and adapter token entries
    (before any of them is used: a malformed value is a :class:`BankError` naming the field)."""
    def bad(field: str, value, why: str) -> BankError:
        return BankError(f"{where}: manifest field {field!r} {why} (got {value!r:.80})")

    next_idx = m["next_idx"]
    used_idx: Dict[int, str] = {}
    names: Dict[str, str] = {}
    files: Dict[str, str] = {}

    def claim_idx(field: str, idx) -> None:
        if not _is_int(idx) or idx < 0 or idx >= next_idx:
            raise bad(field, idx, f"must be a concept index in 0..next_idx-1 = {next_idx - 1}")
        if idx in used_idx:
            raise bad(field, idx, f"repeats the concept index of {used_idx[idx]!r}")
        used_idx[idx] = field

    def claim_name(field: str, name) -> None:
        if not isinstance(name, str) or not name.strip():
            raise bad(field, name, "must be a non-empty string")
        if name in names:
            raise bad(field, name, f"repeats the concept name of {names[name]!r} (concept names are unique)")
        names[name] = field

    for j, c in enumerate(m["concepts"]):
        f = f"concepts[{j}]"
        if not isinstance(c, dict):
            raise bad(f, c, "must be an object")
        claim_idx(f"{f}.idx", c.get("idx"))
        claim_name(f"{f}.name", c.get("name"))
        if not _is_num(c.get("scale")) or c["scale"] <= 0:
            raise bad(f"{f}.scale", c.get("scale"), "must be a positive finite number")
        if not isinstance(c.get("active"), bool):
            raise bad(f"{f}.active", c.get("active"), "must be true or false")
        if "source" in c and (not isinstance(c["source"], str) or not c["source"] or c["active"]):
            raise bad(f"{f}.source", c["source"], "must be a non-empty string (an imported, finished concept)")
        stem = c.get("file")
        if not isinstance(stem, str) or stem not in data:
            raise bad(f"{f}.file", stem, "must name a concept file listed in 'files'")
        if stem == m.get("past"):
            raise bad("past", stem, f"names the file of {f} (the past and a concept cannot share a file)")
        if stem in files:
            raise bad(f"{f}.file", stem, f"names the file of {files[stem]!r} too")
        files[stem] = f
    for j, x in enumerate(m["retired"]):
        f = f"retired[{j}]"
        if not isinstance(x, dict):
            raise bad(f, x, "must be an object {'idx', 'name'}")
        claim_idx(f"{f}.idx", x.get("idx"))
        claim_name(f"{f}.name", x.get("name"))
    # the integration's token section (diffusers: {"tokens": {idx: token}, "retired_tokens": [token]}):
    # a token belongs to one concept; a retired token belongs to none
    ad = m.get("adapter")
    if isinstance(ad, dict) and "tokens" in ad:
        tokens = ad["tokens"]
        if not isinstance(tokens, dict):
            raise bad("adapter.tokens", tokens, "must be an object {concept index: token}")
        owner: Dict[str, str] = {}
        held = {c["idx"] for c in m["concepts"]}
        for k, tok in tokens.items():
            f = f"adapter.tokens[{k}]"
            if not (isinstance(k, str) and re.fullmatch(r"\d+", k) and int(k) in held):
                raise bad(f, k, f"must be keyed by the index of a concept the bank holds {sorted(held)}")
            if not isinstance(tok, str) or not tok:
                raise bad(f, tok, "must be a non-empty string")
            if tok in owner:
                raise bad(f, tok, f"maps the token of concept {owner[tok]} to a second concept")
            owner[tok] = k
        retired_tokens = ad.get("retired_tokens", [])
        if not isinstance(retired_tokens, list) or not all(isinstance(t, str) for t in retired_tokens):
            raise bad("adapter.retired_tokens", retired_tokens, "must be a list of strings")
        both = sorted(set(retired_tokens) & set(owner))
        if both:
            raise bad("adapter.retired_tokens", both, "names tokens that 'adapter.tokens' gives to concepts")


def load_into_controller(ctrl, path, *, replace_active: bool = False) -> None:
    """Verify the bank at ``path`` completely, then install it into ``ctrl``."""
    m, data = _read_bank(path, str(path), lambda m: _check_compatible(ctrl, m, str(path)))
    _install(ctrl, m, data, str(path), replace_active)


_READ_TRIES = 5


def _read_bank(path, where: str, check=None):
    """(manifest, data) of one complete save of the bank at ``path`` (``check(manifest)`` runs before the
    files are read).  Loads take no lock: a save by another process may replace the manifest and remove the
    previous save's files while we read them; we then read the new save.  After :data:`_READ_TRIES` such races
    in a row (saves back to back), or when a file is missing but the manifest reads the same as before (either
    the file is missing from the current save, or saves of banks A, B, A ran while we read: only a read that no
    save can interleave tells which), we read under the save lock, which a writer releases between saves, so
    the load cannot be starved and a truly missing file is reported (a bank folder we cannot create the lock
    file in: the first error)."""
    for _ in range(_READ_TRIES):
        m = read_manifest(path)
        if check is not None:
            check(m)
        try:
            return m, read_files(path, m)
        except _BankFileMissing as e:
            missing = e
            if read_manifest(path) == m:
                break
    with _HELD_GUARD:
        saving_here = _HELD.get(os.path.realpath(path)) == threading.get_ident()
    if saving_here:                          # (this thread holds the lock: waiting for it would never end)
        raise missing
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_flock(Path(path) / LOCK))
        except OSError:
            raise missing from None
        m = read_manifest(path)
        if check is not None:
            check(m)
        return m, read_files(path, m)


def _manifest_sites(m: Dict[str, Any], where: str) -> List[Tuple[str, int, int, Optional[str]]]:
    """The manifest's site table as [(name, out, in, group)], checked."""
    sites = []
    for j, d in enumerate(m["sites"]):
        if not (isinstance(d, dict) and isinstance(d.get("name"), str) and _is_int(d.get("out"))
                and _is_int(d.get("in")) and d["out"] > 0 and d["in"] > 0
                and (d.get("group") is None or isinstance(d.get("group"), str))):
            raise BankError(f"{where}: manifest field 'sites[{j}]' must be {{'name', 'out', 'in', 'group'}} with "
                            f"positive sizes (got {d!r:.80})")
        sites.append((d["name"], d["out"], d["in"], d.get("group")))
    if len({name for name, *_ in sites}) != len(sites):
        raise BankError(f"{where}: manifest field 'sites' repeats a site name")
    return sites


def _read_verified(path, where: str):
    """The bank at ``path`` read and checked as a load checks it, against the manifest's own site table (no
    model): (manifest, its sites [(name, out, in, group)], :func:`_verify_tensors`' result)."""
    m, data = _read_bank(path, where)
    sites = _manifest_sites(m, where)
    return m, sites, _verify_tensors(m, data, where, sites, m["rank"], torch.device("cpu"))


def inspect_bank(path, verify: bool = False) -> Dict[str, Any]:
    """What the bank at ``path`` holds, read from its manifest without a model: ``rank``, ``alpha``,
    ``penalty_weight``, ``sites`` (the number of adapted projections), ``kind`` (the integration that wrote
    it, or None), ``producer``, ``concepts`` [{"idx", "name", "scale", "active", "token", "bytes", "source"}] in
    training order, ``retired`` [{"idx", "name"}], ``next_idx``, ``files`` and ``bytes`` (the data files).

    ``verify=True`` also checks what a load checks that needs no model: every file's size and sha256, the
    tensors' presence, shapes and finiteness for every site of the manifest, and that the stored past is the
    fold of the finished concepts' factors; ``"verified": True`` then (a :class:`BankError` says what is
    wrong otherwise).  Not checked: that the bank fits a given base model (``clora_fast.load`` does that)."""
    where = str(path)
    if verify:
        m, sites, _ = _read_verified(path, where)
    else:
        m = read_manifest(path)
        sites = _manifest_sites(m, where)
        _check_entries(m, m["files"], where)
    ad = m.get("adapter") if isinstance(m.get("adapter"), dict) else {}
    tokens = ad.get("tokens", {}) if isinstance(ad.get("tokens"), dict) else {}
    sizes = {stem: e.get("bytes") for stem, e in m["files"].items() if isinstance(e, dict)}
    return {
        "path": where, "producer": m.get("producer"), "kind": ad.get("kind"),
        "rank": m["rank"], "alpha": m["alpha"], "penalty_weight": m["penalty_weight"], "sites": len(sites),
        "concepts": [{"idx": c["idx"], "name": c["name"], "scale": c["scale"], "active": c["active"],
                      "token": tokens.get(str(c["idx"])), "bytes": sizes.get(c["file"]),
                      "source": c.get("source")} for c in m["concepts"]],
        "retired": [{"idx": x["idx"], "name": x["name"]} for x in m["retired"]],
        "next_idx": m["next_idx"], "files": len(sizes),
        "bytes": sum(b for b in sizes.values() if _is_int(b)), "verified": verify,
    }


def remove_from_bank(path, concept) -> Dict[str, Any]:
    """Forget one concept of the bank at ``path`` without loading the model: the same bank a
    ``clora_fast.load(model, path)``, ``remove_concept(idx)``, ``save(path)`` writes (P refolded from the
    remaining concepts in order, the concept's name retired, its token, if any, retired with it), computed
    from the bank alone.  ``concept``: its index (int) or name.  The concept saved mid-training (active), if
    any, stays active when another is removed; naming it drops it as ``discard_concept()`` + ``save(path)``
    would (P untouched, its name and token retired).  The bank is verified first (as by
    ``inspect_bank(path, verify=True)``).  A save by someone else between this read and this write is not
    overwritten: the removal is redone on the new bank.  Returns the removed concept's ``{"idx", "name",
    "unfinished"}`` (``unfinished``: it was the active one)."""
    for _ in range(_READ_TRIES):
        try:
            return _remove_from_bank_once(path, concept)
        except _BankChanged:
            continue
    raise BankError(f"the bank at {str(path)!r} kept being saved by someone else: nothing was removed")


def _remove_from_bank_once(path, concept) -> Dict[str, Any]:
    from .controller import CLoRAController, Site
    where = str(path)
    m, sites, (pasts, concepts, active, active_factors, extras) = _read_verified(path, where)
    finished = {c.idx: c.name for c in concepts}
    if isinstance(concept, str):
        idx = next((i for i, n in finished.items() if n == concept), None)
        unfinished = active is not None and idx is None and concept == active[1]
    elif _is_int(concept):
        idx = concept if concept in finished else None
        unfinished = active is not None and concept == active[0]
    else:
        raise TypeError(f"concept must be a concept index (int) or name (str), got {concept!r}")
    if idx is None and not unfinished:
        held = [f"{i} {n}" for i, n in finished.items()] + ([f"{active[0]} {active[1]} (unfinished)"] if active else [])
        raise BankError(f"the bank at {where!r} has no concept {concept!r}: it holds {held}")
    ctrl = CLoRAController([Site(name, torch.zeros(out, inp), None, group) for name, out, inp, group in sites],
                           rank=m["rank"], alpha=float(m["alpha"]), penalty_weight=float(m["penalty_weight"]),
                           backend="reference")
    ctrl._set_state(pasts, concepts, [dict(x) for x in m["retired"]], m["next_idx"], active, active_factors)
    _remember_unloaded_extra(ctrl, m.get("adapter"), extras)       # the tokens: carried as by a bare model
    stored = m["identity"]
    ctrl._identity = lambda: stored          # the base model's identity: the bank's own (no model here)
    if unfinished:
        idx, name = active
        ctrl.discard_concept()
    else:
        name = finished[idx]
        ctrl.remove_concept(idx)
    save_controller(ctrl, path, expect=m)
    return {"idx": idx, "name": name, "unfinished": unfinished}


def _check_compatible(ctrl, m: Dict[str, Any], where: str) -> None:
    """The bank's manifest ``m`` fits ``ctrl``: rank, alpha, sites, base model identity."""
    if m["rank"] != ctrl.rank:
        raise BankError(f"rank mismatch: the bank at {where!r} has rank {m['rank']} but the controller has rank "
                        f"{ctrl.rank}; patch with rank={m['rank']} (or use clora_fast.load, which reads it)")
    if abs(float(m["alpha"]) - ctrl.alpha) > 1e-12 * max(1.0, ctrl.alpha):
        raise BankError(f"alpha mismatch: the bank has alpha {m['alpha']} but the controller has {ctrl.alpha}")
    mine = _site_table(ctrl)
    theirs = m["sites"]
    if [(d.get("name"), d.get("out"), d.get("in")) for d in theirs if isinstance(d, dict)] != \
            [(d["name"], d["out"], d["in"]) for d in mine]:
        raise BankError(f"the bank at {where!r} was made for another base model: its {len(theirs)} adapted "
                        f"projections do not match this model's {len(mine)} (names/shapes)")
    check_identity(m["identity"], ctrl._identity())


# concepts per GEMM in _past_matches_fold: bounds its float64 temporaries ([out, chunk*r] and [chunk*r, in])
_FOLD_CHUNK = 256


def _past_matches_fold(past: Tensor, factors: List[Tuple[float, Tensor, Tensor]], dev: torch.device) -> bool:
    """Whether the stored fp32 past ``P`` [out, in] is the fold of ``factors`` = [(s_t, A_t [r, in], B_t [out, r])].

    ``R = sum_t s_t B_t @ A_t`` is computed in float64 as one GEMM per chunk of concepts (``[s_1 B_1 | ... ]
    @ [A_1; ...]``: a 1000-concept bank costs seconds on a CPU, where T small GEMMs cost minutes), and each
    entry must satisfy ``|P - R| <= (T + 1) u (sum_t |s_t B_t| |A_t|) + 1e-5 max|R| + 1e-7``, u = 2^-24: the
    first term bounds the rounding of :meth:`CLoRAController._fold_into`'s sequential fp32 sum of
    fp64 products rounded to fp32 (each step rounds once in the product and once in the sum), so any
    past that end_concept() built passes, and anything off by more than that rounding is refused.
    The bound's ``|B||A|`` uses, per concept, rowmax|s B| x colsum|A| (one rank-1 term: an upper bound)."""
    p = past.to(dev, torch.float64)
    r_acc = torch.zeros_like(p)
    bound = torch.zeros_like(p)
    for c0 in range(0, len(factors), _FOLD_CHUNK):
        chunk = factors[c0:c0 + _FOLD_CHUNK]
        b = torch.cat([s * bt.to(dev, torch.float64) for s, _, bt in chunk], 1)      # [out, chunk*r]
        a = torch.cat([at.to(dev, torch.float64) for _, at, _ in chunk], 0)          # [chunk*r, in]
        r_acc.addmm_(b, a)
        rowmax = torch.stack([(s * bt.to(dev, torch.float64)).abs().amax(1) for s, _, bt in chunk], 1)
        colsum = torch.stack([at.to(dev, torch.float64).abs().sum(0) for _, at, _ in chunk], 0)
        bound.addmm_(rowmax, colsum)
    tol = (len(factors) + 1) * 2.0 ** -24 * bound + (1e-5 * float(r_acc.abs().max()) + 1e-7)
    return bool(((p - r_acc).abs() <= tol).all())


def _verify_tensors(m: Dict[str, Any], data: Dict[str, Dict[str, Tensor]], where: str,
                    sites: List[tuple], rank: int, fold_dev: torch.device):
    """Check the bank's tensors ``data`` against its manifest ``m`` for the adapted projections ``sites``
    [(name, out, in, ...)] at rank ``rank``: every file holds every site's tensors, with the right shapes, finite,
    and the stored past is the fold of the finished concepts' factors.  Returns (pasts per site, finished
    concepts, active (idx, name) or None, its (As, Bs) or None, extra tensors per concept idx)."""
    from .controller import Concept
    r = rank
    pasts: List[Optional[Tensor]] = [None] * len(sites)
    _check_entries(m, data, where)
    if m.get("past") is not None:
        _expect(m["past"] in data, f"{where}: the manifest names a past file that is not listed")
        tp = data[m["past"]]
        _expect(set(tp) == {site[0] for site in sites}, f"{where}: the past file does not hold every site")
        for i, (name, out, inp, *_) in enumerate(sites):
            t = tp[name]
            _expect(tuple(t.shape) == (out, inp) and t.dtype == torch.float32,
                    f"{where}: past of {name!r} has shape {tuple(t.shape)} {t.dtype}, expected "
                    f"{(out, inp)} float32")
            _expect(bool(torch.isfinite(t).all()), f"{where}: past of {name!r} is not finite")
            pasts[i] = t
    concepts: List[Concept] = []
    active = None
    active_factors = None
    extras: Dict[int, Dict[str, Tensor]] = {}
    for j, c in enumerate(m["concepts"]):
        t = data[c["file"]]
        As, Bs = [], []
        for name, out, inp, *_ in sites:
            a, b = t.get(f"{name}.lora_A"), t.get(f"{name}.lora_B")
            _expect(a is not None and b is not None, f"{where}: concept {c['idx']} lacks factors of {name!r}")
            _expect(tuple(a.shape) == (r, inp) and tuple(b.shape) == (out, r),
                    f"rank/shape mismatch in {where}: concept {c['idx']} factors of {name!r} have shapes "
                    f"{tuple(a.shape)}, {tuple(b.shape)}; expected [{r}, {inp}], [{out}, {r}]")
            _expect(bool(torch.isfinite(a).all() and torch.isfinite(b).all()),
                    f"{where}: concept {c['idx']} factors of {name!r} are not finite")
            As.append(a.float())
            Bs.append(b.float())
        extras[c["idx"]] = {k[len("extra."):]: v for k, v in t.items() if k.startswith("extra.")}
        if c["active"]:
            _expect(active is None and j == len(m["concepts"]) - 1,
                    f"{where}: manifest field 'concepts[{j}].active': only the last concept may be active "
                    f"(at most one concept is being learned)")
            active = (c["idx"], c["name"])
            active_factors = (As, Bs)
        else:
            concepts.append(Concept(c["idx"], c["name"], float(c["scale"]), As, Bs,
                                    {"source": c["source"]} if "source" in c else {}))
    # the stored past must be the fold of the stored factors
    for i, (name, *_) in enumerate(sites):
        if pasts[i] is None or not concepts:
            _expect(pasts[i] is None and not concepts,
                    f"{where}: the folded past does not match the concepts' factors")
            continue
        _expect(_past_matches_fold(pasts[i], [(c.scale, c.lora_A[i], c.lora_B[i]) for c in concepts], fold_dev),
                f"{where}: the folded past of {name!r} does not match the fold of the concepts' factors")
    return pasts, concepts, active, active_factors, extras


def _install(ctrl, m: Dict[str, Any], data: Dict[str, Dict[str, Tensor]], where: str, replace_active: bool) -> None:
    """Verify the bank's tensors ``data`` against ``m`` and ``ctrl`` completely, then install them."""
    fold_dev = ctrl._device() if ctrl._device().type == "cuda" else torch.device("cpu")
    pasts, concepts, active, active_factors, extras = _verify_tensors(
        m, data, where, [(s.name, s.out_features, s.in_features) for s in ctrl.sites], ctrl.rank, fold_dev)
    retired = m["retired"]
    # the integration's extra state (tokens): verify before changing anything
    check = getattr(ctrl.adapter, "check_extra_state", None)
    if check is not None:
        check(m.get("adapter"), extras)
    if ctrl.active_concept is not None and not replace_active and active != (ctrl.active_concept, ctrl.active_name):
        # (reloading the checkpoint of the very concept being learned is a rollback, allowed)
        raise RuntimeError(f"concept {ctrl.active_concept} ({ctrl.active_name!r}) is being learned in this controller "
                           f"and loading a bank would discard it: save() or end_concept() first, or pass "
                           f"replace_active=True")
    dev = ctrl._device()
    pasts = [None if p is None else p.to(dev) for p in pasts]
    for c in concepts:                 # finished concepts' factors stay in host memory (see end_concept)
        c.lora_A = [a.cpu() for a in c.lora_A]
        c.lora_B = [b.cpu() for b in c.lora_B]
    if active_factors is not None:
        active_factors = ([a.to(dev) for a in active_factors[0]], [b.to(dev) for b in active_factors[1]])
    ctrl._set_state(pasts, concepts, [dict(x) for x in retired], m["next_idx"], active, active_factors)
    load = getattr(ctrl.adapter, "load_extra_state", None)
    if load is not None:
        load(m.get("adapter"), extras)
    _remember_unloaded_extra(ctrl, m.get("adapter"), extras)
