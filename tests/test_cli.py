"""clora-fast CLI: train (resumable), sample, info, train-vit dispatch, bad inputs."""
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from clora_fast import cli  # noqa: E402

FAST = ["--resolution", "16", "--steps", "2", "--sample-steps", "1", "--samples-per-concept", "1",
        "--batch-size", "2", "--no-progress", "--backend", "reference"]


def _concept(root: Path, name: str, n: int = 2, seed: int = 0) -> str:
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = (rng.random((20, 24, 3)) * 255).astype(np.uint8)   # non-square: center crop
        Image.fromarray(arr).save(d / f"{i}.png")
    return str(d)


@pytest.fixture
def concepts(tmp_path):
    return [_concept(tmp_path / "data", "alpha", seed=1), _concept(tmp_path / "data", "beta", seed=2)]


def _manifest(bank) -> dict:
    with open(Path(bank) / "manifest.json") as f:
        return json.load(f)


def _concept_tensors(bank, idx: int) -> dict:
    m = _manifest(bank)
    return load_file(str(Path(bank) / m["files"][f"concept-{idx}"]["name"]))


def _names(bank):
    return [c["name"] for c in _manifest(bank)["concepts"]]


def test_train_two_concepts_writes_bank_and_grids(tmp_path, concepts, capsys):
    bank = tmp_path / "bank"
    rc = cli.main(["train", "--concepts", *concepts, "--out", str(bank), *FAST, "--rank", "2"])
    assert rc == 0
    assert _names(bank) == ["<alpha>", "<beta>"]
    assert _manifest(bank)["rank"] == 2
    grids = sorted((tmp_path / "bank_samples").glob("*.png"))
    assert [g.name for g in grids] == ["after_01_alpha.png", "after_02_beta.png"]
    with Image.open(grids[1]) as im:
        assert im.size[1] == 2 * 16          # one row per concept learned so far
    with Image.open(grids[0]) as im:
        assert im.size[1] == 16
    # the trained factors moved away from the init (B starts at 0)
    t = _concept_tensors(bank, 0)
    b_keys = [k for k in t if k.endswith("lora_B")]
    assert b_keys and any(float(t[k].abs().max()) > 0 for k in b_keys)
    out = capsys.readouterr().out
    assert "learned <alpha>" in out and "learned <beta>" in out


def test_crash_mid_concept_then_resume(tmp_path, concepts, monkeypatch, capsys):
    bank = tmp_path / "bank"
    calls = []

    def crash(pos, step):
        calls.append((pos, step))
        if pos == 1 and step == 0:
            raise RuntimeError("boom: simulated crash")

    monkeypatch.setattr(cli, "STEP_HOOK", crash)
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["train", "--concepts", *concepts, "--out", str(bank), *FAST, "--rank", "2"])
    assert calls == [(0, 0), (0, 1), (1, 0)]
    # the bank holds exactly the finished concept, intact
    assert _names(bank) == ["<alpha>"]
    first = _concept_tensors(bank, 0)
    manifest_before = (bank / "manifest.json").read_bytes()

    calls.clear()
    monkeypatch.setattr(cli, "STEP_HOOK", lambda pos, step: calls.append((pos, step)))
    capsys.readouterr()
    rc = cli.main(["train", "--concepts", *concepts, "--out", str(bank), *FAST])
    assert rc == 0
    assert calls == [(1, 0), (1, 1)]                       # concept 1 skipped
    assert "1 of 2 concepts already learned" in capsys.readouterr().out
    assert _names(bank) == ["<alpha>", "<beta>"]
    again = _concept_tensors(bank, 0)
    assert again.keys() == first.keys()
    for k in first:
        assert torch.equal(first[k], again[k]), k
    assert (bank / "manifest.json").read_bytes() != manifest_before

    # a third run has nothing left to do and leaves the bank untouched
    before = (bank / "manifest.json").read_bytes()
    calls.clear()
    assert cli.main(["train", "--concepts", *concepts, "--out", str(bank), *FAST]) == 0
    assert calls == []
    assert (bank / "manifest.json").read_bytes() == before
    assert "nothing to train" in capsys.readouterr().out


def test_crash_before_the_grid_then_resume_makes_the_missing_grid(tmp_path, concepts, monkeypatch, capsys):
    """A run stopped after a concept was saved but before its sample grid was written: the resumed run
    writes that grid first (the same picture an uninterrupted run gives) and then goes on."""
    ref = tmp_path / "ref"
    assert cli.main(["train", "--concepts", *concepts[:1], "--out", str(ref), *FAST, "--rank", "2"]) == 0
    ref_grid = (tmp_path / "ref_samples" / "after_01_alpha.png").read_bytes()

    bank = tmp_path / "bank"
    real_make_grid = cli.make_grid

    def broken(*a, **k):
        raise RuntimeError("boom: crash while drawing the grid")

    monkeypatch.setattr(cli, "make_grid", broken)
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["train", "--concepts", *concepts, "--out", str(bank), *FAST, "--rank", "2"])
    assert _names(bank) == ["<alpha>"]
    assert not (tmp_path / "bank_samples" / "after_01_alpha.png").exists()

    monkeypatch.setattr(cli, "make_grid", real_make_grid)
    capsys.readouterr()
    assert cli.main(["train", "--concepts", *concepts, "--out", str(bank), *FAST]) == 0
    out = capsys.readouterr().out
    assert "missing from the run that learned <alpha>" in out
    grids = sorted(p.name for p in (tmp_path / "bank_samples").glob("*.png"))
    assert grids == ["after_01_alpha.png", "after_02_beta.png"]
    assert (tmp_path / "bank_samples" / "after_01_alpha.png").read_bytes() == ref_grid

    # with every grid present, a finished bank is left alone
    capsys.readouterr()
    assert cli.main(["train", "--concepts", *concepts, "--out", str(bank), *FAST]) == 0
    assert "missing" not in capsys.readouterr().out


def test_resume_rejects_other_order_and_rank(tmp_path, concepts, capsys):
    bank = tmp_path / "bank"
    assert cli.main(["train", "--concepts", concepts[0], "--out", str(bank), *FAST, "--rank", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--concepts", concepts[1], concepts[0], "--out", str(bank), *FAST]) == 2
    err = capsys.readouterr().err
    assert "holds concepts ['<alpha>']" in err and "same order" in err
    assert cli.main(["train", "--concepts", *concepts, "--out", str(bank), *FAST, "--rank", "4"]) == 2
    assert "--rank 2, not 4" in capsys.readouterr().err
    assert _names(bank) == ["<alpha>"]


def test_simulated_crash_env_in_subprocess_and_module_entry(tmp_path, concepts, capsys):
    """``python -m clora_fast.cli`` works; a process that dies mid-concept leaves a complete bank."""
    bank = tmp_path / "bank"
    env = dict(os.environ, CLORA_FAST_CRASH_AT="1:1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "clora_fast.cli", "train", "--concepts", *concepts, "--out", str(bank),
           *FAST, "--rank", "2", "--samples-per-concept", "0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "simulated crash at concept 1 step 1" in r.stderr
    assert "learned <alpha>" in r.stdout and "learned <beta>" not in r.stdout
    assert _names(bank) == ["<alpha>"]
    assert not (tmp_path / "bank_samples").exists()
    assert not [p for p in bank.iterdir() if p.name.startswith(".")]     # no temp files left behind
    # resume (in-process, to keep the test fast)
    assert cli.main(cmd[3:-2]) == 0
    assert _names(bank) == ["<alpha>", "<beta>"]
    assert "1 of 2 concepts already learned" in capsys.readouterr().out


def test_sample_writes_png(tmp_path, concepts, capsys):
    bank = tmp_path / "bank"
    assert cli.main(["train", "--concepts", concepts[0], "--out", str(bank), *FAST, "--rank", "2",
                     "--samples-per-concept", "0"]) == 0
    out = tmp_path / "img.png"
    rc = cli.main(["sample", "--bank", str(bank), "--prompt", "a photo of <alpha>", "--out", str(out),
                   "--steps", "2", "--resolution", "16", "--backend", "reference"])
    assert rc == 0
    with Image.open(out) as im:
        assert im.size == (16, 16) and im.mode == "RGB"
    assert "concepts used: ['<alpha>']" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", "--bank", str(bank), "--prompt", "a photo of <alpha>", "--out", str(grid),
                     "--steps", "1", "--resolution", "16", "--num-images", "3"]) == 0
    with Image.open(grid) as im:
        assert im.size[1] == 16 and im.size[0] >= 3 * 16
    # deterministic in the seed
    out2 = tmp_path / "img2.png"
    assert cli.main(["sample", "--bank", str(bank), "--prompt", "a photo of <alpha>", "--out", str(out2),
                     "--steps", "2", "--resolution", "16", "--backend", "reference"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(out2)))
    # a token that is not in the bank: a warning, still an image
    assert cli.main(["sample", "--bank", str(bank), "--prompt", "a photo of <gamma>", "--out", str(out2),
                     "--steps", "1", "--resolution", "16"]) == 0
    assert "['<gamma>'] are not in the bank" in capsys.readouterr().err
    # --negative-prompt: what the pipeline makes of it (with guidance; refused without, before any model loads)
    args = ["sample", "--bank", str(bank), "--prompt", "a photo of <alpha>", "--steps", "2", "--resolution", "16",
            "--backend", "reference"]
    assert cli.main(args + ["--out", str(out2), "--negative-prompt", "blurry"]) == 2
    assert "--negative-prompt needs --guidance-scale above 1" in capsys.readouterr().err
    for neg, f in ((None, "g.png"), ("blurry", "n.png")):
        assert cli.main(args + ["--out", str(tmp_path / f), "--guidance-scale", "4"]
                        + ([] if neg is None else ["--negative-prompt", neg])) == 0
    import clora_fast
    from clora_fast.builtin import build_pipeline
    pipe = build_pipeline()
    clora_fast.load(pipe, str(bank), backend="reference").merge()
    (want,) = cli.generate(pipe, ["a photo of <alpha>"], steps=2, seed=0, guidance_scale=4.0, resolution=16,
                           negative_prompt="blurry")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "n.png")), np.asarray(want))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "n.png")), np.asarray(Image.open(tmp_path / "g.png")))


