#!/usr/bin/env python
"""Block-config sweep of the segmented LoRA projection kernels (the 'fused' strategy) on a GPU.

The kernels pick one block config by heuristic (``_fwd_config`` / ``_bwd_config`` in
``kernels/lora_projection.py``; Triton's multi-config autotune needs a GPU at import time and
re-tunes per shape, so it is not used).  This script times the forward and the backward of
``segmented_lora_forward`` / ``segmented_lora_backward`` under a list of candidate configs
(``triton.testing.do_bench`` with ``return_mode="median"`` where this Triton has it, else its mean; ms,
kernels only: the launches are queued back to back),
checks each result against the default config's, and prints the fastest next to the heuristic's
choice, so that the heuristic can be revised from measurements.

Shapes: the whole-UNet K/V launch (SD-1.5's 32 cross-attention projections, 77 tokens x batch 2)
and one ViT-B/16 layer's K and V (197 tokens x batch 128), bf16, rank 16.

The penalty sweep interleaves its cases (bf16, and the controller's fp32 with ieee / tf32 / 3xTF32
products): every case's default config first, then the next config of each case in turn, so that a short
budget reaches the fp32 cases too.  tune.jsonl gets a line per timed config as it goes; tune.md is written
at the end, also when the budget, an error or SIGTERM stops the sweep.

Run: python benchmarks/tune_triton.py [--out DIR] [--budget S]
On a machine without a GPU it runs the same sweep on tiny shapes in the Triton interpreter
(TRITON_INTERPRET=1), two configs per kernel: a check of the script, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if not os.environ.get("TRITON_INTERPRET"):
    try:
        import torch as _t
        if not _t.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover
        pass

import torch  # noqa: E402

import _common as C  # noqa: E402


def fwd_candidates(gpu: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): Hopper-sized tiles under 228 KB of shared memory."""
    if not gpu:
        return [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1),
                dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)]
    grid = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (64, 256, 64, 8, 3),
            (128, 128, 128, 8, 3), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (128, 64, 64, 4, 4),
            (64, 64, 64, 4, 4), (64, 64, 128, 4, 4)]
    return [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st) for m, n, k, w, st in grid]


def dx_candidates(gpu: bool, LR: int):
    """(BLOCK_M, BLOCK_K, BLOCK_N, warps, stages) of the dx GEMM (reduction over N then L*r)."""
    jb = max(16, min(32, 1 << (LR - 1).bit_length()))
    if not gpu:
        return [dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, BLOCK_J=16, num_warps=4, num_stages=1),
                dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, BLOCK_J=16, num_warps=4, num_stages=1)]
    grid = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (64, 128, 64, 4, 3),
            (128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (128, 256, 32, 8, 4), (64, 256, 32, 8, 4)]
    return [dict(BLOCK_M=m, BLOCK_K=k, BLOCK_N=n, BLOCK_J=jb, num_warps=w, num_stages=st)
            for m, k, n, w, st in grid]


def shapes(gpu: bool):
    if not gpu:
        return [("tiny_kv", 37, 24, [0, 20, 40], 4)]
    sd = C.sd_kv_shapes_from_config(C.load_json_config("sd15_unet.json"))
    offs = [0]
    for _, o, _ in sd:
        offs.append(offs[-1] + o)
    return [("sd_unet_kv_all_b2", 2 * 77, 768, offs, 16), ("vit_b16_kv_b128", 128 * 197, 768, [0, 768, 1536], 16)]


PEN_KNOBS = ("block_o", "block_i", "num_warps", "num_stages", "deterministic", "reduce_block", "fused_reduce",
             "col_splits", "maxnreg", "da_trans")


def _tiles(bo, bi, warps, stages):
    return dict(block_o=bo, block_i=bi, num_warps=warps, num_stages=stages)


