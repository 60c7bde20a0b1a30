"""Class-incremental continual learning of a ViT classifier with C-LoRA on K/V.

Protocol (as in prompt-based continual learning, L2P / CODA-Prompt): a sequence of
tasks, each bringing a new, disjoint set of classes. The backbone's K/V projections
carry C-LoRA (one controller concept per task: past tasks folded into the frozen
``P``, the forgetting penalty ``lambda * ||P ⊙ s B@A||^2`` added to the loss); a
classifier head grows by the new classes at every task. While task ``t`` trains, the
logits of past classes are masked (``-inf``), so the cross-entropy is over the
current classes only and the old class weights stay as they were. After each task the
model is evaluated on the test sets of every task seen so far, predicting among *all*
classes seen so far (class-incremental: no task id at test time).

Metrics, with ``acc[i][j]`` the accuracy on task ``j``'s test set after training task ``i``:

* final average accuracy  ``mean_j acc[T-1][j]``
* average forgetting      ``mean_{j<T-1} (max_{j<=i<T-1} acc[i][j] - acc[T-1][j])``

The same two numbers are also reported task-incrementally (``*_til``: the task id is given
at test time, prediction among that task's classes only) as a diagnostic.

Methods: ``"clora"`` (C-LoRA: LoRA on K/V + forgetting penalty), ``"lora"`` (sequential
LoRA: the same, penalty weight 0), ``"linear_probe"`` (frozen backbone, only the heads
train), ``"finetune"`` (every backbone weight trains, no regularisation).

Python API: :func:`run_continual`, :func:`make_class_incremental_tasks`,
:func:`load_digits_tasks`, :func:`build_backbone`, :func:`pretrain_backbone`,
:func:`save_backbone` / :func:`load_backbone`, :func:`load_head`.
Command line: ``clora-fast train-vit ...`` (:func:`cli_main`).

``train-vit --output OUT`` writes (every file atomically; safetensors and JSON only)::

    OUT/backbone.safetensors       the backbone weights every method started from (after
                                   --pretrain-epochs), i.e. the base weights the banks were made for
    OUT/backbone.json              how to rebuild it (framework, ViTConfig or timm name + kwargs, sha256)
    OUT/<method>_head.safetensors  the trained classifier head (class ids in its metadata)
    OUT/<method>_bank/             clora / lora: the controller's concept bank (one concept per task)
    OUT/results.json               metrics, written last

Reloading a trained C-LoRA model::

    from clora_fast import vit_train as vt
    import clora_fast
    backbone = vt.load_backbone("OUT")                   # same weights, bit for bit
    ctrl = clora_fast.load(backbone, "OUT/clora_bank")   # every task folded in
    head = vt.load_head("OUT/clora_head.safetensors")
    logits = head(vt.FeatureExtractor(backbone)(images))  # columns: head.class_ids

(``finetune`` changes the backbone itself and saves only its head: that head does not fit
the saved backbone.) ``--seed`` seeds torch, numpy and ``random`` before the backbone's random
init, so the same command gives the same results and files.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import numbers
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["Task", "ContinualResult", "FeatureExtractor", "GrowingHead", "CosineLinear", "METHODS", "HEADS",
           "make_class_incremental_tasks", "load_digits_tasks", "load_tasks_file", "build_backbone",
           "tiny_vit_config", "pretrain_backbone", "run_continual", "accuracy_metrics", "save_backbone",
           "load_backbone", "load_head", "cli_main"]

METHODS = ("clora", "lora", "linear_probe", "finetune")
HEADS = ("linear", "cosine")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@dataclass
class Task:
    """One task: its (global) class ids and its train/test images ``[N, C, H, W]`` and labels ``[N]``."""
    classes: List[int]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def _check_images(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"{name} must be [N, C, H, W] (or [N, H, W]), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    return x


def _check_labels(name: str, y, n: int, x_name: str) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one label per image of {x_name} ({n}), "
                         f"got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex():
        raise TypeError(f"{name} must hold integer class ids, got dtype {y.dtype}")
    return y.long()


def make_class_incremental_tasks(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, *,
                                 n_tasks: Optional[int] = None, classes_per_task: Optional[int] = None,
                                 class_order: Optional[Sequence[int]] = None) -> List[Task]:
    """Split a labelled data set into class-incremental tasks.

    ``class_order`` (default: sorted class ids) is cut into consecutive chunks of
    ``classes_per_task`` classes (or into ``n_tasks`` equal chunks). Labels stay global."""
    x_train = _check_images("x_train", x_train)
    x_test = _check_images("x_test", x_test)
    y_train = _check_labels("y_train", y_train, x_train.shape[0], "x_train")
    y_test = _check_labels("y_test", y_test, x_test.shape[0], "x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"x_train and x_test must have the same image shape, got {tuple(x_train.shape[1:])} "
                         f"and {tuple(x_test.shape[1:])}")
    present = sorted(set(y_train.tolist()))
    order = list(class_order) if class_order is not None else present
    if len(set(order)) != len(order):
        raise ValueError(f"class_order has repeated classes: {order}")
    missing = [c for c in order if c not in present]
    if missing:
        raise ValueError(f"class_order names classes {missing} that have no training images "
                         f"(classes present in y_train: {present})")
    if (n_tasks is None) == (classes_per_task is None):
        raise ValueError(f"give exactly one of n_tasks or classes_per_task, got n_tasks={n_tasks}, "
                         f"classes_per_task={classes_per_task}")
    if n_tasks is not None:
        if n_tasks < 1 or len(order) % n_tasks:
            raise ValueError(f"n_tasks={n_tasks} must divide the number of classes ({len(order)})")
        classes_per_task = len(order) // n_tasks
    if classes_per_task < 1 or len(order) % classes_per_task:
        raise ValueError(f"classes_per_task={classes_per_task} must divide the number of classes ({len(order)})")
    tasks = []
    for t0 in range(0, len(order), classes_per_task):
        cls = order[t0:t0 + classes_per_task]
        c = torch.tensor(cls)
        tr = torch.isin(y_train, c)
        te = torch.isin(y_test, c)
        tasks.append(Task(cls, x_train[tr], y_train[tr], x_test[te], y_test[te]))
    return tasks


def load_digits_tasks(n_tasks: int = 5, *, image_size: int = 8, test_fraction: float = 0.3,
                      seed: int = 0, class_order: Optional[Sequence[int]] = None) -> List[Task]:
    """scikit-learn's 8x8 digits (1,797 real images, shipped inside the package) as class-
    incremental tasks. Pixels scaled to [0, 1] then standardised; ``image_size > 8`` upsamples
    bilinearly. Stratified train/test split with ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.5) / 0.5
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    idx_tr, idx_te = train_test_split(range(len(y)), test_size=test_fraction, random_state=seed,
                                      stratify=d.target)
    idx_tr, idx_te = torch.tensor(idx_tr), torch.tensor(idx_te)
    return make_class_incremental_tasks(x[idx_tr], y[idx_tr], x[idx_te], y[idx_te], n_tasks=n_tasks,
                                        class_order=class_order)


