#!/usr/bin/env python
"""Nsight Compute driver: one warm launch of a clora_fast kernel to profile, and a summary of ncu's CSV.

Run a case (warm-up launches first, so that ``ncu --launch-skip WARMUP --launch-count 1`` captures a
steady-state launch with its tables cached and its binary compiled):

    ncu --clock-control none --kernel-name regex:_penalty_main_kernel --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section SchedulerStats --csv --page details \\
        python benchmarks/profile_kernels.py --case penalty_bf16 > ncu.csv
    python benchmarks/profile_kernels.py --summarize ncu.csv > ncu.md

``benchmarks/gpu_check.sh`` does both for every case, last and only with the time left before its deadline
(at most ``NCU_S`` seconds, ``NCU_CASE_S`` = 45 per case: python and CUDA start under ncu, the warm-up launches
and ncu's replay passes), with ``ncu`` from the PATH, /opt/nvidia/nsight-compute*/ or /usr/local/cuda*/bin/.

Cases (the grouped forgetting penalty over the 32 SD-1.5 cross-attention K/V projections, rank 16, the
launcher's default configuration; kernel ``_penalty_main_kernel``):
  penalty_bf16   bf16 past and bf16 factors (native bf16 tensor-core products)
  penalty_ctl    fp32 past and fp32 factors, as a controller holds them (fp32 products unless TF32 is on)
On a CPU (``TRITON_INTERPRET=1``) the cases run at tiny shapes, so the driver itself can be tested.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _common as C  # noqa: E402

CASES = {"penalty_bf16": (torch.bfloat16, torch.bfloat16), "penalty_ctl": (torch.float32, torch.float32)}
KERNEL = {"penalty_bf16": "_penalty_main_kernel", "penalty_ctl": "_penalty_main_kernel"}
# metrics worth a line in the summary (ncu's names; substrings, case-insensitive), in this order
KEY_METRICS = ["Duration", "DRAM Throughput", "Memory Throughput", "L2 Cache Throughput", "Compute (SM) Throughput",
               "Registers Per Thread", "Shared Memory Configuration Size", "Dynamic Shared Memory Per Block",
               "Block Limit Registers", "Block Limit Shared Mem", "Theoretical Occupancy", "Achieved Occupancy",
               "Waves Per SM", "Grid Size", "Warp Cycles Per Issued Instruction", "Issued Warp Per Scheduler",
               "No Eligible", "Active Warps Per Scheduler", "Eligible Warps Per Scheduler", "Mem Busy",
               "Max Bandwidth", "L1/TEX Hit Rate", "L2 Hit Rate"]


def run_case(case: str, warmup: int) -> int:
    from clora_fast.kernels import forgetting_penalty as FP
    p_dt, ab_dt = CASES[case]
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    if gpu:
        outs = [o for _, o, _ in C.sd_kv_shapes_from_config(C.load_json_config("sd15_unet.json"))]
        K, r = 768, 16
    else:
        outs, K, r = [20, 37, 9], 24, 4
    g = torch.Generator().manual_seed(0)
    pasts = [(torch.randn(o, K, generator=g) * 0.02).to(dev, p_dt) for o in outs]
    As = [(torch.randn(r, K, generator=g) * 0.02).to(dev, ab_dt) for _ in outs]
    Bs = [(torch.randn(o, r, generator=g) * 0.02).to(dev, ab_dt) for o in outs]
    for _ in range(warmup + 1):          # the last one is the launch ncu captures
        loss, dAs, dBs = FP.grouped_forgetting_penalty_forward(pasts, As, Bs, 1.0)
    if gpu:
        torch.cuda.synchronize()
    plan = next(reversed(FP._PLANS.values()))
    print(f"case {case}: {len(outs)} layers, {plan.n_prog} programs of {plan.bo}x{plan.bi}, {plan.num_warps} warps, "
          f"{plan.num_stages} stages, fused reduce {plan.fused}, loss {float(loss):.6g}", file=sys.stderr)
    return 0


def summarize(path: str) -> str:
    """Markdown of ncu's ``--csv --page details`` output: per profiled kernel, the KEY_METRICS rows first, then
    all its rows in a collapsed block (for the record)."""
    with open(path, newline="") as f:
        text = f.read()
    title = f"# ncu: {os.path.splitext(os.path.basename(path))[0]}\n"
    start = text.find('"ID"')            # ncu prints its own log lines ("==PROF==") before the CSV
    if start < 0:
        return f"{title}\nno CSV table in {path} (ncu failed?):\n\n```\n{text[-2000:]}\n```\n"
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    kernels: dict = {}
    for row in rows:
        key = (row.get("ID", ""), row.get("Kernel Name", "?"))
        kernels.setdefault(key, []).append(row)
    md = [title]
    for (kid, name), krows in kernels.items():
        first = krows[0]
        md.append(f"\n## {name[:80]} (launch {kid}; grid {first.get('Grid Size', '?')}, block "
                  f"{first.get('Block Size', '?')})\n\n| section | metric | value | unit |\n|---|---|---|---|\n")
        picked = []
        for want in KEY_METRICS:
            for row in krows:
                if want.lower() in row.get("Metric Name", "").lower() and row not in picked:
                    picked.append(row)
        for row in picked:
            md.append(f"| {row.get('Section Name', '')} | {row.get('Metric Name', '')} | {row.get('Metric Value', '')} "
                      f"| {row.get('Metric Unit', '')} |\n")
        md.append(f"\n<details><summary>all {len(krows)} metrics</summary>\n\n| section | metric | value | unit |\n"
                  "|---|---|---|---|\n")
        for row in krows:
            md.append(f"| {row.get('Section Name', '')} | {row.get('Metric Name', '')} | {row.get('Metric Value', '')} "
                      f"| {row.get('Metric Unit', '')} |\n")
        md.append("\n</details>\n")
    return "".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), help="run this case (under ncu)")
    ap.add_argument("--warmup", type=int, default=3, help="launches before the profiled one (ncu --launch-skip)")
    ap.add_argument("--kernel-of", choices=sorted(CASES), help="print the kernel name of a case and exit")
    ap.add_argument("--summarize", metavar="CSV", help="print a markdown summary of ncu's --csv --page details output")
    args = ap.parse_args(argv)
    if args.kernel_of:
        print(KERNEL[args.kernel_of])
        return 0
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if args.case:
        return run_case(args.case, args.warmup)
    ap.error("give --case, --kernel-of or --summarize")
    return 2


if __name__ == "__main__":
    sys.exit(main())
