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


def test_discard_concept_saves_what_end_then_remove_would(tmp_path, token_bank):
    """discard_concept() on a pipeline holding an active concept (<cd>, with its token): the bank it saves is the
    one end_concept() + remove_concept() write, file for file (P and the finished concepts untouched: no fold,
    no refold), the token retired on the model; the name stays taken."""
    import warnings
    src, rows = token_bank
    pipes, banks = {}, {}
    for how in ("discard", "end_remove"):
        pipe = build_pipeline()
        cl = clora_fast.load(pipe, src, backend="reference")
        past = [cl.past(i).clone() for i in range(cl.num_sites)]
        assert cl.active_name == "<cd>"
        if how == "discard":
            assert cl.discard_concept() == 3
            for i in range(cl.num_sites):                 # untouched, not refolded
                assert cl.past(i) is not None and torch.equal(cl.past(i), past[i])
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cl.end_concept()
            cl.remove_concept(3)
        assert cl.active_concept is None and cl.trainable_parameters() == []
        assert cl.retired_concepts == [{"idx": 3, "name": "<cd>"}]
        with pytest.raises(ValueError, match="already exists"):
            cl.begin_concept("<cd>")
        with pytest.raises(ValueError, match="retired"):
            pipe.text_encoder(pipe.tokenizer(["a <cd>"], return_tensors="pt").input_ids)
        cl.save(tmp_path / how)
        pipes[how], banks[how] = pipe, _bank_files(tmp_path / how)
    assert banks["discard"] == banks["end_remove"]
    meta = banks["discard"][0]["adapter"]
    assert meta["tokens"] == {"0": "<ca>", "1": "<cb>", "2": "<cc>"} and meta["retired_tokens"] == ["<cd>"]
    _pipe, cl2, got = _pipeline_rows(tmp_path / "discard")
    assert [c.name for c in cl2.concepts] == ["<ca>", "<cb>", "<cc>"] and cl2.active_concept is None
    for idx in got:
        assert torch.equal(got[idx], rows[idx]), idx
    with pytest.raises(RuntimeError, match="no concept is active"):
        cl2.discard_concept()
    pipe3 = build_pipeline()
    cl3 = clora_fast.load(pipe3, src, backend="reference")
    clora_fast.unpatch(pipe3)                           # the model no longer calls it: refused, nothing changed
    with pytest.raises(RuntimeError, match="unpatched"):
        cl3.discard_concept()
    assert cl3.active_name == "<cd>"


def _bank_files(path):
    """{file name: bytes} of the bank's data files and its manifest (parsed)."""
    files = {p.name: p.read_bytes() for p in path.iterdir() if p.suffix == ".safetensors"}
    return _manifest(path), files


def test_remove_from_bank_without_the_model_writes_what_the_model_would(tmp_path, token_bank):
    """clora_fast.bank.remove_from_bank (and 'clora-fast remove') forgets a concept from the bank alone; the
    result is the bank that load(pipe) -> remove_concept -> save writes, byte for byte (P refolded, the name
    and its token retired, the other concepts' token rows kept), and it loads onto the pipeline."""
    import shutil

    from clora_fast import cli
    from clora_fast.bank import remove_from_bank
    src, rows = token_bank
    want, free, by_cli = tmp_path / "want", tmp_path / "free", tmp_path / "cli"
    for p in (want, free, by_cli):
        shutil.copytree(src, p)
    _, cl, _ = _pipeline_rows(want)
    cl.remove_concept(1)
    cl.save(want)
    assert remove_from_bank(free, "<cb>") == {"idx": 1, "name": "<cb>", "unfinished": False}
    assert _bank_files(free) == _bank_files(want)
    assert cli.main(["remove", str(by_cli), "1"]) == 0
    assert _bank_files(by_cli) == _bank_files(want)
    pipe, cl, got = _pipeline_rows(free)
    assert [c.idx for c in cl.concepts] == [0, 2] and cl.active_concept == 3
    assert sorted(got) == [0, 2, 3] and all(torch.equal(got[i], rows[i]) for i in got)
    assert "<cb>" in _manifest(free)["adapter"]["retired_tokens"]


def test_remove_from_bank_refusals_leave_the_bank_unchanged(tmp_path, token_bank, capsys):
    import shutil

    from clora_fast import cli
    from clora_fast.bank import BankError, remove_from_bank
    path = tmp_path / "bank"
    shutil.copytree(token_bank[0], path)
    before = _bank_files(path)
    with pytest.raises(BankError, match=r"no concept 7: it holds \['0 <ca>', '1 <cb>', '2 <cc>', '3 <cd> \(unfinished\)'\]"):
        remove_from_bank(path, 7)
    with pytest.raises(TypeError, match="index \\(int\\) or name"):
        remove_from_bank(path, 1.0)
    assert cli.main(["remove", str(path), "<zz>"]) == 1
    assert "no concept '<zz>'" in capsys.readouterr().err
    assert _bank_files(path) == before


def test_remove_from_bank_drops_the_unfinished_concept(tmp_path, token_bank, capsys):
    """The concept saved mid-training can be removed from the bank alone too: the bank that load(pipe) ->
    discard_concept() -> save writes, file for file (P untouched, its name and token retired); 'clora-fast
    remove' also deletes its mid-concept checkpoint."""
    import shutil

    from clora_fast import cli
    from clora_fast.bank import remove_from_bank
    src, rows = token_bank
    want, free, by_cli = tmp_path / "want", tmp_path / "free", tmp_path / "cli"
    for p in (want, free, by_cli):
        shutil.copytree(src, p)
    _, cl, _ = _pipeline_rows(want)
    cl.discard_concept()
    cl.save(want)
    assert remove_from_bank(free, "<cd>") == {"idx": 3, "name": "<cd>", "unfinished": True}
    assert _bank_files(free) == _bank_files(want)
    (by_cli / cli.RESUME_FILE).write_bytes(b"a checkpoint of <cd>")
    assert cli.main(["remove", str(by_cli), "3"]) == 0
    assert "removed concept 3 '<cd>' (unfinished)" in capsys.readouterr().out
    assert _bank_files(by_cli) == _bank_files(want) and not (by_cli / cli.RESUME_FILE).exists()
    pipe, cl, got = _pipeline_rows(free)
    assert [c.idx for c in cl.concepts] == [0, 1, 2] and cl.active_concept is None
    assert sorted(got) == [0, 1, 2] and all(torch.equal(got[i], rows[i]) for i in got)
    assert "<cd>" in _manifest(free)["adapter"]["retired_tokens"]