def load_tasks_file(path: str, *, n_tasks: Optional[int] = None, classes_per_task: Optional[int] = None,
                    class_order: Optional[Sequence[int]] = None) -> List[Task]:
    """Tasks from a safetensors file holding ``x_train`` ``[N,C,H,W]``/``[N,H,W]``, ``y_train`` ``[N]``,
    ``x_test``, ``y_test`` (no pickle)."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    t = load_file(path)
    need = ("x_train", "y_train", "x_test", "y_test")
    missing = [k for k in need if k not in t]
    if missing:
        raise KeyError(f"data file {path!r} lacks tensors {missing}; it has {sorted(t)}")
    return make_class_incremental_tasks(t["x_train"], t["y_train"], t["x_test"], t["y_test"],
                                        n_tasks=n_tasks, classes_per_task=classes_per_task,
                                        class_order=class_order)


# --------------------------------------------------------------------------------------------
# backbone
# --------------------------------------------------------------------------------------------
def tiny_vit_config(image_size: int = 8, patch_size: int = 2, num_channels: int = 1, hidden_size: int = 64,
                    num_hidden_layers: int = 4, num_attention_heads: int = 4, intermediate_size: int = 128):
    """A small transformers ``ViTConfig`` (digits-sized by default)."""
    from transformers import ViTConfig
    return ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=num_channels,
                     hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                     num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build_backbone(*, framework: str = "transformers", model: Optional[str] = None, config=None,
                   timm_model: Optional[str] = None, timm_kwargs: Optional[dict] = None,
                   checkpoint: Optional[str] = None) -> nn.Module:
    """A ViT backbone, random from a config or loaded from local safetensors.

    * ``framework="transformers"``: ``model`` = a local folder (``config.json`` +
      ``model.safetensors``, e.g. from ``save_pretrained``) or ``config`` = a ``ViTConfig``,
      a dict, or a path to a config JSON (random weights, or ``checkpoint`` = a ``.safetensors``
      state dict of a ViTModel/ViTForImageClassification); neither: :func:`tiny_vit_config`.
    * ``framework="timm"``: ``timm_model`` name (e.g. ``"vit_tiny_patch16_224"``) built with
      ``pretrained=False, num_classes=0, **timm_kwargs``; ``checkpoint`` = optional
      ``.safetensors`` state dict to load (head keys ignored).

    Arguments that do not apply are refused, never ignored: ``model`` together with
    ``checkpoint`` or ``config`` (the folder already holds both), ``timm_model``/``timm_kwargs``
    with ``framework="transformers"``, ``model``/``config`` with ``framework="timm"``. The seed
    of a random init is the caller's: seed torch's RNG first (``clora-fast train-vit`` does)."""
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path to a .safetensors file, got {type(checkpoint).__name__}")
    if framework == "transformers":
        from transformers import ViTConfig, ViTModel
        if timm_model is not None or timm_kwargs:
            raise ValueError("timm_model/timm_kwargs apply to framework='timm' only; got them with "
                             "framework='transformers'")
        if model is not None:
            if checkpoint is not None:
                raise ValueError(f"give either model (a folder, {str(model)!r}) or checkpoint (+ config, "
                                 f"{str(checkpoint)!r}), not both: the folder's own weights would be used "
                                 f"and the checkpoint ignored")
            if config is not None:
                raise ValueError(f"give either model (a folder, {str(model)!r}, which holds its own config.json) "
                                 f"or config, not both")
            if not os.path.isdir(model):
                raise FileNotFoundError(f"model={model!r}: expected a local folder with config.json and "
                                        f"model.safetensors")
            return ViTModel.from_pretrained(model, use_safetensors=True, add_pooling_layer=False)
        if config is None:
            cfg = tiny_vit_config()
        elif isinstance(config, ViTConfig):
            cfg = config
        elif isinstance(config, dict):
            cfg = ViTConfig(**config)
        elif isinstance(config, str):
            if not os.path.isfile(config):
                raise FileNotFoundError(f"config={config!r} does not exist")
            with open(config) as f:
                cfg = ViTConfig(**json.load(f))
        else:
            raise TypeError(f"config must be a ViTConfig, dict or JSON path, got {type(config).__name__}")
        net = ViTModel(cfg, add_pooling_layer=False)
        if checkpoint is not None:
            _load_hf_checkpoint(net, checkpoint)
        return net
    if framework == "timm":
        import timm
        if not timm_model:
            raise ValueError("framework='timm' needs timm_model (e.g. 'vit_tiny_patch16_224')")
        if model is not None or config is not None:
            raise ValueError("model/config apply to framework='transformers' only; for timm give timm_model "
                             "(+ timm_kwargs, checkpoint)")
        net = timm.create_model(timm_model, pretrained=False, num_classes=0, **(timm_kwargs or {}))
        if checkpoint is not None:
            from safetensors.torch import load_file
            if not str(checkpoint).endswith(".safetensors") or not os.path.isfile(checkpoint):
                raise FileNotFoundError(f"checkpoint={checkpoint!r}: expected an existing .safetensors file")
            sd = {k: v for k, v in load_file(checkpoint).items() if not k.startswith("head.")}
            missing, unexpected = net.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.startswith("head.")]
            if missing or unexpected:
                raise ValueError(f"checkpoint={checkpoint!r} does not fit timm model {timm_model!r}: "
                                 f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        return net
    raise ValueError(f"framework must be 'transformers' or 'timm', got {framework!r}")


def _load_hf_checkpoint(net: nn.Module, checkpoint: str) -> None:
    """Load a ``.safetensors`` state dict of a ViTModel or ViTForImageClassification (``vit.``
    prefix stripped, classifier/pooler keys ignored) into ``net``; strict otherwise."""
    from safetensors.torch import load_file
    if not str(checkpoint).endswith(".safetensors") or not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint={checkpoint!r}: expected an existing .safetensors file")
    sd = {}
    for k, v in load_file(checkpoint).items():
        if k.startswith(("classifier.", "pooler.", "vit.pooler.")):
            continue
        sd[k[len("vit."):] if k.startswith("vit.") else k] = v
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint={checkpoint!r} does not fit the ViT config: missing {list(missing)[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")


class FeatureExtractor(nn.Module):
    """Image -> pooled feature vector ``[B, D]`` for a transformers ViT (CLS token after the final
    layernorm) or a timm model (``forward_head(..., pre_logits=True)``)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        inner = getattr(backbone, "vit", None)  # ViTForImageClassification -> its ViTModel
        self.backbone = inner if isinstance(inner, nn.Module) else backbone
        if hasattr(self.backbone, "forward_features") and hasattr(self.backbone, "forward_head"):
            self.kind = "timm"
            self.dim = int(getattr(self.backbone, "num_features", getattr(self.backbone, "embed_dim", 0)))
        elif hasattr(getattr(self.backbone, "config", None), "hidden_size"):
            self.kind = "transformers"
            self.dim = int(self.backbone.config.hidden_size)
        else:
            raise TypeError(f"backbone must be a transformers ViT or a timm VisionTransformer, got "
                            f"{type(backbone).__module__}.{type(backbone).__name__}")

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "timm":
            return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.backbone(pixel_values=x).last_hidden_state[:, 0]


