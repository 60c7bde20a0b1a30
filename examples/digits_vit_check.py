"""Real-data check of C-LoRA for class-incremental ViT classification, on 2 CPU cores in minutes.

Data: scikit-learn's 8x8 digits (1,797 real images shipped inside the package), split
70/30 (stratified), as 5 tasks of 2 classes: {0,1}, {2,3}, {4,5}, {6,7}, {8,9}.

Backbone: a small transformers ViT (8x8 images, patch 2 -> 16 patches + CLS, hidden 64,
4 layers, 4 heads), randomly initialised and fully trained on the first task only: that
is the "pre-trained backbone" every method starts from (the same weights for all).

Then the whole 5-task sequence is learned class-incrementally (clora_fast.vit_train
protocol: new head block per task, past-class logits masked while training, evaluation
after each task on every class seen so far) by:

* ``clora``         C-LoRA on K/V of every block (rank 8), penalty weight lambda (several)
* ``lora``          sequential LoRA on K/V (the same, lambda = 0)
* ``linear_probe``  frozen backbone, only the head blocks train
* ``finetune``      every backbone weight trains (no regularisation), for reference

for both head kinds (``linear`` as in L2P/CODA-Prompt, ``cosine``). Prints a markdown
table (final average accuracy / average forgetting, class-incremental and, as a
diagnostic, task-incremental) and optionally writes everything as JSON.

    python examples/digits_vit_check.py                 # the full check (~10-20 min on 2 busy cores)
    python examples/digits_vit_check.py --quick         # a 1-2 minute smoke version
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clora_fast import vit_train as vt  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few epochs, one lambda, one head: a smoke run")
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=10, help="epochs per task")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--penalty-weights", default="1e3,1e4,1e5", help="C-LoRA lambdas (comma-separated)")
    p.add_argument("--heads", default="linear,cosine")
    p.add_argument("--methods", default="linear_probe,lora,clora,finetune")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (each: its own split, backbone, run)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on busy 2-core machines)")
    p.add_argument("--json", help="write all results here")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_epochs, args.epochs, args.penalty_weights, args.heads = 5, 2, "1e3", "cosine"
    torch.set_num_threads(args.threads)
    lambdas = [float(v) for v in args.penalty_weights.split(",") if v]
    heads = [h for h in args.heads.split(",") if h]
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]

    t_all = time.perf_counter()
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
               f"({torch.get_num_threads()} thread(s)), load average at start "
               f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else platform.machine())
    print(f"machine: {machine}", file=sys.stderr)
    runs = []
    for seed in seeds:
        tasks = vt.load_digits_tasks(5, seed=seed)
        torch.manual_seed(seed)
        backbone = vt.build_backbone(config=vt.tiny_vit_config(image_size=8, patch_size=2, num_channels=1,
                                                               hidden_size=64, num_hidden_layers=4,
                                                               num_attention_heads=4, intermediate_size=128))
        t0 = time.perf_counter()
        pre = vt.pretrain_backbone(backbone, tasks[0], epochs=args.pretrain_epochs, lr=1e-3, seed=seed)
        print(f"seed {seed}: pretrained on task 0 {tasks[0].classes} in {time.perf_counter() - t0:.1f} s: {pre}",
              file=sys.stderr)
        for head in heads:
            variants = []
            for m in methods:
                if m == "clora":
                    variants += [("clora", lam) for lam in lambdas]
                else:
                    variants.append((m, None))
            for m, lam in variants:
                res = vt.run_continual(backbone, tasks, method=m, penalty_weight=lam, rank=args.rank,
                                       epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, head=head,
                                       backend=args.backend, seed=seed)
                d = res.to_dict()
                d.update(seed=seed, head=head, penalty_weight=lam, pretrain=pre)
                runs.append(d)
                print(f"seed {seed} head {head} {m}{'' if lam is None else f' lambda={lam:g}'}: "
                      f"CIL acc {res.final_avg_acc:.4f} forgetting {res.avg_forgetting:.4f} | "
                      f"TIL acc {res.final_avg_acc_til:.4f} forgetting {res.avg_forgetting_til:.4f} "
                      f"({res.wall_s:.1f} s)", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t_all

    # markdown table, averaged over seeds
    print(f"\nmachine: {machine}; total wall time {wall:.0f} s; seeds {seeds}; pretrain {args.pretrain_epochs} "
          f"epochs; {args.epochs} epochs/task; rank {args.rank}; lr {args.lr}; batch {args.batch_size}\n")
    print("| head | method | lambda | CIL final avg acc | CIL avg forgetting | TIL final avg acc | "
          "TIL avg forgetting | wall s/run |")
    print("|---|---|---|---|---|---|---|---|")
    keys = []
    for r in runs:
        k = (r["head"], r["method"], r["penalty_weight"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        rs = [r for r in runs if (r["head"], r["method"], r["penalty_weight"]) == k]
        mean = lambda f: sum(r[f] for r in rs) / len(rs)  # noqa: E731
        lam = "-" if k[2] is None else f"{k[2]:g}"
        if k[1] == "lora":
            lam = "0"
        print(f"| {k[0]} | {k[1]} | {lam} | {mean('final_avg_acc'):.3f} | {mean('avg_forgetting'):.3f} | "
              f"{mean('final_avg_acc_til'):.3f} | {mean('avg_forgetting_til'):.3f} | {mean('wall_s'):.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "wall_s": wall, "args": vars(args), "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
