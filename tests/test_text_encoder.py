"""Frozen text encoders: the offline tokenizer, diffusers parity, truncation warnings, open_clip, loading offline."""

from __future__ import annotations

import json
import time
import types
import warnings

import pytest
import torch

from ldm.errors import UserError
from ldm.text import (
    FrozenTextEncoder,
    PromptTruncatedWarning,
    TextEncoderConfig,
    load_text_encoder,
    offline_clip_tokenizer,
    tiny_clip_text_encoder,
    tiny_clip_text_model,
)
from ldm.text.openclip import OpenCLIPTextEncoder
from ldm.text.tiny import tiny_open_clip_model, tiny_open_clip_model_cfg

PROMPTS = [
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "An Astronaut Riding A Horse On Mars, trending on ArtStation",
    "",
    "   lots   of\twhite\nspace   ",
    "punctuation!!! ??? ... --- ;;; (brackets) [square] {curly} <angle>",
    "numbers 0 1 2 3 42 1999 3.14159 -7 1e10 100%",
    "it's, don't, we're, they've, I'm, you'll, he'd",
    "café crème brûlée, naïve façade",
    "日本語のテキスト 東京タワー",
    "emoji 🐱🚀🔥 and symbols © ® ™ € £ ¥",
    "Ünïcödé ÄÖÜ ß Œuvre Ångström",
    "русский текст, ελληνικά, עברית, العربية",
    "hello-world_snake_case camelCase kebab-case",
    "email me@example.com url https://example.org/a?b=c#d",
    "a 4k hdr photo, 8k uhd, f/1.8, 35mm, iso 100",
    "(masterpiece:1.2), best quality, ((detailed)), [low quality]",
    "C++ and C# and F# are languages; so is Go.",
    "tabs\tand\r\nwindows line endings",
    "the quick brown fox jumps over the lazy dog " * 3,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "ALLCAPS MixedCase lowercase 123ABC abc123",
    "a red cube on a blue sphere, studio lighting, octane render " * 6,  # longer than 77 tokens
]


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