def penalty_cases(gpu: bool):
    """(name, P dtype, A/B dtype, precision, [configs]); a config is a dict of launcher keywords
    (``PEN_KNOBS``; absent = the launcher's default).  The first config of each case is the default
    (partial sums reduced inside the main launch); ``fused_reduce=False`` is the two-launch variant."""
    if not gpu:
        return [("tiny_pen", torch.float32, torch.float32, None,
                 [{}, dict(fused_reduce=False), _tiles(16, 16, 4, 1), dict(reduce_block=64)])]
    # the default tiles take ~245 registers at 8 warps (ptxas, sm_90): one program per SM, and the 32 SD layers
    # give 200 row blocks x 2 column chunks = 400 programs, 3.03 waves on 132 SMs; hence the rows with other
    # column splits (waves), a register cap (2 programs per SM, some spills) and 4-warp tiles (2 per SM)
    bf16 = [{}, dict(fused_reduce=False), dict(deterministic=False), dict(deterministic=False, fused_reduce=False),
            dict(col_splits=1), dict(col_splits=3), dict(col_splits=4), dict(maxnreg=128), dict(maxnreg=168),
            dict(maxnreg=128, col_splits=1), dict(da_trans=True), dict(da_trans=True, col_splits=3),
            dict(da_trans=True, **_tiles(64, 64, 8, 3)), dict(reduce_block=512), dict(reduce_block=8192), _tiles(128, 64, 8, 4),
            _tiles(128, 64, 8, 5), _tiles(128, 32, 4, 4), _tiles(64, 64, 4, 3), _tiles(64, 64, 4, 4),
            _tiles(256, 32, 8, 3)]
    ieee = [{}, _tiles(64, 32, 4, 3), dict(da_trans=True)]
    tf32 = [{}, dict(fused_reduce=False), dict(deterministic=False), dict(da_trans=True)]
    # the controller's dtypes (fp32 past and factors) also with 3xTF32 products (about fp32 accuracy on the
    # tensor cores) against full-fp32 FMA products ("ieee", torch's default) and plain TF32
    return [("sd32_bf16P_bf16AB", torch.bfloat16, torch.bfloat16, None, bf16),
            ("sd32_fp32P_fp32AB_ieee", torch.float32, torch.float32, "ieee", ieee),
            ("sd32_fp32P_fp32AB_tf32", torch.float32, torch.float32, "tf32", tf32),
            ("sd32_fp32P_fp32AB_tf32x3", torch.float32, torch.float32, "tf32x3", [{}])]


def penalty_sweep(args, t0, gpu, dev, emit):
    """Grouped penalty over the 32 SD-1.5 K/V projections (r 16): kernel time per launch config; ``emit(row)``
    takes each row as it is measured."""
    from clora_fast.kernels import forgetting_penalty as FP
    timer = C.Timer(dev, 1e9, quick=not gpu)
    peaks_bw = None
    if gpu:
        src = torch.empty(1 << 28, dtype=torch.float32, device=dev)
        dst = torch.empty_like(src)
        peaks_bw = 2 * src.numel() * 4 / (timer(lambda: dst.copy_(src), rep_ms=100) * 1e-3) / 1e9
        del src, dst
    if gpu:
        outs = [o for _, o, _ in C.sd_kv_shapes_from_config(C.load_json_config("sd15_unet.json"))]
        K, r = 768, 16
    else:
        outs, K, r = [20, 37, 9], 24, 4
    cases = penalty_cases(gpu)
    data, refs = {}, {}

    def case_data(name, pdt, abdt):
        if name not in data:
            g = torch.Generator(device=dev).manual_seed(1)
            pasts = [(torch.randn(o, K, device=dev, generator=g) * 0.02).to(pdt) for o in outs]
            As = [(torch.randn(r, K, device=dev, generator=g) * 0.02).to(abdt) for _ in outs]
            Bs = [(torch.randn(o, r, device=dev, generator=g) * 0.02).to(abdt) for o in outs]
            nbytes = sum(p.numel() * p.element_size() + 2 * (a.numel() * a.element_size()
                                                             + b.numel() * b.element_size())
                         for p, a, b in zip(pasts, As, Bs))
            data[name] = (pasts, As, Bs, nbytes)
        return data[name]

    # round robin over the cases: config i of every case before config i+1 of any (the defaults first)
    schedule = [(c, i) for i in range(max(len(c[4]) for c in cases)) for c in cases if i < len(c[4])]
    for (name, pdt, abdt, prec, cfgs), i in schedule:
        if time.perf_counter() - t0 > args.budget:
            break
        cfg = cfgs[i]
        pasts, As, Bs, nbytes = case_data(name, pdt, abdt)
        ref = refs.get(name)
        kw = dict(cfg, input_precision=prec)
        fn = lambda kw=kw: FP.grouped_forgetting_penalty_forward(pasts, As, Bs, 1.0, **kw)  # noqa: E731
        try:
            loss = fn()[0]
            ref = refs[name] = loss if ref is None else ref
            rel = abs(float(loss) - float(ref)) / max(abs(float(ref)), 1e-30)
            if rel > 1e-2:
                raise RuntimeError(f"loss differs from the default config's by {rel:.2g}")
            ms = timer.device_ms(fn, iters=5, flush=True) if gpu else timer(fn)
            status = "ok"
        except Exception as e:  # noqa: BLE001
            ms, status = None, f"n/a ({C.describe_exc(e)})"
        # the plan fn() used (a failed config may not have made one: no registers then)
        ck = getattr(next(reversed(FP._PLANS.values()), None), "compiled", None) if ms else None
        gbps = nbytes / (ms * 1e-3) / 1e9 if ms else None
        row = dict(shape=name, kernel="penalty", heuristic=i == 0, time_ms=ms, status=status, gbps=gbps,
                   bw_frac=(gbps / peaks_bw) if gbps and peaks_bw else None, copy_gbps=peaks_bw,
                   config={k: cfg.get(k, "default") for k in PEN_KNOBS},
                   regs=getattr(ck, "n_regs", None), spills=getattr(ck, "n_spills", None),
                   device=torch.cuda.get_device_name(0) if gpu else "cpu (interpreter)")
        emit(row)


