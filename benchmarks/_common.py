"""Shared helpers of the clora_fast benchmark scripts.

Timing:  GPU -> CUDA events with warm-up, median of repeated blocks (see
``Timer``: like ``triton.testing.do_bench`` but with a capped repeat count and
an optional L2 flush); CPU -> ``torch.utils.benchmark`` (median of blocked
runs).  Every script writes JSON lines + a markdown table into ``--out``
(default ``benchmarks/out/``) and reports ratios measured in the same run;
absolute CPU numbers mean little.

A backend or integration that is missing (clora_fast.ops not written yet, the
CUDA extension not built, diffusers absent, Triton on a CPU) becomes a row
whose status is ``"n/a (reason)"``, never a crash.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIG_DIR = os.path.join(HERE, "configs")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ESIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


# --------------------------------------------------------------------------- CLI
def base_parser(description: str, default_budget: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="output folder (JSON lines, markdown, PNG)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds (smoke test); implies --cpu "
                   "unless --device is given")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    p.add_argument("--device", default=None, help="explicit device (cpu, cuda, cuda:1)")
    p.add_argument("--plot", action="store_true", help="also draw a PNG plot (matplotlib)")
    p.add_argument("--gpu-budget", "--budget", dest="budget", type=float, default=default_budget,
                   help="seconds of measuring after which the remaining cases are reported as n/a (budget)")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--interpret", action="store_true",
                   help="CPU only, tiny shapes: also run the triton backend under TRITON_INTERPRET=1 (checks the "
                        "GPU code path of the scripts - calls, reports, target lines - without a GPU; slow)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default on a CPU device: 1 - on shared 2-core machines the "
                        "intra-op thread pool's spinning under load made timings 10-40x slower and meaningless)")
    return p


def configure_threads(args, device: torch.device) -> int:
    """Set torch's intra-op threads for this run; returns the previous value (restore it when done)."""
    old = torch.get_num_threads()
    n = args.threads if args.threads else (1 if device.type == "cpu" else None)
    if n:
        torch.set_num_threads(n)
    return old


def pick_device(args) -> torch.device:
    if getattr(args, "interpret", False):
        os.environ["TRITON_INTERPRET"] = "1"  # before the first Triton launch
    if args.device:
        return torch.device(args.device)
    if args.cpu or args.quick or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def profile_of(args, device: torch.device) -> str:
    """'quick' (tiny shapes), 'cpu' (real per-layer shapes, reduced sweep) or 'gpu' (everything)."""
    if args.quick:
        return "quick"
    return "gpu" if device.type == "cuda" else "cpu"


# ------------------------------------------------------------------ environment
def git_commit() -> str:
    try:
        c = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10).stdout.strip()
        d = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, timeout=10).stdout.strip()
        return (c + ("+dirty" if d else "")) if c else "unknown"
    except Exception:  # noqa: BLE001 - git missing on the machine
        return os.environ.get("CLORA_COMMIT", "unknown")


