"""The builtin tiny SD / SDXL pipelines and the offline CLIP tokenizer."""
import gzip
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from clora_fast import builtin  # noqa: E402


def test_clip_vocab_layout():
    vocab, merges = builtin.clip_vocab_and_merges()
    assert len(vocab) == 49408
    assert len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0                      # first byte char
    assert vocab["!</w>"] == 256                # first byte char + </w>
    assert vocab["in"] == 512                   # first merge ("i n")
    assert merges[0] == "i n"
    assert len(set(vocab.values())) == 49408    # ids dense and unique
    assert sorted(vocab.values()) == list(range(49408))


@pytest.mark.parametrize(
    "text, ids",
    [
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        # ids of OpenAI CLIP's tokenizer (openai/clip-vit-large-patch14)
        ("hello world", [49406, 3306, 1002, 49407]),
        ("an astronaut riding a horse", [49406, 550, 18376, 6765, 320, 4558, 49407]),
        ("A PHOTO of a Dog.", [49406, 320, 1125, 539, 320, 1929, 269, 49407]),
    ],
)
def test_tokenizer_real_clip_ids(text, ids):
    tok = builtin.clip_tokenizer()
    assert tok(text).input_ids == ids
    assert tok.model_max_length == 77
    padded = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[: len(ids)] == ids and padded[-1] == 49407


def test_tokenizer_added_token_gets_next_id():
    tok = builtin.clip_tokenizer()
    assert tok.add_tokens(["<c1>"]) == 1
    ids = tok("a photo of <c1>").input_ids
    assert ids == [49406, 320, 1125, 539, 49408, 49407]
    # each build is fresh: tokens added to one do not leak into the next
    assert len(builtin.clip_tokenizer()) == 49408


def test_corrupt_merges_file_is_a_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "m.txt.gz"
    with gzip.open(bad, "wt") as f:
        f.write("#version: 0.2\ni n\n")
    monkeypatch.setattr(builtin, "MERGES_FILE", bad)
    builtin.clip_vocab_and_merges.cache_clear()
    try:
        with pytest.raises(ValueError, match="holds 1 merges, expected 48894"):
            builtin.clip_vocab_and_merges()
        monkeypatch.setattr(builtin, "MERGES_FILE", tmp_path / "missing.gz")
        builtin.clip_vocab_and_merges.cache_clear()
        with pytest.raises(FileNotFoundError, match="missing"):
            builtin.clip_vocab_and_merges()
    finally:
        monkeypatch.undo()
        builtin.clip_vocab_and_merges.cache_clear()


def test_builtin_pipeline_shape_and_determinism():
    pipe = builtin.build_pipeline()
    attn2 = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert len(attn2) == 7
    assert any(n.startswith("down_blocks") for n in attn2)
    assert any(n.startswith("mid_block") for n in attn2)
    assert any(n.startswith("up_blocks") for n in attn2)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == 49408
    assert pipe.safety_checker is None
    # bit-identical across builds, and the global RNG is not touched
    state = torch.random.get_rng_state()
    again = builtin.build_pipeline()
    assert torch.equal(state, torch.random.get_rng_state())
    for (k, a), (_, b) in zip(pipe.unet.state_dict().items(), again.unet.state_dict().items()):
        assert torch.equal(a, b), k
    other = builtin.build_pipeline(seed=1)
    w = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert not torch.equal(pipe.unet.state_dict()[w], other.unet.state_dict()[w])


def test_builtin_pipeline_samples_one_step():
    pipe = builtin.build_pipeline()
    out = pipe(
        "a photo of a cat",
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 32, 32, 3)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_build_pipeline_bad_inputs():
    with pytest.raises(ValueError, match="unknown builtin model 'nope'"):
        builtin.build_pipeline("nope")
    with pytest.raises(ValueError, match="dtype"):
        builtin.build_pipeline(dtype=torch.int32)


def test_load_pipeline_builtin_and_local_folder(tmp_path):
    pipe = builtin.load_pipeline("builtin")
    folder = tmp_path / "sd"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    loaded = builtin.load_pipeline(str(folder))
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    assert torch.equal(loaded.unet.state_dict()[k], pipe.unet.state_dict()[k])