def _bench_fn():
    """ms of ``fn`` by ``triton.testing.do_bench``: the median where this Triton takes ``return_mode``
    (3.x), else its default (the mean)."""
    import inspect

    import triton.testing
    try:
        median = "return_mode" in inspect.signature(triton.testing.do_bench).parameters
    except (TypeError, ValueError):
        median = False

    def bench(fn):
        if median:
            return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=5, rep=20))
    return bench


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    ap.add_argument("--budget", type=float, default=120.0, help="seconds for the whole sweep (stops early)")
    ap.add_argument("--skip-projection", action="store_true", help="only the penalty sweep")
    ap.add_argument("--skip-penalty", action="store_true", help="only the projection sweep")
    args = ap.parse_args(argv)
    from clora_fast.kernels import lora_projection as LP

    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    jsonl = open(os.path.join(args.out, "tune.jsonl"), "w")

    def emit(row):
        """Keep a measured row: in the table, and in tune.jsonl at once (a killed sweep keeps its lines)."""
        rows.append(row)
        jsonl.write(json.dumps(row) + "\n")
        jsonl.flush()
        C.print_flush(json.dumps(row))

    gpu_bench = _bench_fn() if gpu else None

    def bench(fn):
        if gpu:
            return gpu_bench(fn)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    # the two sweeps each on their own (an error is logged, the other runs); tune.md is written at the end
    # whatever happens, SIGTERM (gpu_check.sh's hard timeout) included
    try:
        with C.sigterm_exits():
            if not args.skip_projection:
                C.guarded("projection sweep", _projection_sweep, args, t0, gpu, dev, dtype, LP, bench, emit)
            if not args.skip_penalty:
                C.guarded("penalty sweep", penalty_sweep, args, t0, gpu, dev, emit)
    finally:
        jsonl.close()
        _write_md(args, rows)
    return 0