def test_sample_after_a_concept(tmp_path, two_concept_bank, capsys):
    """sample --after <alpha>: the model as it was right after <alpha> was learned (the bank's later concepts left
    out in memory; the bank is not changed): what the pipeline makes with only <alpha> merged; a prompt with a
    later concept's token, or an --after that is not in the bank, is an error."""
    import clora_fast
    from clora_fast.builtin import build_pipeline

    before = _manifest(two_concept_bank)
    rc, out, err = _sample(capsys, two_concept_bank, "a photo of <alpha>", tmp_path / "a.png", "--after", "<ALPHA>",
                           "--steps", "2")
    assert rc == 0 and "concepts used: ['<alpha>']" in out, err
    pipe = build_pipeline()
    cl = clora_fast.load(pipe, str(two_concept_bank), backend="reference")
    cl.remove_concepts([1])
    cl.merge()
    (want,) = cli.generate(pipe, ["a photo of <alpha>"], steps=2, seed=0, guidance_scale=1.0, resolution=16)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(want))
    rc, out, err = _sample(capsys, two_concept_bank, "a photo of <alpha>", tmp_path / "b.png", "--steps", "2")
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(want))   # <beta> changes it
    rc, out, err = _sample(capsys, two_concept_bank, "<alpha> and <beta>", tmp_path / "c.png", "--after", "<alpha>")
    assert rc == 2 and "uses '<beta>', which was learned after --after '<alpha>'" in err
    rc, out, err = _sample(capsys, two_concept_bank, "a photo", tmp_path / "c.png", "--after", "<gamma>")
    assert rc == 2 and "--after '<gamma>' is not a finished concept" in err and not (tmp_path / "c.png").exists()
    assert _manifest(two_concept_bank) == before


def test_sample_scheduler(tmp_path, two_concept_bank, capsys):
    """sample --scheduler: every named diffusers scheduler, built from the model's scheduler config, denoises (an
    image each); Euler's image is what the pipeline makes with that scheduler itself, and differs from the model's
    own scheduler's (DDIM for the builtin model)."""
    import clora_fast
    from diffusers import EulerDiscreteScheduler
    from clora_fast.builtin import build_pipeline

    images = {}
    for name in sorted(cli._SAMPLERS):
        rc, out, err = _sample(capsys, two_concept_bank, "a photo of <alpha>", tmp_path / f"{name}.png",
                               "--scheduler", name, "--steps", "3")
        assert rc == 0, err
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    pipe = build_pipeline()
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    clora_fast.load(pipe, str(two_concept_bank), backend="reference").merge()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    (want,) = cli.generate(pipe, ["a photo of <alpha>"], steps=3, seed=0, guidance_scale=1.0, resolution=16)
    assert np.array_equal(images["euler"], np.asarray(want))
    assert np.array_equal(images["model"], images["ddim"]) and not np.array_equal(images["euler"], images["ddim"])


def test_info_lists_a_bank_and_verifies_it(tmp_path, concepts, capsys):
    """clora-fast info: the concepts with their tokens and sizes, no model loaded; --json; --verify, and
    exit status 1 for a damaged bank or a folder that is not one."""
    bank = tmp_path / "bank"
    assert cli.main(["train", "--concepts", *concepts, "--out", str(bank), *FAST, "--rank", "2",
                     "--samples-per-concept", "0"]) == 0
    capsys.readouterr()
    assert cli.main(["info", str(bank)]) == 0
    out = capsys.readouterr().out
    assert "2 finished concept(s), 0 removed" in out and "rank 2" in out and "diffusers.unet" in out
    assert re.search(r"0  <alpha>\s+<alpha>\s+1\s+\d", out) and "not verified" in out
    assert cli.main(["info", str(bank), "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in info["concepts"]] == [c["token"] for c in info["concepts"]] == ["<alpha>", "<beta>"]
    assert info["verified"] is True
    f = next(bank.glob("concept-1-*.safetensors"))
    f.write_bytes(f.read_bytes()[:-1])
    assert cli.main(["info", str(bank)]) == 0                   # the manifest alone still reads
    capsys.readouterr()
    assert cli.main(["info", str(bank), "--verify"]) == 1
    assert "truncated or modified" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path)]) == 1
    assert "no concept bank" in capsys.readouterr().err


