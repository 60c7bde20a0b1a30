"""C-LoRA on ViTs: transformers (5.x q/k/v_proj layout, 4.x query/key/value layout) and timm
(fused qkv). Tiny configs, CPU."""
import copy
import math
import re
import types

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import clora_fast
from clora_fast import reference
from clora_fast import integrations
from clora_fast.integrations import vit

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
# a few tests spell out transformers 5.x module names (vit.layers.{i}.attention.{k,v}_proj); 4.x names
# them vit.encoder.layer.{i}.attention.attention.{key,value} (the integration handles both)
HF5 = int(transformers.__version__.split(".")[0]) >= 5
needs_hf5 = pytest.mark.skipif(not HF5, reason="spells out transformers 5.x ViT module names")

torch.set_num_threads(1)  # tiny shapes: threads only add contention on 2 shared cores

D = 32  # hidden size of the tiny models


def hf_model(layers=2, cls=True, attn=None, seed=0):
    from transformers import ViTConfig, ViTForImageClassification, ViTModel
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=D, num_hidden_layers=layers,
                    num_attention_heads=4, intermediate_size=64, num_labels=3)
    if attn is not None:
        cfg._attn_implementation = attn
    m = ViTForImageClassification(cfg) if cls else ViTModel(cfg, add_pooling_layer=False)
    return m.eval()


def timm_model(layers=2, seed=0, qkv_bias=True):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                             embed_dim=D, depth=layers, num_heads=4, num_classes=3, qkv_bias=qkv_bias).eval()


def run(model, x):
    out = model(x)
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out


# ---------------------------------------------------------------- a transformers 4.x layout replica
class ViTSelfAttention(nn.Module):
    """The transformers 4.x ViT self-attention layout (query/key/value linears called on the
    same hidden states), reproduced here because transformers 4.x cannot be installed next to
    5.x; its ``__module__`` is set to transformers' so discovery treats it as the real one."""

    def __init__(self, d, heads):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, hidden_states):
        B, N, _ = hidden_states.shape
        t = lambda y: y.view(B, N, self.h, self.dh).transpose(1, 2)  # noqa: E731
        k = t(self.key(hidden_states))
        v = t(self.value(hidden_states))
        q = t(self.query(hidden_states))
        o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(B, N, -1)


ViTSelfAttention.__module__ = "transformers.models.vit.modeling_vit"


class LegacyViT(nn.Module):
    def __init__(self, layers=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(4, D)
        self.blocks = nn.ModuleList([nn.ModuleDict({"attention": nn.ModuleDict({"attention": ViTSelfAttention(D, 4)}),
                                                    "mlp": nn.Linear(D, D)}) for _ in range(layers)])

    def forward(self, x):  # x [B, N, 4]
        h = self.embed(x)
        for b in self.blocks:
            h = h + b["attention"]["attention"](h)
            h = h + torch.tanh(b["mlp"](h))
        return h


FRAMEWORKS = {
    "hf": (lambda **kw: hf_model(**kw), lambda: torch.randn(3, 1, 8, 8)),
    "timm": (lambda **kw: timm_model(**kw), lambda: torch.randn(3, 1, 8, 8)),
    "legacy": (lambda **kw: LegacyViT(**kw), lambda: torch.randn(3, 5, 4)),
}


def make(fw, **kw):
    build, inp = FRAMEWORKS[fw]
    torch.manual_seed(123)
    return build(**kw), inp()


def patched_with_a_past(fw, layers=2):
    """(model, x, controller) with one finished concept "t0" (random factors) folded into P."""
    m, x = make(fw, layers=layers)
    ctrl = vit.patch(m, rank=2, backend="reference")
    ctrl.begin_concept("t0")
    randomize_factors(ctrl, seed=1)
    ctrl.end_concept()
    return m, x, ctrl


def randomize_factors(ctrl, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(ctrl.lora_A) + list(ctrl.lora_B):
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------- discovery
@needs_hf5
def test_discovery_transformers_sites_and_groups():
    m = hf_model(layers=3)
    fw, blocks = vit.find_attention_blocks(m)
    assert fw == "transformers" and [b.name for b in blocks] == [f"vit.layers.{i}.attention" for i in range(3)]
    assert all(b.layout == "hf" for b in blocks)
    ctrl = vit.patch(m, rank=4)
    names = ctrl.site_names
    assert names == [f"vit.layers.{i}.attention.{p}" for i in range(3) for p in ("k_proj", "v_proj")]
    assert ctrl.groups == [f"vit.layers.{i}.attention" for i in range(3)]
    assert ctrl.group_sites("vit.layers.1.attention") == ["vit.layers.1.attention.k_proj",
                                                          "vit.layers.1.attention.v_proj"]
    # the weights are the model's own parameters, not copies
    assert ctrl.sites[0].weight is m.vit.layers[0].attention.k_proj.weight
    assert vit.get_controller(m) is ctrl


def test_discovery_timm_sites_are_row_views_of_qkv():
    m = timm_model(layers=2)
    ctrl = vit.patch(m, rank=4)
    assert ctrl.site_names == ["blocks.0.attn.qkv.k", "blocks.0.attn.qkv.v", "blocks.1.attn.qkv.k", "blocks.1.attn.qkv.v"]
    qkv = m.blocks[0].attn.qkv
    k, v = ctrl.sites[0], ctrl.sites[1]
    assert k.weight.shape == (D, D) and v.weight.shape == (D, D)
    assert k.weight.data_ptr() == qkv.weight[D:2 * D].data_ptr()
    assert v.weight.data_ptr() == qkv.weight[2 * D:].data_ptr()
    assert k.bias.data_ptr() == qkv.bias[D:2 * D].data_ptr()
    assert ctrl.groups == ["blocks.0.attn", "blocks.1.attn"]


def test_can_patch():
    assert vit.can_patch(hf_model(layers=1))
    assert vit.can_patch(hf_model(layers=1, cls=False))
    assert vit.can_patch(timm_model(layers=1))
    assert not vit.can_patch(nn.Linear(4, 4))
    assert not vit.can_patch("not a model")
    assert not vit.can_patch(None)
    # a transformers text model with q/k/v_proj attention is not a ViT: not ours
    from transformers import CLIPTextConfig, CLIPTextModel
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=1, vocab_size=100, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))
    assert not vit.can_patch(clip)
    # a timm CNN has no ViT attention
    assert not vit.can_patch(timm.create_model("resnet18", pretrained=False, num_classes=2))


def test_clora_fast_patch_dispatches_here():
    m = hf_model(layers=1)
    ctrl = clora_fast.patch(m, rank=2)
    assert vit.get_controller(m) is ctrl
    clora_fast.unpatch(m)
    assert vit.get_controller(m) is None
    t = timm_model(layers=1)
    ctrl = clora_fast.patch(t, rank=2, penalty_weight=5.0)
    assert ctrl.penalty_weight == 5.0 and vit.get_controller(t) is ctrl
    clora_fast.unpatch(t)


