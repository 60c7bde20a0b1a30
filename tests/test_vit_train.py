"""Class-incremental continual training of ViT classifiers (clora_fast.vit_train) and the
`clora-fast train-vit` command. Tiny models, few steps, CPU."""
import json

import pytest
import torch
from torch import nn

from clora_fast import vit_train as vt
from clora_fast.integrations import vit

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

torch.set_num_threads(1)


def tiny_backbone(seed=0, layers=1, hidden=16):
    torch.manual_seed(seed)
    return vt.build_backbone(config=vt.tiny_vit_config(hidden_size=hidden, num_hidden_layers=layers,
                                                       num_attention_heads=2, intermediate_size=32))


@pytest.fixture(scope="module")
def digits_tasks():
    return vt.load_digits_tasks(5)


def small_tasks(tasks, n_train=40, n_test=30, k=3):
    return [vt.Task(t.classes, t.x_train[:n_train], t.y_train[:n_train], t.x_test[:n_test], t.y_test[:n_test])
            for t in tasks[:k]]


# ---------------------------------------------------------------- data
def test_digits_split(digits_tasks):
    assert [t.classes for t in digits_tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    n_tr = sum(t.x_train.shape[0] for t in digits_tasks)
    n_te = sum(t.x_test.shape[0] for t in digits_tasks)
    assert n_tr + n_te == 1797
    for t in digits_tasks:
        assert t.x_train.shape[1:] == (1, 8, 8) and t.x_train.dtype == torch.float32
        assert set(t.y_train.tolist()) == set(t.classes) == set(t.y_test.tolist())
    up = vt.load_digits_tasks(5, image_size=16)
    assert up[0].x_train.shape[1:] == (1, 16, 16)


def test_make_tasks_order_and_errors():
    x = torch.randn(60, 1, 4, 4)
    y = torch.arange(60) % 6
    tasks = vt.make_class_incremental_tasks(x, y, x, y, classes_per_task=2, class_order=[5, 4, 3, 2, 1, 0])
    assert [t.classes for t in tasks] == [[5, 4], [3, 2], [1, 0]]
    assert set(tasks[0].y_train.tolist()) == {4, 5} and tasks[0].x_train.shape[0] == 20
    assert len(vt.make_class_incremental_tasks(x, y, x, y, n_tasks=2)) == 2
    with pytest.raises(ValueError, match="n_tasks=4 must divide the number of classes \\(6\\)"):
        vt.make_class_incremental_tasks(x, y, x, y, n_tasks=4)
    with pytest.raises(ValueError, match="exactly one of n_tasks or classes_per_task"):
        vt.make_class_incremental_tasks(x, y, x, y)
    with pytest.raises(ValueError, match="y_train must be 1-D with one label per image of x_train \\(60\\), got shape \\(59,\\)"):
        vt.make_class_incremental_tasks(x, y[:59], x, y, n_tasks=2)
    with pytest.raises(TypeError, match="y_train must hold integer class ids, got dtype torch.float32"):
        vt.make_class_incremental_tasks(x, y.float(), x, y, n_tasks=2)
    with pytest.raises(ValueError, match="x_train must be \\[N, C, H, W\\]"):
        vt.make_class_incremental_tasks(torch.randn(60, 16), y, x, y, n_tasks=2)
    with pytest.raises(ValueError, match="class_order names classes \\[7\\]"):
        vt.make_class_incremental_tasks(x, y, x, y, n_tasks=2, class_order=[0, 1, 2, 3, 4, 7])


def test_tasks_file_round_trip(tmp_path):
    from safetensors.torch import save_file
    x = torch.randn(40, 1, 4, 4)
    y = torch.arange(40) % 4
    save_file({"x_train": x, "y_train": y, "x_test": x[:8].clone(), "y_test": y[:8].clone()},
              str(tmp_path / "d.safetensors"))
    tasks = vt.load_tasks_file(str(tmp_path / "d.safetensors"), n_tasks=2)
    assert [t.classes for t in tasks] == [[0, 1], [2, 3]]
    assert torch.equal(tasks[1].x_train, x[y >= 2])
    save_file({"x_train": x}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match="lacks tensors \\['y_train', 'x_test', 'y_test'\\]"):
        vt.load_tasks_file(str(tmp_path / "bad.safetensors"), n_tasks=2)


def test_accuracy_metrics_by_hand():
    acc = [[0.9], [0.6, 0.8], [0.5, 0.7, 1.0]]
    m = vt.accuracy_metrics(acc)
    assert m["final_avg_acc"] == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    # forgetting: task0 max(0.9, 0.6) - 0.5 = 0.4; task1 max(0.8) - 0.7 = 0.1
    assert m["avg_forgetting"] == pytest.approx(0.25)
    assert vt.accuracy_metrics([[0.7]]) == {"final_avg_acc": 0.7, "avg_forgetting": 0.0}


def test_growing_head():
    c = vt.GrowingHead(4, kind="cosine", cosine_scale=5.0)
    c.add_task([0, 1, 2])
    assert c(torch.randn(6, 4) * 100).abs().max() <= 5.0 + 1e-5  # bounded logits
    with pytest.raises(ValueError, match="head kind must be one of"):
        vt.GrowingHead(4, kind="mlp")
    h = vt.GrowingHead(4)
    h.add_task([3, 7])
    first = h.blocks[0]
    h.add_task([1])
    assert h.class_ids == [3, 7, 1]
    assert h(torch.randn(5, 4)).shape == (5, 3)
    assert not any(p.requires_grad for p in first.parameters())
    assert all(p.requires_grad for p in h.blocks[1].parameters())


# ---------------------------------------------------------------- backbones
def test_backbone_from_local_safetensors_folder(tmp_path):
    bb = tiny_backbone(seed=3)
    bb.save_pretrained(tmp_path / "vit", safe_serialization=True)
    assert (tmp_path / "vit" / "model.safetensors").exists()
    bb2 = vt.build_backbone(model=str(tmp_path / "vit"))
    x = torch.randn(2, 1, 8, 8)
    f1, f2 = vt.FeatureExtractor(bb.eval()), vt.FeatureExtractor(bb2.eval())
    torch.testing.assert_close(f1(x), f2(x))
    with pytest.raises(FileNotFoundError, match="expected a local folder"):
        vt.build_backbone(model=str(tmp_path / "missing"))


def test_backbone_from_config_and_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file
    from transformers import ViTForImageClassification
    cfg = vt.tiny_vit_config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(4)
    src = ViTForImageClassification(cfg)  # keys "vit.*" and "classifier.*"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    bb = vt.build_backbone(config=cfg, checkpoint=str(tmp_path / "w.safetensors"))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(vt.FeatureExtractor(bb.eval())(x), vt.FeatureExtractor(src.eval())(x))
    other = vt.tiny_vit_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    with pytest.raises(Exception, match="size mismatch|does not fit"):
        vt.build_backbone(config=other, checkpoint=str(tmp_path / "w.safetensors"))
    with pytest.raises(FileNotFoundError, match="expected an existing .safetensors file"):
        vt.build_backbone(config=cfg, checkpoint=str(tmp_path / "w.pt"))


def test_backbone_from_config_json(tmp_path):
    cfg = vt.tiny_vit_config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).to_dict()
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg))
    bb = vt.build_backbone(config=str(p))
    assert bb.config.hidden_size == 16 and len(bb.layers if hasattr(bb, "layers") else bb.encoder.layer) == 1