def test_bank_model_mismatch_is_a_clear_error(tmp_path, concepts, capsys):
    from clora_fast.builtin import build_pipeline

    bank = tmp_path / "bank"
    assert cli.main(["train", "--concepts", concepts[0], "--out", str(bank), *FAST, "--rank", "2",
                     "--samples-per-concept", "0"]) == 0
    other = tmp_path / "other_model"
    build_pipeline(seed=123).save_pretrained(str(other), safe_serialization=True)
    capsys.readouterr()
    rc = cli.main(["sample", "--bank", str(bank), "--model", str(other), "--prompt", "a photo of <alpha>",
                   "--out", str(tmp_path / "x.png"), "--steps", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot load the bank" in err and "another base model" in err
    assert not (tmp_path / "x.png").exists()
    # resuming training on another model: same error, bank untouched
    before = (bank / "manifest.json").read_bytes()
    rc = cli.main(["train", "--model", str(other), "--concepts", *concepts, "--out", str(bank), *FAST])
    assert rc == 2
    assert "another base model" in capsys.readouterr().err
    assert (bank / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("case", ["missing", "empty", "file", "notimages"])
def test_bad_concept_dirs(tmp_path, concepts, capsys, case):
    bad = tmp_path / "bad"
    if case == "empty":
        bad.mkdir()
    elif case == "file":
        bad.write_text("x")
    elif case == "notimages":
        bad.mkdir()
        (bad / "readme.txt").write_text("no images here")
    rc = cli.main(["train", "--concepts", concepts[0], str(bad), "--out", str(tmp_path / "bank"), *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    expect = {"missing": "does not exist", "empty": "holds no images", "file": "is not a folder",
              "notimages": "holds no images"}[case]
    assert f"concept folder {str(bad)!r} {expect}" in err or f"concept path {str(bad)!r} {expect}" in err
    assert not (tmp_path / "bank").exists()   # validation happens before any training


def test_other_bad_inputs(tmp_path, concepts, capsys):
    def run(*argv):
        rc = cli.main(list(argv))
        return rc, capsys.readouterr().err

    bank = str(tmp_path / "bank")
    # corrupt image
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    rc, err = run("train", "--concepts", str(broken), "--out", bank, *FAST)
    assert rc == 2 and "cannot read image" in err and "a.png" in err
    # two folders with the same token
    dup = _concept(tmp_path / "other", "alpha")
    rc, err = run("train", "--concepts", concepts[0], dup, "--out", bank, *FAST)
    assert rc == 2 and "same token ['<alpha>']" in err
    # --out is a non-empty folder that is not a bank
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "keep.txt").write_text("important")
    rc, err = run("train", "--concepts", concepts[0], "--out", str(junk), *FAST)
    assert rc == 2 and "holds no concept bank" in err
    assert (junk / "keep.txt").read_text() == "important"
    # unknown model
    rc, err = run("train", "--model", str(tmp_path / "nomodel"), "--concepts", concepts[0], "--out", bank, *FAST)
    assert rc == 2 and "neither a builtin model" in err
    # sample: missing bank, not a png
    rc, err = run("sample", "--bank", str(tmp_path / "nobank"), "--prompt", "x", "--out", str(tmp_path / "a.png"))
    assert rc == 2 and "does not exist" in err
    rc, err = run("sample", "--bank", str(junk), "--prompt", "x", "--out", str(tmp_path / "a.jpg"))
    assert rc == 2 and ".png" in err
    # a folder that is not a bank
    rc, err = run("sample", "--bank", str(junk), "--prompt", "x", "--out", str(tmp_path / "a.png"))
    assert rc == 2 and "manifest.json is missing" in err
    # --lr must be positive; argparse-level errors exit 2 with the option named
    rc, err = run("train", "--concepts", concepts[0], "--out", bank, *FAST, "--lr", "0")
    assert rc == 2 and "--lr must be a positive number" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--concepts", concepts[0], "--out", bank, "--steps", "0"])
    assert e.value.code == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--concepts", concepts[0], "--out", bank, "--penalty-weight", "-1"])
    assert "--penalty-weight must be a finite number >= 0" in capsys.readouterr().err
    # no subcommand
    assert cli.main([]) == 2
    assert not Path(bank).exists()


def test_prompts_file_json_and_lines(tmp_path, concepts, monkeypatch):
    pj = tmp_path / "p.json"
    pj.write_text(json.dumps({"alpha": "a drawing of {token} digit", "beta": "{token} on black"}))
    assert cli.parse_prompts_file(str(pj)) == {"alpha": "a drawing of {token} digit", "beta": "{token} on black"}
    pl = tmp_path / "p.txt"
    pl.write_text("# comment\nalpha: a drawing of {token}: digit\n\nbeta:{token}\n")
    assert cli.parse_prompts_file(str(pl)) == {"alpha": "a drawing of {token}: digit", "beta": "{token}"}
    for text, msg in [
        ("alpha a photo", "expected 'dirname: prompt'"),
        ("alpha: a photo", "does not contain '{token}'"),
        ("alpha: {token}\nalpha: {token}", "given twice"),
        ("{\"alpha\": 3}", "JSON object of strings"),
        ("{bad json", "not valid JSON"),
        ("alpha: {token} {other}", "bad prompt template"),
        ("alpha: a photo of {{token}}", "does not contain '{token}'"),       # an escaped brace pair: no token
        ('{"alpha": "{token}", "alpha": "a {token}"}', "given more than once"),
    ]:
        pl.write_text(text)
        with pytest.raises(cli.CLIError, match=msg.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
            cli.parse_prompts_file(str(pl))
    with pytest.raises(cli.CLIError, match="does not exist"):
        cli.parse_prompts_file(str(tmp_path / "none.txt"))

    # the prompt actually used in training comes from the file
    seen = []
    real = cli.train_concept

    def spy(pipe, cl, lat_mean, lat_std, prompt, **kw):
        seen.append(prompt)
        return real(pipe, cl, lat_mean, lat_std, prompt, **kw)

    monkeypatch.setattr(cli, "train_concept", spy)
    pl.write_text("alpha: a drawing of {token}\n")
    assert cli.main(["train", "--concepts", *concepts, "--out", str(tmp_path / "bank"), *FAST, "--rank", "2",
                     "--samples-per-concept", "0", "--prompts", str(pl)]) == 0
    assert seen == ["a drawing of <alpha>", "a photo of <beta>"]
    pl.write_text("gamma: {token}\n")
    assert cli.main(["train", "--concepts", *concepts, "--out", str(tmp_path / "b2"), *FAST,
                     "--prompts", str(pl)]) == 2


def test_random_flip(tmp_path, concepts, monkeypatch, capsys):
    """--random-flip: the concept's latents are those of its images and of their mirrors (one of 2n drawn
    uniformly), and the setting is part of what a resume must keep (recorded only when on; a bank trained
    without it counts as off)."""
    seen = []
    real = cli.encode_images

    def spy(pipe, images):
        seen.append(images.clone())
        return real(pipe, images)

    monkeypatch.setattr(cli, "encode_images", spy)
    base = ["train", "--out", str(tmp_path / "bank"), *FAST, "--rank", "2", "--samples-per-concept", "0"]
    assert cli.main(base + ["--concepts", concepts[0], "--random-flip"]) == 0
    (images,) = seen
    n = images.shape[0] // 2
    assert n >= 1 and images.shape[0] == 2 * n and torch.equal(images[n:], images[:n].flip(-1))
    assert not torch.equal(images[n:], images[:n])
    assert cli.main(base + ["--concepts", *concepts]) == 2
    assert "(random_flip True -> False)" in capsys.readouterr().err
    assert cli.main(base + ["--concepts", *concepts, "--random-flip"]) == 0 and len(seen) == 2
    assert cli.main(["train", "--out", str(tmp_path / "plain"), *FAST, "--rank", "2", "--samples-per-concept", "0",
                     "--concepts", concepts[0]]) == 0
    assert seen[-1].shape[0] == n                   # without the option: the images alone
    settings = json.loads((tmp_path / "plain" / cli.SETTINGS_FILE).read_text())
    assert "random_flip" not in settings["<alpha>"]
    capsys.readouterr()
    assert cli.main(["train", "--out", str(tmp_path / "plain"), *FAST, "--rank", "2", "--samples-per-concept", "0",
                     "--concepts", *concepts, "--random-flip"]) == 2
    assert "(random_flip False -> True)" in capsys.readouterr().err


def test_concept_token_names():
    assert cli.concept_token("/x/digit3") == "<digit3>"
    assert cli.concept_token("/x/My Dog!/") == "<my_dog>"
    with pytest.raises(cli.CLIError, match="cannot derive a token"):
        cli.concept_token("/x/!!!")


def test_train_vit_dispatch(monkeypatch, capsys):
    got = []
    fake = types.ModuleType("clora_fast.vit_train")
    fake.cli_main = lambda argv: got.append(argv) or 7
    monkeypatch.setitem(sys.modules, "clora_fast.vit_train", fake)
    import clora_fast

    monkeypatch.setattr(clora_fast, "vit_train", fake, raising=False)
    assert cli.main(["train-vit", "--epochs", "1", "--help-me"]) == 7
    assert got == [["--epochs", "1", "--help-me"]]
    # module missing: clear error, exit status 2
    monkeypatch.setitem(sys.modules, "clora_fast.vit_train", None)
    monkeypatch.delattr(clora_fast, "vit_train", raising=False)
    assert cli.main(["train-vit"]) == 2
    assert "train-vit needs clora_fast.vit_train" in capsys.readouterr().err


def test_train_bf16_mixed_precision_then_fp32_in_one_process(tmp_path, concepts, monkeypatch):
    n_threads = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(cli, "STEP_HOOK", lambda pos, step: seen.append(torch.get_num_threads()))
    try:
        torch.set_num_threads(2)
        assert cli.main(["train", "--concepts", concepts[0], "--out", str(tmp_path / "b16"), *FAST, "--rank", "2",
                         "--samples-per-concept", "0", "--mixed-precision", "bf16", "--threads", "1"]) == 0
        assert seen == [1, 1]                        # --threads applies while training ...
        assert torch.get_num_threads() == 2          # ... and is restored when main() returns
    finally:
        torch.set_num_threads(n_threads)
    t = _concept_tensors(tmp_path / "b16", 0)
    assert all(torch.isfinite(v).all() for v in t.values())
    assert all(v.dtype == torch.float32 for k, v in t.items() if "lora" in k)
    # accelerate's process-wide state was reset: another precision works in the same process
    assert cli.main(["train", "--concepts", concepts[0], "--out", str(tmp_path / "b32"), *FAST, "--rank", "2",
                     "--samples-per-concept", "0"]) == 0
    assert _names(tmp_path / "b32") == ["<alpha>"]


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_shipped_example_concepts_are_reproducible(tmp_path):
    """examples/concepts/* is exactly what examples/make_digit_concepts.py generates."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import make_digit_concepts as mk
    finally:
        sys.path.remove(str(EXAMPLES))
    assert mk.main(["--out", str(tmp_path), "--digits", "3", "5", "7", "--per-concept", "8", "--size", "32"]) == 0
    shipped = sorted(p.relative_to(EXAMPLES / "concepts") for p in (EXAMPLES / "concepts").rglob("*.png"))
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert shipped == made and len(made) == 24
    for rel in made:
        a = np.asarray(Image.open(tmp_path / rel))
        b = np.asarray(Image.open(EXAMPLES / "concepts" / rel))
        assert a.shape == (32, 32, 3) and np.array_equal(a, b), rel
    total = sum(p.stat().st_size for p in (EXAMPLES / "concepts").rglob("*"))
    assert total < 300_000
    with pytest.raises(ValueError, match="digit must be in 0..9"):
        mk.digit_images(12, 1, 32)


def test_digits_check_mmd_separates_distributions():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import digits_diffusion_check as dc
    finally:
        sys.path.remove(str(EXAMPLES))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    c = torch.randn(200, 8, generator=g) + 1.0
    bw = dc.median_bandwidth(torch.cat([a, b]))
    same, diff = dc.mmd2(a, b, bw), dc.mmd2(a, c, bw)
    assert abs(same) < 0.02 and diff > 0.2


def _bank_tensors(bank) -> dict:
    m = _manifest(bank)
    return {stem: load_file(str(Path(bank) / e["name"])) for stem, e in m["files"].items()}


def _assert_same_banks(a, b, exact=True):
    a, b = _bank_tensors(a), _bank_tensors(b)
    assert a.keys() == b.keys()
    for stem in a:
        assert a[stem].keys() == b[stem].keys()
        for k in a[stem]:
            if exact:
                assert torch.equal(a[stem][k], b[stem][k]), (stem, k)
            else:
                torch.testing.assert_close(a[stem][k], b[stem][k], rtol=1e-4, atol=1e-6, msg=f"{stem} {k}")
    assert any(k.startswith("extra.") for k in a["concept-0"])          # the token embedding is compared too


def test_train_same_seed_gives_bit_identical_banks(tmp_path, concepts, monkeypatch):
    """--seed seeds the global RNGs too: the LoRA A init (begin_concept) and the new token's
    embedding row come from torch's global RNG, which the batches' generator does not cover.
    Seeded per concept: a crashed and resumed run gives the same bank as an uninterrupted one."""
    argv = ["train", "--concepts", *concepts, *FAST, "--rank", "2", "--samples-per-concept", "0", "--seed", "3"]
    torch.manual_seed(1)
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    state = torch.get_rng_state()
    torch.manual_seed(2)                     # another global RNG state before the second run
    assert cli.main([*argv, "--out", str(tmp_path / "b")]) == 0
    _assert_same_banks(tmp_path / "a", tmp_path / "b")
    # the caller's global RNG state is restored when main() returns
    torch.manual_seed(1)

    def crash(pos, step):
        if pos == 1:
            raise RuntimeError("boom")

    monkeypatch.setattr(cli, "STEP_HOOK", crash)
    with pytest.raises(RuntimeError, match="boom"):
        cli.main([*argv, "--out", str(tmp_path / "c")])
    assert torch.equal(torch.get_rng_state(), state)
    monkeypatch.setattr(cli, "STEP_HOOK", None)
    assert _names(tmp_path / "c") == ["<alpha>"]
    assert cli.main([*argv, "--out", str(tmp_path / "c")]) == 0
    _assert_same_banks(tmp_path / "a", tmp_path / "c")


@pytest.fixture(scope="module")
def two_concept_bank(tmp_path_factory):
    """A bank of <alpha>, <beta> (rank 2) trained once for the sample tests; copy it before changing it."""
    root = tmp_path_factory.mktemp("two_concept_bank")
    folders = [_concept(root / "data", "alpha", seed=1), _concept(root / "data", "beta", seed=2)]
    bank = root / "bank"
    assert cli.main(["train", "--concepts", *folders, "--out", str(bank), *FAST, "--rank", "2",
                     "--samples-per-concept", "0"]) == 0
    return bank


def _copy_bank(bank, dst):
    import shutil
    shutil.copytree(bank, dst)
    return dst


SAMPLE_FAST = ["--steps", "1", "--resolution", "16", "--backend", "reference"]


def test_sample_corrupt_manifest_is_a_clean_error(tmp_path, two_concept_bank, capsys):
    """A BankError (a malformed manifest value) ends as 'clora-fast: error: ...', exit status 2."""
    bank = _copy_bank(two_concept_bank, tmp_path / "bank")
    m = _manifest(bank)
    m["concepts"][0]["file"] = []
    (bank / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    rc = cli.main(["sample", "--bank", str(bank), "--prompt", "a photo of <alpha>", "--out",
                   str(tmp_path / "x.png"), *SAMPLE_FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("clora-fast: error:") and "'concepts[0].file'" in err
    assert not (tmp_path / "x.png").exists()
    m["concepts"][0]["file"] = "concept-0"
    m["alpha"] = float("nan")
    (bank / "manifest.json").write_text(json.dumps(m))
    rc = cli.main(["sample", "--bank", str(bank), "--prompt", "a photo of <alpha>", "--out",
                   str(tmp_path / "x.png"), *SAMPLE_FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("clora-fast: error:") and "'alpha'" in err
    # resuming training from it: the same clean error, the bank untouched
    before = (bank / "manifest.json").read_bytes()
    data = two_concept_bank.parent / "data"
    rc = cli.main(["train", "--concepts", str(data / "alpha"), str(data / "beta"), "--out", str(bank), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("clora-fast: error:") and "'alpha'" in err
    assert (bank / "manifest.json").read_bytes() == before


def _sample(capsys, bank, prompt, out, *extra):
    capsys.readouterr()
    rc = cli.main(["sample", "--bank", str(bank), "--prompt", prompt, "--out", str(out), *SAMPLE_FAST, *extra])
    o = capsys.readouterr()
    return rc, o.out, o.err


def test_sample_bank_with_an_unfinished_concept(tmp_path, two_concept_bank, capsys):
    """A bank saved mid-concept samples with its finished concepts (and says so); a prompt with the
    unfinished concept's token is a clear error, not a RuntimeError from merge()."""
    import clora_fast
    from clora_fast.builtin import build_pipeline

    pipe = build_pipeline()
    pipe.unet.requires_grad_(False)
    cl = clora_fast.load(pipe, str(two_concept_bank), backend="reference")
    cl.begin_concept("<wip>")
    with torch.no_grad():
        for p in cl.trainable_parameters():
            p.add_(0.5)
    cl.save(str(tmp_path / "wip"))
    before = (tmp_path / "wip" / "manifest.json").read_bytes()
    rc, out, err = _sample(capsys, tmp_path / "wip", "a photo of <alpha>", tmp_path / "a.png")
    assert rc == 0, err
    assert "unfinished concept '<wip>'" in err and "2 finished concept(s)" in err
    assert "concepts used: ['<alpha>']" in out
    assert (tmp_path / "wip" / "manifest.json").read_bytes() == before      # the bank is not changed
    # the same image as the bank without the unfinished concept
    assert _sample(capsys, two_concept_bank, "a photo of <alpha>", tmp_path / "b.png")[0] == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    rc, out, err = _sample(capsys, tmp_path / "wip", "a photo of <wip>", tmp_path / "c.png")
    assert rc == 2 and err.startswith("clora-fast: error:") and "'<wip>'" in err and "unfinished" in err
    assert not (tmp_path / "c.png").exists()
    assert "unfinished concept" in subprocess.run(
        [sys.executable, "-m", "clora_fast.cli", "sample", "--help"], capture_output=True, text=True,
        env=dict(os.environ, COLUMNS="200")).stdout


def test_sample_removed_concept_token_and_bad_resolution(tmp_path, two_concept_bank, capsys):
    import clora_fast
    from clora_fast.builtin import build_pipeline

    pipe = build_pipeline()
    cl = clora_fast.load(pipe, str(two_concept_bank), backend="reference")
    cl.remove_concept(0)
    cl.save(str(tmp_path / "rm"))
    rc, out, err = _sample(capsys, tmp_path / "rm", "a photo of <alpha>", tmp_path / "a.png")
    assert rc == 2 and err.startswith("clora-fast: error:") and "'<alpha>'" in err and "removed" in err
    assert "Traceback" not in err and not (tmp_path / "a.png").exists()
    rc, out, err = _sample(capsys, tmp_path / "rm", "a photo of <beta>", tmp_path / "a.png", "--negative-prompt",
                           "<alpha>", "--guidance-scale", "2")
    assert rc == 2 and "the negative prompt '<alpha>' uses the token '<alpha>'" in err and "removed" in err
    rc, out, err = _sample(capsys, tmp_path / "rm", "a photo of <beta>", tmp_path / "a.png")
    assert rc == 0 and "concepts used: ['<beta>']" in out
    for res in ("7", "12"):             # not a multiple of the VAE factor (2) / of the pipeline's 8
        rc, out, err = _sample(capsys, two_concept_bank, "a photo of <beta>", tmp_path / "r.png", "--resolution", res)
        assert rc == 2 and err.startswith("clora-fast: error: --resolution") and "multiple of 8" in err
        assert not (tmp_path / "r.png").exists()


def test_sample_concepts_used_matches_the_tokenizer(tmp_path, two_concept_bank, capsys):
    """The tokenizer lower-cases: '<Alpha>' is the concept <alpha>, and the summary says so."""
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x's slow CLIPTokenizer matches added tokens case-sensitively")
    rc, out, err = _sample(capsys, two_concept_bank, "a photo of <Alpha> and <BETA>", tmp_path / "a.png")
    assert rc == 0 and "concepts used: ['<alpha>', '<beta>']" in out
    assert "not in the bank" not in err
    rc, out, err = _sample(capsys, two_concept_bank, "a photo of <alphas>", tmp_path / "a.png")
    assert rc == 0 and "concepts used: none" in out and "['<alphas>'] are not in the bank" in err


def test_train_resolution_the_sample_grids_cannot_use(tmp_path, concepts, capsys):
    """--resolution 12 trains (a multiple of the VAE factor 2) but the pipeline samples only
    multiples of 8: refused before training when grids are asked for, accepted without them."""
    bank = tmp_path / "bank"
    rc = cli.main(["train", "--concepts", concepts[0], "--out", str(bank), *FAST, "--resolution", "12"])
    assert rc == 2 and "the sample grids need a multiple of 8" in capsys.readouterr().err
    assert not bank.exists()
    assert cli.main(["train", "--concepts", concepts[0], "--out", str(bank), *FAST, "--resolution", "12",
                     "--samples-per-concept", "0", "--rank", "2"]) == 0


def test_train_refuses_a_prompt_whose_token_is_cut_off(tmp_path, concepts, capsys, monkeypatch):
    """A training prompt longer than the text encoder's 77 tokens with the concept's token in the
    cut-off part: a clear error naming the prompt, before anything is trained."""
    long = "a very very detailed photo, " * 15 + "of {token}"
    pl = tmp_path / "p.txt"
    pl.write_text(f"beta: {long}\n")
    bank = tmp_path / "bank"
    capsys.readouterr()
    rc = cli.main(["train", "--concepts", *concepts, "--out", str(bank), *FAST, "--prompts", str(pl)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("clora-fast: error: the training prompt")
    assert repr(long.format(token="<beta>")) in err and "'<beta>' would be cut off" in err
    assert str(concepts[1]) in err
    assert not bank.exists()                       # refused before the first concept was trained
    # the same prompt with the token early enough trains
    pl.write_text("beta: {token}, " + long.replace(" of {token}", "") + "\n")
    assert cli.main(["train", "--concepts", *concepts, "--out", str(bank), *FAST, "--prompts", str(pl),
                     "--rank", "2", "--samples-per-concept", "0"]) == 0
    # train_concept itself checks too (library use)
    import clora_fast
    from clora_fast.builtin import build_pipeline
    pipe = build_pipeline()
    pipe.unet.requires_grad_(False)
    cl = clora_fast.patch(pipe, rank=2, backend="reference")
    cl.begin_concept("<gamma>")
    lat = torch.zeros(1, pipe.unet.config.in_channels, 4, 4)
    with pytest.raises(cli.CLIError, match="'<gamma>' would be cut off"):
        cli.train_concept(pipe, cl, lat, None, long.format(token="<gamma>"), steps=1, lr=1e-3, batch_size=1,
                          generator=torch.Generator().manual_seed(0))


def test_train_out_dot_is_the_current_folder(tmp_path, concepts, monkeypatch, capsys):
    """'--out .' (an empty current folder) is the bank; the grids go to ../<folder>_samples."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.main(["train", "--concepts", concepts[0], "--out", ".", *FAST, "--rank", "2"]) == 0
    assert _names(work) == ["<alpha>"]
    assert [p.name for p in (tmp_path / "work_samples").iterdir()] == ["after_01_alpha.png"]
    capsys.readouterr()
    assert cli.main(["train", "--concepts", concepts[0], "--out", "../work", *FAST]) == 0    # resumes it
    assert "nothing to train" in capsys.readouterr().out
    assert cli.main(["train", "--concepts", concepts[0], "--out", "/", *FAST]) == 2
    assert "root" in capsys.readouterr().err


def _no_model(*a, **k):
    raise AssertionError("the model was loaded: the bad argument must be refused before")


def test_bad_output_paths_are_refused_before_any_work(tmp_path, concepts, capsys, monkeypatch):
    """An existing file as --samples-dir (or as the default <out>_samples, or above it) and an existing
    folder as sample --out: one 'clora-fast: error:' line before the model loads, not an OSError
    traceback after a concept was trained or the images were generated."""
    monkeypatch.setattr(cli, "_load_model", _no_model)
    afile = tmp_path / "afile"
    afile.write_text("keep")
    bank = tmp_path / "bank"
    for extra, flag in ((["--samples-dir", str(afile)], "--samples-dir 'afile'"),
                        (["--samples-dir", str(afile / "sub")], "is a file, not a folder"),
                        ([], "--samples-dir (default <out>_samples)")):
        if not extra:
            (tmp_path / "bank_samples").write_text("x")
        rc = cli.main(["train", "--concepts", concepts[0], "--out", str(bank), *FAST, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("clora-fast: error:"), err
        assert flag.replace("'afile'", repr(str(afile))) in err
        assert not bank.exists() and afile.read_text() == "keep"
    out = tmp_path / "dir.png"
    out.mkdir()
    for target, msg in ((out, "is an existing folder, not a file"), (afile / "x.png", "is a file, not a folder")):
        rc = cli.main(["sample", "--bank", str(tmp_path), "--prompt", "a photo of <alpha>", "--out", str(target)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("clora-fast: error: --out") and msg in err, err
    assert not any(out.iterdir())


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_backend_that_cannot_run_here_is_refused_before_the_model_loads(tmp_path, concepts, capsys,
                                                                         monkeypatch, backend):
    """--backend cuda without the built extension and a GPU, --backend triton on the CPU without the
    Triton interpreter: the library would raise only at the first projection (a traceback after the
    model loaded); the CLI refuses up front with the library's own reason."""
    from clora_fast import _cuda

    if backend == "cuda" and _cuda.is_available() or backend == "triton" and torch.cuda.is_available():
        pytest.skip(f"the {backend} backend can run on this machine")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(cli, "_load_model", _no_model)
    bank = tmp_path / "bank"
    for argv in (["train", "--concepts", concepts[0], "--out", str(bank), *FAST],
                 ["sample", "--bank", str(tmp_path), "--prompt", "a photo of <alpha>", "--out",
                  str(tmp_path / "a.png")]):
        rc = cli.main(argv + ["--backend", backend])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"clora-fast: error: --backend {backend} cannot run"), err
        assert f"backend='{backend}'" in err and "Traceback" not in err
    assert not bank.exists() and not (tmp_path / "a.png").exists()


def test_resume_with_other_settings_is_refused_unless_allowed(tmp_path, concepts, capsys, monkeypatch):
    """The bank folder records each concept's settings; a resume with others (here --steps, --seed) would mix
    them silently: refused with what changed, before any training, unless --allow-new-settings."""
    bank = tmp_path / "bank"
    fast = [*FAST, "--rank", "2", "--samples-per-concept", "0"]
    assert cli.main(["train", "--concepts", concepts[0], "--out", str(bank), *fast, "--seed", "1"]) == 0
    rec = json.loads((bank / cli.SETTINGS_FILE).read_text())
    assert rec["<alpha>"]["steps"] == 2 and rec["<alpha>"]["seed"] == 1 and rec["<alpha>"]["prompt"]
    calls = []
    monkeypatch.setattr(cli, "STEP_HOOK", lambda pos, step: calls.append((pos, step)))
    capsys.readouterr()
    argv = ["train", "--concepts", *concepts, "--out", str(bank), *fast, "--steps", "3", "--seed", "2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "steps 2 -> 3" in err and "seed 1 -> 2" in err and calls == []
    assert cli.main(argv + ["--allow-new-settings"]) == 0
    assert calls == [(1, 0), (1, 1), (1, 2)] and _names(bank) == ["<alpha>", "<beta>"]
    rec = json.loads((bank / cli.SETTINGS_FILE).read_text())
    assert rec["<alpha>"]["steps"] == 2 and rec["<beta>"]["steps"] == 3


def test_tokens_that_cannot_be_learned_are_refused_before_training(tmp_path, concepts, capsys, monkeypatch):
    """A folder whose token belonged to a concept removed from the bank, or already exists in the model's
    tokenizer, used to fail at its begin_concept - after the earlier concepts had trained."""
    import clora_fast
    from clora_fast.builtin import build_pipeline
    bank = tmp_path / "bank"
    fast = [*FAST, "--rank", "2", "--samples-per-concept", "0"]
    assert cli.main(["train", "--concepts", concepts[0], "--out", str(bank), *fast]) == 0
    pipe = build_pipeline()
    cl = clora_fast.load(pipe, str(bank), backend="reference")
    cl.remove_concept(0)
    cl.save(str(bank))
    calls = []
    monkeypatch.setattr(cli, "STEP_HOOK", lambda pos, step: calls.append((pos, step)))
    capsys.readouterr()
    bank2 = tmp_path / "b2"
    assert cli.main(["train", "--concepts", concepts[0], "--out", str(bank), *fast, "--allow-new-settings"]) == 2
    assert "was removed from the bank" in capsys.readouterr().err and calls == []
    real = cli._load_model

    def with_beta(model, device):
        p = real(model, device)
        p.tokenizer.add_tokens(["<beta>"])
        return p

    monkeypatch.setattr(cli, "_load_model", with_beta)
    assert cli.main(["train", "--concepts", *concepts, "--out", str(bank2), *fast]) == 2
    assert "already exists in the model's tokenizer" in capsys.readouterr().err
    assert calls == [] and not bank2.exists()


def test_more_refusals_before_any_work(tmp_path, concepts, capsys, monkeypatch):
    """fp16 autocast on the CPU (accelerate turns it off silently), more denoising steps than the scheduler has,
    an unwritable --out, seeds out of range; and file system / divergence errors met later are one line."""
    def run(*argv):
        return cli.main(list(argv)), capsys.readouterr().err

    bank = str(tmp_path / "bank")
    rc, err = run("train", "--concepts", concepts[0], "--out", bank, *FAST, "--mixed-precision", "fp16")
    assert rc == 2 and "fp16 does not run on the CPU" in err
    rc, err = run("train", "--concepts", concepts[0], "--out", bank, *FAST[:-2], "--sample-steps", "1001")
    assert rc == 2 and "--sample-steps 1001 is more than the 1000 timesteps" in err
    assert not Path(bank).exists()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: False if "ro_dir" in str(p) else real_access(p, mode))
    (tmp_path / "ro_dir").mkdir()
    rc, err = run("train", "--concepts", concepts[0], "--out", str(tmp_path / "ro_dir" / "bank"), *FAST)
    assert rc == 2 and "no write permission" in err
    rc, err = run("sample", "--bank", str(tmp_path / "ro_dir"), "--prompt", "x", "--out",
                  str(tmp_path / "ro_dir" / "x.png"))
    assert rc == 2 and "no write permission" in err
    for seed in ("-1", str(2**32)):
        with pytest.raises(SystemExit):
            cli.main(["train", "--concepts", concepts[0], "--out", bank, "--seed", seed])
        assert "--seed must be in 0 .. 4294967295" in capsys.readouterr().err

    def diverge(*a, **k):
        raise cli.NonFiniteLoss("clora_fast: non-finite loss at step 0 (diffusion nan, penalty 0.0): lower --lr")

    monkeypatch.setattr(cli, "train_concept", diverge)
    rc, err = run("train", "--concepts", concepts[0], "--out", bank, *FAST)
    assert rc == 1 and err.strip().startswith("clora-fast: error: clora_fast: non-finite loss") and "Traceback" not in err

    def disk_full(args):
        raise OSError(28, "No space left on device", bank)

    monkeypatch.setattr(cli, "cmd_train", disk_full)
    rc, err = run("train", "--concepts", concepts[0], "--out", bank, *FAST)
    assert rc == 1 and "No space left on device" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "--samples-per-concept", "-2"], "--samples-per-concept must be >= 0, got -2"),
    (["train", "--guidance-scale", "nan"], "--guidance-scale must be a finite number, got 'nan'"),
    (["sample", "--bank", "b", "--prompt", "x", "--out", "x.png", "--guidance-scale", "inf"],
     "--guidance-scale must be a finite number, got 'inf'"),
    (["train-vit", "--lr", "-1"], "--lr must be a finite number > 0, got '-1'"),
    (["train-vit", "--head-lr", "nan"], "--head-lr must be a finite number > 0, got 'nan'"),
    (["train-vit", "--pretrain-lr", "0"], "--pretrain-lr must be a finite number > 0, got '0'"),
    (["train-vit", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["train-vit", "--rank", "0"], "--rank must be >= 1, got 0"),
    (["train-vit", "--seed", "-3"], "--seed must be in 0 .. 4294967295, got -3"),
])
def test_bad_numbers_are_usage_errors(argv, message, concepts, tmp_path, capsys):
    """Numbers the runs cannot use are refused by the parser (exit 2): train-vit trained with a negative --lr
    (torch's Adam checks only its default lr: gradient ascent, exit 0), --samples-per-concept -2 meant 0."""
    if argv[0] == "train":
        argv = [*argv, "--concepts", *concepts, "--out", str(tmp_path / "bank")]
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bank").exists()


def test_run_continual_refuses_a_learning_rate_it_cannot_use():
    from clora_fast import vit_train
    tasks = vit_train.load_digits_tasks(5, image_size=8)
    backbone = vit_train.build_backbone(framework="transformers",
                                        config=vit_train.tiny_vit_config(image_size=8, num_channels=1, patch_size=2))
    for kw in ({"lr": -1e-3}, {"head_lr": float("nan")}, {"lr": True}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be a finite number > 0"):
            vit_train.run_continual(backbone, tasks, epochs=1, **kw)


def test_ctrl_c_during_train_is_one_line_and_the_rerun_resumes(tmp_path, concepts, capsys, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) mid-training: exit 130 with one line saying the bank holds the finished
    concepts (no traceback); the run's lock is released, and the same command resumes."""
    bank = tmp_path / "bank"
    argv = ["train", "--concepts", *concepts, "--out", str(bank), *FAST, "--rank", "2", "--samples-per-concept", "0"]

    def interrupt(pos, step):
        if pos == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "STEP_HOOK", interrupt)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "clora-fast: interrupted; the bank" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    assert _names(bank) == ["<alpha>"]
    monkeypatch.setattr(cli, "STEP_HOOK", None)
    assert cli.main(argv) == 0
    assert _names(bank) == ["<alpha>", "<beta>"]
    # with --checkpoint-every the message says the concept goes on from its checkpoint, and it does
    argv = ["train", "--concepts", *concepts, "--out", str(tmp_path / "ck"), *CKPT]
    monkeypatch.setattr(cli, "STEP_HOOK", lambda pos, step: (_ for _ in ()).throw(KeyboardInterrupt)
                        if (pos, step) == (1, 3) else None)
    assert cli.main(argv) == 130
    assert "<beta> goes on from its checkpoint at step 2 of 5" in capsys.readouterr().err
    monkeypatch.setattr(cli, "STEP_HOOK", None)
    assert cli.main(argv) == 0
    assert "resuming <beta> at step 2 of 5" in capsys.readouterr().out



# --------------------------------------------------------------------------- SDXL (builtin-xl and SDXL folders)


def _patched_builtin(model):
    """(pipe, controller): a builtin pipeline, frozen, patched (rank 2, reference backend), concept <c1> begun."""
    from clora_fast.builtin import build_pipeline
    import clora_fast

    pipe = build_pipeline(model)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
    cl = clora_fast.patch(pipe, rank=2, backend="reference")
    cl.begin_concept("<c1>")
    return pipe, cl


@pytest.mark.parametrize("model", ["builtin", "builtin-xl", "builtin+mask"])
def test_training_condition_is_what_the_pipeline_feeds_the_unet(model):
    """The training step's text conditioning (``cli.text_condition``) is bit for bit what ``pipe()`` passes
    the UNet for the same prompt and size: SD's last hidden state; SDXL's two penultimate hidden states side
    by side, the pooled projection and the size/crop time ids.  With a concept's token in the prompt the
    gradient reaches that token's embedding row in every text encoder."""
    pipe, cl = _patched_builtin(model.replace("+mask", ""))
    if model.endswith("+mask"):                  # a text encoder that reads the padding mask (its config says so)
        pipe.text_encoder.config.use_attention_mask = True
    prompt, size = "a photo of <c1> on a table", (16, 24)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args, kw: seen.append(kw), with_kwargs=True)
    try:
        pipe(prompt, num_inference_steps=1, guidance_scale=1.0, height=size[0], width=size[1], output_type="latent")
    finally:
        handle.remove()
    ids = cli.prompt_inputs(pipe, prompt)
    assert len(ids) == (2 if model == "builtin-xl" else 1)
    cond, added = cli.text_condition(pipe, ids, size)
    assert torch.equal(cond.detach(), seen[0]["encoder_hidden_states"])
    if model.endswith("+mask"):                  # the mask changes the states: it was used
        pipe.text_encoder.config.use_attention_mask = False
        assert not torch.allclose(cli.text_condition(pipe, ids, size)[0], cond)
    if model != "builtin-xl":
        assert added is None and seen[0].get("added_cond_kwargs") in (None, {})
    else:
        want = seen[0]["added_cond_kwargs"]
        assert sorted(added) == sorted(want) == ["text_embeds", "time_ids"]
        assert torch.equal(added["time_ids"], want["time_ids"])
        assert added["time_ids"].tolist() == [[16, 24, 0, 0, 16, 24]]
        assert torch.equal(added["text_embeds"].detach(), want["text_embeds"])
    loss = cond.square().sum() + (0 if added is None else added["text_embeds"].square().sum())
    loss.backward()
    rows = [p for p in cl.trainable_parameters() if p.dim() == 1]     # the token embedding rows, one per encoder
    assert len(rows) == len(ids)
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in rows)


def test_train_sample_and_resume_on_builtin_xl(tmp_path, concepts, capsys):
    """``clora-fast train --model builtin-xl``: two concepts with their tokens in both tokenizers; the bank
    loads onto the SDXL pipeline (and not onto the SD one), samples, and a rerun resumes."""
    import clora_fast
    from clora_fast.builtin import build_pipeline

    bank = tmp_path / "bank"
    assert cli.main(["train", "--model", "builtin-xl", "--concepts", *concepts, "--out", str(bank), *FAST,
                     "--rank", "2"]) == 0
    assert _names(bank) == ["<alpha>", "<beta>"]
    t = _concept_tensors(bank, 1)
    assert sorted(k for k in t if "lora" not in k) == ["extra.token_embedding.0", "extra.token_embedding.1"]
    assert any(float(t[k].abs().max()) > 0 for k in t if k.endswith("lora_B"))
    assert sorted(p.name for p in (tmp_path / "bank_samples").glob("*.png")) == ["after_01_alpha.png",
                                                                               "after_02_beta.png"]
    pipe = build_pipeline("builtin-xl")
    cl = clora_fast.load(pipe, str(bank), backend="reference")
    assert cl.num_sites == 16 and len(cl.concepts) == 2
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        assert {"<alpha>", "<beta>"} <= set(tok.get_added_vocab())
    capsys.readouterr()
    out = tmp_path / "img.png"
    assert cli.main(["sample", "--bank", str(bank), "--model", "builtin-xl", "--prompt", "a photo of <beta>",
                     "--out", str(out), *SAMPLE_FAST]) == 0
    assert "concepts used: ['<beta>']" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size == (16, 16)
    # the SD builtin is another base model: a clear error, nothing written
    assert cli.main(["sample", "--bank", str(bank), "--prompt", "a photo of <beta>", "--out",
                     str(tmp_path / "x.png"), *SAMPLE_FAST]) == 2
    assert "cannot load the bank" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    assert cli.main(["train", "--model", "builtin-xl", "--concepts", *concepts, "--out", str(bank), *FAST,
                     "--rank", "2"]) == 0
    assert "nothing to train" in capsys.readouterr().out


def test_train_on_an_sdxl_folder_checks_both_tokenizers(tmp_path, concepts, capsys):
    """A local SDXL pipeline folder trains too; a prompt cut off by either tokenizer is refused before
    training (here only the second one is shorter)."""
    from clora_fast.builtin import build_pipeline

    folder = tmp_path / "xl_model"
    build_pipeline("builtin-xl").save_pretrained(str(folder), safe_serialization=True)
    cfg_file = folder / "tokenizer_2" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model_max_length"] = 4
    cfg_file.write_text(json.dumps(cfg))
    bank = tmp_path / "bank"
    assert cli.main(["train", "--model", str(folder), "--concepts", concepts[0], "--out", str(bank), *FAST]) == 2
    err = capsys.readouterr().err
    assert "cut off" in err and "of concept folder" in err and not bank.exists()    # refused before training
    cfg["model_max_length"] = 77
    cfg_file.write_text(json.dumps(cfg))
    assert cli.main(["train", "--model", str(folder), "--concepts", concepts[0], "--out", str(bank), *FAST,
                     "--samples-per-concept", "0"]) == 0
    assert _names(bank) == ["<alpha>"]


@pytest.mark.parametrize("model", ["builtin", "builtin-xl"])
def test_gradient_checkpointing_same_training_recomputed(tmp_path, concepts, model):
    """--gradient-checkpointing: the same bank (up to fp32 rounding); in a step every cross-attention runs again
    in backward, i.e. checkpointing is on (diffusers < 0.33 checkpoints only in training mode: a UNet in eval
    mode would silently keep every activation); the UNet is back in eval mode, not checkpointing, afterwards
    (the sample grids)."""
    args = ["train", "--model", model, "--concepts", *concepts, "--out"]
    fast = [*FAST, "--rank", "2", "--samples-per-concept", "0"]
    assert cli.main(args + [str(tmp_path / "a"), *fast]) == 0
    assert cli.main(args + [str(tmp_path / "b"), *fast, "--gradient-checkpointing"]) == 0
    # the same gradients up to the order of fp32 sums (the recomputed blocks' backward accumulates differently)
    _assert_same_banks(tmp_path / "a", tmp_path / "b", exact=False)

    def attn2_calls(checkpointing):
        pipe, cl = _patched_builtin(model)
        calls = [0]
        for name, m in pipe.unet.named_modules():
            if name.endswith("attn2"):
                m.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        cli.train_concept(pipe, cl, torch.zeros(2, 4, 8, 8), None, "a photo of <c1>", steps=1, lr=1e-3,
                          batch_size=2, generator=torch.Generator().manual_seed(0),
                          gradient_checkpointing=checkpointing)
        assert not pipe.unet.training
        assert not any(getattr(m, "gradient_checkpointing", False) for m in pipe.unet.modules())
        return calls[0], len(cl.sites) // 2

    # checkpointed: every cross-attention runs again in backward (its activations were not kept)
    assert attn2_calls(False) == (attn2_calls(False)[1],) * 2
    n, layers = attn2_calls(True)
    assert n == 2 * layers


def test_non_finite_loss_stops_before_the_optimizer_step():
    """A non-finite loss (here NaN latents) raises NonFiniteLoss naming the step and the terms, and the concept's
    parameters are as they were: the check runs before the optimizer step (it reads the step's numbers once,
    after backward is queued)."""
    pipe, cl = _patched_builtin("builtin")
    before = [p.detach().clone() for p in cl.trainable_parameters()]
    seen = []
    with pytest.raises(cli.NonFiniteLoss, match=r"non-finite loss at step 0 \(diffusion nan, penalty 0.0\)"):
        cli.train_concept(pipe, cl, torch.full((2, 4, 8, 8), float("nan")), None, "a photo of <c1>", steps=2,
                          lr=1e-3, batch_size=1, generator=torch.Generator().manual_seed(0),
                          on_step=lambda *a: seen.append(a))
    assert seen == [] and all(torch.equal(p, q) for p, q in zip(cl.trainable_parameters(), before))


@pytest.mark.parametrize("pos, max_rows, want", [
    (2, 8, [0, 1, 2]), (7, 8, list(range(8))), (99, 8, [0, 14, 28, 42, 57, 71, 85, 99]), (99, 2, [0, 99]),
    (5, 1, [5]), (4, 0, [0, 1, 2, 3, 4]), (500, 0, list(range(501)))])
def test_grid_concepts(pos, max_rows, want):
    assert cli.grid_concepts(pos, max_rows) == want
    for p in range(1, 60):                       # always the newest, the first when there is room, no repeats
        for n in range(1, 10):
            got = cli.grid_concepts(p, n)
            assert len(got) == min(n, p + 1) and got[-1] == p and (n == 1 or got[0] == 0)
            assert got == sorted(set(got))


def test_sample_every_and_grid_rows(tmp_path, capsys):
    """--sample-every 2 --grid-rows 2 on three concepts: grids after the 2nd and the last (3rd) concept only,
    each of two rows (the 3rd's: the first and the newest concept)."""
    folders = [_concept(tmp_path / "data", n, seed=i) for i, n in enumerate(("a1", "b2", "c3"))]
    bank = tmp_path / "bank"
    assert cli.main(["train", "--concepts", *folders, "--out", str(bank), *FAST, "--rank", "2",
                     "--sample-every", "2", "--grid-rows", "2"]) == 0
    grids = sorted(p.name for p in (tmp_path / "bank_samples").glob("*.png"))
    assert grids == ["after_02_b2.png", "after_03_c3.png"]
    for g in grids:
        with Image.open(tmp_path / "bank_samples" / g) as im:
            assert im.size[1] == 2 * 16
    # the rows of the last grid are concepts 1 and 3: the same images as their rows in a full grid
    full = tmp_path / "full"
    assert cli.main(["train", "--concepts", *folders, "--out", str(full), *FAST, "--rank", "2",
                     "--sample-every", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "full_samples").glob("*.png")) == ["after_03_c3.png"]
    a = np.asarray(Image.open(tmp_path / "bank_samples" / "after_03_c3.png"))
    b = np.asarray(Image.open(tmp_path / "full_samples" / "after_03_c3.png"))
    assert b.shape[0] == 3 * 16
    assert np.array_equal(a[:16], b[:16]) and np.array_equal(a[16:], b[32:])


# --------------------------------------------------------------------------- --checkpoint-every


CKPT = [*FAST, "--rank", "2", "--samples-per-concept", "0", "--steps", "5", "--checkpoint-every", "2"]


def _crash_at(monkeypatch, at, calls=None):
    def hook(pos, step):
        if calls is not None:
            calls.append((pos, step))
        if (pos, step) == at:
            raise RuntimeError("boom: simulated crash")

    monkeypatch.setattr(cli, "STEP_HOOK", hook)


@pytest.mark.parametrize("crash", [(0, 4), (1, 4)])
def test_checkpoint_every_resumes_mid_concept_to_the_same_bank(tmp_path, concepts, monkeypatch, capsys, crash):
    """A run stopped mid-concept goes on from the concept's last checkpoint (its factors, token rows, AdamW
    moments, data generator, loss EMA) and ends with the bank an uninterrupted run writes, bit for bit; also in
    the first concept, before the bank's first save.  The checkpoint file is gone once the concept is saved."""
    argv = ["train", "--concepts", *concepts, *CKPT]
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert not (tmp_path / "a" / cli.RESUME_FILE).exists()
    bank = tmp_path / "b"
    _crash_at(monkeypatch, crash)
    with pytest.raises(RuntimeError, match="boom"):
        cli.main([*argv, "--out", str(bank)])
    assert (bank / cli.RESUME_FILE).is_file()              # steps 0-1 and 2-3 checkpointed, then the crash
    capsys.readouterr()
    if crash[0] == 0:                                      # no bank yet: info says what is there
        assert cli.main(["info", str(bank)]) == 1
        err = capsys.readouterr().err
        assert "manifest.json is missing" in err and "checkpoint of <alpha> at step 4 of 5" in err
    else:
        assert cli.main(["info", str(bank)]) == 0
        assert "training checkpoint: <beta> (concept 2 of the train run) at step 4 of 5" in capsys.readouterr().out
        assert cli.main(["info", str(bank), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["checkpoint"] == {"token": "<beta>", "position": 1, "step": 4,
                                                                     "steps": 5}
    calls = []
    _crash_at(monkeypatch, None, calls)
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(bank)]) == 0
    token = ["<alpha>", "<beta>"][crash[0]]
    assert f"resuming {token} at step 4 of 5 from its checkpoint" in capsys.readouterr().out
    assert calls[0] == (crash[0], 4)                       # steps 0-3 of that concept are not run again
    _assert_same_banks(tmp_path / "a", bank)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (bank / "manifest.json").read_bytes()
    assert not (bank / cli.RESUME_FILE).exists()


def test_checkpoint_that_cannot_be_used(tmp_path, concepts, monkeypatch, capsys):
    """A checkpoint with other settings is refused (--allow-new-settings: trained again from its first step); a
    damaged one, or one from before the bank changed, is not used (a note says so): the concept starts over."""
    argv = ["train", "--concepts", *concepts, *CKPT]
    ref = tmp_path / "ref"
    assert cli.main([*argv, "--out", str(ref)]) == 0
    bank = tmp_path / "bank"

    def crashed():
        import shutil
        shutil.rmtree(bank, ignore_errors=True)
        _crash_at(monkeypatch, (1, 3))
        with pytest.raises(RuntimeError, match="boom"):
            cli.main([*argv, "--out", str(bank)])
        monkeypatch.setattr(cli, "STEP_HOOK", None)
        capsys.readouterr()

    crashed()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"beta": "a picture of {token}"}))      # <beta> only: <alpha> is finished
    assert cli.main([*argv, "--out", str(bank), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint of <beta> at step 2" in err and "'a photo of <beta>'" in err and "--allow-new-settings" in err
    assert cli.main([*argv, "--out", str(bank), "--prompts", str(prompts), "--allow-new-settings"]) == 0
    assert "is not used (other settings (prompt))" in capsys.readouterr().out

    crashed()
    f = bank / cli.RESUME_FILE
    f.write_bytes(f.read_bytes()[:100])
    assert cli.main([*argv, "--out", str(bank)]) == 0
    assert "cannot be read" in capsys.readouterr().out
    _assert_same_banks(ref, bank)

    crashed()
    m = json.loads((bank / "manifest.json").read_text())
    (bank / "manifest.json").write_text(json.dumps(m))       # the same bank, rewritten (e.g. by another tool)
    assert cli.main([*argv, "--out", str(bank)]) == 0
    assert "not used (the bank changed since it was written)" in capsys.readouterr().out
    _assert_same_banks(ref, bank)


def test_resume_file_round_trip(tmp_path):
    """What a checkpoint holds comes back exactly: parameters, AdamW's moments and step, each process's own
    generator, the EMA (repr of a float), fp16's loss-scaler state."""
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.square().sum() for p in params).backward()
    opt.step()
    gen = torch.Generator().manual_seed(7)
    torch.randn(3, generator=gen)

    class Scaler:
        def state_dict(self):
            return {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                    "_growth_tracker": 17}

    settings = {"steps": 9, "lr": 1e-3, "prompt": "a photo of <x>"}
    cli._write_resume(tmp_path, pos=2, token="<x>", steps_done=4, ema=0.1 + 0.2, params=params, optimizer=opt,
                      generators=[gen.get_state()], settings=settings, bank="abc", scaler=Scaler())
    (tmp_path / "manifest.json").write_text("{}")
    notes = []
    assert cli._read_resume(tmp_path, pos=2, token="<x>", settings=settings, params=params, allow_new=False,
                            log=notes.append) is None                      # written on another bank
    assert "the bank changed" in notes[-1]
    cli._write_resume(tmp_path, pos=2, token="<x>", steps_done=4, ema=0.1 + 0.2, params=params, optimizer=opt,
                      generators=[torch.Generator().manual_seed(1).get_state(), gen.get_state()], settings=settings,
                      bank=cli._manifest_sig(tmp_path), scaler=Scaler())
    assert cli._read_resume(tmp_path, pos=2, token="<x>", settings=settings, params=params, allow_new=False,
                            log=notes.append) is None                      # made by 2 processes, read by 1
    assert "made by a run of 2 process(es), this one has 1" in notes[-1]
    got = cli._read_resume(tmp_path, pos=2, token="<x>", settings=settings, params=params, allow_new=False,
                           log=notes.append, process=(1, 2))               # process 1 of 2: its own generator
    assert got["step"] == 4 and got["ema"] == 0.1 + 0.2 and got["scaler"] == Scaler().state_dict()
    assert all(torch.equal(a, b) for a, b in zip(got["params"], params))
    assert torch.equal(got["generator"], gen.get_state())
    want = opt.state_dict()["state"]
    assert got["optimizer"].keys() == want.keys()
    for i in want:
        assert sorted(got["optimizer"][i]) == sorted(want[i])
        for k in want[i]:
            assert torch.equal(torch.as_tensor(got["optimizer"][i][k]), torch.as_tensor(want[i][k])), (i, k)
    # another concept's checkpoint (one that finished since) is silently stale; a later step than --steps is not used
    assert cli._read_resume(tmp_path, pos=3, token="<y>", settings=settings, params=params, allow_new=False,
                            log=notes.append, process=(1, 2)) is None
    assert cli._read_resume(tmp_path, pos=2, token="<x>", settings=dict(settings, steps=4), params=params,
                            allow_new=True, log=notes.append, process=(1, 2)) is None
    assert "other settings (steps)" in notes[-1]


def test_a_model_folder_without_safetensors_is_a_clear_error(tmp_path, two_concept_bank, capsys):
    """Weights in pickle (.bin) files are never loaded: the error names the missing safetensors file and says how
    to convert."""
    from clora_fast.builtin import build_pipeline

    folder = tmp_path / "bin_model"
    build_pipeline().save_pretrained(str(folder), safe_serialization=False)
    assert cli.main(["sample", "--bank", str(two_concept_bank), "--model", str(folder), "--prompt", "a photo of "
                     "<alpha>", "--out", str(tmp_path / "x.png"), *SAMPLE_FAST]) == 2
    err = capsys.readouterr().err
    assert f"model {str(folder)!r}" in err and "safetensors only, never pickle" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_training_target_follows_the_prediction_type(prediction, monkeypatch):
    """The loss compares the UNet's output with the noise (epsilon models: SD 1.x, SDXL) or with the velocity
    sqrt(a) noise - sqrt(1 - a) x0 (v-prediction models: SD 2.x 768)."""
    from diffusers import DDPMScheduler
    import torch.nn.functional as F

    pipe, cl = _patched_builtin("builtin")
    sched = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction)
    seen = {}
    add_noise, mse = sched.add_noise, F.mse_loss

    def recording_add_noise(lat, noise, t):
        seen["lat"], seen["noise"], seen["t"] = lat, noise, t
        return add_noise(lat, noise, t)

    def recording_mse(pred, target):
        seen["target"] = target
        return mse(pred, target)

    monkeypatch.setattr(sched, "add_noise", recording_add_noise)
    monkeypatch.setattr(F, "mse_loss", recording_mse)
    cli.train_concept(pipe, cl, torch.randn(2, 4, 8, 8), None, "a photo of <c1>", steps=1, lr=1e-3, batch_size=2,
                      generator=torch.Generator().manual_seed(0), noise_scheduler=sched)
    a = sched.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1)
    want = seen["noise"] if prediction == "epsilon" else a.sqrt() * seen["noise"] - (1 - a).sqrt() * seen["lat"]
    torch.testing.assert_close(seen["target"], want)
    assert not torch.allclose(seen["noise"], a.sqrt() * seen["noise"] - (1 - a).sqrt() * seen["lat"])