# ---------------------------------------------------------------- zero-adapter equivalence
@pytest.mark.parametrize("fw", ["hf", "timm", "legacy"])
def test_zero_adapter_outputs_equal_unpatched(fw):
    m, x = make(fw)
    ref = run(m, x).detach()
    ctrl = vit.patch(m, rank=4, backend="reference")
    assert torch.equal(run(m, x), ref)            # patched, no concept: the very same computation
    ctrl.begin_concept("t0")                      # B = 0: the adapter changes nothing
    y = run(m, x)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    ctrl.end_concept()                            # folding a zero update keeps W
    torch.testing.assert_close(run(m, x), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_zero_adapter_hf_attention_implementations(attn):
    m = hf_model(layers=1, attn=attn)
    x = torch.randn(2, 1, 8, 8)
    ref = run(m, x).detach()
    ctrl = vit.patch(m, rank=4)
    ctrl.begin_concept()
    torch.testing.assert_close(run(m, x), ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- gradients vs the reference path
def _reference_model(fw, m0, As, Bs, scale, weights):
    """The unpatched model with every K/V linear replaced by clora_fast.reference.lora_projection
    (with the folded weight ``weights[i]`` = W0 + P) using the given leaf A/B tensors: the
    autograd reference."""
    m = copy.deepcopy(m0)
    _, blocks = vit.find_attention_blocks(m)
    i = 0
    for blk in blocks:
        if blk.layout == "timm":
            qkv = blk.linears["qkv"]
            d = qkv.out_features // 3

            def fwd(x, qkv=qkv, d=d, i=i):
                W, b = qkv.weight, qkv.bias
                q = F.linear(x, W[:d], b[:d] if b is not None else None)
                k = reference.lora_projection(x, weights[i], As[i], Bs[i], scale,
                                              b[d:2 * d] if b is not None else None)
                v = reference.lora_projection(x, weights[i + 1], As[i + 1], Bs[i + 1], scale,
                                              b[2 * d:] if b is not None else None)
                return torch.cat([q, k, v], -1)
            qkv.forward = fwd
            i += 2
        else:
            for role in ("k", "v"):
                lin = blk.linears[role]

                def fwd(x, lin=lin, i=i):
                    return reference.lora_projection(x, weights[i], As[i], Bs[i], scale, lin.bias)
                lin.forward = fwd
                i += 1
    return m


@pytest.mark.parametrize("fw", ["hf", "timm", "legacy"])
@pytest.mark.parametrize("second_concept", [False, True])
@pytest.mark.parametrize("strategy", ["fused", "merged"])
def test_grads_match_reference_autograd(fw, second_concept, strategy, monkeypatch):
    # float64 on both sides, so a tight tolerance means the same math (not rounding luck);
    # "merged" = the K/V path CUDA takes by default (split K/V outputs of one autograd Function)
    monkeypatch.setenv("CLORA_FAST_STRATEGY", strategy)
    m, x = make(fw)
    m, x = m.double(), x.double()
    m.requires_grad_(False)
    m0 = copy.deepcopy(m)
    ctrl = vit.patch(m, rank=4, alpha=8.0, backend="reference", penalty_weight=10.0)
    pasts = [torch.zeros_like(s.weight) for s in ctrl.sites]
    weights = [s.weight.detach().clone() for s in ctrl.sites]
    if second_concept:
        ctrl.begin_concept("t0")
        randomize_factors(ctrl, seed=3)
        A0 = [ctrl.current_factors(i)[0].detach().double() for i in range(ctrl.num_sites)]
        B0 = [ctrl.current_factors(i)[1].detach().double() for i in range(ctrl.num_sites)]
        ctrl.end_concept()
        pasts = [ctrl.past(i).double() for i in range(ctrl.num_sites)]
        for i in range(ctrl.num_sites):  # P = s * B0 @ A0 (kept in float32 by the controller)
            torch.testing.assert_close(pasts[i], ctrl.scale * B0[i] @ A0[i], rtol=1e-6, atol=1e-7)
            assert pasts[i].abs().sum() > 0
        # Wf = W0 + P as the controller folds it (float32 P; W0 + P rounded through float32)
        weights = [ctrl.folded_weight(i).detach().clone() for i in range(ctrl.num_sites)]
        for w, s, p in zip(weights, ctrl.sites, pasts):
            torch.testing.assert_close(w, s.weight + p, rtol=1e-6, atol=1e-7)
    ctrl.begin_concept("t1")
    randomize_factors(ctrl, seed=5)
    target = torch.randn_like(run(m, x))
    y = run(m, x)
    loss = ((y - target) ** 2).sum() + ctrl.penalty()
    loss.backward()

    As = [ctrl.current_factors(i)[0].detach().double().requires_grad_(True) for i in range(ctrl.num_sites)]
    Bs = [ctrl.current_factors(i)[1].detach().double().requires_grad_(True) for i in range(ctrl.num_sites)]
    mr = _reference_model(fw, m0, As, Bs, ctrl.scale, weights)
    yr = run(mr, x)
    pen = 10.0 * reference.grouped_forgetting_penalty(pasts, As, Bs, [ctrl.scale] * len(As))
    lr_ = ((yr - target) ** 2).sum() + pen
    lr_.backward()
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    if second_concept:
        assert float(ctrl.penalty().detach()) > 0
        torch.testing.assert_close(ctrl.penalty().detach().double(), pen.detach(), rtol=1e-6, atol=1e-8)
    for i in range(ctrl.num_sites):
        gA = ctrl.lora_A[ctrl._site_bundle[i][0]].grad
        gB = ctrl.lora_B[ctrl._site_bundle[i][0]].grad
        b, pos = ctrl._site_bundle[i]
        bundle = ctrl._bundles[b]
        r = ctrl.rank
        # the controller keeps A/B in float32: its grads are the float64 grads rounded to float32
        torch.testing.assert_close(gA[pos * r:(pos + 1) * r], As[i].grad.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gB[bundle.offsets[pos]:bundle.offsets[pos + 1]], Bs[i].grad.float(),
                                   rtol=1e-5, atol=1e-6)
    # the frozen model received no gradient
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_triton_backend_matches_reference(fw):
    """Through the Triton kernels (interpreter on CPU): same outputs and A/B gradients."""
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test; on CUDA test_gpu_vit_b16_kernels_vs_float64 covers the kernels")
    if "triton" not in clora_fast.available_backends():
        pytest.skip("triton backend unavailable")
    m, x = make(fw, layers=1)
    x = x[:1]
    m.requires_grad_(False)
    m2 = copy.deepcopy(m)
    outs, grads = [], []
    for model, be in ((m, "reference"), (m2, "triton")):
        ctrl = vit.patch(model, rank=4, backend=be)
        ctrl.begin_concept("t0")
        randomize_factors(ctrl, seed=2)
        ctrl.end_concept()
        ctrl.begin_concept("t1")
        randomize_factors(ctrl, seed=4)
        y = run(model, x)
        (y.square().sum() + ctrl.penalty()).backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in ctrl.trainable_parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for g1, g0 in zip(grads[1], grads[0]):
        torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- grouping
@pytest.mark.parametrize("fw", ["hf", "timm", "legacy"])
def test_kv_of_a_block_in_one_grouped_call(fw, monkeypatch):
    m, x = make(fw, layers=3)
    ctrl = vit.patch(m, rank=2)
    ctrl.begin_concept()
    calls = []
    orig_group, orig_project = ctrl.project_group, ctrl.project

    def spy_group(group, xx):
        calls.append(group)
        return orig_group(group, xx)

    def spy_project(*a, **k):
        raise AssertionError("per-site project() must not be used: K and V go through project_group")
    monkeypatch.setattr(ctrl, "project_group", spy_group)
    monkeypatch.setattr(ctrl, "project", spy_project)
    run(m, x)
    assert calls == ctrl.groups  # one call per block, in order
    calls.clear()
    run(m, x)
    assert calls == ctrl.groups


@needs_hf5
def test_hf_separate_calls_with_different_inputs_recompute():
    """k_proj and v_proj called on different tensors must each see their own input."""
    m = hf_model(layers=1)
    ctrl = vit.patch(m, rank=2, backend="reference")
    ctrl.begin_concept()
    randomize_factors(ctrl)
    attn = m.vit.layers[0].attention
    x1, x2 = torch.randn(2, 5, D), torch.randn(2, 5, D)
    k1 = attn.k_proj(x1)
    v2 = attn.v_proj(x2)  # different input: must not reuse the V computed with x1
    A, B = ctrl.current_factors(1)
    ref_v2 = reference.lora_projection(x2, attn.v_proj.weight, A, B, ctrl.scale, attn.v_proj.bias)
    torch.testing.assert_close(v2, ref_v2, rtol=1e-5, atol=1e-5)
    A, B = ctrl.current_factors(0)
    torch.testing.assert_close(k1, reference.lora_projection(x1, attn.k_proj.weight, A, B, ctrl.scale,
                                                             attn.k_proj.bias), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- timm: Q untouched
def test_timm_q_rows_and_q_output_untouched():
    m = timm_model(layers=2)
    x = torch.randn(2, 1, 8, 8)
    m0 = copy.deepcopy(m)
    qkv_out = {}

    def capture(name):
        def hook(mod, inp, out):
            qkv_out[name] = out.detach()
        return hook
    for mm, tag in ((m0, "ref"), (m, "patched")):
        for i, blk in enumerate(mm.blocks):
            blk.attn.qkv.register_forward_hook(capture(f"{tag}{i}"))
    run(m0, x)
    ctrl = vit.patch(m, rank=4, backend="reference")
    # train a concept for a few steps, fold it, start another: K/V change, Q must not
    ctrl.begin_concept("t0")
    opt = torch.optim.SGD(ctrl.trainable_parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        run(m, x).square().sum().backward()
        opt.step()
    ctrl.end_concept()
    ctrl.begin_concept("t1")
    randomize_factors(ctrl)
    run(m, x)
    # the layer-0 input is identical (the embedding is not adapted): compare the qkv outputs there
    q_ref, q_new = qkv_out["ref0"][..., :D], qkv_out["patched0"][..., :D]
    torch.testing.assert_close(q_new, q_ref, rtol=1e-6, atol=1e-6)
    assert (qkv_out["patched0"][..., D:] - qkv_out["ref0"][..., D:]).abs().max() > 1e-3  # K/V did change
    # the Q rows are the very same weights (and so are K/V: folding writes no base weight)
    for b0, b in zip(m0.blocks, m.blocks):
        assert torch.equal(b.attn.qkv.weight, b0.attn.qkv.weight)
        assert torch.equal(b.attn.qkv.bias, b0.attn.qkv.bias)
    # merge writes only the K/V rows
    ctrl.end_concept()
    ctrl.merge()
    for b0, b in zip(m0.blocks, m.blocks):
        assert torch.equal(b.attn.qkv.weight[:D], b0.attn.qkv.weight[:D])
        assert torch.equal(b.attn.qkv.bias, b0.attn.qkv.bias)
        assert not torch.equal(b.attn.qkv.weight[D:], b0.attn.qkv.weight[D:])


def test_timm_without_qkv_bias():
    m = timm_model(layers=1, qkv_bias=False)
    x = torch.randn(2, 1, 8, 8)
    ref = run(m, x).detach()
    ctrl = vit.patch(m, rank=2)
    assert ctrl.sites[0].bias is None
    ctrl.begin_concept()
    torch.testing.assert_close(run(m, x), ref, rtol=1e-6, atol=1e-6)
    randomize_factors(ctrl)
    assert (run(m, x) - ref).abs().max() > 1e-3


# ---------------------------------------------------------------- merge / unpatch
@pytest.mark.parametrize("fw", ["hf", "timm", "legacy"])
@pytest.mark.parametrize("merge", [False, True])
def test_unpatch_restores_bit_identically(fw, merge):
    m, x = make(fw)
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    mods0 = [(n, type(mod)) for n, mod in m.named_modules()]
    ref = run(m, x).detach()
    ctrl = vit.patch(m, rank=4)
    ctrl.begin_concept("t0")
    randomize_factors(ctrl)
    y_active = run(m, x).detach()
    ctrl.end_concept()
    y_folded = run(m, x).detach()
    torch.testing.assert_close(y_folded, y_active, rtol=1e-5, atol=1e-5)
    assert (y_folded - ref).abs().max() > 1e-3
    assert set(m.state_dict()) == set(sd0)  # patching adds no state_dict entries
    if merge:
        ctrl.merge()
        torch.testing.assert_close(run(m, x), y_folded, rtol=1e-5, atol=1e-5)
    clora_fast.unpatch(m)
    sd = m.state_dict()
    assert list(sd) == list(sd0)
    assert all(torch.equal(sd[k], sd0[k]) for k in sd0)
    assert [(n, type(mod)) for n, mod in m.named_modules()] == mods0
    assert all("forward" not in mod.__dict__ for mod in m.modules())
    assert all(not mod._forward_hooks for mod in m.modules())  # the checkpointing input hook is gone too
    assert torch.equal(run(m, x), ref)
    assert vit.get_controller(m) is None
    with pytest.raises(RuntimeError, match=r"merge\(\): this controller's model was unpatched"):
        ctrl.merge()                          # would write W0 + P into the unpatched model
    assert torch.equal(run(m, x), ref)
    vit.patch(m, rank=2)  # can be patched again


def test_deepcopy_of_patched_model_is_independent():
    for fw in ("hf", "timm"):
        m, x = make(fw, layers=1)
        ctrl = vit.patch(m, rank=2)
        ctrl.begin_concept()
        randomize_factors(ctrl)
        m2 = copy.deepcopy(m)
        c2 = vit.get_controller(m2)
        assert c2 is not ctrl
        torch.testing.assert_close(run(m2, x), run(m, x))
        with torch.no_grad():
            for p in ctrl.lora_B:
                p.zero_()
        assert (run(m2, x) - run(m, x)).abs().max() > 1e-4


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_save_load_round_trip(fw, tmp_path):
    m, x = make(fw)
    m_fresh = copy.deepcopy(m)
    ctrl = vit.patch(m, rank=4, alpha=2.0, penalty_weight=7.0)
    for t in range(2):
        ctrl.begin_concept(f"task{t}")
        randomize_factors(ctrl, seed=10 + t)
        ctrl.end_concept()
    ctrl.begin_concept("task2")        # an active concept is saved too (resumable)
    randomize_factors(ctrl, seed=20)
    y = run(m, x).detach()
    pen = float(ctrl.penalty().detach())
    ctrl.save(tmp_path / "bank")

    c2 = clora_fast.load(m_fresh, tmp_path / "bank")
    assert vit.get_controller(m_fresh) is c2
    assert (c2.rank, c2.alpha, c2.penalty_weight) == (4, 2.0, 7.0)
    assert [c.name for c in c2.concepts] == ["task0", "task1"] and c2.active_name == "task2"
    torch.testing.assert_close(run(m_fresh, x), y, rtol=1e-6, atol=1e-6)
    assert float(c2.penalty().detach()) == pytest.approx(pen, rel=1e-6)
    # loading into an already patched model loads into its controller
    c3 = vit.load(m_fresh, tmp_path / "bank")
    assert c3 is c2


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_discard_concept_restores_the_outputs(fw):
    """discard_concept() on a patched ViT: the model computes exactly what it did before the concept began (P
    untouched), gradients flow to the next concept's factors, and it is not among the concepts."""
    m, x = make(fw)
    ctrl = vit.patch(m, rank=4)
    ctrl.begin_concept("task0")
    randomize_factors(ctrl, seed=1)
    ctrl.end_concept()
    before = run(m, x).detach()
    ctrl.begin_concept("task1")
    randomize_factors(ctrl, seed=2)
    assert not torch.equal(run(m, x).detach(), before)
    assert ctrl.discard_concept() == 1
    assert torch.equal(run(m, x).detach(), before) and [c.name for c in ctrl.concepts] == ["task0"]
    ctrl.begin_concept("task2")
    randomize_factors(ctrl, seed=3)
    run(m, x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ctrl.trainable_parameters())


def test_load_into_a_different_model_fails_cleanly(tmp_path):
    m = hf_model(layers=2)
    ctrl = vit.patch(m, rank=2)
    ctrl.begin_concept()
    ctrl.end_concept()
    ctrl.save(tmp_path / "bank")
    other = hf_model(layers=3)
    with pytest.raises(ValueError):
        vit.load(other, tmp_path / "bank")
    assert vit.get_controller(other) is None
    assert all("forward" not in mod.__dict__ for mod in other.modules())
    other_w = hf_model(layers=2, seed=99)  # same structure, other weights
    with pytest.raises(ValueError):
        vit.load(other_w, tmp_path / "bank")
    assert vit.get_controller(other_w) is None


# ---------------------------------------------------------------- bad input
def test_no_attention_layers_clear_error():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="found no self-attention layers.*Sequential"):
        vit.patch(net)
    with pytest.raises(TypeError, match=r"clora_fast.patch does not know how to adapt.*Sequential.*DINOv2.*"
                                        r"timm VisionTransformer"):
        clora_fast.patch(net)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        vit.patch("vit")


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_rank_larger_than_projection(fw):
    m, _ = make(fw, layers=1)
    with pytest.raises(ValueError, match=r"rank=33 is larger than min\(in, out\) = 32.*\[32, 32\]"):
        vit.patch(m, rank=33)
    assert vit.get_controller(m) is None
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        vit.patch(m, rank=0)
    with pytest.raises(TypeError, match="rank must be a positive int, got 2.5"):
        vit.patch(m, rank=2.5)
    vit.patch(m, rank=32)  # exactly min(in, out) is fine


def test_double_patch_and_unpatch_errors():
    m = hf_model(layers=1)
    vit.patch(m, rank=2)
    with pytest.raises(RuntimeError, match="already patched"):
        vit.patch(m, rank=2)
    vit.unpatch(m)
    with pytest.raises(ValueError, match="not patched"):
        vit.unpatch(m)


@needs_hf5
def test_bad_input_shape_names_the_projection():
    m = hf_model(layers=1)
    ctrl = vit.patch(m, rank=2)
    ctrl.begin_concept()
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 32\]"):
        m.vit.layers[0].attention.k_proj(torch.randn(2, 5, 31))


def test_hf_gradient_checkpointing_same_grads():
    """With HF gradient checkpointing the blocks are recomputed in backward: same A/B grads."""
    grads, n_calls = [], []
    for ckpt in (False, True):
        m = hf_model(layers=2).train()
        m.requires_grad_(False)
        if ckpt:  # transformers >= 5.2x renames it activation_checkpointing_enable
            (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
        ctrl = vit.patch(m, rank=2, backend="reference")
        ctrl.begin_concept()
        randomize_factors(ctrl)
        calls = []
        orig = ctrl.project_group
        ctrl.project_group = lambda g, xx, _o=orig: (calls.append(g), _o(g, xx))[1]
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
        m(x).logits.square().sum().backward()
        grads.append([p.grad.clone() for p in ctrl.trainable_parameters()])
        n_calls.append(len(calls))
    assert n_calls == [2, 4]  # checkpointing recomputed both blocks in backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _enable_checkpointing(fw, m, reentrant):
    """Gradient checkpointing of the model's blocks, reentrant or not; returns an undo for timm's global flag."""
    if fw == "hf":  # transformers >= 5.2x renames it activation_checkpointing_enable (kwargs dict: 1st arg)
        (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)(
            {"use_reentrant": reentrant})
        return lambda: None
    m.set_grad_checkpointing(True)
    if not hasattr(timm.layers, "set_reentrant_ckpt"):   # older timm: always torch's reentrant default
        if not reentrant:
            pytest.skip("this timm has no set_reentrant_ckpt")
        return lambda: None
    before = timm.layers.use_reentrant_ckpt()
    timm.layers.set_reentrant_ckpt(reentrant)
    return lambda: timm.layers.set_reentrant_ckpt(before)


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_reentrant_gradient_checkpointing_frozen_backbone_same_grads(fw):
    """Reentrant checkpointing (transformers 4.x's default; timm's with set_reentrant_ckpt(True)) of a frozen
    backbone: nothing entering a block requires grad, so torch's reentrant checkpoint would record no graph and
    the adapters would silently get no gradient. While a concept trains the patch embedding's output is made to
    require grad: same A/B grads as without checkpointing (the input itself does not require grad here)."""
    grads, n_calls = [], []
    for ckpt in (False, True):
        m, _ = make(fw, layers=2)
        m.train().requires_grad_(False)
        undo = _enable_checkpointing(fw, m, reentrant=True) if ckpt else (lambda: None)
        try:
            ctrl = vit.patch(m, rank=2, backend="reference")
            ctrl.begin_concept()
            randomize_factors(ctrl)
            calls = []
            orig = ctrl.project_group
            ctrl.project_group = lambda g, xx, _o=orig: (calls.append(g), _o(g, xx))[1]
            x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
            (run(m, x).square().sum() + ctrl.penalty()).backward()
        finally:
            undo()
        assert all(p.grad is not None for p in ctrl.trainable_parameters()), "adapters got no gradient"
        grads.append([p.grad.clone() for p in ctrl.trainable_parameters()])
        n_calls.append(len(calls))
    assert n_calls == [2, 4]  # checkpointing recomputed both blocks in backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_checkpointing_input_hook_only_acts_when_needed(fw):
    """The embedding output is made to require grad only under grad mode, with a concept active and reentrant
    checkpointing: no extra backward work otherwise (non-reentrant checkpointing needs no help)."""
    m, x = make(fw, layers=1)
    m.train().requires_grad_(False)
    emb = m.get_input_embeddings() if fw == "hf" else m.patch_embed
    seen = []
    ctrl = vit.patch(m, rank=2, backend="reference")
    emb.register_forward_hook(lambda mod, a, out: seen.append(out.requires_grad))  # runs after the adapter's
    for reentrant in (False, True):
        undo = _enable_checkpointing(fw, m, reentrant)
        try:
            seen.clear()
            run(m, x)                          # no concept active: nothing to train
            ctrl.begin_concept()
            with torch.no_grad():
                run(m, x)
            run(m, x)
            ctrl.end_concept()
        finally:
            undo()
        assert seen == [False, False, reentrant], (reentrant, seen)


# ---------------------------------------------------------------- training moves only A/B
def test_one_training_step_changes_outputs_and_only_adapter():
    m = hf_model(layers=2)
    m.requires_grad_(False)
    x = torch.randn(4, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 0])
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    ctrl = vit.patch(m, rank=4)
    ctrl.begin_concept()
    opt = torch.optim.Adam(ctrl.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(m(x).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, sd0[k]) for k, v in m.state_dict().items())
    assert math.isfinite(losses[-1])


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_model_converted_after_patching(fw):
    """model.to(dtype/device) after patch: timm's fused qkv gets new storage, so the K/V row
    views must follow (on CPU a dtype change stands in for a device move)."""
    m, x, ctrl = patched_with_a_past(fw)
    ctrl.begin_concept("t1")
    randomize_factors(ctrl, seed=2)
    y32 = run(m, x).detach()
    m.to(torch.float64)
    y64 = run(m, x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, y32.double(), rtol=1e-4, atol=1e-5)
    assert all(s.weight.dtype == torch.float64 for s in ctrl.sites)
    if fw == "timm":
        qkv = m.blocks[0].attn.qkv
        assert ctrl.sites[0].weight.data_ptr() == qkv.weight[D:].data_ptr()
    # and back: unpatch still restores the (converted) model exactly
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    clora_fast.unpatch(m)
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())



@pytest.mark.parametrize("fw", ["hf", "timm"])
@pytest.mark.parametrize("change", ["to", "deepcopy", "assign"])
def test_merge_right_after_a_conversion_uses_the_live_weights(fw, change):
    """merge()/unmerge() (no forward in between) after model.to(), deepcopy or load_state_dict(assign=True):
    the sites were stale until the next forward, so merge wrote W0+P into dead storage (timm's qkv row views)
    or into replaced parameters, and the merged model silently lost every concept."""
    m, x, ctrl = patched_with_a_past(fw)
    if change == "to":
        m.to(torch.float64)
        x = x.double()
    elif change == "deepcopy":
        m = copy.deepcopy(m)
        ctrl = vit.get_controller(m)
    else:
        m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    ctrl.merge()                                   # no forward since the change
    with torch.no_grad():
        merged = run(m, x)
    ctrl.unmerge()
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    with torch.no_grad():
        folded = run(m, x)
    torch.testing.assert_close(merged, folded, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_inference_mode_evaluation_before_training(fw):
    """An evaluation under torch.inference_mode() right after begin_concept (or a bank load) must not
    leave inference tensors in the controller's caches: training right after would fail."""
    m, x, ctrl = patched_with_a_past(fw)
    ctrl.begin_concept("t1")
    with torch.inference_mode():
        run(m, x)
    (run(m, x).square().sum() + ctrl.penalty()).backward()
    assert all(p.grad is not None for p in ctrl.trainable_parameters())


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_patching_a_part_of_a_patched_model_is_an_error(fw):
    m, x = make(fw, layers=2)
    ctrl = vit.patch(m, rank=2, backend="reference")
    part = m.vit if fw == "hf" else m.blocks
    with pytest.raises(RuntimeError, match="already patched by clora_fast as part of another model"):
        vit.patch(part, rank=2)
    clora_fast.unpatch(m)
    vit.patch(part, rank=2)                   # fine once the whole model is unpatched
    with pytest.raises(RuntimeError, match="already patched by clora_fast as part of another model"):
        vit.patch(m, rank=2)

# ---------------------------------------------------------------- penalty, dtypes
@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_penalty_is_one_grouped_call_over_every_site(fw, monkeypatch):
    from clora_fast import ops
    m, _ = make(fw, layers=3)
    ctrl = vit.patch(m, rank=2, penalty_weight=3.0, backend="reference")
    ctrl.begin_concept()
    randomize_factors(ctrl, seed=1)
    ctrl.end_concept()
    ctrl.begin_concept()
    randomize_factors(ctrl, seed=2)
    calls = []
    orig = ops.PackedForgettingPenalty.__call__

    def spy(self, flat_As, flat_Bs):
        calls.append((len(self.pasts), len(self.layout)))
        return orig(self, flat_As, flat_Bs)
    monkeypatch.setattr(ops.PackedForgettingPenalty, "__call__", spy)
    pen = ctrl.penalty()
    assert calls == [(6, 6)]  # K and V of 3 blocks, one call
    ref = 3.0 * sum(reference.forgetting_penalty(ctrl.past(i), *ctrl.current_factors(i), ctrl.scale)
                    for i in range(6))
    torch.testing.assert_close(pen.detach(), ref.detach(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_bf16_model_and_cpu_autocast(fw):
    m, x = make(fw, layers=1)
    ref32 = run(m, x).detach()
    mb = copy.deepcopy(m).to(torch.bfloat16)
    refb = run(mb, x.to(torch.bfloat16)).detach()
    ctrl = vit.patch(mb, rank=2)
    ctrl.begin_concept()
    torch.testing.assert_close(run(mb, x.to(torch.bfloat16)), refb, rtol=2e-2, atol=2e-2)
    randomize_factors(ctrl, std=0.05)
    y = run(mb, x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in ctrl.trainable_parameters())
    # fp32 model under CPU autocast: Q (dense) and K/V (controller) agree on the compute dtype
    ctrl32 = vit.patch(m, rank=2)
    ctrl32.begin_concept()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = run(m, x)
    torch.testing.assert_close(ya.float(), ref32, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_torch_compile_patched_model(fw):
    """torch.compile (dynamo + aot_eager: no C compiler needed) of a patched model: same outputs
    and A/B grads, on every torch (below integrations.TRACED_MIN the K/V projections run as eager islands)."""
    m, x = make(fw, layers=1)
    ctrl = vit.patch(m, rank=2, backend="reference")
    ctrl.begin_concept()
    randomize_factors(ctrl, seed=1)
    ctrl.end_concept()
    ctrl.begin_concept()
    randomize_factors(ctrl, seed=2)
    y = run(m, x)
    y.square().sum().backward()
    g = [p.grad.clone() for p in ctrl.trainable_parameters()]
    for p in ctrl.trainable_parameters():
        p.grad = None
    yc = run(torch.compile(m, backend="aot_eager"), x)
    yc.square().sum().backward()
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, ctrl.trainable_parameters()):
        torch.testing.assert_close(b.grad, a, rtol=1e-5, atol=1e-6)


def _compiled_matches_eager(m, mc, x, ctrl, grads=True, tol=1e-5):
    """Outputs (and the factors' gradients) of the compiled model ``mc`` equal the eager ``m``'s."""
    res = []
    for f in (m, mc):
        y = run(f, x)
        g = torch.autograd.grad(y.float().square().sum(), ctrl.trainable_parameters()) if grads else ()
        res.append((y.detach(), g))
    (y, g), (yc, gc) = res
    torch.testing.assert_close(yc, y, rtol=tol, atol=tol)
    for a, b in zip(g, gc):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


traced_kv = pytest.mark.skipif(not integrations._TRACEABLE,
                               reason=f"dynamo of torch < {integrations.TRACED_MIN}: K/V run eagerly")


@traced_kv
@pytest.mark.filterwarnings("ignore:.*without the forgetting penalty")
@pytest.mark.parametrize("strategy", ["fused", "merged"])
@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_torch_compile_fullgraph_follows_the_concept_state(fw, strategy, monkeypatch):
    """fullgraph=True: the K/V projections are traced into the one graph (no graph break, so CUDA graphs -
    mode="reduce-overhead" - can take the whole step), with the past folded in the graph from the live weights.
    The compiled model computes what the eager one does in every state reached after compiling: a concept
    active over a folded past (outputs and factor gradients), its end (a new P), merged (the plain linears),
    unmerged with a new concept, the model converted to float64, and under bf16 autocast.  Both projection
    strategies (forced: a trace takes "merged" on CUDA from ops.TRACED_MERGED_MIN_ROWS rows up)."""
    monkeypatch.setenv("CLORA_FAST_STRATEGY", strategy)
    torch._dynamo.reset()
    m, x, ctrl = patched_with_a_past(fw, layers=2)
    m.requires_grad_(False)
    mc = torch.compile(m, backend="aot_eager", fullgraph=True)
    ctrl.begin_concept("t1")
    randomize_factors(ctrl, seed=2)
    _compiled_matches_eager(m, mc, x, ctrl)
    ctrl.end_concept()
    _compiled_matches_eager(m, mc, x, ctrl, grads=False)
    ctrl.merge()
    _compiled_matches_eager(m, mc, x, ctrl, grads=False)
    ctrl.unmerge()
    ctrl.begin_concept("t2")
    randomize_factors(ctrl, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _compiled_matches_eager(m, mc, x, ctrl, tol=2e-2)
    m.to(torch.float64)
    _compiled_matches_eager(m, mc, x.double(), ctrl)


@traced_kv
@pytest.mark.filterwarnings("ignore:.*without the forgetting penalty")
@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_torch_compile_reads_the_concept_state_in_place(fw, graph_tensor_inputs):
    """In a compiled training step (model output and penalty) every tensor the adapters read - the past P, the
    flat factors, the base weights - is a static graph input: a CUDA graph reads them in place instead of copying
    them at every replay (P alone is the size of the adapted weights); only the batch is copied."""
    m, x, ctrl = patched_with_a_past(fw, layers=2)
    m.requires_grad_(False)
    ctrl.begin_concept("t1")
    randomize_factors(ctrl, seed=2)
    inputs = graph_tensor_inputs(lambda inp: run(m, inp).square().mean() + ctrl.penalty(), x)
    assert len(inputs) > 10
    assert [name for name, static in inputs if not static] == [next(n for n, _ in inputs if "inp" in n)]


@traced_kv
@pytest.mark.filterwarnings("ignore:.*without the forgetting penalty")
@pytest.mark.parametrize("strategy", ["fused", "merged"])
@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_torch_compile_dynamic_batch(fw, strategy, monkeypatch, recording_aot_eager):
    """torch.compile(dynamic=True, fullgraph=True) (what a smaller last batch leads to after a recompile): the
    graphs compiled with a symbolic batch for a batch of 3 serve a batch of 4 (1 is dynamo's own specialization: a
    recompile), with the eager outputs and factor gradients."""
    monkeypatch.setenv("CLORA_FAST_STRATEGY", strategy)
    torch._dynamo.reset()
    m, x, ctrl = patched_with_a_past(fw, layers=2)
    m.requires_grad_(False)
    ctrl.begin_concept("t1")
    randomize_factors(ctrl, seed=2)
    graphs = []
    mc = torch.compile(m, backend=recording_aot_eager(graphs), fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(5)
    counts = []
    for b in (x.shape[0], x.shape[0] + 1, 1):
        _compiled_matches_eager(m, mc, torch.randn(b, *x.shape[1:], generator=g), ctrl)
        counts.append(len(graphs))
    assert counts[0] == counts[1]                   # batch 4 reused batch 3's graphs


@traced_kv
@pytest.mark.parametrize("strategy", ["fused", "merged"])
@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_torch_compile_fullgraph_with_gradient_checkpointing(fw, strategy, monkeypatch):
    """fullgraph=True with the framework's gradient checkpointing on (a checkpoint region refuses side effects on
    outside state: the traced K/V keep nothing on the adapter objects): same outputs and factor gradients as
    eager, twice in a row, with either projection strategy."""
    monkeypatch.setenv("CLORA_FAST_STRATEGY", strategy)
    torch._dynamo.reset()
    m, x, ctrl = patched_with_a_past(fw, layers=2)
    m.train().requires_grad_(False)
    undo = _enable_checkpointing(fw, m, reentrant=False)     # (a reentrant one does not serve autograd.grad)
    try:
        ctrl.begin_concept("t1")
        randomize_factors(ctrl, seed=2)
        mc = torch.compile(m, backend="aot_eager", fullgraph=True)
        for _ in range(2):
            _compiled_matches_eager(m, mc, x, ctrl)
    finally:
        undo()


@traced_kv
@pytest.mark.filterwarnings("ignore:.*without the forgetting penalty")
def test_torch_compile_fullgraph_of_a_loss_with_the_penalty():
    """A compiled loss function (model output + controller.penalty()) in one graph: the penalty is traced too (the
    grouped penalty's custom op over row views of the flat factors); loss and factor gradients equal eager, for
    a first concept (nothing folded: a zero penalty) and a concept over a past."""
    torch._dynamo.reset()
    m, x = make("timm", layers=2)
    m.requires_grad_(False)
    ctrl = vit.patch(m, rank=2, backend="reference")

    def loss_fn(inp):
        return run(m, inp).square().mean() + ctrl.penalty()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    for seed in (1, 2):
        ctrl.begin_concept()
        randomize_factors(ctrl, seed=seed)
        for _ in range(2):
            res = []
            for f in (loss_fn, compiled):
                loss = f(x)
                res.append((loss.detach(), torch.autograd.grad(loss, ctrl.trainable_parameters())))
            (le, ge), (lc, gc) = res
            torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
            for a, b in zip(ge, gc):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        ctrl.end_concept()


@traced_kv
@pytest.mark.parametrize("strategy", ["fused", "merged"])
def test_torch_compile_inductor_of_a_patched_model(strategy, monkeypatch):
    """Inductor (real code generation, as mode="reduce-overhead" uses) of a patched timm ViT with fullgraph=True:
    same outputs and factor gradients as eager, over two training steps (the factors change in between), with
    either projection strategy (the merged one's fold, casts and padding fused by inductor)."""
    monkeypatch.setenv("CLORA_FAST_STRATEGY", strategy)
    torch._dynamo.reset()
    m, x, ctrl = patched_with_a_past("timm", layers=1)
    m.requires_grad_(False)
    mc = torch.compile(m, fullgraph=True)
    ctrl.begin_concept("t1")
    randomize_factors(ctrl, seed=2)
    opt = torch.optim.SGD(ctrl.trainable_parameters(), lr=0.1)
    for _ in range(2):
        _compiled_matches_eager(m, mc, x, ctrl, tol=1e-4)
        loss = run(mc, x).square().mean() + ctrl.penalty()
        loss.backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------- projections with their own forward
def _last_v_projection(m):
    """(qualified name, module) of the last block's V projection (timm: its fused qkv), any layout."""
    blk = vit.find_attention_blocks(m)[1][-1]
    attr = next(a for a in ("qkv", "v_proj", "value") if isinstance(getattr(blk.module, a, None), nn.Linear))
    return f"{blk.name}.{attr}", getattr(blk.module, attr)


@pytest.mark.parametrize("fw", ["hf", "timm", "legacy"])
def test_projection_with_its_own_forward_is_refused(fw, tmp_path):
    """An instance-level forward on a projection (a user's wrapper, an accelerate hook) would be replaced by the
    adapter's and deleted on unpatch: patch/load refuse, naming the module, before changing anything."""
    m, x = make(fw)
    vit.patch(copy.deepcopy(m), rank=2).save(tmp_path / "bank")
    name, lin = _last_v_projection(m)
    calls = []
    wrapper = lambda inp, _f=lin.forward: (calls.append(1), _f(inp))[1]  # noqa: E731
    lin.forward = wrapper
    y = run(m, x).detach()
    attempts = [lambda: vit.patch(m, rank=2), lambda: vit.load(m, tmp_path / "bank")]
    if fw != "legacy":  # the replica is no transformers/timm model: clora_fast.patch does not dispatch it here
        attempts.append(lambda: clora_fast.patch(m, rank=2))
    for fn in attempts:
        with pytest.raises(RuntimeError, match=rf"{re.escape(name)} has its own forward \(<function .*lambda.*\).*"
                                               rf"bypass it while patched.*del module.forward"):
            fn()
        assert vit.get_controller(m) is None
        assert lin.__dict__["forward"] is wrapper
        assert all("forward" not in mod.__dict__ for mod in m.modules() if mod is not lin)
        assert all(not mod._forward_hooks for mod in m.modules())
    calls.clear()
    assert torch.equal(run(m, x), y) and calls == [1]
    del lin.forward
    vit.patch(m, rank=2)        # fine once the wrapper is gone
    vit.unpatch(m)
    # the class's own forward bound on the instance (what accelerate's remove_hook_from_module leaves) is
    # harmless: accepted, and put back on unpatch
    lin.forward = types.MethodType(type(lin).forward, lin)
    vit.patch(m, rank=2).begin_concept()
    assert not isinstance(lin.__dict__["forward"], types.MethodType)
    vit.unpatch(m)
    assert lin.__dict__["forward"].__self__ is lin and lin.__dict__["forward"].__func__ is nn.Linear.forward
    assert torch.equal(run(m, x), y)


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_accelerate_hook_on_projection_is_refused(fw):
    hooks = pytest.importorskip("accelerate.hooks")
    m, x = make(fw)
    name, lin = _last_v_projection(m)
    hooks.add_hook_to_module(lin, hooks.ModelHook())
    hooked = lin.__dict__["forward"]
    with pytest.raises(RuntimeError, match=rf"{re.escape(name)} has its own forward "
                                           rf"\(an accelerate hook, ModelHook.*remove_hook_from_module"):
        vit.patch(m, rank=2)
    assert vit.get_controller(m) is None and lin.__dict__["forward"] is hooked
    assert all(not mod._forward_hooks for mod in m.modules())
    hooks.remove_hook_from_module(lin)       # leaves the bound class forward on the instance: fine
    had = "forward" in lin.__dict__
    vit.patch(m, rank=2)
    vit.unpatch(m)
    assert ("forward" in lin.__dict__) == had
    # what cpu_offload / dispatch_model / device_map=... install on every leaf module
    offloaded, _ = make(fw)
    y = run(offloaded, x).detach()
    pytest.importorskip("accelerate").cpu_offload(offloaded, execution_device="cpu")
    with pytest.raises(RuntimeError, match="an accelerate hook, AlignDevicesHook.*does not support offloaded"):
        vit.patch(offloaded, rank=2)
    assert vit.get_controller(offloaded) is None
    torch.testing.assert_close(run(offloaded, x), y)


# ---------------------------------------------------------------- tracing
@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_trace_or_export_of_unmerged_model_clear_error(fw):
    """torch.jit.trace / torch.export cannot record the adapted projections: a clear error saying to merge()
    (instead of torch-internal ones); after merge() the timm model traces and exports like a plain one."""
    can_export = hasattr(torch, "export") and hasattr(torch.compiler, "is_exporting")  # torch >= 2.5
    m, x, ctrl = patched_with_a_past(fw, layers=1)
    ctrl.begin_concept("t1")
    msg = r"torch.jit.trace / torch.export of a model with unmerged C-LoRA adapters.*controller.merge\(\) first"
    for state in ("active", "folded"):
        with pytest.raises(RuntimeError, match=msg):
            torch.jit.trace(m, x, check_trace=False, strict=False)
        if can_export:
            with pytest.raises(RuntimeError, match=msg):
                torch.export.export(m, (x,), strict=False)  # strict (dynamo) export wraps the error
        if state == "active":
            randomize_factors(ctrl, seed=3)
            ctrl.end_concept()
    if fw == "timm":
        with torch.no_grad():
            y = run(m, x)
        ctrl.merge()
        traced = torch.jit.trace(m, x)
        torch.testing.assert_close(traced(x), y, rtol=1e-5, atol=1e-5)
        if can_export:
            torch.testing.assert_close(torch.export.export(m, (x,)).module()(x), y, rtol=1e-5, atol=1e-5)


def test_jit_script_of_a_patched_model_is_a_clear_error():
    """torch.jit.script of a patched timm ViT (timm models script) fails with what to do, not with a TorchScript
    internals error (or a script of the class's forward without the adapters); the documented recipe gives
    a plain scriptable model with the concept in its weights, and unpatch makes it scriptable again."""
    m, x, ctrl = patched_with_a_past("timm", layers=1)
    with torch.no_grad():
        y = run(m, x)
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile a model patched by clora_fast"):
        torch.jit.script(m)
    torch.testing.assert_close(run(m, x), y)          # nothing changed on the way
    ctrl.merge()
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile"):
        torch.jit.script(m)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    clora_fast.unpatch(m)
    m.load_state_dict(sd)
    scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), y, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- GPU (skipped without CUDA)
def _gpu_models(fw, dtype):
    if fw == "hf":
        from transformers import ViTConfig, ViTForImageClassification
        torch.manual_seed(0)
        cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                        intermediate_size=3072, num_labels=10)
        m = ViTForImageClassification(cfg)
    else:
        torch.manual_seed(0)
        m = timm.create_model("vit_base_patch16_224", pretrained=False, depth=2, num_classes=10)
    return m.eval().to("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fw", ["hf", "timm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_vit_b16_kernels_vs_float64(fw, dtype):
    """ViT-B/16 shapes (2 blocks, batch 4, 197 tokens) on CUDA: the kernel backend's outputs and A/B
    gradients are within ~2x the error of the plain PyTorch path in the same dtype, both measured
    against the float64 reference."""
    x = torch.randn(4, 3, 224, 224, device="cuda")
    results = {}
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for tag, be, dt in (("f64", "reference", torch.float64), ("torch", "reference", dtype),
                            ("kern", "auto", dtype)):
            # the kernels' fp32 dots are TF32 on the GPU (documented): the torch side does the same
            torch.backends.cuda.matmul.allow_tf32 = tag != "f64"
            m = _gpu_models(fw, dt)
            m.requires_grad_(False)
            ctrl = vit.patch(m, rank=16, backend=be)
            ctrl.begin_concept("t0")
            randomize_factors(ctrl, std=0.02, seed=1)
            ctrl.end_concept()
            ctrl.begin_concept("t1")
            randomize_factors(ctrl, std=0.02, seed=2)
            y = run(m, x.to(dt))
            loss = y.float().square().sum() + ctrl.penalty()
            loss.backward()
            results[tag] = (y.double(), [p.grad.double() for p in ctrl.trainable_parameters()])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    y64, g64 = results["f64"]
    for name, (y, g) in (("kern", results["kern"]),):
        ty, tg = results["torch"]
        err_k, err_t = (y - y64).abs().max(), (ty - y64).abs().max()
        assert err_k <= 2 * err_t + 1e-3 * y64.abs().max(), (name, float(err_k), float(err_t))
        for a, b, c in zip(g, tg, g64):
            ek, et = (a - c).abs().max(), (b - c).abs().max()
            assert ek <= 2 * et + 1e-3 * c.abs().max(), (float(ek), float(et))


@pytest.mark.gpu
@traced_kv
def test_gpu_compiled_training_steps_reduce_overhead():
    """torch.compile(mode="reduce-overhead", fullgraph=True) of a patched bf16 ViT-B/16 (2 blocks) on CUDA: the K/V
    projections and the penalty inside CUDA graphs; over three SGD steps the losses and the factors' gradients
    match the eager steps' (bf16 model, float32 factors: relative error of bf16 products)."""
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        m = _gpu_models("timm", torch.bfloat16)
        m.requires_grad_(False)
        ctrl = vit.patch(m, rank=16)
        ctrl.begin_concept("t0")
        randomize_factors(ctrl, std=0.02, seed=1)
        ctrl.end_concept()
        ctrl.begin_concept("t1")
        randomize_factors(ctrl, std=0.02, seed=2)
        opt = torch.optim.SGD(ctrl.trainable_parameters(), lr=0.1)
        f = torch.compile(m, mode="reduce-overhead", fullgraph=True) if compiled else m
        steps = []
        for _ in range(3):
            loss = run(f, x).float().square().mean() + ctrl.penalty()
            loss.backward()
            steps.append((loss.detach().clone(), [p.grad.detach().clone() for p in ctrl.trainable_parameters()]))
            opt.step()
            opt.zero_grad(set_to_none=False)
        runs.append(steps)
    for (le, ge), (lc, gc) in zip(*runs):
        torch.testing.assert_close(lc, le, rtol=2e-2, atol=0)
        for a, b in zip(ge, gc):
            assert (b - a).norm() <= 3e-2 * a.norm(), (float((b - a).norm()), float(a.norm()))


@needs_hf5
def test_other_adapters_on_projections_clear_errors():
    peft = pytest.importorskip("peft")
    m, x = make("hf", layers=2)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["k_proj", "v_proj"]))
    with pytest.raises(TypeError, match="got a PEFT PeftModel: patch the model itself"):
        clora_fast.patch(pm)
    with pytest.raises(ValueError, match=r"not plain nn.Linear .*vit.layers.0.attention.k_proj \(peft"):
        clora_fast.patch(pm.base_model.model)
    # a LoRA on Q only leaves K and V adaptable
    m2, x2 = make("hf", layers=2)
    pm2 = peft.get_peft_model(m2, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ctrl = clora_fast.patch(pm2.base_model.model, rank=2, backend="reference")
    assert len(ctrl.sites) == 4
    ctrl.begin_concept("t0")
    with torch.no_grad():
        y = pm2(x2).logits
    assert y.shape == (x2.shape[0], 3)


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_export_lora_loads_into_peft(fw, tmp_path):
    peft = pytest.importorskip("peft")
    m, x = make(fw, layers=2)
    base = copy.deepcopy(m)
    ctrl = vit.patch(m, rank=2, backend="reference")
    for t in range(2):
        ctrl.begin_concept(f"t{t}")
        randomize_factors(ctrl, std=0.2, seed=t + 1)
        ctrl.end_concept()
    with torch.no_grad():
        want = run(m, x)
    ctrl.export_lora(tmp_path / "lora.safetensors")
    from safetensors.torch import load_file
    sd = load_file(tmp_path / "lora.safetensors")
    r = 2 * 2 * (2 if fw == "timm" else 1)         # rank x concepts (timm: K and V side by side in qkv)
    target = ["qkv"] if fw == "timm" else (["k_proj", "v_proj"] if HF5 else ["key", "value"])
    pm = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=r, target_modules=target))
    res = peft.set_peft_model_state_dict(pm, sd)
    assert not res.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(run(pm, x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"layout='kohya' writes kohya's lora_unet_ keys of a diffusers UNet"):
        clora_fast.export_lora(m, tmp_path / "kohya.safetensors", layout="kohya")
    assert not (tmp_path / "kohya.safetensors").exists()


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_patched_model_is_garbage_collected(fw):
    """A patched model (with a trained step and a past concept) is freed once the last reference to it and to
    its controller goes: nothing of clora_fast (caches, hooks, wrapped projections) keeps it alive."""
    import gc
    import weakref
    m, x, ctrl = patched_with_a_past(fw)
    ctrl.begin_concept("t1")
    randomize_factors(ctrl, seed=2)
    run(m, x).float().square().sum().backward()
    ref = weakref.ref(m)
    del m, ctrl
    gc.collect()
    assert ref() is None


def test_save_pretrained_of_a_patched_transformers_vit_warns_unless_merged(tmp_path):
    """model.save_pretrained while patched writes W0 only: warned about unless merged; the merged save reloads
    into a plain model with the patched outputs; unpatch removes the instance attribute."""
    import warnings as _w
    m, x, ctrl = patched_with_a_past("hf")
    with pytest.warns(UserWarning, match="writes the base weights W0 only"):
        m.save_pretrained(tmp_path / "w0")
    ctrl.merge()
    with _w.catch_warnings():
        _w.simplefilter("error")
        m.save_pretrained(tmp_path / "merged")
    want = run(m, x).detach()
    plain = type(m).from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(run(plain, x).detach(), want, rtol=1e-5, atol=1e-5)
    clora_fast.unpatch(m)
    assert "save_pretrained" not in m.__dict__
    t, _ = make("timm")                      # timm models have no save_pretrained: nothing is put there
    vit.patch(t, rank=2)
    assert "save_pretrained" not in t.__dict__


# ---------------------------------------------------------------- model families: folded-weight reference
# Every supported ViT family is checked against the same model run *unpatched* with its K/V weights set to
# W0 + P + s*B@A (torch.func.functional_call, so the reference's gradients w.r.t. A and B come from plain
# autograd through the weights): outputs and LoRA gradients in train and eval, the merged/unmerged model,
# and unpatch bit-identical. The K/V parameters are named here independently of the integration's discovery:
# transformers ``*.k_proj``/``*.v_proj`` (or ``*.key``/``*.value``), timm the K and V rows of ``*.qkv``.
def _kv_params(model):
    """[(parameter name, row lo, row hi)] of every K and V weight, in module order (lo None: the whole weight)."""
    out = []
    for n, p in model.named_parameters():
        if n.endswith(("k_proj.weight", "v_proj.weight", ".key.weight", ".value.weight")):
            out.append((n, None, None))
        elif n.endswith("qkv.weight"):
            d = p.shape[0] // 3
            out += [(n, d, 2 * d), (n, 2 * d, 3 * d)]
    return out


class _Call(nn.Module):
    def __init__(self, m, fn):
        super().__init__()
        self.m, self.fn = m, fn

    def forward(self, x):
        return self.fn(self.m, x)


def _folded_reference(m0, fn, kv, deltas, x):
    """fn(m0, x) with every K/V weight (rows) of ``kv`` replaced by W0 + delta (differentiable in delta)."""
    params = dict(m0.named_parameters())
    new = {}
    for (name, lo, hi), dlt in zip(kv, deltas):
        w = new.get(name, params[name])
        new[name] = w + dlt if lo is None else torch.cat([w[:lo], w[lo:hi] + dlt, w[hi:]], 0)
    return torch.func.functional_call(_Call(m0, fn), {f"m.{k}": v for k, v in new.items()}, (x,))


def _site_grads(ctrl, i):
    b, pos = ctrl._site_bundle[i]
    bundle, r = ctrl._bundles[b], ctrl.rank
    return (ctrl.lora_A[b].grad[pos * r:(pos + 1) * r],
            ctrl.lora_B[b].grad[bundle.offsets[pos]:bundle.offsets[pos + 1]])


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    return out[0]


def _check_family_against_folded_weights(m, x, fn=None, train=False, n_blocks=2):
    fn = fn or (lambda mod, inp: _first_tensor(mod(inp)))
    m, x = m.double(), x.double()
    m.requires_grad_(False)
    m.train(train)
    kv = _kv_params(m)
    assert len(kv) == 2 * n_blocks, kv
    m0 = copy.deepcopy(m)
    if getattr(m0, "grad_checkpointing", False):   # the reference swaps weights only for the forward: no recompute
        m0.set_grad_checkpointing(False)
    y_orig = fn(m, x).detach()
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    ctrl = clora_fast.patch(m, rank=2, alpha=4.0, backend="reference", penalty_weight=0.0)
    assert ctrl.num_sites == len(kv)
    params = dict(m.named_parameters())
    for site, (n, lo, hi) in zip(ctrl.sites, kv):     # exactly the K/V rows, biases untouched
        w = params[n] if lo is None else params[n][lo:hi]
        assert site.weight.shape == w.shape and torch.equal(site.weight, w), n
    assert torch.equal(fn(m, x), y_orig)
    ctrl.begin_concept("t0")
    randomize_factors(ctrl, std=0.2, seed=3)
    pasts = [(ctrl.scale * B.double() @ A.double()).detach()
             for A, B in (ctrl.current_factors(i) for i in range(ctrl.num_sites))]
    ctrl.end_concept()
    ctrl.begin_concept("t1")
    randomize_factors(ctrl, std=0.2, seed=5)
    y = fn(m, x)
    target = torch.randn_like(y)
    ((y - target) ** 2).sum().backward()
    As = [ctrl.current_factors(i)[0].detach().double().requires_grad_(True) for i in range(ctrl.num_sites)]
    Bs = [ctrl.current_factors(i)[1].detach().double().requires_grad_(True) for i in range(ctrl.num_sites)]
    yr = _folded_reference(m0, fn, kv, [p + ctrl.scale * B @ A for p, A, B in zip(pasts, As, Bs)], x)
    ((yr - target) ** 2).sum().backward()
    assert not torch.allclose(yr, y_orig, rtol=1e-4, atol=1e-4)     # the adapters do change the output
    torch.testing.assert_close(y, yr, rtol=1e-6, atol=1e-6)
    for i in range(ctrl.num_sites):
        gA, gB = _site_grads(ctrl, i)
        torch.testing.assert_close(gA, As[i].grad.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gB, Bs[i].grad.float(), rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in m.parameters())
    ctrl.end_concept()
    with torch.no_grad():
        deltas = [p + ctrl.scale * B.double() @ A.double() for p, A, B in zip(pasts, As, Bs)]
        want = _folded_reference(m0, fn, kv, deltas, x)
        torch.testing.assert_close(fn(m, x), want, rtol=1e-6, atol=1e-6)
        ctrl.merge()
        torch.testing.assert_close(fn(m, x), want, rtol=1e-6, atol=1e-6)
        ctrl.unmerge()
        torch.testing.assert_close(fn(m, x), want, rtol=1e-6, atol=1e-6)
    clora_fast.unpatch(m)
    assert torch.equal(fn(m, x), y_orig)
    sd = m.state_dict()
    assert sd.keys() == sd0.keys() and all(torch.equal(sd[k], sd0[k]) for k in sd0)


_OMIT = object()


def _timm_vit(arch="vit_tiny_patch16_224", **kw):
    """A tiny timm model (skipped where this timm lacks ``arch``); a keyword set to _OMIT is not passed."""
    if not timm.is_model(arch):
        pytest.skip(f"timm {timm.__version__} has no {arch}")
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=16, patch_size=4, depth=2, embed_dim=D, num_heads=4, num_classes=3)
    args.update(kw)
    return timm.create_model(arch, **{k: v for k, v in args.items() if v is not _OMIT})


def _timm_vit_takes(arg: str) -> bool:
    import inspect
    return arg in inspect.signature(timm.models.VisionTransformer.__init__).parameters


def _no_fused_attn(m):
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    return m


def _unit_layer_scale(m):
    with torch.no_grad():
        for mod in m.modules():
            if type(mod).__name__ == "LayerScale":
                mod.gamma.fill_(1.0)           # timm's 1e-5 init would hide what the attention does
    return m


def _ckpt(m):
    m.set_grad_checkpointing(True)
    return m


# name: (build, image size, fn(model, x) -> tensor or None for model(x), attention blocks)
TIMM_FAMILIES = {
    "vit_qkv_bias": (lambda: _timm_vit(qkv_bias=True), 16, None),
    "vit_no_qkv_bias": (lambda: _timm_vit(qkv_bias=False), 16, None),
    "vit_qk_norm": (lambda: _timm_vit(qk_norm=True), 16, None),
    "vit_avg_no_cls": (lambda: _timm_vit(class_token=False, global_pool="avg"), 16, None),
    "vit_reg_tokens": (lambda: _timm_vit(reg_tokens=4), 16, None),
    "vit_map_head": (lambda: _timm_vit(class_token=False, global_pool="map"), 16, None),
    "vit_not_fused_attn": (lambda: _no_fused_attn(_timm_vit()), 16, None),
    "vit_dynamic_img_size": (lambda: _timm_vit(dynamic_img_size=True), 24, None),
    "vit_features_head": (lambda: _timm_vit(), 16, lambda mod, x: mod.forward_head(mod.forward_features(x))),
    "vit_features_only": (lambda: _timm_vit(), 16, lambda mod, x: mod.forward_features(x)),
    "deit_distilled": (lambda: _timm_vit("deit_tiny_distilled_patch16_224"), 16, None),
    "vit_parallel_blocks": (lambda: _unit_layer_scale(_timm_vit("vit_small_patch16_18x2_224")), 16,
                            lambda mod, x: mod.forward_features(x), 4),
    "vit_grad_checkpointing": (lambda: _ckpt(_timm_vit()), 16, None),
    "naflexvit": (lambda: _unit_layer_scale(_timm_vit("naflexvit_base_patch16_gap")), 16, None),
    "vit_hybrid_resnet_stem": (lambda: _timm_vit("vit_tiny_r_s16_p8_224", img_size=32, patch_size=1), 32, None),
}


def _check_family(table, family, train):
    """Build ``table[family]`` = (build, image size, output fn, [blocks]) and check it against the folded weights."""
    build, size, fn, *n_blocks = table[family]
    m = build()
    torch.manual_seed(7)
    x = torch.randn(2, 3, size, size)
    _check_family_against_folded_weights(m, x, fn, train=train, n_blocks=n_blocks[0] if n_blocks else 2)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("family", sorted(TIMM_FAMILIES))
def test_timm_family_matches_folded_weights(family, train):
    _check_family(TIMM_FAMILIES, family, train)


def _hf(config_cls, model_cls, **kw):
    T = transformers
    torch.manual_seed(0)
    args = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                patch_size=4, num_channels=3, num_labels=3)
    args.update(kw)
    if not (hasattr(T, config_cls) and hasattr(T, model_cls)):
        pytest.skip(f"transformers {T.__version__} has no {model_cls}")
    cfg = getattr(T, config_cls)(**args)
    return getattr(T, model_cls)(cfg)


def _swin():
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 1],
                                  num_heads=[2, 2], window_size=2, drop_path_rate=0.0, num_labels=3)
    return transformers.SwinForImageClassification(cfg)