class CosineLinear(nn.Module):
    """``scale * normalize(x) @ normalize(W).T``: logits bounded by ``scale``, so a head trained
    on an easy early task cannot dominate later heads by sheer magnitude."""

    def __init__(self, dim: int, n: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dim) * dim ** -0.5)
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


class GrowingHead(nn.Module):
    """Classifier over every class seen so far: one block per task (``nn.Linear``, or
    :class:`CosineLinear` with ``kind="cosine"``), logits concatenated in task order.
    ``class_ids`` maps logit columns to global class ids. Adding a task freezes the old blocks."""

    def __init__(self, dim: int, kind: str = "linear", cosine_scale: float = 16.0):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"head kind must be one of {HEADS}, got {kind!r}")
        self.dim = dim
        self.kind = kind
        self.cosine_scale = cosine_scale
        self.blocks = nn.ModuleList()
        self.class_ids: List[int] = []

    def add_task(self, classes: Sequence[int]) -> nn.Module:
        for b in self.blocks:
            b.requires_grad_(False)
        blk = nn.Linear(self.dim, len(classes)) if self.kind == "linear" else \
            CosineLinear(self.dim, len(classes), self.cosine_scale)
        p = next(iter(self.blocks.parameters()), None)
        if p is not None:
            blk = blk.to(device=p.device, dtype=p.dtype)
        self.blocks.append(blk)
        self.class_ids.extend(int(c) for c in classes)
        return blk

    def forward(self, feats: Tensor) -> Tensor:
        return torch.cat([b(feats) for b in self.blocks], dim=-1)