# --------------------------------------------------------------------------- export


def _latents(pipe, prompt):
    return pipe(prompt, num_inference_steps=2, guidance_scale=1.0, output_type="latent", height=16, width=16,
                generator=torch.Generator().manual_seed(3)).images


def test_export_pipeline_and_lora_reproduce_the_bank(tmp_path, two_concept_bank, capsys):
    """clora-fast export: a plain diffusers pipeline (no clora_fast needed to load it) and LoRA + textual-inversion
    files, each denoising exactly as the builtin model with the bank loaded and merged."""
    import clora_fast
    from diffusers import StableDiffusionPipeline
    from clora_fast.builtin import build_pipeline

    prompt = "a photo of <alpha> and <beta>"
    ref = build_pipeline()
    clora_fast.load(ref, str(two_concept_bank), backend="reference").merge()
    want = _latents(ref, prompt)

    assert cli.main(["export", "--bank", str(two_concept_bank), "--out", str(tmp_path / "pipe")]) == 0
    assert "concepts ['<alpha>', '<beta>']" in capsys.readouterr().out
    plain = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), safety_checker=None)
    plain.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_latents(plain, prompt), want, rtol=1e-5, atol=1e-6)

    pytest.importorskip("peft")
    out = tmp_path / "lora"
    assert cli.main(["export", "--bank", str(two_concept_bank), "--out", str(out), "--format", "lora"]) == 0
    listing = json.loads((out / "concepts.json").read_text())
    assert listing["concepts"] == [{"token": "<alpha>", "file": "alpha.safetensors"},
                                   {"token": "<beta>", "file": "beta.safetensors"}]
    fresh = build_pipeline()
    fresh.load_lora_weights(str(out), weight_name=listing["lora"])
    fresh.load_textual_inversion([str(out / c["file"]) for c in listing["concepts"]])
    torch.testing.assert_close(_latents(fresh, prompt), want, rtol=1e-4, atol=1e-5)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    # --per-concept: each concept's LoRA as its own adapter; at weights 1 / 1 the merged model, at 1 / 0 the bank
    # without <beta>
    assert cli.main(["export", "--bank", str(two_concept_bank), "--out", str(tmp_path / "pipe2"),
                     "--per-concept"]) == 2
    assert "--per-concept writes LoRA files" in capsys.readouterr().err
    out = tmp_path / "each"
    assert cli.main(["export", "--bank", str(two_concept_bank), "--out", str(out), "--format", "lora",
                     "--per-concept"]) == 0
    listing = json.loads((out / "concepts.json").read_text())
    assert [c["lora"] for c in listing["concepts"]] == ["loras/alpha.safetensors", "loras/beta.safetensors"]
    each = build_pipeline()
    for c in listing["concepts"]:
        each.load_lora_weights(str(out / "loras"), weight_name=c["lora"].split("/")[1], adapter_name=c["file"][:-12])
    each.load_textual_inversion([str(out / c["file"]) for c in listing["concepts"]])
    each.set_adapters(["alpha", "beta"], adapter_weights=[1.0, 1.0])
    torch.testing.assert_close(_latents(each, prompt), want, rtol=1e-4, atol=1e-5)
    both = _latents(each, "a photo of <alpha>")
    each.set_adapters(["alpha", "beta"], adapter_weights=[1.0, 0.0])
    assert (_latents(each, "a photo of <alpha>") - both).abs().max() > 1e-4      # <beta>'s weights count
    without = build_pipeline()
    cl = clora_fast.load(without, str(two_concept_bank), backend="reference")
    cl.remove_concept(1)
    cl.merge()
    torch.testing.assert_close(_latents(each, "a photo of <alpha>"), _latents(without, "a photo of <alpha>"),
                               rtol=1e-4, atol=1e-5)