def env_info(device: torch.device) -> dict:
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": os.environ.get("CLORA_COMMIT") or git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        from importlib import metadata as _md
        info["triton"] = _md.version("triton")
    except Exception as e:  # noqa: BLE001
        info["triton"] = f"n/a ({type(e).__name__})"
    from importlib import metadata
    for mod in ("peft", "diffusers", "transformers", "timm"):
        try:  # metadata only: importing these costs seconds
            info[mod] = metadata.version(mod)
        except Exception as e:  # noqa: BLE001
            info[mod] = f"n/a ({type(e).__name__})"
    try:   # which autograd Function runs the merged K/V strategy: the C++ host extension or Python
        from clora_fast import ops as _ops
        info["merged_impl"] = "cpp" if (_ops.MERGED_IMPL != "python" and _ops._cpp_merged() is not None) else "python"
    except Exception as e:  # noqa: BLE001 - an older clora_fast
        info["merged_impl"] = f"n/a ({type(e).__name__})"
    try:   # where the Triton penalty reduces its partial sums (inside its launch, or a second kernel)
        from clora_fast.kernels import forgetting_penalty as _fp
        info["penalty_reduce"] = "fused" if _fp._fused_reduce(None) else "separate"
    except Exception as e:  # noqa: BLE001 - an older clora_fast, or no Triton
        info["penalty_reduce"] = f"n/a ({type(e).__name__})"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        info["sm_count"] = props.multi_processor_count
        info["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["gpu"] = "none"
        info["cpu"] = platform.processor() or platform.machine()
    return info


# ----------------------------------------------------------- clora_fast access
class Clora:
    """What of clora_fast is importable right now, with reasons for what is not."""

    def __init__(self, interpret: bool = False):
        self.interpret = interpret
        self.pkg = None
        self.ops = None
        self.reference = None
        self.reason_pkg = ""
        self.reason_ops = ""
        self.backends: List[str] = []
        try:
            import clora_fast
            self.pkg = clora_fast
        except Exception as e:  # noqa: BLE001
            self.reason_pkg = f"import clora_fast failed: {type(e).__name__}: {e}"
            return
        try:
            from clora_fast import reference
            self.reference = reference
        except Exception as e:  # noqa: BLE001
            self.reason_pkg = f"clora_fast.reference: {type(e).__name__}: {e}"
        try:
            from clora_fast import ops
            self.ops = ops
        except Exception as e:  # noqa: BLE001
            self.reason_ops = f"clora_fast.ops not importable ({type(e).__name__}: {e})"
        try:
            self.backends = list(clora_fast.available_backends())
        except Exception as e:  # noqa: BLE001
            self.backends = []
            self.reason_backends = f"available_backends() failed ({type(e).__name__}: {e})"
        else:
            self.reason_backends = ""

    def backend_status(self, backend: str, device: torch.device) -> Optional[str]:
        """None when ``backend`` can run on ``device``, else the reason it cannot."""
        if backend == "reference":
            if self.ops is None and self.reference is None:
                return self.reason_ops or self.reason_pkg
            return None
        if self.ops is None:
            return self.reason_ops or self.reason_pkg or "clora_fast.ops missing"
        if device.type != "cuda" and not (self.interpret and backend == "triton"):
            return f"{backend} on CPU: skipped (interpreter too slow; ratios use reference)"
        if self.reason_backends:
            return self.reason_backends
        if backend not in self.backends:
            return f"backend {backend!r} not available (available: {self.backends})"
        return None

    def has_patch(self) -> Optional[str]:
        if self.pkg is None:
            return self.reason_pkg
        if not hasattr(self.pkg, "patch"):
            return "clora_fast.patch not implemented yet"
        return None


def gpu_backends_run(device: torch.device, args) -> bool:
    """Whether 'ours' means the GPU backends (triton/cuda) in this run: on CUDA, or on CPU with --interpret."""
    return device.type == "cuda" or bool(getattr(args, "interpret", False))


def describe_exc(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


# ----------------------------------------------------------------- measuring
class Timer:
    """Median time of ``fn`` in milliseconds on ``device`` with a budget for the whole run."""

    def __init__(self, device: torch.device, budget_s: float, quick: bool):
        self.device = device
        self.budget_s = budget_s
        self.quick = quick
        self.t0 = time.perf_counter()
        self._flush_buf = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = (),
                 warmup_ms: float = 10.0, rep_ms: float = 40.0, flush: bool = False) -> float:
        """Median milliseconds per call of ``fn``.

        GPU, ``flush=False``: back-to-back calls in blocks of >= ~1 ms between CUDA events (steady state of a
        training loop: includes the host's launch overhead when that is the bottleneck; L2 stays warm).
        GPU, ``flush=True``: every call timed alone by events after a 256 MiB write that evicts the L2 (for
        memory-bound cases whose data would fit in the L2).  CPU: ``torch.utils.benchmark`` median.
        """
        if self.device.type == "cuda":
            return self._cuda(fn, grad_to_none, warmup_ms, rep_ms, flush)
        return self._cpu(fn, grad_to_none)

    def _cuda(self, fn, grad_to_none, warmup_ms, rep_ms, flush) -> float:
        def clear():
            for t in grad_to_none:
                t.grad = None

        clear()
        fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(3):
            clear()
            fn()
        e.record()
        torch.cuda.synchronize()
        est = max(s.elapsed_time(e) / 3, 1e-3)
        for _ in range(max(1, min(200, int(warmup_ms / est)))):
            clear()
            fn()
        if not flush:
            inner = max(1, min(100, int(1.0 / est)))
            reps = max(5, min(50, int(rep_ms / (est * inner))))
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for a, b in evs:
                a.record()
                for _ in range(inner):
                    clear()
                    fn()
                b.record()
            torch.cuda.synchronize()
            times = sorted(a.elapsed_time(b) / inner for a, b in evs)
        else:
            if getattr(self, "_flush_buf", None) is None:
                self._flush_buf = torch.empty(256 * 2**20, dtype=torch.int8, device=self.device)
            reps = max(10, min(200, int(rep_ms / est)))
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for a, b in evs:
                self._flush_buf.zero_()
                clear()
                a.record()
                fn()
                b.record()
            torch.cuda.synchronize()
            times = sorted(a.elapsed_time(b) for a, b in evs)
        return float(times[len(times) // 2])

    def device_ms(self, fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = (), iters: int = 10,
                  flush: bool = False) -> Optional[float]:
        """GPU time of the kernels (and copies) one call of ``fn`` launches, in ms: the sum of the durations
        torch.profiler records (CUPTI), host time and idle gaps excluded.  With ``flush`` each call follows an
        L2-evicting write whose own time is profiled separately and subtracted.  None on a CPU."""
        if self.device.type != "cuda":
            return None
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        if flush and getattr(self, "_flush_buf", None) is None:
            self._flush_buf = torch.empty(256 * 2**20, dtype=torch.int8, device=self.device)

        def gpu_us(body, keep=False) -> float:
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(iters):
                    body()
                torch.cuda.synchronize()
            evs = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
            if keep:    # per-kernel breakdown (us per call), largest first: self.last_breakdown
                agg: Dict[str, float] = {}
                for e in evs:
                    agg[e.name[:80]] = agg.get(e.name[:80], 0.0) + e.time_range.elapsed_us() / iters
                self.last_breakdown = dict(sorted(agg.items(), key=lambda kv: -kv[1])[:8])
            return sum(e.time_range.elapsed_us() for e in evs)

        def call():
            if flush:
                self._flush_buf.zero_()
            for t in grad_to_none:
                t.grad = None
            fn()

        call()
        total = gpu_us(call, keep=True)
        if flush:
            total -= gpu_us(lambda: self._flush_buf.zero_())
        return max(total, 0.0) / iters / 1e3

    def graph_ms(self, fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = (), reps: int = 20,
                 rounds: int = 5) -> Optional[float]:
        """Milliseconds per call of ``fn`` captured once as a CUDA graph and replayed: the host's launch work
        is gone (what a captured training step or ``torch.compile(mode="reduce-overhead")`` pays), the
        kernels and their gaps on the GPU remain.  Median of ``rounds`` blocks of ``reps`` replays.  The
        gradients in ``grad_to_none`` are set to None before the capture, so the captured backward
        allocates them in the graph's pool and every replay rewrites them.  None on a CPU."""
        if self.device.type != "cuda":
            return None

        def clear():
            for t in grad_to_none:
                t.grad = None

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):          # warm-up off the default stream, as torch.cuda.graph requires
            for _ in range(3):
                clear()
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize(self.device)
        times = []
        for _ in range(rounds):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(reps):
                graph.replay()
            b.record()
            torch.cuda.synchronize(self.device)
            times.append(a.elapsed_time(b) / reps)
        clear()
        del graph
        return float(sorted(times)[len(times) // 2])

    def _cpu(self, fn, grad_to_none) -> float:
        from torch.utils import benchmark

        def run():
            for t in grad_to_none:
                t.grad = None
            fn()

        run()  # warm-up (first-call allocations, lazy init)
        if self.quick:  # smoke runs: a few calls, median (torch.utils.benchmark's calibration alone is ~0.1 s)
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                run()
                ts.append(time.perf_counter() - t0)
            return float(sorted(ts)[1] * 1e3)
        min_time = 0.3
        m = benchmark.Timer(stmt="run()", globals={"run": run}).blocked_autorange(min_run_time=min_time)
        return float(m.median * 1e3)


def measure_peaks(device: torch.device, timer: Timer, quick: bool) -> dict:
    """Device ceilings measured in this run: large GEMM per dtype (TFLOP/s) and large copy (GB/s, read+write)."""
    peaks = {}
    if device.type == "cuda":
        n = 8192
        dts = {"bf16": torch.bfloat16, "fp32": torch.float32}
        copy_elems = 1 << 29  # 2 GiB fp32 source: far past the L2
    else:
        n = 256 if quick else 1024
        dts = {"fp32": torch.float32} if quick else {"fp32": torch.float32, "bf16": torch.bfloat16}
        copy_elems = (1 << 20) if quick else (1 << 25)
    for name, dt in dts.items():
        nn_ = n if not (device.type == "cpu" and dt == torch.bfloat16) else n // 2  # bf16 on CPU is very slow
        a = torch.randn(nn_, nn_, device=device, dtype=dt)
        b = torch.randn(nn_, nn_, device=device, dtype=dt)
        t = timer(lambda: torch.mm(a, b), warmup_ms=50, rep_ms=300)
        peaks[f"gemm_tflops_{name}"] = 2 * nn_ ** 3 / (t * 1e-3) / 1e12
        peaks[f"gemm_n_{name}"] = nn_
        del a, b
    src = torch.randn(copy_elems, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), warmup_ms=50, rep_ms=300)
    peaks["copy_gbps"] = 2 * src.numel() * 4 / (t * 1e-3) / 1e9
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return peaks


def roofline(flops: float, nbytes: float, t_ms: float, peaks: dict, dtype: str) -> dict:
    """Achieved TFLOP/s and GB/s, and the fraction of the roofline floor max(flops/peak, bytes/bw) / t."""
    out = {"flops": flops, "bytes": nbytes}
    if t_ms is None or not (t_ms > 0):
        return out
    s = t_ms * 1e-3
    out["tflops"] = flops / s / 1e12
    out["gbps"] = nbytes / s / 1e9
    peak = peaks.get(f"gemm_tflops_{dtype}") or peaks.get("gemm_tflops_fp32")
    floor = 0.0
    if peak:
        floor = max(floor, flops / (peak * 1e12))
    if peaks.get("copy_gbps"):
        floor = max(floor, nbytes / (peaks["copy_gbps"] * 1e9))
    if floor > 0:
        out["roofline_frac"] = floor / s
        out["bound"] = "memory" if nbytes / (peaks.get("copy_gbps", 1) * 1e9) >= flops / ((peak or 1) * 1e12) \
            else "compute"
    return out


def try_time(timer: Timer, make: Callable[[], tuple], **kw) -> tuple:
    """Build the case with ``make() -> (fn, grad_to_none)`` and time it; (ms, None) or (None, 'n/a (reason)')."""
    if timer.over_budget():
        return None, "n/a (budget)"
    try:
        fn, g2n = make()
        return timer(fn, grad_to_none=g2n, **kw), None
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "n/a (out of memory)"
    except Exception as e:  # noqa: BLE001
        if os.environ.get("CLORA_BENCH_DEBUG"):
            traceback.print_exc()
        return None, f"n/a ({describe_exc(e)})"


def try_device_time(timer: Timer, make: Callable[[], tuple], **kw) -> Optional[float]:
    """:meth:`Timer.device_ms` of a freshly built case; None on a CPU, over budget or on any error."""
    if timer.device.type != "cuda" or timer.over_budget():
        return None
    try:
        fn, g2n = make()
        timer.last_breakdown = None
        ms = timer.device_ms(fn, grad_to_none=g2n, **kw)
        if ms is not None and getattr(timer, "last_breakdown", None):
            print_flush("  kernels (us/call): " + ", ".join(f"{k}={v:.1f}" for k, v in timer.last_breakdown.items()))
        return ms
    except Exception as e:  # noqa: BLE001
        print_flush(f"device time n/a: {describe_exc(e)}")
        return None


def paired_ratios(pairs) -> Tuple[Optional[float], List[float]]:
    """``(median, ratios)`` of the per-round ratios ``other / base`` of ``(base, other)`` times measured back
    to back in each round (rounds missing a side are left out): the median cancels the machine's drift
    between rounds.  The median (upper) is None with fewer than two rounds."""
    rs = [o / b for b, o in pairs if b and o]
    return (sorted(rs)[len(rs) // 2] if len(rs) > 1 else None), rs


def try_graph_time(timer: Timer, make: Callable[[], tuple]) -> Optional[float]:
    """:meth:`Timer.graph_ms` of a freshly built case; None on a CPU, over budget or when the capture fails
    (the reason is printed)."""
    if timer.device.type != "cuda" or timer.over_budget():
        return None
    try:
        fn, g2n = make()
        return timer.graph_ms(fn, grad_to_none=g2n)
    except Exception as e:  # noqa: BLE001
        print_flush(f"CUDA graph time n/a: {describe_exc(e)}")
        torch.cuda.synchronize()
        return None


# ------------------------------------------------------------------- output
class Output:
    def __init__(self, out_dir: str, name: str, tag: str = ""):
        os.makedirs(out_dir, exist_ok=True)
        self.dir = out_dir
        base = name + (f"_{tag}" if tag else "")
        self.jsonl = os.path.join(out_dir, base + ".jsonl")
        self.md = os.path.join(out_dir, base + ".md")
        self.png = os.path.join(out_dir, base + ".png")
        self._f = open(self.jsonl, "w")

    def row(self, **kw):
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in kw.items()}
        self._f.write(json.dumps(clean, sort_keys=True) + "\n")
        self._f.flush()

    def close(self):
        self._f.close()

    def write_md(self, text: str):
        with open(self.md, "w") as f:
            f.write(text)


def fmt_ms(t: Optional[float]) -> str:
    if t is None:
        return "n/a"
    if t >= 100:
        return f"{t:.0f}"
    if t >= 1:
        return f"{t:.2f}"
    return f"{t:.3f}"


def fmt_num(x: Optional[float]) -> str:
    """3 significant digits (GB/s, TFLOP/s: tiny on a CPU, large on a GPU)."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def fmt_ratio(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines) + "\n"


def md_env(info: dict, peaks: dict) -> str:
    keys = ["date_utc", "commit", "device", "gpu", "cpu", "torch", "triton", "peft", "diffusers", "transformers",
            "timm", "python", "cpu_threads", "merged_impl", "penalty_reduce"]
    s = "- " + "; ".join(f"{k}: {info[k]}" for k in keys if k in info) + "\n"
    if peaks:
        s += "- measured ceilings in this run: " + ", ".join(
            f"{k} = {v:.3g}" for k, v in peaks.items()) + "\n"
    return s


class Targets:
    """PASS/MISS lines; meaningful on a GPU only (on CPU they are printed as INFO)."""

    def __init__(self, device: torch.device, info: Optional[str] = None, echo: bool = True):
        self.device = device
        self.info = info            # set: every line is INFO, for this reason (e.g. proxies of a target)
        self.echo = echo            # print each line (off for the interim reports written after each section)
        self.lines: List[str] = []

    def check(self, name: str, ok: Optional[bool], detail: str, covered: Optional[Tuple[int, int]] = None):
        """One target line.  ``covered = (k, n)``: the verdict needs all n shapes of the target and k of them
        were measured; with k < n the line is ``N/A (partial k/n measured)`` whatever the k shapes say (a
        budget cut must not turn into a PASS on the easy shapes)."""
        if covered is not None and covered[0] < covered[1]:
            ok = None
            detail = f"(partial {covered[0]}/{covered[1]} measured) {detail}"
        if ok is None:
            tag = "N/A "
        elif self.device.type != "cuda" or self.info:
            tag = "INFO"
        else:
            tag = "PASS" if ok else "MISS"
        line = f"{tag} {name}: {detail}"
        self.lines.append(line)
        if self.echo:
            print(line, flush=True)

    def md(self) -> str:
        if not self.lines:
            return ""
        note = f" ({self.info})" if self.info else "" if self.device.type == "cuda" else \
            " (CPU run: targets are GPU targets, shown as INFO only)"
        return f"\n### Targets{note}\n\n" + "".join(f"- {l}\n" for l in self.lines)


# ---------------------------------------------------------------- model shapes
def load_json_config(name: str) -> dict:
    with open(os.path.join(CONFIG_DIR, name)) as f:
        cfg = json.load(f)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def sd_config(profile: str) -> dict:
    """The SD-1.5 UNet config (shipped JSON); in 'quick' a tiny UNet of the same structure."""
    if profile == "quick":
        return load_json_config("tiny_unet.json")
    return load_json_config("sd15_unet.json")


def sd_kv_shapes_from_config(cfg: dict) -> List[tuple]:
    """(name, out, in) of every attn2 to_k/to_v, derived from the config the way diffusers builds the UNet.

    Order = module order of ``UNet2DConditionModel`` (down, up, mid), as ``named_modules`` lists it.
    """
    ch = list(cfg["block_out_channels"])
    cross = cfg["cross_attention_dim"]
    lpb = cfg.get("layers_per_block", 2)
    tpl = cfg.get("transformer_layers_per_block", 1)
    shapes = []

    def add(prefix, c, n_transformer):
        for t in range(n_transformer):
            for kv in ("to_k", "to_v"):
                shapes.append((f"{prefix}.transformer_blocks.{t}.attn2.{kv}", c, cross))

    for i, bt in enumerate(cfg["down_block_types"]):
        if "CrossAttn" in bt:
            for j in range(lpb):
                add(f"down_blocks.{i}.attentions.{j}", ch[i], tpl if isinstance(tpl, int) else tpl[i])
    rev = list(reversed(ch))
    for i, bt in enumerate(cfg["up_block_types"]):
        if "CrossAttn" in bt:
            for j in range(lpb + 1):
                add(f"up_blocks.{i}.attentions.{j}", rev[i], tpl if isinstance(tpl, int) else list(reversed(tpl))[i])
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        add("mid_block.attentions.0", ch[-1], tpl if isinstance(tpl, int) else tpl[-1])
    return shapes


def sd_kv_shapes_from_diffusers(cfg: dict) -> Optional[List[tuple]]:
    """Same list read off a UNet that diffusers builds on the meta device (None when diffusers is missing)."""
    try:
        from diffusers import UNet2DConditionModel
    except Exception:  # noqa: BLE001
        return None
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    out = []
    for name, mod in unet.named_modules():
        if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
            out.append((name, mod.out_features, mod.in_features))
    return out


def vit_b16_kv_shapes() -> List[tuple]:
    return [(f"layer.{i}.{kv}", 768, 768) for i in range(12) for kv in ("k", "v")]


def save_plot(path: str, title: str, series: Dict[str, List[tuple]], xlabel: str, ylabel: str = "time [ms]",
              logx: bool = False, logy: bool = True, xticklabels: Optional[List[str]] = None) -> Optional[str]:
    """series: name -> [(x, y)]; returns the path or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"plot skipped: {describe_exc(e)}")
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, pts in series.items():
        pts = [(x, y) for x, y in pts if y is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)))
        ax.set_xticklabels(xticklabels, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def seed_all(seed: int = 0):
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def print_flush(*a):
    print(*a, flush=True)
    sys.stdout.flush()


class sigterm_exits:
    """Context manager: while inside, SIGTERM (the hard ``timeout`` of gpu_check.sh) raises SystemExit in the
    main thread, so that the scripts' ``finally`` blocks still write their reports; a second SIGTERM kills.
    The previous handler is restored on exit (the smoke tests run the scripts inside pytest)."""

    def __enter__(self):
        import signal
        import threading
        self._old = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                signal.signal(signum, signal.SIG_DFL)
                print_flush("SIGTERM: stopping, writing what was measured")
                raise SystemExit(128 + signum)
            try:
                self._old = signal.signal(signal.SIGTERM, handler)
            except (ValueError, OSError):  # not the main interpreter
                self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            import signal
            signal.signal(signal.SIGTERM, self._old)
        return False


def guarded(name: str, fn: Callable, *a, **kw):
    """Run one section of a benchmark; an exception is logged with its traceback (``ERROR section ...``) and
    the script goes on with the next section (None returned).  SystemExit / KeyboardInterrupt pass."""
    try:
        return fn(*a, **kw)
    except Exception as e:  # noqa: BLE001
        print_flush(f"ERROR section {name} failed: {describe_exc(e)}")
        traceback.print_exc()
        sys.stderr.flush()
        return None


def run_keeping_threads(fn, argv):
    """Run a benchmark's ``fn(argv)`` and restore torch's thread count afterwards (the CPU profile sets it);
    meanwhile SIGTERM raises SystemExit (:class:`sigterm_exits`), so the script's finally blocks run."""
    old_threads = torch.get_num_threads()
    try:
        with sigterm_exits():
            return fn(argv)
    finally:
        torch.set_num_threads(old_threads)