_MAE_NOISE = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))

# name: (build, image size, fn(model, x) -> tensor or None for model(x)[0]/logits, attention blocks)
HF_FAMILIES = {
    "vit_eager": (lambda: _hf("ViTConfig", "ViTForImageClassification", attn_implementation="eager"), 16, None),
    "vit_sdpa": (lambda: _hf("ViTConfig", "ViTForImageClassification", attn_implementation="sdpa"), 16, None),
    "vit_output_attentions": (lambda: _hf("ViTConfig", "ViTForImageClassification", attn_implementation="eager"),
                              16, lambda mod, x: (lambda o: torch.cat([o.logits.flatten()] + [a.flatten() for a in
                                                                          o.attentions]))(
                                  mod(x, output_attentions=True))),
    "vit_interpolate_pos_encoding": (lambda: _hf("ViTConfig", "ViTModel"), 24,
                                     lambda mod, x: mod(x, interpolate_pos_encoding=True).last_hidden_state),
    "deit": (lambda: _hf("DeiTConfig", "DeiTForImageClassification"), 16, None),
    "deit_with_teacher": (lambda: _hf("DeiTConfig", "DeiTForImageClassificationWithTeacher"), 16, None),
    "dinov2": (lambda: _hf("Dinov2Config", "Dinov2ForImageClassification"), 16, None),
    "dinov2_with_registers": (lambda: _hf("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification"),
                              16, None),
    "dinov3_vit": (lambda: _hf("DINOv3ViTConfig", "DINOv3ViTModel", pos_embed_rescale=None), 16, None),
    "beit": (lambda: _hf("BeitConfig", "BeitForImageClassification", use_relative_position_bias=True,
                         drop_path_rate=0.0), 16, None),
    "beit_shared_relpos": (lambda: _hf("BeitConfig", "BeitModel", use_shared_relative_position_bias=True,
                                       drop_path_rate=0.0), 16, None),
    "data2vec_vision": (lambda: _hf("Data2VecVisionConfig", "Data2VecVisionForImageClassification",
                                    use_relative_position_bias=True, drop_path_rate=0.0), 16, None),
    "clip_vision": (lambda: _hf("CLIPVisionConfig", "CLIPVisionModel"), 16, None),
    "clip_vision_with_projection": (lambda: _hf("CLIPVisionConfig", "CLIPVisionModelWithProjection",
                                                projection_dim=8), 16, None),
    "siglip_vision": (lambda: _hf("SiglipVisionConfig", "SiglipVisionModel"), 16, None),
    "vit_mae": (lambda: _hf("ViTMAEConfig", "ViTMAEModel"), 16,
                lambda mod, x: mod(x, noise=_MAE_NOISE.to(x.dtype)).last_hidden_state),
    "vit_msn": (lambda: _hf("ViTMSNConfig", "ViTMSNForImageClassification"), 16, None),
    "ijepa": (lambda: _hf("IJepaConfig", "IJepaForImageClassification"), 16, None),
    "swin": (_swin, 16, None),
}


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_transformers_family_matches_folded_weights(family, train):
    _check_family(HF_FAMILIES, family, train)