def test_export_refusals_and_an_unfinished_concept(tmp_path, two_concept_bank, capsys):
    """An existing non-empty --out is refused before anything is loaded; a bank saved mid-concept exports its
    finished concepts only (with a note)."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert cli.main(["export", "--bank", str(two_concept_bank), "--out", str(busy)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    import clora_fast
    from clora_fast.builtin import build_pipeline

    bank = _copy_bank(two_concept_bank, tmp_path / "bank")
    pipe = build_pipeline()
    cl = clora_fast.load(pipe, str(bank), backend="reference")
    cl.begin_concept("<gamma>")
    cl.save(str(bank))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["export", "--bank", str(bank), "--out", str(empty), "--format", "lora"]) == 0
    cap = capsys.readouterr()
    assert "unfinished concept '<gamma>'" in cap.err and "concepts ['<alpha>', '<beta>']" in cap.out
    assert sorted(p.name for p in empty.iterdir()) == ["alpha.safetensors", "beta.safetensors", "concepts.json",
                                                      "pytorch_lora_weights.safetensors"]


def test_export_lora_file_names_never_collide(tmp_path, capsys):
    """Two tokens that sanitize to one file name get two files (the second suffixed with its index); concepts
    without a token (a bank saved from a bare UNet) get none."""
    import warnings

    import clora_fast
    from clora_fast.builtin import build_pipeline

    g = torch.Generator().manual_seed(0)

    def learn(ctrl, name):          # a concept with random (non-zero) factors, without training
        ctrl.begin_concept(name)
        with torch.no_grad():
            for p in ctrl.trainable_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ctrl.end_concept()

    pipe = build_pipeline()
    cl = clora_fast.patch(pipe, rank=2, backend="reference")
    for name in ("<c_1>", "<c*1>"):
        learn(cl, name)
    cl.save(str(tmp_path / "bank"))
    out = tmp_path / "lora"
    assert cli.main(["export", "--bank", str(tmp_path / "bank"), "--out", str(out), "--format", "lora"]) == 0
    listing = json.loads((out / "concepts.json").read_text())["concepts"]
    assert listing == [{"token": "<c_1>", "file": "c_1.safetensors"}, {"token": "<c*1>", "file": "c_1-1.safetensors"}]
    a, b = (load_file(str(out / c["file"])) for c in listing)
    assert list(a) == ["<c_1>"] and list(b) == ["<c*1>"] and not torch.equal(a["<c_1>"], b["<c*1>"])
    # a bank saved from a bare UNet has no token embeddings: the LoRA file only, "file": null in the listing
    unet_only = build_pipeline()
    cu = clora_fast.patch(unet_only.unet.requires_grad_(False), rank=2, backend="reference")
    learn(cu, "<u>")
    cu.save(str(tmp_path / "bare"))
    assert cli.main(["export", "--bank", str(tmp_path / "bare"), "--out", str(tmp_path / "bare_lora"),
                     "--format", "lora"]) == 0
    listing = json.loads((tmp_path / "bare_lora" / "concepts.json").read_text())["concepts"]
    assert listing == [{"token": "<u>", "file": None}]
    assert sorted(p.name for p in (tmp_path / "bare_lora").iterdir()) == ["concepts.json",
                                                                          "pytorch_lora_weights.safetensors"]


def _builtin_sites():
    from clora_fast.builtin import load_pipeline
    from clora_fast.integrations import diffusers as D
    cl = D.patch(load_pipeline("builtin", device="cpu"), rank=1, backend="reference")
    return [(s.name, s.in_features, s.out_features) for s in cl.sites]


def test_import_an_sdxl_kohya_lora_into_a_builtin_xl_bank_and_export_it(tmp_path, capsys):
    """`import --model builtin-xl` of a LoRA as kohya's SDXL files are written: UNet keys named after the original
    Stable Diffusion modules (lora_unet_input_blocks_2_1_..., middle_block_1, output_blocks_N_1; fp16 with .alpha)
    beside text-encoder keys (lora_te1_ / lora_te2_).  Refused, naming those modules, and no bank is written;
    with --ignore-other-modules the bank's past is (alpha / rank) up @ down at every site.  `export --format kohya`
    writes it back under the same key stems, and diffusers' SDXL pipeline loads that file to what the bank
    denoises to."""
    from safetensors.torch import save_file
    import clora_fast
    from clora_fast.builtin import build_pipeline
    from clora_fast.integrations import diffusers as D

    cl = clora_fast.patch(build_pipeline("builtin-xl"), rank=2, backend="reference")
    aliases = D.get_adapter(cl.adapter.unet).lora_module_aliases()
    g = torch.Generator().manual_seed(0)
    lora, want = {}, {}
    for site in cl.sites:
        (alias,) = aliases[site.name]
        k = "lora_unet_" + alias.replace(".", "_")
        down = (torch.randn(2, site.in_features, generator=g) * 0.1).half()
        up = (torch.randn(site.out_features, 2, generator=g) * 0.1).half()
        lora.update({f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(1.0)})
        want[site.name] = 0.5 * up.double() @ down.double()
    assert any("input_blocks" in k for k in lora) and any("middle_block_1" in k for k in lora)
    for te in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1"):
        lora.update({f"{te}.lora_down.weight": torch.zeros(2, 8), f"{te}.lora_up.weight": torch.zeros(8, 2)})
    save_file(lora, str(tmp_path / "xl_style.safetensors"))
    bank = tmp_path / "bank"
    argv = ["import", str(bank), str(tmp_path / "xl_style.safetensors"), "--model", "builtin-xl", "--rank", "2"]
    assert cli.main(argv) == 2
    assert "also adapts 2 module(s) that are not C-LoRA sites (e.g. ['lora_te1_text_model" in capsys.readouterr().err
    assert not bank.exists()
    assert cli.main(argv[:-1] + ["1", "--ignore-other-modules"]) == 2
    assert "more than the controller's rank 1; create the bank with --rank 2 or more" in capsys.readouterr().err
    assert not bank.exists()
    assert cli.main(argv + ["--ignore-other-modules"]) == 0
    (c,) = _manifest(bank)["concepts"]
    assert (c["name"], c["source"]) == ("<xl_style>", "xl_style.safetensors")
    ref = build_pipeline("builtin-xl")
    again = clora_fast.load(ref, bank, backend="reference")
    for i, site in enumerate(again.sites):
        torch.testing.assert_close(again.past(i).double(), want[site.name], rtol=0, atol=1e-6)

    out = tmp_path / "out"
    assert cli.main(["export", "--bank", str(bank), "--model", "builtin-xl", "--out", str(out),
                     "--format", "kohya", "--per-concept"]) == 0
    printed = capsys.readouterr().out
    assert "kohya_lora.safetensors (pipe.load_lora_weights, kohya keys)" in printed, printed
    listing = json.loads((out / "concepts.json").read_text())
    assert listing["lora"] == "kohya_lora.safetensors" and listing["text_encoders"] == 2
    got = load_file(str(out / "kohya_lora.safetensors"))
    assert sorted(got) == sorted(k for k in lora if k.startswith("lora_unet_"))
    (c,) = listing["concepts"]
    own = load_file(str(out / c["lora"]))                  # the one concept's own file: the same tensors
    assert own.keys() == got.keys() and all(torch.equal(own[k], got[k]) for k in got)
    assert all(float(v) == 2.0 for k, v in got.items() if k.endswith(".alpha"))
    for site in again.sites:
        k = "lora_unet_" + aliases[site.name][0].replace(".", "_")
        torch.testing.assert_close(got[f"{k}.lora_up.weight"].double() @ got[f"{k}.lora_down.weight"].double(),
                                   want[site.name], rtol=0, atol=1e-6)
    pytest.importorskip("peft")
    again.merge()
    fresh = build_pipeline("builtin-xl")
    fresh.load_lora_weights(str(out), weight_name=listing["lora"])
    denoised = _latents(ref, "a photo")
    torch.testing.assert_close(_latents(fresh, "a photo"), denoised, rtol=1e-4, atol=1e-5)
    assert (_latents(build_pipeline("builtin-xl"), "a photo") - denoised).abs().max() > 1e-3    # the LoRA counts


def test_import_a_lora_then_train_after_it(tmp_path, concepts, capsys):
    """`import` adds a LoRA file to a new bank (created with --rank) as a finished, imported concept (info says
    so); `train` on that bank learns its --concepts after it (the imported concept is not one of them) and its
    rerun resumes; refusals (rank, other modules, pickle, busy bank) exit 2 and leave the bank as it was."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    sites = _builtin_sites()
    lora = {}
    for name, n_in, n_out in sites:
        lora[f"unet.{name}.lora_A.weight"] = torch.randn(2, n_in, generator=g) * 0.1
        lora[f"unet.{name}.lora_B.weight"] = torch.randn(n_out, 2, generator=g) * 0.1
    save_file(lora, str(tmp_path / "style.safetensors"))
    extra = dict(lora, **{"text_encoder.x.lora_A.weight": torch.zeros(2, 4),
                          "text_encoder.x.lora_B.weight": torch.zeros(4, 2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    torch.save(lora, str(tmp_path / "style.pt"))
    save_file({k: torch.cat([v, v], 0 if k.endswith("lora_A.weight") else 1) for k, v in lora.items()},
              str(tmp_path / "rank4.safetensors"))
    bank = tmp_path / "bank"

    assert cli.main(["import", str(bank), str(tmp_path / "style.safetensors"), "--rank", "2", "--scale", "0.5"]) == 0
    (c,) = _manifest(bank)["concepts"]
    assert (c["name"], c["scale"], c["source"]) == ("<style>", 0.5, "style.safetensors")
    assert cli.main(["info", str(bank), "--verify"]) == 0
    assert "imported from style.safetensors" in capsys.readouterr().out

    before = _manifest(bank)
    for argv, msg in (([str(tmp_path / "extra.safetensors")], "Pass --ignore-other-modules"),
                      ([str(tmp_path / "style.pt")], "safetensors only"),
                      ([str(tmp_path / "style.safetensors"), "--rank", "4"], "has --rank 2, not 4"),
                      ([str(tmp_path / "rank4.safetensors")], "more than the controller's rank 2: import it into a "
                                                              "new bank made with --rank 4 or more"),
                      ([str(tmp_path / "style.safetensors")], "'<style>' already exists")):
        assert cli.main(["import", str(bank), *argv]) == 2
        assert msg in capsys.readouterr().err
    assert _manifest(bank) == before

    clash = _concept(tmp_path / "data", "style", seed=3)
    assert cli.main(["train", "--concepts", clash, "--out", str(bank), *FAST, "--rank", "2"]) == 2
    assert "the token '<style>' is the name of concept 0 of the bank" in capsys.readouterr().err
    argv = ["train", "--concepts", concepts[0], "--out", str(bank), *FAST, "--rank", "2"]
    assert cli.main(argv) == 0
    assert _names(bank) == ["<style>", "<alpha>"]
    assert cli.main(["info", str(bank), "--verify"]) == 0           # the stored past folds both
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "1 of 1 concepts already learned ['<alpha>'] (and imported: ['<style>'])" in capsys.readouterr().out
    assert _names(bank) == ["<style>", "<alpha>"]