def test_load_pipeline_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a builtin model"):
        builtin.load_pipeline(str(tmp_path / "nowhere"))
    (tmp_path / "notsd").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        builtin.load_pipeline(str(tmp_path / "notsd"))
    with pytest.raises(ValueError, match="--model"):
        builtin.load_pipeline("")


def test_shipped_configs_are_json_objects():
    for name, extra in (("builtin", ()), ("builtin-xl", ("text_encoder_2",))):
        folder = builtin.CONFIG_DIR / name
        for comp in ("unet", "vae", "text_encoder", "scheduler", "pipeline") + extra:
            with open(folder / f"{comp}.json") as f:
                assert isinstance(json.load(f), dict)
    assert builtin.builtin_names() == ["builtin", "builtin-xl"]


def test_builtin_xl_pipeline_shape_and_determinism():
    from diffusers import StableDiffusionXLPipeline

    pipe = builtin.build_pipeline("builtin-xl")
    assert type(pipe) is StableDiffusionXLPipeline
    attn2 = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert len(attn2) == 8 and {n.split(".")[0] for n in attn2} == {"down_blocks", "mid_block", "up_blocks"}
    te, te2, cfg = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.unet.config
    # SDXL's wiring: the UNet reads both encoders' states side by side, and its added embedding takes the
    # six size/crop time ids plus the second encoder's pooled projection
    assert cfg.cross_attention_dim == te.hidden_size + te2.hidden_size
    assert cfg.addition_embed_type == "text_time"
    assert pipe.unet.add_embedding.linear_1.in_features == 6 * cfg.addition_time_embed_dim + te2.projection_dim
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == te.vocab_size == te2.vocab_size == 49408
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.tokenizer_2("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    state = torch.random.get_rng_state()
    again = builtin.build_pipeline("builtin-xl")
    assert torch.equal(state, torch.random.get_rng_state())
    for part in ("unet", "text_encoder_2", "vae"):
        for (k, a), (_, b) in zip(getattr(pipe, part).state_dict().items(),
                                  getattr(again, part).state_dict().items()):
            assert torch.equal(a, b), (part, k)
    out = pipe("a photo of a cat", num_inference_steps=1, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (1, 32, 32, 3)


def test_load_pipeline_xl_folder_and_other_pipeline_classes(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = builtin.load_pipeline("builtin-xl")
    folder = tmp_path / "xl"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    loaded = builtin.load_pipeline(str(folder))
    assert type(loaded) is StableDiffusionXLPipeline
    assert loaded.tokenizer_2.pad_token == "!"
    for part in ("unet", "text_encoder", "text_encoder_2"):
        for (k, a), (_, b) in zip(getattr(loaded, part).state_dict().items(),
                                  getattr(pipe, part).state_dict().items()):
            assert torch.equal(a, b), (part, k)
    # a pipeline class the CLI cannot train (another UNet input layout, no text prompt, ...) is named
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLInpaintPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is a 'StableDiffusionXLInpaintPipeline'.*StableDiffusionXLPipeline"):
        builtin.load_pipeline(str(folder))
    (folder / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="model_index.json is not a JSON object"):
        builtin.load_pipeline(str(folder))


def test_load_pipeline_never_reads_pickle_weights(tmp_path, monkeypatch):
    """A folder whose weights are pickle (.bin) only is refused before diffusers reads anything (diffusers < 0.31
    falls back to pickle even with use_safetensors=True); safetensors beside a stale .bin is fine."""
    import diffusers

    pipe = builtin.build_pipeline()
    pipe.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    calls = []
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: calls.append(a)))
    with pytest.raises(ValueError, match=r"(text_encoder|unet|vae)/ holds its weights only as pickle .*never pickle"):
        builtin.load_pipeline(str(tmp_path / "bin"))
    assert calls == []
    monkeypatch.undo()
    pipe.save_pretrained(str(tmp_path / "bin"), safe_serialization=True)      # now both formats
    loaded = builtin.load_pipeline(str(tmp_path / "bin"))
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(loaded.unet.state_dict()[k], pipe.unet.state_dict()[k])