def test_timm_backbone_and_checkpoint(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file
    kw = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **kw)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    bb = vt.build_backbone(framework="timm", timm_model="vit_tiny_patch16_224", timm_kwargs=kw,
                           checkpoint=str(tmp_path / "w.safetensors"))
    assert torch.equal(bb.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    f = vt.FeatureExtractor(bb)
    assert f.dim == 16 and f(torch.randn(2, 1, 8, 8)).shape == (2, 16)
    with pytest.raises(FileNotFoundError, match="expected an existing .safetensors file"):
        vt.build_backbone(framework="timm", timm_model="vit_tiny_patch16_224", timm_kwargs=kw,
                          checkpoint=str(tmp_path / "w.bin"))
    with pytest.raises(ValueError, match="framework='timm' needs timm_model"):
        vt.build_backbone(framework="timm")


# ---------------------------------------------------------------- run_continual
@pytest.mark.parametrize("method", ["clora", "lora", "linear_probe", "finetune"])
def test_run_continual_smoke(method, digits_tasks):
    bb = tiny_backbone()
    sd0 = {k: v.clone() for k, v in bb.state_dict().items()}
    tasks = small_tasks(digits_tasks)
    res = vt.run_continual(bb, tasks, method=method, epochs=2, batch_size=20, rank=2, lr=1e-2,
                           penalty_weight=1e4 if method == "clora" else None)
    # shape of the accuracy matrix: row i has i+1 entries in [0, 1]
    assert [len(r) for r in res.acc] == [1, 2, 3]
    assert all(0.0 <= a <= 1.0 for r in res.acc for a in r)
    assert res.final_avg_acc == pytest.approx(sum(res.acc[-1]) / 3)
    assert res.head.class_ids == [0, 1, 2, 3, 4, 5]
    # the caller's backbone is untouched (a copy was trained)
    assert all(torch.equal(v, sd0[k]) for k, v in bb.state_dict().items())
    assert vit.get_controller(bb) is None
    json.dumps(res.to_dict())  # serialisable
    if method in ("clora", "lora"):
        ctrl = res.controller
        assert [c.name for c in ctrl.concepts] == ["task0", "task1", "task2"]
        assert ctrl.active_concept is None
        # only the adapters moved: the trained model's own weights equal the backbone's
        sd = res.model.state_dict()
        assert all(torch.equal(sd[k], sd0[k]) for k in sd0)
        assert res.penalty_last[0] == 0.0  # first task: P = 0
        if method == "clora":
            assert res.settings["penalty_weight"] == 1e4
            assert res.penalty_last[1] > 0 and res.penalty_last[2] > 0
        else:
            assert res.settings["penalty_weight"] == 0.0
            assert res.penalty_last == [0.0, 0.0, 0.0]
    if method == "linear_probe":
        sd = res.model.state_dict()
        assert all(torch.equal(sd[k], sd0[k]) for k in sd0)
    if method == "finetune":
        sd = res.model.state_dict()
        assert any(not torch.equal(sd[k], sd0[k]) for k in sd0)


def test_clora_learns_a_new_task_on_a_pretrained_backbone(digits_tasks):
    torch.manual_seed(0)
    bb = vt.build_backbone(config=vt.tiny_vit_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32))
    tasks = small_tasks(digits_tasks, n_train=120, n_test=60, k=2)
    vt.pretrain_backbone(bb, tasks[0], epochs=8, lr=1e-2, batch_size=16)
    res = vt.run_continual(bb, tasks[1:], method="clora", epochs=8, batch_size=16, rank=4, lr=2e-2, head="cosine")
    # digits 2 vs 3 (chance 0.5), learned through K/V LoRA + head; 0.80-0.93 over seeds 0-5
    assert res.acc[0][0] >= 0.7
    hist = res.loss_history[0]
    assert len(hist) == 8 and hist[-1] < 0.7 * hist[0]


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_past_heads_unchanged_by_later_tasks(head, digits_tasks):
    """Old class blocks are frozen and their logits masked: after task 1 the task-0 block is
    bit-identical to what task 0 left (same seed -> task 0 replays identically)."""
    bb = tiny_backbone()
    tasks = small_tasks(digits_tasks, k=2)
    kw = dict(method="clora", epochs=2, batch_size=16, rank=2, lr=1e-2, head=head, seed=7)
    r1 = vt.run_continual(bb, tasks[:1], **kw)
    r2 = vt.run_continual(bb, tasks, **kw)
    b1, b2 = r1.head.blocks[0], r2.head.blocks[0]
    assert isinstance(b1, nn.Linear if head == "linear" else vt.CosineLinear)
    assert all(torch.equal(p1, p2) for p1, p2 in zip(b1.parameters(), b2.parameters()))
    assert not any(p.requires_grad for p in b2.parameters())
    # ...while the backbone adapters did move for task 1
    assert len(r2.controller.concepts) == 2
    assert r2.controller.concepts[1].lora_B[0].abs().sum() > 0