# timm models whose self-attention this integration does not adapt: refused, naming the model class, the
# unsupported attention modules and what is supported (never patched partially or silently not at all)
TIMM_REFUSED = {
    "eva02": (lambda: _timm_vit("eva02_tiny_patch14_224"), "EvaAttention"),
    "vit_rope": (lambda: _timm_vit("vit_base_patch16_rope_224"), "AttentionRope"),
    "beit": (lambda: _timm_vit("beit_base_patch16_224"), "beit.Attention"),     # q_bias/v_bias, F.linear
    "vit_relpos": (lambda: _timm_vit("vit_relpos_small_patch16_224"), "RelPosAttention"),
    "samvit": (lambda: _timm_vit("samvit_base_patch16", global_attn_indexes=(1,), window_size=2, num_classes=0,
                                 ref_feat_shape=None), "vision_transformer_sam.Attention"),
    "vit_diff_attention": (lambda: _timm_vit(attn_layer="diff") if _timm_vit_takes("attn_layer") else
                           pytest.skip(f"timm {timm.__version__}: VisionTransformer has no attn_layer"),
                           "DiffAttention"),
    "cait": (lambda: _timm_vit("cait_xxs24_224"), "TalkingHeadAttn"),
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, depths=(1, 1),
                                       embed_dim=16, num_heads=(1, 2), window_size=2, num_classes=3),
             "WindowAttention"),
    "twins": (lambda: timm.create_model("twins_svt_small", pretrained=False, img_size=64, depths=(1, 1, 1, 1),
                                        embed_dims=(16, 16, 32, 32), num_heads=(1, 1, 2, 2), wss=[2, 2, 2, 2]),
              "LocallyGroupedAttn"),
    # timm Attention blocks next to other self-attention (CSATv2's SpatialTransformerBlock): never only some
    "csatv2_partial": (lambda: _timm_vit("csatv2", img_size=_OMIT, patch_size=_OMIT, depth=_OMIT, embed_dim=_OMIT,
                                         num_heads=_OMIT), "SpatialTransformerBlock"),
}


