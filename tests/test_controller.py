"""CLoRAController on plain tensors (framework-free): projections, concepts, fold/remove,
penalty against the reference, merge, export, validation."""
import contextlib
import math

import pytest
import torch
from torch import nn

from clora_fast import ops
from clora_fast import reference as R
from clora_fast.controller import DEFAULT_PENALTY_WEIGHT, CLoRAController, Site

IN = 12
OUTS = (8, 16, 8, 24)


def make_sites(seed=0, group="g", bias=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sites = []
    for i, o in enumerate(OUTS):
        w = torch.randn(o, IN, generator=g, dtype=torch.float32).to(dtype)
        b = torch.randn(o, generator=g).to(dtype) if (bias and i % 2 == 0) else None
        sites.append(Site(f"layer{i // 2}.{'kv'[i % 2]}", w, b, group))
    return sites


def randomize(ctrl, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ctrl.trainable_parameters():
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.device))


def one_past_one_active(ctrl):
    """One concept trained (random factors) and folded into P, a second one active with other random factors."""
    ctrl.begin_concept()
    randomize(ctrl)
    ctrl.end_concept()
    ctrl.begin_concept()
    randomize(ctrl, seed=3)
    return ctrl


def expected(ctrl, i, x):
    """x @ (W0 + P + s B A)^T + b computed by the reference, in float64."""
    s = ctrl.sites[i]
    w = s.weight.double() + ctrl.past(i).double()
    A, B = ctrl.current_factors(i)
    y = R.lora_projection(x.double(), w, A.detach().double(), B.detach().double(), ctrl.scale,
                          None if s.bias is None else s.bias.double())
    return y


def test_default_penalty_weight_and_scale():
    c = CLoRAController(make_sites(), rank=4)
    assert c.penalty_weight == DEFAULT_PENALTY_WEIGHT
    assert c.scale == 1.0 and c.alpha == 4.0
    c2 = CLoRAController(make_sites(), rank=4, alpha=8, penalty_weight=5.0)
    assert c2.scale == 2.0 and c2.penalty_weight == 5.0
    import clora_fast.controller as C
    old = C.DEFAULT_PENALTY_WEIGHT
    try:                                   # a sweep can change the module constant at run time
        C.DEFAULT_PENALTY_WEIGHT = 123.0
        assert CLoRAController(make_sites(), rank=4).penalty_weight == 123.0
    finally:
        C.DEFAULT_PENALTY_WEIGHT = old
    assert c.groups == ["g"] and c.group_sites("g") == [s.name for s in c.sites]


@pytest.mark.parametrize("kw, msg", [
    (dict(rank=0), "rank"), (dict(rank=9), "rank=9 exceeds"), (dict(alpha=-1.0), "alpha"),
    (dict(penalty_weight=float("nan")), "penalty_weight"), (dict(backend="gpu"), "backend"),
    (dict(param_dtype=torch.float64, backend="triton"), "param_dtype=torch.float64 needs backend 'reference'"),
])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CLoRAController(make_sites(), **{"rank": 2, **kw})


def test_bad_sites():
    with pytest.raises(ValueError, match="empty"):
        CLoRAController([])
    s = make_sites()
    s[1].name = s[0].name
    with pytest.raises(ValueError, match="duplicate site name"):
        CLoRAController(s)
    s = make_sites()
    s[2] = Site("odd", torch.randn(8, IN + 1), None, "g")
    with pytest.raises(ValueError, match="must share in_features"):
        CLoRAController(s, rank=2)
    with pytest.raises(ValueError, match=r"weight must be a 2-D floating tensor"):
        CLoRAController([Site("x", torch.zeros(3, dtype=torch.long))])
    with pytest.raises(ValueError, match=r"bias must be None or a tensor of shape \[8\]"):
        CLoRAController([Site("x", torch.randn(8, 4), torch.randn(7))], rank=2)
    with pytest.raises(TypeError, match="Site"):
        CLoRAController([("x", torch.randn(8, 4))])


def test_pristine_is_bit_identical_to_linear():
    sites = make_sites(bias=True)
    c = CLoRAController(sites, rank=4, backend="reference")
    x = torch.randn(3, 5, IN)
    assert c.pristine
    ys = c.project_group("g", x)
    for i, s in enumerate(sites):
        ref = nn.functional.linear(x, s.weight, s.bias)
        assert torch.equal(c.project(i, x), ref)
        assert torch.equal(ys[i], ref)
    k, v = c.project_pair(0, 1, x)
    assert torch.equal(k, nn.functional.linear(x, sites[0].weight, sites[0].bias))


def test_fresh_concept_is_identity_change():
    sites = make_sites(bias=True)
    c = CLoRAController(sites, rank=4, backend="reference")
    idx = c.begin_concept()
    assert idx == 0 and c.active_concept == 0 and c.active_name == "<c1>"
    x = torch.randn(2, 7, IN, generator=torch.Generator().manual_seed(3))
    ys = c.project_group("g", x)
    for i, s in enumerate(sites):
        ref = nn.functional.linear(x, s.weight, s.bias)
        A, B = c.current_factors(i)
        assert torch.count_nonzero(B) == 0
        # A is PEFT's Kaiming-uniform(a=sqrt(5)): bound 1/sqrt(in)
        assert A.abs().max() <= 1 / math.sqrt(IN) + 1e-6 and A.abs().max() > 0.3 / math.sqrt(IN)
        assert torch.equal(c.project(i, x), ref)          # per layer: bit-identical
        # grouped GEMM: another summation order, fp32 rounding (|y| up to ~10: 1 ulp is ~1e-6)
        torch.testing.assert_close(ys[i], ref, rtol=1e-5, atol=1e-5)