# --------------------------------------------------------------------------------------------
# training / evaluation
# --------------------------------------------------------------------------------------------
def _batches(n: int, batch_size: int, gen: Optional[torch.Generator]):
    idx = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield idx[i:i + batch_size]


@torch.no_grad()
def _evaluate_both(feat: FeatureExtractor, head: GrowingHead, task: Task, device, batch_size: int):
    """(class-incremental accuracy: argmax over every class seen so far,
    task-incremental accuracy: argmax over the task's own classes only)."""
    col_of = {c: i for i, c in enumerate(head.class_ids)}
    y = torch.tensor([col_of[int(c)] for c in task.y_test.tolist()], dtype=torch.long)
    own = torch.tensor([col_of[int(c)] for c in task.classes], dtype=torch.long)
    correct = correct_til = 0
    for b in _batches(task.x_test.shape[0], batch_size, None):
        logits = head(feat(task.x_test[b].to(device))).cpu()
        correct += int((logits.argmax(-1) == y[b]).sum())
        correct_til += int((own[logits[:, own].argmax(-1)] == y[b]).sum())
    n = max(1, task.x_test.shape[0])
    return correct / n, correct_til / n


def _evaluate(feat: FeatureExtractor, head: GrowingHead, task: Task, device, batch_size: int) -> float:
    return _evaluate_both(feat, head, task, device, batch_size)[0]


def accuracy_metrics(acc: List[List[float]]) -> Dict[str, float]:
    """``acc[i][j]`` = accuracy on task j after task i (j <= i) -> final average accuracy and
    average forgetting (0 for a single task)."""
    T = len(acc)
    final = acc[-1]
    avg = sum(final) / len(final)
    if T < 2:
        return {"final_avg_acc": avg, "avg_forgetting": 0.0}
    forg = [max(acc[i][j] for i in range(j, T - 1)) - final[j] for j in range(T - 1)]
    return {"final_avg_acc": avg, "avg_forgetting": sum(forg) / len(forg)}