@pytest.mark.parametrize("family", sorted(TIMM_REFUSED))
def test_timm_unsupported_attention_is_refused(family):
    build, what = TIMM_REFUSED[family]
    m = build()
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    for entry in (clora_fast.patch, vit.patch):
        with pytest.raises(ValueError) as ei:
            entry(m, rank=2)
        msg = str(ei.value)
        assert type(m).__name__ in msg and what in msg and "supported" in msg, msg
    assert vit.get_controller(m) is None and not vit.can_patch(m)
    assert all("forward" not in mod.__dict__ for mod in m.modules())        # nothing was left installed
    assert all(torch.equal(v, sd0[k]) for k, v in m.state_dict().items())



# transformers models whose attention is not (or not only) in the supported families: refused by both entries
HF_REFUSED = {
    # the text tower uses the same CLIPAttention class as the vision tower: never adapt it silently
    "clip_with_text_tower": (lambda: transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=D, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=50, max_position_embeddings=8),
        vision_config=dict(hidden_size=D, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                           image_size=16, patch_size=4), projection_dim=8)), "'clip'"),
    "swinv2": (lambda: transformers.Swinv2Model(transformers.Swinv2Config(
        image_size=16, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2)), "'swinv2'"),
    "bert": (lambda: transformers.BertModel(transformers.BertConfig(
        hidden_size=D, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=50)), "'bert'"),
}