def test_projections_match_reference_and_grouped_equals_per_layer():
    sites = make_sites(bias=True)
    c = CLoRAController(sites, rank=3, alpha=6.0, backend="reference")
    c.begin_concept()
    randomize(c)
    c.end_concept()
    c.begin_concept()
    randomize(c, seed=2)
    x = torch.randn(2, 5, IN, dtype=torch.float32, requires_grad=True)
    ys = c.project_group("g", x)
    loss_g = sum((y * (j + 1)).sum() for j, y in enumerate(ys))
    grads_g = torch.autograd.grad(loss_g, [x] + c.trainable_parameters())
    for i in range(len(sites)):
        torch.testing.assert_close(ys[i].double(), expected(c, i, x.detach()), rtol=1e-5, atol=1e-5)
    per = [c.project(i, x) for i in range(len(sites))]
    for a, b in zip(ys, per):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    loss_p = sum((y * (j + 1)).sum() for j, y in enumerate(per))
    grads_p = torch.autograd.grad(loss_p, [x] + c.trainable_parameters())
    for a, b in zip(grads_g, grads_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    k, v = c.project_pair(0, 1, x)
    torch.testing.assert_close(k, per[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, per[1], rtol=1e-6, atol=1e-6)
    # names work as site keys
    torch.testing.assert_close(c.project(sites[3].name, x), per[3])


def test_input_validation_messages():
    c = CLoRAController(make_sites(), rank=2)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 12\], got shape \(2, 5\)"):
        c.project(0, torch.randn(2, 5))
    with pytest.raises(KeyError, match="unknown site"):
        c.project("nope", torch.randn(2, IN))
    with pytest.raises(IndexError):
        c.project(99, torch.randn(2, IN))
    with pytest.raises(KeyError, match="unknown group"):
        c.project_group("h", torch.randn(2, IN))
    with pytest.raises(TypeError, match="torch.Tensor"):
        c.project(0, [1.0] * IN)


def test_penalty_zero_then_matches_reference_with_gradients():
    c = CLoRAController(make_sites(), rank=3, alpha=1.5, penalty_weight=10.0, backend="reference")
    assert float(c.penalty()) == 0.0          # no concept
    c.begin_concept()
    randomize(c)
    p1 = c.penalty()
    assert float(p1) == 0.0                   # first concept: P = 0 exactly
    c.end_concept()
    c.begin_concept()
    randomize(c, seed=5)
    pen = c.penalty()
    params = c.trainable_parameters()
    grads = torch.autograd.grad(pen, params)
    # reference: autograd through clora_fast.reference on float64 copies of the same factors
    As = [c.current_factors(i)[0].detach().double().requires_grad_(True) for i in range(c.num_sites)]
    Bs = [c.current_factors(i)[1].detach().double().requires_grad_(True) for i in range(c.num_sites)]
    ref = 10.0 * R.grouped_forgetting_penalty([c.past(i).double() for i in range(c.num_sites)], As, Bs,
                                              [c.scale] * c.num_sites)
    ref.backward()
    assert float(pen.detach()) > 0
    torch.testing.assert_close(pen.double(), ref.detach(), rtol=1e-5, atol=0)
    # the flat parameters' gradients, split per site, equal the reference gradients
    for i in range(c.num_sites):
        gA = grads[0][i * 3:(i + 1) * 3]
        o = c._bundles[0].offsets
        gB = grads[1][o[i]:o[i + 1]]
        torch.testing.assert_close(gA.double(), As[i].grad, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(gB.double(), Bs[i].grad, rtol=1e-4, atol=1e-10)
    c.end_concept()
    assert float(c.penalty()) == 0.0          # no active concept


def test_penalty_weight_zero_and_ungrouped_sites():
    sites = make_sites(group=None)
    c = CLoRAController(sites, rank=2, penalty_weight=0.0)
    assert c.groups == [] and len(c._bundles) == len(sites)
    c.begin_concept()
    randomize(c)
    c.end_concept()
    c.begin_concept()
    randomize(c)
    assert float(c.penalty()) == 0.0
    c.penalty_weight = 2.0
    assert float(c.penalty()) > 0
    # per-site bundles: trainable = one A and one B per site
    assert len(c.trainable_parameters()) == 2 * len(sites)


def test_fold_and_remove_arithmetic():
    sites = make_sites()
    c = CLoRAController(sites, rank=2, alpha=3.0, backend="reference")
    saved = []
    for t in range(3):
        c.begin_concept(f"<t{t}>")
        randomize(c, seed=10 + t)
        saved.append([tuple(f.detach().clone() for f in c.current_factors(i)) for i in range(c.num_sites)])
        c.end_concept()
    s = c.scale
    for i in range(c.num_sites):
        P = sum(s * (B.float() @ A.float()) for A, B in (saved[t][i] for t in range(3)))
        torch.testing.assert_close(c.past(i), P, rtol=1e-6, atol=1e-7)
        wf = (sites[i].weight.float() + c.past(i)).to(sites[i].weight.dtype)
        assert torch.equal(c.folded_weight(i), wf)
    c.remove_concept(1)
    assert [k.idx for k in c.concepts] == [0, 2]
    # a controller that only ever folded concepts 0 and 2 has bit-identical P
    c2 = CLoRAController(make_sites(), rank=2, alpha=3.0)
    for t in (0, 2):
        c2.begin_concept()
        with torch.no_grad():
            for i in range(c2.num_sites):
                A, B = c2.current_factors(i)
                A.copy_(saved[t][i][0])
                B.copy_(saved[t][i][1])
        c2.end_concept()
    for i in range(c.num_sites):
        assert torch.equal(c.past(i), c2.past(i))
    with pytest.raises(KeyError, match="removed"):
        c.remove_concept(1)
    with pytest.raises(ValueError, match="already exists"):
        c.begin_concept("<t1>")                  # names stay unique, even removed ones
    # several at once: checked first (an unknown or removed index changes nothing), one refold
    for bad, err in (([0, 1], KeyError), ([0, 7], KeyError), (0, TypeError), ([True], TypeError)):
        with pytest.raises(err):
            c.remove_concepts(bad)
        assert [k.idx for k in c.concepts] == [0, 2] and torch.equal(c.past(0), c2.past(0))
    c.remove_concepts([2, 0])
    assert [r["idx"] for r in c.retired_concepts] == [1, 0, 2]
    assert not c.has_past and c.pristine     # back to the base model exactly
    x = torch.randn(3, IN)
    assert torch.equal(c.project(0, x), x @ sites[0].weight.T)


def test_discard_concept_leaves_the_past_as_it_was():
    """discard_concept(): the active concept is dropped unfolded (even one with non-finite factors, which
    end_concept() refuses), P and the outputs are those from before its begin_concept(), its index is used up
    and its name taken; the state_dict round trip keeps that."""
    c = CLoRAController(make_sites(), rank=2, backend="reference")
    c.begin_concept("<a>")
    randomize(c)
    c.end_concept()
    x = torch.randn(3, IN)
    before = [c.project(i, x) for i in range(c.num_sites)]
    past = [c.past(i).clone() for i in range(c.num_sites)]
    c.begin_concept("<b>")
    randomize(c, seed=5)
    with torch.no_grad():
        c.trainable_parameters()[-1][0, 0] = float("nan")
    assert c.discard_concept() == 1
    assert c.active_concept is None and c.trainable_parameters() == [] and [k.name for k in c.concepts] == ["<a>"]
    assert c.retired_concepts == [{"idx": 1, "name": "<b>"}]
    for i in range(c.num_sites):
        assert torch.equal(c.past(i), past[i]) and torch.equal(c.project(i, x), before[i])
    with pytest.raises(ValueError, match="already exists"):
        c.begin_concept("<b>")
    assert c.begin_concept("<c>") == 2
    c.discard_concept()
    with pytest.raises(RuntimeError, match="no concept is active"):
        c.discard_concept()
    c2 = CLoRAController(make_sites(), rank=2, backend="reference")
    c2.load_state_dict(c.state_dict())
    assert c2.retired_concepts == c.retired_concepts and c2.begin_concept() == 3


def test_concept_lifecycle_errors_and_trainables():
    c = CLoRAController(make_sites(), rank=2)
    assert c.trainable_parameters() == []
    with pytest.raises(RuntimeError, match="no concept is active"):
        c.end_concept()
    c.begin_concept("a")
    with pytest.raises(RuntimeError, match="still active"):
        c.begin_concept("b")
    with pytest.raises(KeyError, match="still being learned"):
        c.remove_concept(0)
    with pytest.raises(RuntimeError, match="end_concept"):
        c.merge()
    params = c.trainable_parameters()
    assert len(params) == 2 and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert params[0].shape == (4 * 2, IN) and params[1].shape == (sum(OUTS), 2)
    with torch.no_grad():
        params[1].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        c.end_concept()


def test_merge_unmerge_bit_identical():
    sites = make_sites(bias=True)
    w0 = [s.weight.clone() for s in sites]
    c = CLoRAController(sites, rank=2, backend="reference")
    c.begin_concept()
    randomize(c)
    c.end_concept()
    x = torch.randn(4, IN)
    dense = [c.project(i, x) for i in range(c.num_sites)]
    grouped = c.project_group("g", x)
    c.merge()
    assert c.merged and c.pristine
    for i, s in enumerate(sites):
        assert torch.equal(s.weight, c.folded_weight(i))
        assert torch.equal(c.project(i, x), dense[i])     # zero-overhead dense path, same bits
        torch.testing.assert_close(grouped[i], dense[i], rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="unmerge"):
        c.begin_concept()
    with pytest.raises(RuntimeError, match="already merged"):
        c.merge()
    c.unmerge()
    for s, w in zip(sites, w0):
        assert torch.equal(s.weight, w)
    with pytest.raises(RuntimeError, match="not merged"):
        c.unmerge()


def test_unmerge_keeps_a_change_made_while_merged():
    """A base weight changed while merged (fuse_lora, load_state_dict, an optimizer step) keeps that change on
    unmerge (W0 + change, with a warning naming it) instead of being silently reset to the saved W0; the
    others come back bit for bit, and writes that leave the merged value as it was (save() while merged
    computes the identity on W0 by briefly unmerging) warn about nothing."""
    import warnings
    sites = make_sites(bias=True)
    w0 = [s.weight.clone() for s in sites]
    c = CLoRAController(sites, rank=2, backend="reference")
    c.begin_concept()
    randomize(c)
    c.end_concept()
    c.merge()
    delta = torch.randn(sites[1].weight.shape, generator=torch.Generator().manual_seed(9)) * 0.1
    with torch.no_grad():
        sites[1].weight.add_(delta)
    with pytest.warns(UserWarning, match=r"1 adapted base weight\(s\) changed while merged \(\['layer0.v'\]\)"):
        c.unmerge()
    torch.testing.assert_close(sites[1].weight, w0[1] + delta, rtol=0, atol=1e-6)
    for i, (s, w) in enumerate(zip(sites, w0)):
        if i != 1:
            assert torch.equal(s.weight, w)
    # the kept change is the new W0: merging again folds P on top of it
    c.merge()
    torch.testing.assert_close(sites[1].weight, w0[1] + delta + c.past(1), rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c._identity()                 # writes W0 and then W0 + P back into the weights
        with torch.no_grad():
            sites[0].weight.copy_(sites[0].weight.clone())
            sites[2].weight.copy_(sites[2].weight.half().float())        # model.half().float() while merged
            sites[3].weight.copy_(sites[3].weight.bfloat16().float())
        c.unmerge()
    assert all(torch.equal(s.weight, w) for i, (s, w) in enumerate(zip(sites, w0)) if i != 1)
    # weights offloaded to the meta device while merged (accelerate): nothing to compare, unmerge still works
    c.merge()
    for s in sites:
        s.weight = s.weight.to("meta")
    c.unmerge()
    assert not c.merged


def test_export_factors_reconstruct_past():
    c = CLoRAController(make_sites(), rank=2, alpha=5.0)
    for t in range(2):
        c.begin_concept()
        randomize(c, seed=t)
        c.end_concept()
    f = c.export_factors("merged")
    for i, s in enumerate(c.sites):
        A, B = f[s.name]
        assert A.shape == (4, IN) and B.shape == (s.out_features, 4)
        torch.testing.assert_close(B @ A, c.past(i), rtol=1e-5, atol=1e-6)
    one = c.export_factors(1)
    A, B = one[c.sites[0].name]
    k = c.concept(1)
    torch.testing.assert_close(B @ A, k.scale * k.lora_B[0] @ k.lora_A[0])
    with pytest.raises(KeyError):
        c.export_factors(7)


def test_no_grad_and_autocast_bf16():
    c = CLoRAController(make_sites(bias=True), rank=2, backend="reference")
    c.begin_concept()
    randomize(c)
    x = torch.randn(2, 3, IN)
    with torch.no_grad():
        ys = c.project_group("g", x)
        assert not ys[0].requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = c.project_group("g", x)
        yp = c.project(1, x)
    assert yb[0].dtype == torch.bfloat16 and yp.dtype == torch.bfloat16
    for a, b in zip(yb, ys):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)
    # gradients reach the fp32 parameters through the casts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sum(y.float().sum() for y in c.project_group("g", x))
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in c.trainable_parameters())


class _CastShapes(__import__("torch.utils._python_dispatch", fromlist=["TorchDispatchMode"]).TorchDispatchMode):
    """The input shapes of every cast down from float32 (aten._to_copy) run inside the block."""

    def __enter__(self):
        self.shapes = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 != out.dtype:
            self.shapes.add(tuple(args[0].shape))
        return out


@pytest.mark.parametrize("strategy", ["fused", "merged"])
def test_autocast_casts_the_folded_weights_once(strategy, monkeypatch):
    """Under autocast the folded weights and biases are cast to the autocast dtype once per state, not at every
    call (autocast itself recasts a frozen weight at every forward): the same outputs and gradients as casting
    them per call, no weight cast in a steady call, and a new cast after a state change or a weight write."""
    monkeypatch.setenv("CLORA_FAST_STRATEGY", strategy)
    sites = make_sites(bias=True)
    c = CLoRAController(sites, rank=2, backend="reference")
    one_past_one_active(c)
    x = torch.randn(2, 3, IN, requires_grad=True)
    bf = torch.bfloat16

    def run():
        with torch.autocast("cpu", dtype=bf):
            ys = c.project_group("g", x)
        return ys, torch.autograd.grad([y.float().square().sum() for y in ys], [x] + c.trainable_parameters())

    def want():          # the same call with the folded weights cast per call by the ops' own autocast rule
        w = torch.cat([c.folded_weight(i) for i in range(c.num_sites)])
        b = torch.cat([s.bias if s.bias is not None else torch.zeros(s.out_features) for s in sites])
        A, B = c.lora_A[0], c.lora_B[0]
        with torch.autocast("cpu", dtype=bf):
            y = ops.segmented_lora_projection(x, w, A.to(bf), B.to(bf), c._bundles[0].offsets, c.scale, bias=b,
                                              backend="reference", split=True)
        return y, torch.autograd.grad([t.float().square().sum() for t in y], [x] + c.trainable_parameters())

    for step in ("first", "steady", "new weight"):
        if step == "new weight":
            with torch.no_grad():
                sites[0].weight.mul_(1.5)                 # a version bump: refolded, and cast again
        (ys, gs), (yw, gw) = run(), want()
        for a, b in zip(list(ys) + list(gs), list(yw) + list(gw)):
            assert torch.equal(a, b), step
        cast = c._bundles[0].wcast
        assert cast is not None and cast[2].dtype == bf and cast[3].dtype == bf
        with _CastShapes() as seen:
            run()
        n = c._bundles[0].n_out
        assert seen.shapes and not {(n, IN), (n,)} & seen.shapes, (step, seen.shapes)    # never the weight or bias
    c.end_concept()                                       # a new P: refolded and cast again at the next call
    w = torch.cat([c.folded_weight(i) for i in range(c.num_sites)])
    b = torch.cat([s.bias if s.bias is not None else torch.zeros(s.out_features) for s in sites])
    with torch.no_grad(), torch.autocast("cpu", dtype=bf):
        got, want = torch.cat(c.project_group("g", x), -1), torch.nn.functional.linear(x, w, b)
    assert torch.equal(got, want) and c._bundles[0].wcast[1] is c._bundles[0].wcat


def test_model_dtype_fp16_weights_cast_factors():
    sites = make_sites(dtype=torch.float64)
    c = CLoRAController(sites, rank=2, backend="reference")
    c.begin_concept()
    randomize(c)
    x = torch.randn(2, IN, dtype=torch.float64)
    y = c.project(0, x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected(c, 0, x), rtol=1e-6, atol=1e-6)


def test_triton_backend_matches_reference(device):
    pytest.importorskip("triton")
    import clora_fast
    if "triton" not in clora_fast.available_backends():
        pytest.skip("triton backend unavailable")
    sites = make_sites()
    for s in sites:
        s.weight = s.weight.to(device)
    ct = CLoRAController(sites, rank=2, backend="triton")
    cr = CLoRAController(sites, rank=2, backend="reference")
    for c in (ct, cr):
        c.begin_concept()
        randomize(c, seed=3)
        c.end_concept()
        c.begin_concept()
        randomize(c, seed=4)
    x = torch.randn(5, IN, device=device)
    tol = 1e-4 if device.type == "cpu" else 1e-2   # on a GPU the fp32 projection kernel uses TF32
    for a, b in zip(ct.project_group("g", x), cr.project_group("g", x)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for _ in range(2):      # the second step reuses the cached layout and kernel tables
        lt, lr = ct.penalty(), cr.penalty()
        torch.testing.assert_close(lt, lr, rtol=tol, atol=1e-6)
        gt = torch.autograd.grad(lt, ct.trainable_parameters())
        gr = torch.autograd.grad(lr, cr.trainable_parameters())
        for a, b in zip(gt, gr):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=tol, atol=1e-5)


def test_follows_module_dtype_change_after_patch():
    """Sites reference the modules' Parameters: after ``module.double()`` the folded weights
    are rebuilt in the new dtype (P stays float32) and the factors are cast at use."""
    torch.manual_seed(0)
    lins = [nn.Linear(IN, o, bias=False) for o in OUTS]
    c = CLoRAController([Site(f"l{i}", m.weight, m.bias, "g") for i, m in enumerate(lins)], rank=2,
                        backend="reference")
    c.begin_concept()
    randomize(c)
    c.end_concept()
    x = torch.randn(3, IN)
    y32 = c.project_group("g", x)
    for m in lins:
        m.double()
    y64 = c.project_group("g", x.double())
    assert y64[0].dtype == torch.float64 and c.past(0).dtype == torch.float32
    for a, b in zip(y32, y64):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_fold_keeps_float64_weights_in_float64():
    """A float64 model's folded weight is W0 + P computed in float64 (not rounded through fp32)."""
    ctrl = CLoRAController(make_sites(dtype=torch.float64), rank=4, backend="reference")
    ctrl.begin_concept("c1")
    randomize(ctrl)
    ctrl.end_concept()
    for i, site in enumerate(ctrl.sites):
        w0 = site.weight.detach()
        expect = w0 + ctrl.past(i).to(torch.float64)
        assert ctrl.folded_weight(i).dtype == torch.float64
        assert torch.equal(ctrl.folded_weight(i), expect)
        assert not torch.equal(expect.float().double(), expect)   # fp32 rounding would have shown


@pytest.mark.parametrize("group", ["g", None])
def test_project_pair_launches_and_gradient_slices(monkeypatch, group):
    """project_pair (the per-layer K/V path: grouped=False, or a fallback) takes the layer's rows of the
    flat parameters as one block (K and V consecutive in a group) or the whole per-site parameters: at most
    one slice node per flat parameter (each costs a zero-filled gradient of the whole parameter), and the
    merged K/V fwd+bwd stays within 12 launches; the result equals two single projections."""
    from clora_fast._launches import count_launches
    monkeypatch.setenv("CLORA_FAST_STRATEGY", "merged")
    g = torch.Generator().manual_seed(0)
    sites = [Site(f"l{i // 2}.{'kv'[i % 2]}", torch.randn(16, IN, generator=g), None, group) for i in range(6)]
    c = CLoRAController(sites, rank=3, backend="reference")
    one_past_one_active(c)
    x = torch.randn(2, 5, IN, requires_grad=True)
    gy = torch.randn(2, 5, 16)

    def step():
        x.grad = None
        for p in c.trainable_parameters():
            p.grad = None
        k, v = c.project_pair(2, 3, x)
        torch.autograd.backward([k, v], [gy, gy])
        return k, v

    k, v = step()
    n, ops_ = count_launches(step)
    w = [torch.randn(16, IN) for _ in range(2)]

    def dense():
        x.grad = None
        torch.autograd.backward([nn.functional.linear(x, w[0]), nn.functional.linear(x, w[1])], [gy, gy])
    dense()
    n_dense, _ = count_launches(dense)
    assert ops_.get("slice_backward", 0) == (2 if group else 0), ops_
    assert n <= n_dense + 7, (n, n_dense, ops_)          # 12 vs 5 on torch 2.14 (per-site parameters: 11)
    torch.testing.assert_close(k, c.project(2, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, c.project(3, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["bf16", "autocast"])
def test_float32_factors_of_a_bf16_model_are_not_cast_per_call(monkeypatch, model):
    """A bf16 model (or a float32 one under bf16 autocast) keeps its factors in float32: a K/V group's call hands
    them to the merged strategy as they are (no cast launch per factor and per call; under autocast no checked
    path either), with float32 gradients equal to those of the factors cast to bf16 first within bf16 rounding,
    and the launches of the all-bf16 call plus the two gradient casts (plus x's casts under autocast)."""
    from clora_fast._launches import count_launches
    monkeypatch.setenv("CLORA_FAST_STRATEGY", "merged")
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(4)
    wdt = bf if model == "bf16" else torch.float32
    sites = [Site(f"l0.{kv}", torch.randn(16, IN, generator=g).to(wdt), torch.randn(16, generator=g).to(wdt), "g")
             for kv in "kv"]
    c = CLoRAController(sites, rank=4, backend="reference")
    one_past_one_active(c)
    assert all(p.dtype == torch.float32 for p in c.trainable_parameters())
    x = torch.randn(2, 5, IN, generator=g).to(wdt).requires_grad_()
    gy = [torch.randn(2, 5, 16, generator=g).to(bf) for _ in range(2)]

    def step(cast_first=False):
        ctx = torch.autocast("cpu", dtype=bf) if model == "autocast" else contextlib.nullcontext()
        with ctx:
            if cast_first:            # the previous behaviour: the factors cast to the compute dtype per call
                w, b = c._bundle_weights(c._bundles[0], bf if model == "autocast" else None)
                A, B = (t[0] for t in c._flat_factors())
                ys = ops.segmented_lora_projection(x, w, A.to(bf), B.to(bf), c._bundles[0].offsets, c.scale, bias=b,
                                                   split=True, backend="reference")
            else:
                ys = c.project_group("g", x)
        return ys, torch.autograd.grad(ys, [x] + c.trainable_parameters(), gy)

    (ys, gs), (yw, gw) = step(), step(cast_first=True)
    assert all(y.dtype == bf for y in ys) and gs[0].dtype == wdt and all(t.dtype == torch.float32 for t in gs[1:])
    for got, want in zip(list(ys) + list(gs), list(yw) + list(gw)):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    n_ours, n_cast = count_launches(step)[0], count_launches(lambda: step(cast_first=True))[0]
    assert n_ours == n_cast - 2, (n_ours, n_cast)         # two factor casts in forward fewer
    assert n_ours == (11 if model == "bf16" else 13), n_ours   # 9 + the 2 gradient casts (+ x's 2 under autocast)


def test_fold_ignores_autocast_and_tf32_and_the_bank_reloads(tmp_path):
    """end_concept() inside an autocast region folded s*B@A in bf16: P was 0.5% off and the saved bank
    failed its own fold check on load. The fold is now exact (float64, rounded once to float32)."""
    sites = make_sites()
    c = CLoRAController(sites, rank=2, backend="reference")
    factors = []
    for t in range(2):
        c.begin_concept()
        randomize(c, seed=t)
        factors.append([tuple(f.detach().clone() for f in c.current_factors(i)) for i in range(c.num_sites)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c.end_concept()
    for i in range(c.num_sites):
        P = sum((c.scale * (B.double() @ A.double())).float() for A, B in (f[i] for f in factors))
        torch.testing.assert_close(c.past(i), P, rtol=1e-6, atol=1e-7)
    c.save(tmp_path / "bank")
    c2 = CLoRAController.load_state(tmp_path / "bank", make_sites())
    for i in range(c.num_sites):
        assert torch.equal(c2.past(i), c.past(i))


def test_rollback_loads_into_the_optimizers_parameters(tmp_path):
    c = CLoRAController(make_sites(), rank=2, backend="reference")
    c.begin_concept("<a>")
    randomize(c)
    c.save(tmp_path / "ckpt")
    saved = [p.detach().clone() for p in c.trainable_parameters()]
    params = c.trainable_parameters()
    opt = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(5, IN)

    def step():
        opt.zero_grad()
        sum(y.square().sum() for y in c.project_group("g", x)).backward()
        opt.step()

    step()
    c.load_bank(tmp_path / "ckpt")                 # roll back the concept being learned
    assert all(p is q for p, q in zip(c.trainable_parameters(), params))
    assert all(torch.equal(p, s) for p, s in zip(c.trainable_parameters(), saved))
    step()                                         # the optimizer still trains the controller's factors
    assert not all(torch.equal(p, s) for p, s in zip(c.trainable_parameters(), saved))


def test_invalidate_caches_after_writes_through_data():
    sites = make_sites()
    c = CLoRAController(sites, rank=2, backend="reference")
    c.begin_concept()
    randomize(c)
    c.end_concept()
    x = torch.randn(3, IN)
    y0 = c.project(0, x)
    sites[0].weight.data.mul_(2.0)            # invisible to the version counter
    c.invalidate_caches()
    torch.testing.assert_close(c.project(0, x), x @ (sites[0].weight + c.past(0)).T)
    assert not torch.equal(c.project(0, x), y0)


def test_replaced_factor_parameters_are_used():
    """load_state_dict(assign=True) (or `lora_B[0] = nn.Parameter(...)`) replaces the parameters inside the
    ParameterLists: the projections and the penalty must use (and give gradients to) the new ones."""
    c = CLoRAController(make_sites(), rank=2, backend="reference")
    c.begin_concept()
    c.end_concept()
    c.begin_concept()
    x = torch.randn(3, IN)
    c.project_group("g", x)                                   # fills the factor cache
    sd = {k: torch.randn_like(v) * 0.3 for k, v in c.state_dict().items() if k.startswith("lora_")}
    c.load_state_dict(sd, assign=True, strict=False)
    params = c.trainable_parameters()
    assert all(torch.equal(p, sd[k]) for p, k in zip(params, ("lora_A.0", "lora_B.0")))
    for i in range(c.num_sites):
        torch.testing.assert_close(c.project(i, x), expected(c, i, x).float(), rtol=1e-5, atol=1e-5)
    (sum(y.square().sum() for y in c.project_group("g", x)) + c.penalty()).backward()
    assert all(p.grad is not None for p in params)


def test_rollback_after_half_keeps_the_parameters(tmp_path):
    c = CLoRAController(make_sites(), rank=2, backend="reference")
    c.begin_concept("<a>")
    randomize(c)
    c.half()
    c.save(tmp_path / "ckpt")
    params = c.trainable_parameters()
    c.load_bank(tmp_path / "ckpt")
    assert all(p is q and p.dtype == torch.float16 for p, q in zip(c.trainable_parameters(), params))


def test_reference_penalty_is_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    p, a, b = torch.randn(8, 12, generator=g), torch.randn(2, 12, generator=g), torch.randn(8, 2, generator=g)
    want = R.forgetting_penalty_grads(p, a, b, 0.7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = R.forgetting_penalty_grads(p, a, b, 0.7)
        loss = R.forgetting_penalty(p, a, b, 0.7)
    for u, v in zip(got, want):
        assert u.dtype == torch.float32 and torch.equal(u, v)
    assert torch.equal(loss, R.forgetting_penalty(p, a, b, 0.7))


def test_state_dict_round_trip_holds_everything(tmp_path):
    """state_dict() held only the active factors: saving it lost the past and every finished concept."""
    src = CLoRAController(make_sites(), rank=2, backend="reference")
    for t in range(3):
        src.begin_concept(f"<t{t}>")
        randomize(src, seed=t)
        if t < 2:
            src.end_concept()
    src.remove_concept(0)
    torch.save(src.state_dict(), tmp_path / "ctrl.pt")
    dst = CLoRAController(make_sites(), rank=2, backend="reference")
    dst.load_state_dict(torch.load(tmp_path / "ctrl.pt", weights_only=True))
    assert [c.idx for c in dst.concepts] == [1] and dst.active_concept == 2 and dst.active_name == "<t2>"
    for i in range(src.num_sites):
        assert torch.equal(dst.past(i), src.past(i))
        for u, v in zip(dst.current_factors(i), src.current_factors(i)):
            assert torch.equal(u, v)
    x = torch.randn(3, IN)
    assert torch.equal(dst.penalty(), src.penalty())
    assert all(torch.equal(u, v) for u, v in zip(dst.project_group("g", x), src.project_group("g", x)))
    with pytest.raises(ValueError, match="has rank 2, alpha 2.0; this controller rank 3"):
        CLoRAController(make_sites(), rank=3).load_state_dict(src.state_dict())


def test_replace_active_and_bad_states_do_not_reuse_or_half_install(tmp_path):
    other = CLoRAController(make_sites(), rank=2, backend="reference")
    other.begin_concept("<other>")
    randomize(other, seed=5)
    other.save(tmp_path / "other")
    c = CLoRAController(make_sites(), rank=2, backend="reference")
    c.begin_concept("<mine>")
    params = c.trainable_parameters()
    c.load_bank(tmp_path / "other", replace_active=True)      # another concept: fresh parameters
    assert c.active_name == "<other>" and all(p is not q for p, q in zip(c.trainable_parameters(), params))
    state = other.state_dict()
    state["_extra_state"]["past"] = state["_extra_state"]["past"][:1]
    before = c.get_extra_state()
    with pytest.raises(ValueError, match="one past and one factor pair per site"):
        c.load_state_dict(state)
    assert c.get_extra_state()["active"] == before["active"] and len(c._past) == c.num_sites


def test_penalty_of_the_first_concept_supports_backward_alone():
    c = CLoRAController(make_sites(), rank=2, backend="reference")
    assert not c.penalty().requires_grad                 # no concept: a plain constant
    c.begin_concept()
    pen = c.penalty()
    assert pen.item() == 0.0
    pen.backward()                                       # e.g. the penalty's own backward in an accumulation loop
    with torch.no_grad():
        assert not c.penalty().requires_grad


def test_begin_concept_and_rollback_under_inference_mode_give_trainable_factors(tmp_path):
    """begin_concept (or loading a bank whose concept is active) inside torch.inference_mode (an evaluation block
    that starts the next concept): the factors are normal tensors, so the first training step works."""
    c = CLoRAController(make_sites(), rank=2, backend="reference")
    c.begin_concept()
    randomize(c)
    c.end_concept()
    x = torch.randn(3, IN)
    with torch.inference_mode():
        c.project(0, x)
        c.begin_concept()
    assert not any(p.is_inference() for p in c.trainable_parameters())
    randomize(c, seed=2)
    c.save(tmp_path / "bank")
    c2 = CLoRAController(make_sites(), rank=2, backend="reference")
    with torch.inference_mode():
        c2.load_bank(tmp_path / "bank")
    for ctrl in (c, c2):
        assert ctrl.active_concept is not None and not any(p.is_inference() for p in ctrl.trainable_parameters())
        (ctrl.project(0, x).square().sum() + ctrl.penalty()).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ctrl.trainable_parameters())


def test_a_concept_ended_untrained_is_warned_about():
    """The classic slip: an optimizer built once, before begin_concept() made the new concept's tensors,
    trains the previous concept's (now frozen) factors; the new B stays zero and the concept changes
    nothing. That was silent; end_concept() now warns. A concept trained by its own optimizer does not."""
    import warnings
    c = CLoRAController(make_sites(), rank=2, backend="reference")
    x = torch.randn(3, 12)

    def train(opt):
        for _ in range(2):
            opt.zero_grad()
            (c.project_group("g", x)[0].square().sum() + c.penalty()).backward()
            opt.step()

    c.begin_concept("first")
    opt = torch.optim.SGD(c.trainable_parameters(), lr=0.1)
    train(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.end_concept()
    c.begin_concept("second")
    train(opt)                                   # still the first concept's tensors
    with pytest.warns(UserWarning, match=r"concept 1 \('second'\) ends untrained: all its B factors are still zero"):
        c.end_concept()
    assert torch.equal(c.past(0), c._refold(c.concepts[:1])[0])           # it folded nothing


def test_a_concept_trained_without_the_penalty_is_warned_about(tmp_path):
    """Training with a past but never calling penalty() is plain sequential LoRA, not C-LoRA: silent before,
    a warning at end_concept() now. Not for the first concept (no past), a controller made with
    penalty_weight=0 (on purpose), nor a concept restored mid-training from a bank (its history is unknown)."""
    import warnings
    x = torch.randn(3, 12)

    def train(c, with_penalty):
        opt = torch.optim.SGD(c.trainable_parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            loss = c.project_group("g", x)[0].square().sum()
            (loss + c.penalty() if with_penalty else loss).backward()
            opt.step()

    for weight in (1.0, 0.0):
        c = CLoRAController(make_sites(), rank=2, backend="reference", penalty_weight=weight)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            c.begin_concept()
            train(c, with_penalty=False)             # no past yet: nothing to regularize against
            c.end_concept()
            c.begin_concept()
            train(c, with_penalty=True)
            c.end_concept()
            c.begin_concept()
            train(c, with_penalty=False)
            if weight == 0.0:
                c.end_concept()                      # penalty_weight=0: sequential LoRA on purpose
        if weight:
            c.save(tmp_path / "bank")
            with pytest.warns(UserWarning, match=r"concept 2 \('<c3>'\) was trained without the forgetting penalty"):
                c.end_concept()
            c.load_bank(tmp_path / "bank")           # concept 2 active again, trained before the save
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                c.end_concept()


def test_finished_concepts_live_in_host_memory(device, tmp_path):
    """Finished concepts' factors are kept in host memory (read only by remove_concept, export and save):
    the model's device holds P and the active concept only, so its memory does not grow with the concepts
    (checked on a GPU). P is folded on its own device from them, remove_concept refolds there, export, save
    and load keep them on the host."""
    sites = [Site(s.name, s.weight.to(device), None, s.group) for s in make_sites()]
    ctrl = CLoRAController(sites, rank=3)
    mem = []
    for k in range(3):
        ctrl.begin_concept()
        randomize(ctrl, seed=10 + k)
        ctrl.end_concept()
        if device.type == "cuda":
            torch.cuda.synchronize()
            mem.append(torch.cuda.memory_allocated(device))
    if device.type == "cuda":     # P exists after the first concept; later ones add nothing on the GPU
        assert mem[2] == mem[1], mem

    def fold64(concepts, i):
        return sum(c.scale * (c.lora_B[i].double() @ c.lora_A[i].double()) for c in concepts)
    for c in ctrl.concepts:
        assert all(t.device.type == "cpu" for t in c.lora_A + c.lora_B)
    for i in range(ctrl.num_sites):
        assert ctrl.past(i).device == device
        torch.testing.assert_close(ctrl.past(i).cpu().double(), fold64(ctrl.concepts, i), rtol=1e-6, atol=1e-6)
    ctrl.remove_concept(ctrl.concepts[1].idx)
    for i in range(ctrl.num_sites):
        assert ctrl.past(i).device == device
        torch.testing.assert_close(ctrl.past(i).cpu().double(), fold64(ctrl.concepts, i), rtol=1e-6, atol=1e-6)
    A, B = ctrl.export_factors("merged")[ctrl.sites[0].name]
    assert A.device.type == "cpu" and torch.equal(A, torch.cat([c.lora_A[0] for c in ctrl.concepts]))
    ctrl.save(tmp_path / "bank")
    other = CLoRAController([Site(s.name, s.weight.to(device), None, s.group) for s in make_sites()], rank=3)
    other.load_bank(tmp_path / "bank")
    assert [c.idx for c in other.concepts] == [c.idx for c in ctrl.concepts]
    for c, d in zip(ctrl.concepts, other.concepts):
        assert all(t.device.type == "cpu" for t in d.lora_A + d.lora_B)
        assert all(torch.equal(u, v) for u, v in zip(c.lora_A + c.lora_B, d.lora_A + d.lora_B))
    for i in range(ctrl.num_sites):
        assert other.past(i).device == device and torch.equal(other.past(i), ctrl.past(i))
    state = ctrl.state_dict()                     # load_state_dict keeps them on the host too
    third = CLoRAController([Site(s.name, s.weight.to(device), None, s.group) for s in make_sites()], rank=3)
    third.load_state_dict(state)
    assert all(t.device.type == "cpu" for c in third.concepts for t in c.lora_A + c.lora_B)
    assert all(third.past(i).device == device for i in range(third.num_sites))