def test_run_continual_bad_input(digits_tasks):
    bb = tiny_backbone()
    tasks = small_tasks(digits_tasks, k=2)
    with pytest.raises(ValueError, match="method must be one of"):
        vt.run_continual(bb, tasks, method="ewc")
    with pytest.raises(ValueError, match="head must be one of"):
        vt.run_continual(bb, tasks, head="mlp")
    with pytest.raises(ValueError, match="repeats classes \\[0, 1\\]"):
        vt.run_continual(bb, [tasks[0], tasks[0]], method="lora")
    with pytest.raises(ValueError, match="method='lora' is sequential LoRA"):
        vt.run_continual(bb, tasks, method="lora", penalty_weight=5.0)
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        vt.run_continual(bb, tasks, epochs=0)
    with pytest.raises(TypeError, match="tasks must be a non-empty list of Task"):
        vt.run_continual(bb, [])
    with pytest.raises(ValueError, match="rank=17 is larger than min"):
        vt.run_continual(bb, tasks, rank=17)


def test_pretrain_backbone_learns(digits_tasks):
    torch.manual_seed(0)
    bb = vt.build_backbone(config=vt.tiny_vit_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32))
    t = small_tasks(digits_tasks, n_train=120, n_test=60, k=1)[0]
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    acc = vt.pretrain_backbone(bb, t, epochs=8, lr=1e-2, batch_size=16)
    # digits 0 vs 1 (chance 0.5): 0.85-1.0 train accuracy over seeds 0-5
    assert acc["train_acc"] >= 0.75 and acc["test_acc"] >= 0.75
    assert any(not torch.equal(v, before[k]) for k, v in bb.state_dict().items())


