"""A bank opened where its integration state cannot be used (a bare UNet, no adapter) and saved
again keeps that state: the concepts' token embeddings and the adapter's token section."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

import clora_fast  # noqa: E402
from clora_fast.bank import MANIFEST  # noqa: E402
from clora_fast.builtin import build_pipeline  # noqa: E402
from clora_fast.controller import CLoRAController  # noqa: E402


def _fake_train(cl, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cl.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def token_bank(tmp_path_factory):
    """A pipeline bank of <ca>, <cb>, <cc> (finished) and <cd> (active), with token embeddings."""
    path = tmp_path_factory.mktemp("carry") / "bank"
    pipe = build_pipeline()
    pipe.unet.requires_grad_(False)
    cl = clora_fast.patch(pipe, rank=2, backend="reference")
    for t, name in enumerate(["<ca>", "<cb>", "<cc>", "<cd>"]):
        cl.begin_concept(name)
        _fake_train(cl, t)
        if name != "<cd>":
            cl.end_concept()
    cl.save(path)
    rows = {idx: cl.adapter.token_embedding(idx).detach().clone() for idx in range(4)}
    return path, rows


def _pipeline_rows(path):
    pipe = build_pipeline()
    cl = clora_fast.load(pipe, path, backend="reference")
    rows = {c: cl.adapter.token_embedding(c).detach().clone() for c in cl.adapter.tokens}
    return pipe, cl, rows


def _manifest(path):
    return json.loads((path / MANIFEST).read_text())


def test_bare_unet_resave_keeps_token_embeddings(tmp_path, token_bank):
    src, rows = token_bank
    for kind in ("bare_unet", "no_adapter"):
        path = tmp_path / kind
        if kind == "bare_unet":
            cl = clora_fast.load(build_pipeline().unet, src, backend="reference")
        else:
            cl = CLoRAController.load_state(src, clora_fast.patch(build_pipeline().unet, rank=2).sites,
                                            backend="reference")
        cl.save(path)
        assert _manifest(path)["adapter"] == _manifest(src)["adapter"]
        _pipe, cl2, got = _pipeline_rows(path)
        assert [c.name for c in cl2.concepts] == ["<ca>", "<cb>", "<cc>"] and cl2.active_name == "<cd>"
        assert got.keys() == rows.keys()
        for idx in rows:
            assert torch.equal(got[idx], rows[idx]), (kind, idx)


def test_bare_unet_remove_concept_then_resave(tmp_path, token_bank):
    """Dropping a concept with a bare UNet: its token is retired, the others' embeddings stay."""
    src, rows = token_bank
    cl = clora_fast.load(build_pipeline().unet.requires_grad_(False), src, backend="reference")
    cl.remove_concept(1)
    cl.end_concept()                                   # the active <cd> finished on the bare UNet
    cl.begin_concept("<ce>")                           # a concept learned on the bare UNet: no token
    _fake_train(cl, 9)
    cl.end_concept()
    cl.save(tmp_path / "b")
    meta = _manifest(tmp_path / "b")["adapter"]
    assert meta["tokens"] == {"0": "<ca>", "2": "<cc>", "3": "<cd>"} and meta["retired_tokens"] == ["<cb>"]
    pipe, cl2, got = _pipeline_rows(tmp_path / "b")
    assert [c.name for c in cl2.concepts] == ["<ca>", "<cc>", "<cd>", "<ce>"]
    assert sorted(got) == [0, 2, 3]
    for idx in got:
        assert torch.equal(got[idx], rows[idx]), idx
    with pytest.raises(ValueError, match="retired"):        # the removed concept's token is refused
        pipe.text_encoder(pipe.tokenizer(["a <cb>"], return_tensors="pt").input_ids)
    # loading another bank forgets what was kept from the first
    cl.load_bank(tmp_path / "b")
    cl.save(tmp_path / "c")
    assert _manifest(tmp_path / "c")["adapter"] == meta
    empty = CLoRAController(clora_fast.patch(build_pipeline().unet, rank=2).sites, rank=2)
    empty.save(tmp_path / "d")
    cl.load_bank(tmp_path / "d")
    cl.save(tmp_path / "c")
    assert not _manifest(tmp_path / "c")["adapter"]["tokens"]