def _tiny_pipeline(text_encoder, tokenizer):
    """A StableDiffusionPipeline around the given text encoder; its U-Net and VAE are tiny and never run."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ------------------------------------------------------------------------------------------------ tokenizer


def test_offline_tokenizer_matches_open_clip(tmp_path, open_clip_tokenizer):
    tokenizer = offline_clip_tokenizer(tmp_path / "tok")  # built from scratch here
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    for prompt in PROMPTS:
        reference = open_clip_tokenizer.encode(prompt)  # content tokens, no start/end/padding
        assert tokenizer(prompt, add_special_tokens=False).input_ids == reference, prompt
    # padded and truncated to 77 like open_clip, which pads with 0 (see tokenize_prompts' pad_id)
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = tokens.input_ids.masked_fill(tokens.attention_mask == 0, 0)
    assert torch.equal(ids, open_clip_tokenizer(PROMPTS))
    # the cached files are reused
    mtime = (tmp_path / "tok" / "vocab.json").stat().st_mtime_ns
    assert offline_clip_tokenizer(tmp_path / "tok")(PROMPTS[0]).input_ids == ids[0, :7].tolist()
    assert (tmp_path / "tok" / "vocab.json").stat().st_mtime_ns == mtime


def test_open_clip_encoder_cleans_prompts_like_open_clip(open_clip_tokenizer):
    # open_clip cleans prompts with ftfy and HTML unescaping before tokenizing; transformers' CLIPTokenizer does not
    tricky = [
        "fish &amp; chips &lt;3",
        "“curly quotes” and ‘single’",
        "ﬁne ligatures",
        "ｆｕｌｌｗｉｄｔｈ １２３",
        "mojibake cafÃ©",
        "wow!!! ! !!",
    ]
    encoder = OpenCLIPTextEncoder(tiny_open_clip_model())
    assert torch.equal(encoder.tokenize(tricky), open_clip_tokenizer(tricky))
    plain = offline_clip_tokenizer()
    assert plain("fish &amp; chips", add_special_tokens=False).input_ids != open_clip_tokenizer.encode(
        "fish &amp; chips"
    )


def test_truncation_warns_naming_dropped_words():
    encoder = tiny_clip_text_encoder()
    prompt = "a photo of " + "cat " * 80 + "in the style of van gogh"
    with pytest.warns(PromptTruncatedWarning) as record:
        ids = encoder.tokenize([prompt, "a short prompt"])
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith("prompt truncated to 77 tokens")
    assert "in the style of van gogh" in message and "a photo of" not in message
    assert ids.shape == (2, 77) and ids[0, -1] == 49407
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encoder.encode(["a short prompt"]).shape == (1, 77, 32)


# ------------------------------------------------------------------------------------------------ diffusers parity


@pytest.mark.parametrize("layer", ["last", "penultimate"])
@pytest.mark.filterwarnings("ignore::ldm.text.PromptTruncatedWarning")
def test_matches_diffusers_encode_prompt(layer):
    model = tiny_clip_text_model(seed=1, layers=3)
    tokenizer = offline_clip_tokenizer()
    pipe = _tiny_pipeline(model, tokenizer)
    encoder = FrozenTextEncoder.from_clip(tokenizer, model, layer=layer)
    prompts = PROMPTS[:6] + PROMPTS[-2:]
    clip_skip = None if layer == "last" else 1
    if clip_skip and not hasattr(model, "text_model"):
        # diffusers 0.42 reads text_encoder.text_model.final_layer_norm in its clip_skip branch, a nesting that
        # transformers 5 removed (the branch raises AttributeError); alias it so diffusers' own code runs
        object.__setattr__(model, "text_model", types.SimpleNamespace(final_layer_norm=model.final_layer_norm))
    ours = encoder.encode(prompts)
    theirs, negative = pipe.encode_prompt(prompts, "cpu", 1, True, clip_skip=clip_skip)
    assert ours.shape == (len(prompts), 77, 32)
    assert torch.equal(ours, theirs)
    if layer == "last":  # diffusers' unconditional branch always uses the last layer, whatever clip_skip says
        assert torch.equal(encoder.empty_embedding(len(prompts)), negative)
    else:  # penultimate == diffusers' clip_skip=1, by hand: hidden_states[-2] then the final layer norm
        hidden = model(encoder.tokenize(prompts), output_hidden_states=True).hidden_states[-2]
        assert torch.equal(ours, model.final_layer_norm(hidden))
        assert not torch.equal(ours, encoder.from_clip(tokenizer, model).encode(prompts))


# ------------------------------------------------------------------------------------------------ frozen, dtypes, empty


def test_frozen_eval_and_no_grad():
    encoder = tiny_clip_text_encoder()
    assert not any(p.requires_grad for p in encoder.parameters())
    parent = torch.nn.ModuleDict({"text": encoder, "head": torch.nn.Linear(2, 2)}).train()
    assert parent["head"].training and not encoder.training and not encoder.model.training
    out = encoder.encode(["a cat"])
    assert not out.requires_grad and out.grad_fn is None
    # usable as input to a trained module's backward pass (it is not an inference-mode tensor)
    (torch.nn.Linear(32, 1)(out).sum()).backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    reference = tiny_clip_text_encoder(layer="penultimate").encode(["a cat", "a dog"])
    encoder = tiny_clip_text_encoder(layer="penultimate").to(dtype)
    out = encoder.encode(["a cat", "a dog"])
    assert out.dtype == dtype and out.shape == (2, 77, 32)
    assert torch.allclose(out.float(), reference, atol=0.1)


def test_empty_embedding_is_encode_of_empty_prompt():
    encoder = tiny_clip_text_encoder()
    empty = encoder.empty_embedding(3)
    assert empty.shape == (3, 77, 32)
    assert torch.equal(empty, encoder.encode([""] * 3))
    empty.zero_()  # a copy: the cache is untouched
    assert torch.equal(encoder.empty_embedding(1), encoder.encode([""]))
    encoder.to(torch.bfloat16)  # moving the weights drops the cache
    assert encoder.empty_embedding(2).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ open_clip


def test_open_clip_per_token_hidden_states(open_clip_tokenizer):
    model = tiny_open_clip_model(seed=0, layers=3)
    last = OpenCLIPTextEncoder(model, layer="last")
    penultimate = OpenCLIPTextEncoder(model, layer="penultimate")
    assert not hasattr(last, "visual") and not any(p.requires_grad for p in last.parameters())
    prompts = ["a photo of a cat", "", "A Dog!"]
    ids = last.tokenize(prompts)
    assert torch.equal(ids, open_clip_tokenizer(prompts))  # padded with 0 like open_clip
    h_last, h_pen = last(ids), penultimate(ids)
    assert h_last.shape == h_pen.shape == (3, 77, 32)
    assert not torch.allclose(h_last, h_pen)
    with torch.no_grad():
        # last: pooling our end-token states and projecting them is open_clip's own encode_text
        pooled = h_last[torch.arange(3), ids.argmax(dim=-1)] @ model.text_projection
        assert torch.allclose(pooled, model.encode_text(ids), atol=1e-6)
        # penultimate: open_clip's second-to-last block output, through ln_final
        inter = model.forward_intermediates(
            text=ids, text_indices=2, normalize_intermediates=True, intermediates_only=True
        )["text_intermediates"]
        assert torch.allclose(h_pen, inter[0], atol=1e-6) and torch.allclose(h_last, inter[1], atol=1e-6)
    assert penultimate.to(torch.bfloat16).encode(prompts).dtype == torch.bfloat16


def test_open_clip_loads_from_local_dir(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_open_clip_model_cfg()}))
    cfg = TextEncoderConfig(kind="open_clip", path=f"local-dir:{tmp_path}", layer="penultimate")
    encoder = load_text_encoder(cfg, dtype=torch.float16)
    assert encoder.hidden_size == 32 and encoder.context_length == 77
    assert encoder.encode(["a", "b"]).shape == (2, 77, 32)


# ------------------------------------------------------------------------------------------------ loading


def test_load_saved_clip_directory(tmp_path):
    model = tiny_clip_text_model(seed=3)
    tokenizer = offline_clip_tokenizer()
    model.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "diffusers" / "text_encoder")  # a diffusers model directory's layout
    tokenizer.save_pretrained(tmp_path / "diffusers" / "tokenizer")
    expected = FrozenTextEncoder.from_clip(tokenizer, model).encode(["a cat", ""])
    for folder in ("plain", "diffusers"):
        encoder = load_text_encoder(TextEncoderConfig(path=str(tmp_path / folder)))
        assert encoder.context_length == 77 and encoder.hidden_size == 32
        assert torch.equal(encoder.encode(["a cat", ""]), expected)
    model.save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(UserError, match="no tokenizer files"):
        load_text_encoder(TextEncoderConfig(path=str(tmp_path / "no_tokenizer")))
    with pytest.raises(UserError, match="holds no text encoder"):
        load_text_encoder(TextEncoderConfig(path=str(tmp_path)))
    with pytest.raises(UserError, match="does not exist"):
        load_text_encoder(TextEncoderConfig(path=str(tmp_path / "missing" / "dir")))


def test_hub_ids_fail_fast_offline():
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        load_text_encoder(TextEncoderConfig(path="openai/clip-vit-large-patch14"))
    assert str(error.value) == (
        "cannot load text encoder 'openai/clip-vit-large-patch14' from the Hugging Face hub (offline?): "
        "download it once or point text_encoder.path at a local directory"
    )
    with pytest.raises(UserError, match="offline"):
        load_text_encoder(TextEncoderConfig(kind="open_clip", path="ViT-H-14", pretrained="laion2b_s32b_b79k"))
    with pytest.raises(UserError, match="offline"):
        load_text_encoder(TextEncoderConfig(kind="open_clip", path="hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"))
    assert time.monotonic() - start < 10


def test_config_validation():
    TextEncoderConfig().validate()
    TextEncoderConfig(kind="open_clip", path="ViT-H-14", pretrained="laion2b_s32b_b79k", layer="penultimate").validate()
    with pytest.raises(UserError, match="text_encoder.pretrained"):
        TextEncoderConfig(pretrained="laion2b_s32b_b79k").validate()
    with pytest.raises(UserError, match="did you mean .*ViT-H-14"):
        TextEncoderConfig(kind="open_clip", path="ViT-H-41").validate()
    with pytest.raises(UserError, match="unknown-tag"):
        load_text_encoder(TextEncoderConfig(kind="open_clip", path="ViT-H-14", pretrained="unknown-tag"))


def test_tiny_model_is_deterministic():
    a, b = tiny_clip_text_model(seed=5), tiny_clip_text_model(seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(
        a.embeddings.token_embedding.weight, tiny_clip_text_model(seed=6).embeddings.token_embedding.weight
    )


def test_pickle_only_text_encoder_is_refused(tmp_path):
    """Only safetensors are loaded: a directory whose weights are a pickle (pytorch_model.bin) is refused."""
    encoder = tiny_clip_text_encoder()
    encoder.model.save_pretrained(tmp_path)
    encoder.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # transformers 5 always writes safetensors: make the pickle by hand
    torch.save(encoder.model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot load a CLIP text encoder"):
        load_text_encoder(TextEncoderConfig(path=str(tmp_path)))