@pytest.mark.parametrize("family", sorted(HF_REFUSED))
def test_transformers_unsupported_family_is_refused(family):
    build, what = HF_REFUSED[family]
    m = build()
    with pytest.raises((TypeError, ValueError)) as ei:
        clora_fast.patch(m, rank=2)
    assert type(m).__name__ in str(ei.value)
    for wrap in (False, True):                       # vit.patch directly, also on a user's module holding it
        target = nn.Sequential(m) if wrap else m
        with pytest.raises(ValueError) as ei:
            vit.patch(target, rank=2)
        msg = str(ei.value)
        assert type(target).__name__ in msg and what in msg and "supported" in msg, msg
        assert vit.get_controller(target) is None and not vit.can_patch(target)
    assert all("forward" not in mod.__dict__ for mod in m.modules())


@pytest.mark.parametrize("fw", ["hf", "timm"])
def test_import_lora_from_peft_reproduces_its_outputs(fw, tmp_path):
    """A PEFT LoRA on the K/V projections (timm: on the fused qkv, its Q rows zero), saved with
    get_peft_model_state_dict, imported as a past concept: the patched model computes what the PEFT model does.
    A qkv LoRA that changes Q too is refused (Q is not a site) unless ignore_other_modules=True; clora_fast's own
    export (timm: K and V side by side, rank 2r) imports back into a rank-r controller (zero columns dropped)."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import save_file
    m, x = make(fw, layers=2)
    target = ["qkv"] if fw == "timm" else (["k_proj", "v_proj"] if HF5 else ["key", "value"])
    pm = peft.get_peft_model(copy.deepcopy(m), peft.LoraConfig(r=2, lora_alpha=4, target_modules=target))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                if fw == "timm":
                    p[:p.shape[0] // 3] = 0             # no change to Q
    sd = {k: v.contiguous() for k, v in peft.get_peft_model_state_dict(pm).items()}
    save_file(sd, str(tmp_path / "peft.safetensors"))
    ctrl = vit.patch(m, rank=2, backend="reference")
    assert clora_fast.import_lora(m, tmp_path / "peft.safetensors", "imported", scale=2.0) == 0   # alpha / r
    with torch.no_grad():
        torch.testing.assert_close(run(m, x), run(pm, x), rtol=1e-5, atol=1e-5)

    pm.save_pretrained(str(tmp_path / "saved"))       # adapter_model.safetensors + adapter_config.json (alpha 4, r 2)
    m3, _ = make(fw, layers=2)
    ctrl3 = vit.patch(m3, rank=2, backend="reference")
    ctrl3.import_lora(tmp_path / "saved")                       # the folder: its adapter_model.safetensors
    assert ctrl3.concept(0).scale == 2.0
    with torch.no_grad():
        torch.testing.assert_close(run(m3, x), run(pm, x), rtol=1e-5, atol=1e-5)

    ctrl.export_lora(tmp_path / "ours.safetensors", 0)
    m2, _ = make(fw, layers=2)
    ctrl2 = vit.patch(m2, rank=2, backend="reference")
    ctrl2.import_lora(tmp_path / "ours.safetensors")
    for i in range(ctrl.num_sites):
        torch.testing.assert_close(ctrl2.past(i), ctrl.past(i), rtol=1e-6, atol=1e-7)

    if fw == "timm":
        key = next(k for k in sd if k.endswith("qkv.lora_B.weight"))
        sd[key] = sd[key].clone()
        sd[key][0, 0] = 1.0
        save_file(sd, str(tmp_path / "q.safetensors"))
        with pytest.raises(ValueError, match=r"not C-LoRA sites \(e.g. \['blocks.0.attn.qkv \(its Q rows\)'\]"):
            ctrl2.import_lora(tmp_path / "q.safetensors")
        assert len(ctrl2.concepts) == 1
        ctrl2.import_lora(tmp_path / "q.safetensors", ignore_other_modules=True)
        assert len(ctrl2.concepts) == 2

    dm = peft.get_peft_model(copy.deepcopy(m2), peft.LoraConfig(r=2, target_modules=target, use_dora=True))
    save_file({k: v.contiguous() for k, v in peft.get_peft_model_state_dict(dm).items()},
              str(tmp_path / "dora.safetensors"))                # no config beside it: the keys say DoRA
    n = len(ctrl2.concepts)
    with pytest.raises(ValueError, match=r"is DoRA \(weight-decomposed LoRA\) at \d+ of the sites' module\(s\) "
                                         r"\(e.g. \['base_model.model."):
        ctrl2.import_lora(tmp_path / "dora.safetensors", ignore_other_modules=True)
    assert len(ctrl2.concepts) == n