# ---------------------------------------------------------------- CLI
def test_cli_train_vit_smoke(tmp_path, capsys):
    cfg = vt.tiny_vit_config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32).to_dict()
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    rc = vt.cli_main(["--config", str(tmp_path / "cfg.json"), "--tasks", "5", "--epochs", "1", "--rank", "2",
                      "--method", "clora,lora,linear_probe", "--pretrain-epochs", "1", "--batch-size", "64",
                      "--penalty-weight", "100", "--output", str(out), "--quiet"])
    assert rc == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table) == {"clora", "lora", "linear_probe"}
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert len(res["methods"]["clora"]["acc"]) == 5 and "pretrain" in res
    assert res["methods"]["clora"]["settings"]["penalty_weight"] == 100.0
    for m in ("clora", "lora", "linear_probe"):
        assert table[m]["final_avg_acc"] == round(res["methods"][m]["final_avg_acc"], 4)
        assert (out / f"{m}_head.safetensors").exists()
    # the saved bank loads into a fresh backbone of the same weights... only if the weights
    # match: a freshly initialised backbone differs, so the bank refuses it
    assert (out / "clora_bank" / "manifest.json").exists()
    with pytest.raises(ValueError):
        vit.load(vt.build_backbone(config=vt.tiny_vit_config(hidden_size=16, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=32)),
                 out / "clora_bank")


def test_cli_bank_reloads_into_the_same_backbone(tmp_path, capsys):
    bb = tiny_backbone(seed=5)
    bb.save_pretrained(tmp_path / "vit", safe_serialization=True)
    out = tmp_path / "run"
    rc = vt.cli_main(["--model", str(tmp_path / "vit"), "--tasks", "5", "--epochs", "1", "--rank", "2",
                      "--method", "clora", "--batch-size", "128", "--output", str(out), "--quiet"])
    assert rc == 0
    capsys.readouterr()
    bb2 = vt.build_backbone(model=str(tmp_path / "vit"))
    ctrl = vit.load(bb2, out / "clora_bank")
    assert [c.name for c in ctrl.concepts] == [f"task{i}" for i in range(5)]
    assert ctrl.has_past


def test_cli_timm(capsys):
    pytest.importorskip("timm")
    kw = json.dumps(dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1, num_heads=2))
    rc = vt.cli_main(["--framework", "timm", "--timm-model", "vit_tiny_patch16_224", "--timm-kwargs", kw,
                      "--tasks", "5", "--epochs", "1", "--rank", "2", "--method", "clora", "--batch-size", "128",
                      "--quiet"])
    assert rc == 0
    table = json.loads(capsys.readouterr().out)
    assert 0.0 <= table["clora"]["final_avg_acc"] <= 1.0