def _projection_sweep(args, t0, gpu, dev, dtype, LP, bench, emit):
    orig_fwd, orig_bwd = LP._fwd_config, LP._bwd_config
    try:
        for name, M, K, offs, r in shapes(gpu):
            g = torch.Generator(device=dev).manual_seed(0)
            L, N = len(offs) - 1, offs[-1]
            x = torch.randn(M, K, device=dev, generator=g).to(dtype)
            w = (torch.randn(N, K, device=dev, generator=g) / K ** 0.5).to(dtype)
            a = (torch.randn(L * r, K, device=dev, generator=g) / K ** 0.5).to(dtype)
            b = (torch.randn(N, r, device=dev, generator=g) * 0.02).to(dtype)
            gy = torch.randn(M, N, device=dev, generator=g).to(dtype)
            scales = [1.0] * L
            y0, xa = LP.segmented_lora_forward(x, w, a, b, offs, scales)
            dx0, _, _ = LP.segmented_lora_backward(gy, x, w, a, b, xa, offs, scales, need_dA=False, need_dB=False)
            sizes = [q - p for p, q in zip(offs, offs[1:])]
            heur_f = orig_fwd(M, K, sizes, LP._rank_pad(r), x.element_size(), not gpu, LP._dot_precision(dtype))
            heur_b = orig_bwd(M, K, N, L * r, sizes, LP._rank_pad(r), x.element_size(), not gpu,
                              LP._dot_precision(dtype))["dx"]
            flops_f = 2 * M * K * N + 2 * M * K * L * r + 2 * M * N * r
            for kind, cands, heur in (("fwd", fwd_candidates(gpu), heur_f),
                                      ("dx", dx_candidates(gpu, L * r), heur_b)):
                for cfg in [heur] + [c for c in cands if c != heur]:
                    if time.perf_counter() - t0 > args.budget:
                        break
                    try:
                        if kind == "fwd":
                            LP._fwd_config = lambda *a_, _c=cfg, **k_: dict(_c)
                            fn = lambda: LP.segmented_lora_forward(x, w, a, b, offs, scales)  # noqa: E731
                            out = fn()[0]
                            ref = y0
                        else:
                            base = orig_bwd(M, K, N, L * r, sizes, LP._rank_pad(r), x.element_size(), not gpu,
                                            LP._dot_precision(dtype))
                            LP._bwd_config = lambda *a_, _c=cfg, _b=base, **k_: dict(_b, dx=dict(_c))
                            fn = lambda: LP.segmented_lora_backward(gy, x, w, a, b, xa, offs, scales,  # noqa: E731
                                                                    need_dA=False, need_dB=False)
                            out = fn()[0]
                            ref = dx0
                        err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-9))
                        ms = bench(fn) if err < 3e-2 else None
                        status = "ok" if ms is not None else f"mismatch (rel err {err:.2g})"
                    except Exception as e:  # noqa: BLE001  (e.g. out of shared memory for this config)
                        ms, status = None, f"n/a ({C.describe_exc(e)})"
                    finally:
                        LP._fwd_config, LP._bwd_config = orig_fwd, orig_bwd
                    fl = flops_f if kind == "fwd" else 2 * M * N * K + 2 * M * L * r * K
                    row = dict(shape=name, kernel=kind, config=cfg, heuristic=cfg == heur, time_ms=ms,
                               tflops=(fl / (ms * 1e-3) / 1e12) if ms else None, status=status,
                               device=torch.cuda.get_device_name(0) if gpu else "cpu (interpreter)")
                    emit(row)
    finally:
        LP._fwd_config, LP._bwd_config = orig_fwd, orig_bwd


def _write_md(args, rows):
    md = ["# tune_triton: block-config sweep of the fused projection kernels\n\n",
          f"- device: {rows[0]['device'] if rows else 'n/a'}; commit {C.git_commit()}; bf16 on GPU, rank 16\n\n",
          "| shape | kernel | heuristic ms (TFLOP/s) | best ms (TFLOP/s) | best config | configs timed |\n",
          "|---|---|---|---|---|---|\n"]
    for name, kind in dict.fromkeys((r["shape"], r["kernel"]) for r in rows if r["kernel"] != "penalty"):
        sel = [r for r in rows if r["shape"] == name and r["kernel"] == kind and r["time_ms"]]
        heur = next((r for r in rows if r["shape"] == name and r["kernel"] == kind and r["heuristic"]), None)
        best = min(sel, key=lambda r: r["time_ms"]) if sel else None
        f = lambda r: f"{r['time_ms']:.4g} ({r['tflops']:.3g})" if r and r["time_ms"] else "n/a"  # noqa: E731
        md.append(f"| {name} | {kind} | {f(heur)} | {f(best)} | {best['config'] if best else '-'} | {len(sel)} |\n")
    pen = [r for r in rows if r["kernel"] == "penalty"]
    order = list(dict.fromkeys(r["shape"] for r in pen))
    pen.sort(key=lambda r: order.index(r["shape"]))       # the sweep interleaves the cases: table by case
    if pen:
        md += ["\n## penalty kernels (main [+ reduce]), GPU kernel time after an L2 flush (torch.profiler)\n\n",
               f"| case | config ({', '.join(PEN_KNOBS)}) | default | kernels ms | GB/s | "
               "% of copy BW | registers / spills | status |\n", "|---|---|---|---|---|---|---|---|\n"]
        for r in pen:
            c = r["config"]
            md.append(f"| {r['shape']} | {', '.join(str(c[k]) for k in PEN_KNOBS)} | {'yes' if r['heuristic'] else ''} | "
                      f"{r['time_ms'] and round(r['time_ms'], 4)} | {r.get('gbps') and round(r['gbps'])} | "
                      f"{r.get('bw_frac') and round(100 * r['bw_frac'], 1)} | {r.get('regs')} / {r.get('spills')} | "
                      f"{r['status']} |\n")
    with open(os.path.join(args.out, "tune.md"), "w") as fh:
        fh.write("".join(md))
    print("".join(md))


if __name__ == "__main__":
    sys.exit(main())