def pretrain_backbone(backbone: nn.Module, task: Task, *, epochs: int = 30, lr: float = 1e-3,
                      batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0, device=None,
                      log: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
    """Fully train ``backbone`` (in place) with a throwaway linear head on ``task`` -- a stand-in
    for a pre-trained backbone when no real weights are available. Returns train/test accuracy."""
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    feat = FeatureExtractor(backbone).to(device)
    head = GrowingHead(feat.dim).to(device)
    head.add_task(task.classes)
    head.to(device)
    col_of = {c: i for i, c in enumerate(head.class_ids)}
    y = torch.tensor([col_of[int(c)] for c in task.y_train.tolist()], dtype=torch.long)
    params = [p for p in backbone.parameters()] + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    feat.eval()
    for ep in range(epochs):
        tot = torch.zeros((), dtype=torch.float64, device=device)    # summed on the device: no read per step
        for b in _batches(task.x_train.shape[0], batch_size, gen):
            loss = F.cross_entropy(head(feat(task.x_train[b].to(device))), y[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.detach().double() * len(b)
        if log and (ep == epochs - 1 or (ep + 1) % 10 == 0):
            log(f"pretrain epoch {ep + 1}/{epochs}: loss {float(tot) / task.x_train.shape[0]:.4f}")
    train_task = Task(task.classes, task.x_train, task.y_train, task.x_train, task.y_train)
    return {"train_acc": _evaluate(feat, head, train_task, device, 256),
            "test_acc": _evaluate(feat, head, task, device, 256)}


@dataclass
class ContinualResult:
    """Outcome of :func:`run_continual`. ``acc[i][j]``: class-incremental accuracy on task j
    after task i (the protocol's metric); ``acc_til``: the same with the task id given at test
    time (argmax over the task's own classes), which separates feature forgetting from the
    bias between old and new heads."""
    method: str
    acc: List[List[float]]
    final_avg_acc: float
    avg_forgetting: float
    task_classes: List[List[int]]
    wall_s: float
    acc_til: List[List[float]] = field(default_factory=list)  # task-incremental (task id given)
    final_avg_acc_til: float = float("nan")
    avg_forgetting_til: float = float("nan")
    settings: Dict = field(default_factory=dict)
    penalty_last: List[float] = field(default_factory=list)   # penalty term at the last step of each task
    loss_history: List[List[float]] = field(default_factory=list)  # per task: mean training loss per epoch
    model: Optional[nn.Module] = field(default=None, repr=False)
    head: Optional[GrowingHead] = field(default=None, repr=False)
    controller: Optional[nn.Module] = field(default=None, repr=False)

    def to_dict(self) -> Dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("model", "head", "controller")}
        return d


def run_continual(backbone: nn.Module, tasks: Sequence[Task], *, method: str = "clora", rank: int = 8,
                  alpha: Optional[float] = None, penalty_weight: Optional[float] = None,
                  epochs: int = 10, lr: float = 3e-3, head_lr: Optional[float] = None,
                  batch_size: int = 32, head: str = "linear", backend: str = "auto", seed: int = 0,
                  device=None, copy_backbone: bool = True,
                  log: Optional[Callable[[str], None]] = None) -> ContinualResult:
    """Class-incremental training over ``tasks`` (see the module docstring for the protocol).

    ``method``: ``"clora"`` (``penalty_weight=None`` -> the controller default), ``"lora"``
    (penalty weight forced to 0), ``"linear_probe"``, ``"finetune"``. ``head``: ``"linear"``
    (as in L2P/CODA-Prompt) or ``"cosine"`` (:class:`CosineLinear`). ``copy_backbone=True``
    trains a deep copy (so one pre-trained backbone can serve several runs); the trained
    (patched) model, head and controller are returned in the result."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if not isinstance(tasks, (list, tuple)) or not tasks or not all(isinstance(t, Task) for t in tasks):
        raise TypeError(f"tasks must be a non-empty list of Task, got {type(tasks).__name__}")
    seen: set = set()
    for i, t in enumerate(tasks):
        overlap = seen & set(t.classes)
        if overlap:
            raise ValueError(f"tasks[{i}] repeats classes {sorted(overlap)} of earlier tasks; class-incremental "
                             f"tasks must have disjoint classes")
        seen |= set(t.classes)
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    for name, v in (("lr", lr), ("head_lr", head_lr)):
        # (torch's Adam checks only its default lr, not the per-group ones given here: a negative one ascended)
        if v is not None and (isinstance(v, bool) or not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0)):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if method == "lora" and penalty_weight not in (None, 0, 0.0):
        raise ValueError(f"method='lora' is sequential LoRA (penalty weight 0); got penalty_weight="
                         f"{penalty_weight}; use method='clora' for a penalty")
    t_start = time.perf_counter()
    head_lr = lr if head_lr is None else head_lr
    model = copy.deepcopy(backbone) if copy_backbone else backbone
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.requires_grad_(method == "finetune")
    ctrl = None
    if method in ("clora", "lora"):
        from clora_fast.integrations import vit as vit_integration
        ctrl = vit_integration.patch(model, rank=rank, alpha=alpha,
                                     penalty_weight=0.0 if method == "lora" else penalty_weight,
                                     backend=backend)
        ctrl.to(device)
    feat = FeatureExtractor(model)
    head_kind = head
    head = GrowingHead(feat.dim, kind=head_kind).to(device)
    feat.eval()  # no dropout; ViTs have no batch statistics
    acc: List[List[float]] = []
    acc_til: List[List[float]] = []
    penalty_last: List[float] = []
    loss_history: List[List[float]] = []
    for ti, task in enumerate(tasks):
        new_head = head.add_task(task.classes).to(device)
        n_past = len(head.class_ids) - len(task.classes)
        col_of = {c: i for i, c in enumerate(head.class_ids)}
        y = torch.tensor([col_of[int(c)] for c in task.y_train.tolist()], dtype=torch.long)
        groups = [{"params": list(new_head.parameters()), "lr": head_lr}]
        if ctrl is not None:
            ctrl.begin_concept(f"task{ti}")
            groups.append({"params": list(ctrl.trainable_parameters()), "lr": lr})
        elif method == "finetune":
            groups.append({"params": list(model.parameters()), "lr": lr})
        opt = torch.optim.Adam(groups)
        pen_val = 0.0
        loss_history.append([])
        for ep in range(epochs):
            # the loss summed on the device and read once per epoch (a read per step made the host wait for the
            # forward pass before it could launch the backward)
            tot, n, pen_last = torch.zeros((), dtype=torch.float64, device=device), 0, None
            for b in _batches(task.x_train.shape[0], batch_size, gen):
                logits = head(feat(task.x_train[b].to(device)))
                if n_past:  # mask past-class logits: CE over the current task's classes only
                    logits = logits[:, n_past:]
                    target = y[b].to(device) - n_past
                else:
                    target = y[b].to(device)
                loss = F.cross_entropy(logits, target)
                if ctrl is not None:
                    pen = ctrl.penalty()
                    pen_last = pen.detach()
                    loss = loss + pen
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.detach().double() * len(b)
                n += len(b)
            if pen_last is not None:
                pen_val = float(pen_last)
            loss_history[-1].append(float(tot) / n)
            if log and (ep == epochs - 1):
                log(f"[{method}] task {ti} ({task.classes}) epoch {ep + 1}/{epochs}: loss {loss_history[-1][-1]:.4f}"
                    + (f", penalty {pen_val:.3e}" if ctrl is not None else ""))
        if ctrl is not None:
            ctrl.end_concept()
        penalty_last.append(pen_val)
        both = [_evaluate_both(feat, head, tasks[j], device, 256) for j in range(ti + 1)]
        row = [a for a, _ in both]
        acc.append(row)
        acc_til.append([a for _, a in both])
        if log:
            log(f"[{method}] after task {ti}: acc per task {[round(a, 4) for a in row]}, "
                f"mean {sum(row) / len(row):.4f} (task-incremental mean "
                f"{sum(acc_til[-1]) / len(row):.4f})")
    m = accuracy_metrics(acc)
    m_til = accuracy_metrics(acc_til)
    settings = dict(method=method, rank=rank, alpha=alpha,
                    penalty_weight=(None if ctrl is None else float(getattr(ctrl, "penalty_weight", float("nan")))),
                    epochs=epochs, lr=lr, head_lr=head_lr, batch_size=batch_size, head=head_kind,
                    backend=backend, seed=seed)
    return ContinualResult(method=method, acc=acc, final_avg_acc=m["final_avg_acc"],
                           avg_forgetting=m["avg_forgetting"], task_classes=[list(t.classes) for t in tasks],
                           acc_til=acc_til, final_avg_acc_til=m_til["final_avg_acc"],
                           avg_forgetting_til=m_til["avg_forgetting"],
                           wall_s=time.perf_counter() - t_start, settings=settings, penalty_last=penalty_last,
                           loss_history=loss_history,
                           model=model, head=head, controller=ctrl)


# --------------------------------------------------------------------------------------------
# saving / reloading what train-vit writes
# --------------------------------------------------------------------------------------------
BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_SPEC = "backbone.json"
_BACKBONE_FORMAT = "clora_fast.vit_backbone"


def _atomic_write_json(path: str, obj) -> None:
    from clora_fast.bank import atomic_write_bytes
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _tensors_bytes(tensors: Dict[str, Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)


def save_backbone(backbone: nn.Module, folder: str, *, timm_model: Optional[str] = None,
                  timm_kwargs: Optional[dict] = None) -> Dict:
    """Write ``backbone``'s weights (``backbone.safetensors``) and what rebuilds it
    (``backbone.json``) into ``folder``, atomically; :func:`load_backbone` reads them back.
    A transformers ViT's config is stored whole; a timm model needs its ``timm_model`` name and
    ``timm_kwargs`` (as given to :func:`build_backbone`). Returns the spec written."""
    from clora_fast.bank import atomic_write_bytes
    inner = FeatureExtractor(backbone)
    if inner.kind == "timm":
        if not timm_model:
            raise ValueError("save_backbone: a timm backbone needs timm_model (and timm_kwargs) to be rebuilt")
        spec: Dict = {"framework": "timm", "timm_model": timm_model, "timm_kwargs": dict(timm_kwargs or {})}
    else:
        if timm_model is not None or timm_kwargs:
            raise ValueError("save_backbone: timm_model/timm_kwargs given for a transformers backbone")
        spec = {"framework": "transformers",
                "config": json.loads(inner.backbone.config.to_json_string(use_diff=False))}
    data = _tensors_bytes(inner.backbone.state_dict(), metadata={"format": "pt"})
    spec = {"format": _BACKBONE_FORMAT, "version": 1, **spec, "weights": BACKBONE_WEIGHTS,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    os.makedirs(folder, exist_ok=True)
    atomic_write_bytes(os.path.join(folder, BACKBONE_WEIGHTS), data)
    _atomic_write_json(os.path.join(folder, BACKBONE_SPEC), spec)  # last: names the weights it checks
    return spec


def load_backbone(folder: str) -> nn.Module:
    """Rebuild the backbone :func:`save_backbone` (or ``train-vit --output``) wrote into
    ``folder``: same architecture, same weights bit for bit (checked against the stored sha256),
    on the CPU in eval mode. A bank saved by the same run then loads into it with
    ``clora_fast.load(backbone, folder + "/clora_bank")``."""
    spec_path = os.path.join(folder, BACKBONE_SPEC)
    if not os.path.isfile(spec_path):
        raise FileNotFoundError(f"{spec_path!r} does not exist (written by train-vit --output or save_backbone)")
    with open(spec_path) as f:
        spec = json.load(f)
    if not isinstance(spec, dict) or spec.get("format") != _BACKBONE_FORMAT:
        raise ValueError(f"{spec_path!r} is not a clora_fast backbone spec")
    weights = os.path.join(folder, os.path.basename(str(spec.get("weights", BACKBONE_WEIGHTS))))
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"backbone weights {weights!r} do not exist")
    with open(weights, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if spec.get("sha256") and digest != spec["sha256"]:
        raise ValueError(f"backbone weights {weights!r} do not match {spec_path!r} (sha256 {digest[:12]} != "
                         f"{str(spec['sha256'])[:12]}): the file changed or belongs to another run")
    if spec.get("framework") == "timm":
        net = build_backbone(framework="timm", timm_model=spec["timm_model"], timm_kwargs=spec.get("timm_kwargs"),
                             checkpoint=weights)
    elif spec.get("framework") == "transformers":
        net = build_backbone(framework="transformers", config=dict(spec["config"]), checkpoint=weights)
    else:
        raise ValueError(f"{spec_path!r}: unknown framework {spec.get('framework')!r}")
    return net.eval()


def _save_head(head: GrowingHead, path: str) -> None:
    from clora_fast.bank import atomic_write_bytes
    # one metadata key only: safetensors writes several in a random order (bytes would differ run to run);
    # the kind (bias or not) and the blocks' sizes are in the tensors themselves
    atomic_write_bytes(path, _tensors_bytes(head.state_dict(), metadata={"class_ids": json.dumps(head.class_ids)}))


def load_head(path: str, *, cosine_scale: float = 16.0) -> GrowingHead:
    """The :class:`GrowingHead` saved by ``train-vit --output`` (``<method>_head.safetensors``),
    frozen, in eval mode; its logit columns are ``head.class_ids``. ``linear`` or ``cosine`` is
    read from the tensors (cosine blocks have no bias); ``cosine_scale`` is the one
    :func:`run_continual` uses."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"head file {path!r} does not exist")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if "class_ids" not in meta or "blocks.0.weight" not in sd:
        raise ValueError(f"{path!r} is not a head saved by train-vit (no class_ids metadata or no blocks)")
    class_ids = json.loads(meta["class_ids"])
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    sizes = [int(sd[f"blocks.{i}.weight"].shape[0]) for i in range(n_blocks)]
    if sum(sizes) != len(class_ids):
        raise ValueError(f"head file {path!r}: blocks of {sizes} columns but {len(class_ids)} class ids")
    kind = "linear" if "blocks.0.bias" in sd else "cosine"
    head = GrowingHead(int(sd["blocks.0.weight"].shape[1]), kind=kind, cosine_scale=cosine_scale)
    i = 0
    for n in sizes:
        head.add_task(class_ids[i:i + n])
        i += n
    head.load_state_dict(sd)
    return head.requires_grad_(False).eval()


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from clora_fast.cli import _float_arg, _seed_arg
    p = argparse.ArgumentParser(
        prog="clora-fast train-vit",
        description="Class-incremental continual learning of a ViT classifier with C-LoRA on K/V "
                    "(vs sequential LoRA, linear probe, full fine-tuning). Prints a JSON summary.")
    src = p.add_argument_group("backbone")
    src.add_argument("--framework", choices=("transformers", "timm"), default="transformers")
    src.add_argument("--model", help="local transformers ViT folder (config.json + model.safetensors)")
    src.add_argument("--config", help="transformers ViTConfig JSON (random init); default: a tiny digits ViT")
    src.add_argument("--timm-model", help="timm model name, e.g. vit_tiny_patch16_224 (random init)")
    src.add_argument("--timm-kwargs", default="{}", help='JSON kwargs for timm.create_model, e.g. '
                     '\'{"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 4}\'')
    src.add_argument("--checkpoint", help="state dict (.safetensors) to load: timm model, or a transformers "
                                          "ViT (with --config or the default config; not with --model, whose "
                                          "folder has its own weights)")
    data = p.add_argument_group("data")
    data.add_argument("--data", default="digits",
                      help="'digits' (scikit-learn, shipped) or a .safetensors file with x_train, y_train, "
                           "x_test, y_test")
    data.add_argument("--tasks", type=_at_least(1, "--tasks"), default=5, help="number of tasks (must divide the class count)")
    data.add_argument("--class-order", help="comma-separated class ids (default: sorted)")
    data.add_argument("--image-size", type=_at_least(1, "--image-size"), default=8, help="digits only: upsample to this size")
    tr = p.add_argument_group("training")
    tr.add_argument("--method", default="clora",
                    help=f"one or more of {','.join(METHODS)}, comma-separated (each on its own copy "
                         f"of the backbone)")
    tr.add_argument("--rank", type=_at_least(1, "--rank"), default=8)
    tr.add_argument("--alpha", type=_float_arg("--alpha", 0.0, above=True), default=None)
    tr.add_argument("--penalty-weight", type=_float_arg("--penalty-weight", 0.0), default=None, help="C-LoRA lambda (default: controller's)")
    tr.add_argument("--epochs", type=_at_least(1, "--epochs"), default=10)
    tr.add_argument("--lr", type=_float_arg("--lr", 0.0, above=True), default=3e-3)
    tr.add_argument("--head-lr", type=_float_arg("--head-lr", 0.0, above=True), default=None)
    tr.add_argument("--batch-size", type=_at_least(1, "--batch-size"), default=32)
    tr.add_argument("--head", choices=HEADS, default="linear",
                    help="classifier blocks: linear (L2P/CODA-Prompt protocol) or cosine (bounded logits)")
    tr.add_argument("--pretrain-epochs", type=_at_least(0, "--pretrain-epochs"), default=0,
                    help="first fully train the backbone on the first task's data (a stand-in for a "
                         "pre-trained backbone)")
    tr.add_argument("--pretrain-lr", type=_float_arg("--pretrain-lr", 0.0, above=True), default=1e-3)
    tr.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda"))
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--seed", type=_seed_arg, default=0,
                    help="seeds the digits train/test split, the backbone's random init, pre-training and "
                         "every method")
    tr.add_argument("--threads", type=_at_least(1, "--threads"), default=None, help="torch.set_num_threads")
    out = p.add_argument_group("output")
    out.add_argument("--output", help="folder: backbone.safetensors + backbone.json (the backbone the methods "
                                       "started from), per method its head (<method>_head.safetensors), per "
                                       "C-LoRA/LoRA method its bank (<method>_bank/), results.json. Reload (Python, "
                                       "from clora_fast.vit_train import load_backbone, load_head): "
                                       "clora_fast.load(load_backbone(OUT), OUT/clora_bank); "
                                       "load_head(OUT/clora_head.safetensors)")
    out.add_argument("--quiet", action="store_true")
    return p


def _at_least(lo: int, name: str):
    """argparse type: an int >= lo (``--threads 0`` was accepted and ignored, ``--pretrain-epochs -3`` too)."""
    from clora_fast.cli import _int_at_least
    return _int_at_least(lo, name)


def cli_main(argv: Optional[List[str]] = None) -> int:
    """``clora-fast train-vit`` entry point. Returns the process exit code. With ``--output``
    it writes the folder described in the module docstring (reload with :func:`load_backbone`,
    ``clora_fast.load`` and :func:`load_head`)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): return the code, do not exit
        return int(e.code or 0)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        print(f"train-vit: --method {args.method!r}: unknown {bad}; choose from {', '.join(METHODS)}",
              file=sys.stderr)
        return 2
    try:
        order = [int(c) for c in args.class_order.split(",")] if args.class_order else None
        if args.data == "digits":
            tasks = load_digits_tasks(args.tasks, image_size=args.image_size, seed=args.seed, class_order=order)
        else:
            tasks = load_tasks_file(args.data, n_tasks=args.tasks, class_order=order)
        timm_kwargs = json.loads(args.timm_kwargs)
        if not isinstance(timm_kwargs, dict):
            raise ValueError(f"--timm-kwargs must be a JSON object, got {args.timm_kwargs!r}")
        from clora_fast.cli import _seed_all
        _seed_all(args.seed)  # torch, numpy, random: the backbone's random init (config / timm) is part of the run
        if args.framework == "timm":
            backbone = build_backbone(framework="timm", timm_model=args.timm_model, model=args.model,
                                      config=args.config, timm_kwargs=timm_kwargs, checkpoint=args.checkpoint)
        else:
            cfg = args.config
            if args.model is None and cfg is None:
                x0 = tasks[0].x_train
                cfg = tiny_vit_config(image_size=x0.shape[-1], num_channels=x0.shape[1],
                                      patch_size=2 if x0.shape[-1] <= 16 else 4)
            backbone = build_backbone(framework="transformers", model=args.model, config=cfg,
                                      timm_model=args.timm_model, timm_kwargs=timm_kwargs,
                                      checkpoint=args.checkpoint)
        backbone.to(args.device)
        summary: Dict = {"tasks": [t.classes for t in tasks], "methods": {}}
        if args.pretrain_epochs > 0:
            summary["pretrain"] = pretrain_backbone(backbone, tasks[0], epochs=args.pretrain_epochs,
                                                    lr=args.pretrain_lr, seed=args.seed, device=args.device,
                                                    log=log)
        if args.output:  # the base weights every method starts from (and every bank is made for)
            os.makedirs(args.output, exist_ok=True)
            save_backbone(backbone, args.output,
                          timm_model=args.timm_model if args.framework == "timm" else None,
                          timm_kwargs=timm_kwargs if args.framework == "timm" else None)
        for m in methods:
            res = run_continual(backbone, tasks, method=m, rank=args.rank, alpha=args.alpha,
                                penalty_weight=args.penalty_weight if m == "clora" else None,
                                epochs=args.epochs, lr=args.lr, head_lr=args.head_lr,
                                batch_size=args.batch_size, head=args.head, backend=args.backend, seed=args.seed,
                                device=args.device, log=log)
            summary["methods"][m] = res.to_dict()
            if args.output:
                _save_head(res.head, os.path.join(args.output, f"{m}_head.safetensors"))
                if res.controller is not None:
                    res.controller.save(os.path.join(args.output, f"{m}_bank"))
        if args.output:
            _atomic_write_json(os.path.join(args.output, "results.json"), summary)
    except (ValueError, TypeError, OSError, KeyError, RuntimeError, ArithmeticError) as e:
        # ArithmeticError: FloatingPointError from end_concept() when a diverged run left non-finite factors
        print(f"train-vit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ntrain-vit: interrupted", file=sys.stderr)
        return 130
    table = {m: {k: round(r[k], 4) for k in ("final_avg_acc", "avg_forgetting", "final_avg_acc_til",
                                               "avg_forgetting_til")}
             for m, r in summary["methods"].items()}
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main(sys.argv[1:]))