def test_cli_errors(capsys):
    assert vt.cli_main(["--help"]) == 0
    assert "clora-fast train-vit" in capsys.readouterr().out
    assert vt.cli_main(["--rank", "two"]) == 2
    assert "argument --rank: --rank must be an integer, got 'two'" in capsys.readouterr().err
    assert vt.cli_main(["--method", "ewc", "--quiet"]) == 2
    assert "unknown ['ewc']" in capsys.readouterr().err
    assert vt.cli_main(["--tasks", "3", "--quiet"]) == 1
    assert "n_tasks=3 must divide the number of classes (10)" in capsys.readouterr().err
    assert vt.cli_main(["--data", "/nonexistent.safetensors", "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert vt.cli_main(["--threads", "0", "--quiet"]) == 2            # was accepted and ignored
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    assert vt.cli_main(["--pretrain-epochs", "-3", "--quiet"]) == 2
    assert "--pretrain-epochs must be >= 0, got -3" in capsys.readouterr().err


def test_clora_fast_cli_dispatches_train_vit(capsys):
    cli = pytest.importorskip("clora_fast.cli")
    rc = cli.main(["train-vit", "--method", "nope", "--quiet"])
    assert rc == 2
    assert "unknown ['nope']" in capsys.readouterr().err


def test_task_incremental_accuracy_is_reported_and_not_below_class_incremental(digits_tasks):
    bb = tiny_backbone()
    res = vt.run_continual(bb, small_tasks(digits_tasks), method="lora", epochs=1, batch_size=20, rank=2)
    assert [len(r) for r in res.acc_til] == [1, 2, 3]
    # choosing among a task's own classes can only be right more often than among all classes
    assert all(t >= c for rc, rt in zip(res.acc, res.acc_til) for c, t in zip(rc, rt))
    m = vt.accuracy_metrics(res.acc_til)
    assert res.final_avg_acc_til == m["final_avg_acc"] and res.avg_forgetting_til == m["avg_forgetting"]


# ---------------------------------------------------------------- audit regressions
def _tiny_cfg_file(tmp_path):
    cfg = vt.tiny_vit_config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32).to_dict()
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def _capture_runs(monkeypatch):
    runs = {}
    real = vt.run_continual

    def spy(*a, **kw):
        res = real(*a, **kw)
        runs[res.method] = res
        return res
    monkeypatch.setattr(vt, "run_continual", spy)
    return runs


def test_cli_output_backbone_reloads_with_its_banks(tmp_path, capsys, monkeypatch):
    """train-vit --output saves the backbone the banks were made for (here a random init changed by
    pre-training, so no one could rebuild it otherwise): backbone + bank + head reload and give
    the trained model's outputs."""
    import clora_fast
    runs = _capture_runs(monkeypatch)
    out = tmp_path / "run"
    rc = vt.cli_main(["--config", _tiny_cfg_file(tmp_path), "--tasks", "2", "--epochs", "1", "--rank", "2",
                      "--method", "clora,lora", "--pretrain-epochs", "1", "--batch-size", "128",
                      "--output", str(out), "--quiet"])
    assert rc == 0
    capsys.readouterr()
    assert (out / "backbone.safetensors").exists() and (out / "backbone.json").exists()
    x = vt.load_digits_tasks(2)[1].x_test[:16]
    for m in ("clora", "lora"):
        bb = vt.load_backbone(str(out))
        ctrl = clora_fast.load(bb, str(out / f"{m}_bank"))  # raised BankError: adapted base weights differ
        assert [c.name for c in ctrl.concepts] == ["task0", "task1"]
        head = vt.load_head(str(out / f"{m}_head.safetensors"))
        res = runs[m]
        assert head.class_ids == res.head.class_ids
        with torch.no_grad():
            f_new, f_old = vt.FeatureExtractor(bb)(x), vt.FeatureExtractor(res.model.eval())(x)
            torch.testing.assert_close(f_new, f_old, rtol=0, atol=0)
            torch.testing.assert_close(head(f_new), res.head(f_old), rtol=0, atol=0)
    # the weights file is checked against the spec
    spec = json.loads((out / "backbone.json").read_text())
    spec["sha256"] = "0" * 64
    (out / "backbone.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="do not match"):
        vt.load_backbone(str(out))


def test_cli_output_timm_backbone_reloads(tmp_path, capsys):
    pytest.importorskip("timm")
    import clora_fast
    kw = json.dumps(dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1, num_heads=2))
    out = tmp_path / "run"
    rc = vt.cli_main(["--framework", "timm", "--timm-model", "vit_tiny_patch16_224", "--timm-kwargs", kw,
                      "--tasks", "2", "--epochs", "1", "--rank", "2", "--method", "clora", "--batch-size", "128",
                      "--output", str(out), "--quiet"])
    assert rc == 0
    capsys.readouterr()
    bb = vt.load_backbone(str(out))
    ctrl = clora_fast.load(bb, str(out / "clora_bank"))
    assert len(ctrl.concepts) == 2


def test_cli_same_seed_same_results_and_files(tmp_path, capsys):
    """--seed covers the backbone's random init: two runs in one process (the global RNG in a
    different state each time) give the same metrics and the same bank/backbone files."""
    cfg = _tiny_cfg_file(tmp_path)

    def run(name, seed):
        out = tmp_path / name
        rc = vt.cli_main(["--config", cfg, "--tasks", "2", "--epochs", "1", "--rank", "2", "--seed", str(seed),
                          "--method", "linear_probe,clora", "--batch-size", "128", "--output", str(out), "--quiet"])
        assert rc == 0
        capsys.readouterr()
        res = json.loads((out / "results.json").read_text())
        for r in res["methods"].values():
            r.pop("wall_s")
        return out, res

    torch.manual_seed(123)
    o1, r1 = run("a", 0)
    torch.rand(7)  # a different global RNG state before the second run
    o2, r2 = run("b", 0)
    assert r1 == r2
    assert (o1 / "backbone.safetensors").read_bytes() == (o2 / "backbone.safetensors").read_bytes()
    names = [sorted(p.name for p in (o / "clora_bank").iterdir()) for o in (o1, o2)]
    assert names[0] == names[1]  # data files are named by their content's sha256
    assert (o1 / "clora_bank" / "manifest.json").read_text() == (o2 / "clora_bank" / "manifest.json").read_text()
    for m in ("clora", "linear_probe"):
        assert (o1 / f"{m}_head.safetensors").read_bytes() == (o2 / f"{m}_head.safetensors").read_bytes()
    o3, _ = run("c", 1)
    assert (o1 / "backbone.safetensors").read_bytes() != (o3 / "backbone.safetensors").read_bytes()


def test_build_backbone_refuses_arguments_it_would_ignore(tmp_path, capsys):
    from safetensors.torch import save_file
    bb = tiny_backbone(seed=3)
    bb.save_pretrained(tmp_path / "vit", safe_serialization=True)
    other = tiny_backbone(seed=4)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    folder, ckpt, missing = str(tmp_path / "vit"), str(tmp_path / "other.safetensors"), str(tmp_path / "no.safetensors")
    # the folder's weights would be used and the checkpoint ignored: refused
    with pytest.raises(ValueError, match="either model .* or checkpoint .* not both"):
        vt.build_backbone(model=folder, checkpoint=ckpt)
    with pytest.raises(ValueError, match="not both"):
        vt.build_backbone(model=folder, checkpoint=missing)
    with pytest.raises(ValueError, match="either model .* or config, not both"):
        vt.build_backbone(model=folder, config=vt.tiny_vit_config())
    with pytest.raises(ValueError, match="apply to framework='transformers' only"):
        vt.build_backbone(framework="timm", timm_model="vit_tiny_patch16_224", model=folder)
    with pytest.raises(ValueError, match="apply to framework='timm' only"):
        vt.build_backbone(model=folder, timm_model="vit_tiny_patch16_224")
    # a nonexistent checkpoint (with a config, or the default one) is an error, not a random init
    with pytest.raises(FileNotFoundError, match="expected an existing .safetensors file"):
        vt.build_backbone(checkpoint=missing)
    assert vt.cli_main(["--model", folder, "--checkpoint", missing, "--tasks", "2", "--epochs", "1",
                        "--method", "linear_probe", "--quiet"]) == 1
    assert "not both" in capsys.readouterr().err
    assert vt.cli_main(["--checkpoint", missing, "--tasks", "2", "--epochs", "1", "--method", "linear_probe",
                        "--quiet"]) == 1
    assert "expected an existing .safetensors file" in capsys.readouterr().err
