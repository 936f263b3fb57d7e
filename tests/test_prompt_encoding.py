"""Prompt encoding: today's path kept bit for bit, 75-token chunks, A1111's emphasis math, clip skip, the CLI."""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import pytest
import torch
from conftest import run
from PIL import Image

from ldm.errors import UserError
from ldm.generate import main
from ldm.pipeline.metadata import format_parameters, parse_parameters
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.request import GenerationRequest
from ldm.text import CLIPTextEncoder, tiny_clip_text_encoder
from ldm.text.conditioning import Conditioning
from ldm.text.openclip import OpenCLIPTextEncoder
from ldm.text.prompt_encoding import (
    ClipSkipIgnoredWarning,
    PromptSyntaxWarning,
    apply_weights,
    chunk_input_ids,
    chunk_tokens,
    uses_open_clip_padding,
)
from ldm.text.prompt_encoding import encode_prompt as encode_conditioning
from ldm.text.prompt_encoding import encode_prompt_pair as encode_conditioning_pair
from ldm.text.prompt_syntax import parse_prompt
from ldm.text.tiny import tiny_open_clip_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def encode_prompt(encoder, prompt, clip_skip=1, what="prompt"):
    """The context alone (SD encoders give no pooled embedding)."""
    conditioning = encode_conditioning(encoder, prompt, clip_skip, what)
    assert conditioning.pooled is None
    return conditioning.context


def encode_prompt_pair(encoder, prompt, negative, clip_skip=1):
    cond, uncond = encode_conditioning_pair(encoder, prompt, negative, clip_skip)
    return cond.context, None if uncond is None else uncond.context

SHORT = [
    "a photo of a cat",
    "",
    "An Astronaut Riding A Horse On Mars, trending on ArtStation",
    "punctuation!!! ??? ... --- ;;; {curly} <angle> <lora:x:0.5>",
    "café crème brûlée, naïve façade &amp; “quotes”",
    "a red cube on a blue sphere, studio lighting, octane render " * 5,  # 71 tokens: still one chunk
]
# words that are one CLIP token each, so that N words are N tokens
WORDS = ["cat", "dog", "red", "blue", "house", "tree", "car", "sky", "sun", "moon", "river", "stone", "field", "road", "bird", "fish", "hill", "lake", "boat", "star"]


def _shift(layer_norm: torch.nn.LayerNorm) -> None:
    """A freshly initialised final layer norm (bias 0) makes the hidden states' mean ~0, so A1111's mean-restoring
    factor mean / mean' is ill-conditioned; trained CLIPs have a bias. Give the tiny encoders one."""
    with torch.no_grad():
        layer_norm.bias.copy_(torch.linspace(-0.2, 0.8, layer_norm.bias.numel()))


@pytest.fixture(scope="module")
def clip():
    encoder = tiny_clip_text_encoder(layers=3)
    _shift(encoder._final_layer_norm())
    return encoder


@pytest.fixture(scope="module")
def open_clip_model():
    model = tiny_open_clip_model(seed=0, layers=3)
    _shift(model.ln_final)
    return model


@pytest.fixture(scope="module", params=["clip", "open_clip"])
def encoder(request, clip, open_clip_model):
    return clip if request.param == "clip" else OpenCLIPTextEncoder(open_clip_model, layer="last")


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


# ------------------------------------------------------------------------------------------------ today's path


def test_short_unweighted_prompts_are_bit_identical_to_encode(encoder):
    for prompt in SHORT:
        (chunk,) = chunk_tokens(encoder, parse_prompt(prompt))
        assert torch.equal(chunk_input_ids(encoder, chunk), encoder.tokenize([prompt])), prompt
        assert torch.equal(encode_prompt(encoder, prompt), encoder.encode([prompt])), prompt
    assert all(len(encoder.token_ids([w])[0]) == 1 for w in WORDS)


def test_weight_one_is_the_plain_word(encoder):
    assert torch.equal(encode_prompt(encoder, "a (cat:1.0) on a mat"), encode_prompt(encoder, "a cat on a mat"))
    assert torch.equal(encode_prompt(encoder, "a (cat:1.0) on a mat"), encoder.encode(["a cat on a mat"]))
    assert not torch.equal(encode_prompt(encoder, "a (cat:1.1) on a mat"), encoder.encode(["a cat on a mat"]))


# ------------------------------------------------------------------------------------------------ chunks


def test_two_chunks_are_the_one_chunk_encodings_of_their_tokens(encoder):
    prompt = words(100)  # no comma: a plain cut after 75 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation warning for a chunked prompt
        z = encode_prompt(encoder, prompt)
    assert z.shape == (1, 154, encoder.hidden_size)
    assert torch.equal(z[:, :77], encoder.encode([words(75)]))
    assert torch.equal(z[:, 77:], encoder.encode([words(25, start=75)]))
    assert encode_prompt(encoder, words(75)).shape[1] == 77 and encode_prompt(encoder, words(76)).shape[1] == 154


def test_a_full_chunk_moves_the_words_after_its_last_comma_to_the_next_chunk(clip):
    def lengths(prompt):
        return [len(c.ids) for c in chunk_tokens(clip, parse_prompt(prompt))]

    # comma at token 70 of a full 75: the 4 words after it move on (A1111's backtrack window is 20 tokens)
    assert lengths(words(69) + ", " + words(30)) == [70, 30]
    assert lengths(words(50) + ", " + words(49)) == [75, 25]  # comma 25 tokens from the end: too far, plain cut
    assert lengths(words(74) + ", " + words(10)) == [75, 10]  # the comma is the 75th token: nothing to move
    z = encode_prompt(clip, words(69) + ", " + words(30, start=69))
    assert torch.equal(z[:, :77], clip.encode([words(69) + ","]))
    assert torch.equal(z[:, 77:], clip.encode([words(30, start=69)]))


def test_break_encodes_each_part_as_its_own_prompt(encoder):
    z = encode_prompt(encoder, "a red cat BREAK a blue dog BREAK")
    assert z.shape == (1, 154, encoder.hidden_size)
    assert torch.equal(z[:, :77], encoder.encode(["a red cat"]))
    assert torch.equal(z[:, 77:], encoder.encode(["a blue dog"]))
    long = chunk_tokens(encoder, parse_prompt(words(80) + " BREAK cat"))
    assert [len(c.ids) for c in long] == [75, 5, 1]


def test_prompt_and_negative_are_padded_to_the_same_chunks_with_the_empty_prompt(encoder):
    cond, uncond = encode_prompt_pair(encoder, words(100), "blurry")
    assert cond.shape == uncond.shape == (1, 154, encoder.hidden_size)
    assert torch.equal(uncond[:, :77], encoder.encode(["blurry"]))
    assert torch.equal(uncond[:, 77:], encoder.encode([""]))
    cond, uncond = encode_prompt_pair(encoder, "cat", "a BREAK b BREAK c")
    assert cond.shape[1] == uncond.shape[1] == 231 and torch.equal(cond[:, 77:154], encoder.encode([""]))
    cond, none = encode_prompt_pair(encoder, words(100), None)
    assert none is None and cond.shape[1] == 154


# ------------------------------------------------------------------------------------------------ weights


def test_weights_scale_hidden_states_then_restore_the_mean(encoder):
    """An independent computation on the unweighted hidden states: "a red car" with 'red' at 1.5 and 'car' at 0.8."""
    plain = encoder.encode(["a red car"]).double()  # (1, 77, D); ids: <start> a red car <end> padding
    w = torch.ones(77, dtype=torch.float64)
    w[2], w[3] = 1.5, 0.8
    scaled = plain * w[None, :, None]
    expected = scaled * (plain.mean() / scaled.mean())
    got = encode_prompt(encoder, "a (red:1.5) (car:0.8)")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double().mean(), plain.mean(), rtol=1e-5, atol=1e-7)  # the mean is restored
    # an unweighted token keeps its direction; only the common rescaling factor touches it
    factor = plain.mean() / scaled.mean()
    torch.testing.assert_close(got[0, 1].double(), plain[0, 1] * factor, rtol=1e-5, atol=1e-6)


def test_apply_weights_is_the_a1111_formula_and_keeps_the_dtype():
    z = torch.randn(1, 77, 8, dtype=torch.bfloat16)
    w = torch.ones(1, 77)
    w[0, 5] = 2.0
    out = apply_weights(z, w)
    assert out.dtype == torch.bfloat16
    ref = z.float() * w[..., None]
    ref = ref * (z.float().mean() / ref.mean())
    torch.testing.assert_close(out, ref.to(torch.bfloat16))
    assert torch.equal(apply_weights(z.float(), torch.ones(1, 77)), z.float())


def test_weights_in_the_second_chunk_leave_the_first_alone(clip):
    z = encode_prompt(clip, words(75) + " (cat:1.3) dog")
    assert torch.equal(z[:, :77], clip.encode([words(75)]))
    assert not torch.equal(z[:, 77:], clip.encode(["cat dog"]))


def test_unbalanced_brackets_warn_once_and_errors_raise(clip):
    with pytest.warns(PromptSyntaxWarning, match="prompt has 1 unclosed '\\('"):
        encode_prompt(clip, "a (cat")
    with pytest.raises(UserError, match="negative prompt: '\\(x:y\\)' is not a weight"):
        encode_prompt_pair(clip, "cat", "(x:y)")


# ------------------------------------------------------------------------------------------------ clip skip


def test_clip_skip_is_the_earlier_hidden_state_then_the_final_layer_norm(clip, open_clip_model):
    ids = clip.tokenize(["a red car"])
    with torch.no_grad():
        out = clip.model(ids, output_hidden_states=True)
        norm = clip._final_layer_norm()
        assert torch.equal(clip(ids, clip_skip=1), out.last_hidden_state)
        torch.testing.assert_close(clip(ids, clip_skip=2), norm(out.hidden_states[-2]))
        torch.testing.assert_close(clip(ids, clip_skip=3), norm(out.hidden_states[-3]))
    penultimate = CLIPTextEncoder(clip.tokenizer, clip.model, layer="penultimate")
    assert torch.equal(penultimate(ids), clip(ids, clip_skip=2))  # counts from the configured layer
    assert torch.equal(penultimate(ids, clip_skip=2), clip(ids, clip_skip=3))
    assert clip.max_clip_skip() == 3 and penultimate.max_clip_skip() == 2
    with pytest.raises(UserError, match=r"^clip skip 4 is out of range: this text encoder allows 1..3 \(3 layers"):
        clip(ids, clip_skip=4)
    last, pen = OpenCLIPTextEncoder(open_clip_model, "last"), OpenCLIPTextEncoder(open_clip_model, "penultimate")
    oids = last.tokenize(["a red car"])
    assert torch.equal(last(oids, clip_skip=2), pen(oids)) and torch.equal(last(oids, clip_skip=3), pen(oids, 2))
    # through prompt encoding too
    assert torch.equal(encode_prompt(clip, "a red car", clip_skip=2), penultimate.encode(["a red car"]))


def test_clip_skip_is_ignored_for_open_clip_encoders_as_in_a1111(clip, open_clip_model):
    # A1111's FrozenOpenCLIPEmbedderWithCustomWords (modules/sd_hijack_open_clip.py) never reads
    # CLIP_stop_at_last_layers: an SD 2.x "Clip skip: 2" PNG was conditioned as with clip skip 1
    open_clip = OpenCLIPTextEncoder(open_clip_model, "last")
    converted = CLIPTextEncoder(clip.tokenizer, clip.model, pad_id=0)  # an SD 2.x tower as a CLIPTextModel
    message = ("clip skip {} is ignored: this text encoder is an OpenCLIP one (SD 2.x), for which A1111 ignores Clip "
               "skip too; the prompt is encoded as with clip skip 1")
    for encoder in (open_clip, converted):
        assert uses_open_clip_padding(encoder)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cond, uncond = encode_prompt_pair(encoder, "a (red:1.2) car", "blurry", clip_skip=2)
            plain, plain_uncond = encode_prompt_pair(encoder, "a (red:1.2) car", "blurry")
            assert torch.equal(encode_prompt(encoder, "a car", clip_skip=5), encode_prompt(encoder, "a car"))
        # one line, once for the prompt and the negative prompt together
        assert [(w.category, str(w.message)) for w in caught] == [
            (ClipSkipIgnoredWarning, message.format(2)), (ClipSkipIgnoredWarning, message.format(5))]
        assert torch.equal(cond, plain) and torch.equal(uncond, plain_uncond)
    assert not uses_open_clip_padding(clip)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CLIP (SD 1.x) applies it, without a warning
        assert not torch.equal(encode_prompt(clip, "a car", clip_skip=2), encode_prompt(clip, "a car"))


def test_clip_skip_in_png_metadata():
    one = format_parameters(GenerationRequest(prompt="a cat", seed=1))
    assert "Clip skip" not in one and "clip_skip" not in parse_parameters(one)  # 1 is not written, as A1111 does
    two = format_parameters(GenerationRequest(prompt="a cat", seed=1, clip_skip=2))
    assert two.endswith(", Clip skip: 2") and parse_parameters(two)["clip_skip"] == 2
    a1111 = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model: m, Clip skip: 2"
    assert parse_parameters(a1111)["clip_skip"] == 2


# ------------------------------------------------------------------------------------------------ pipeline and CLI


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model  # tests/conftest.py: written once per session, read-only


@pytest.fixture(scope="module")
def pipe(model_dir):
    return Pipeline.from_pretrained(model_dir, device="cpu", dtype="fp32")


FAST = {"steps": 2, "sampler": "euler", "seed": 3, "height": 32, "width": 32, "show_progress": False}


def test_short_prompts_give_the_images_of_the_old_encoding_path(pipe, monkeypatch):
    new = pipe("a red car", "blurry", cfg=5.0, **FAST)

    # the pipeline's encoding before prompt syntax existed
    def old_path(encoder, prompt, negative, clip_skip=1, embeddings=None):
        return (Conditioning(encoder.encode([prompt])),
                None if negative is None else Conditioning(encoder.encode([negative])))

    monkeypatch.setattr("ldm.pipeline.pipeline.encode_prompt_pair", old_path)
    old = pipe("a red car", "blurry", cfg=5.0, **FAST)
    np.testing.assert_array_equal(new.decoded, old.decoded)
    monkeypatch.undo()
    weighted = pipe("a (red:1.4) car", "blurry", cfg=5.0, **FAST)
    assert np.abs(weighted.decoded - new.decoded).max() > 1e-4


def test_pipeline_takes_long_prompts_and_clip_skip(pipe):
    contexts = []
    unet = pipe._unet_fn

    def recording(x, t, encoder_hidden_states, **kw):
        contexts.append(encoder_hidden_states)
        return unet(x, t, encoder_hidden_states=encoder_hidden_states, **kw)

    pipe._unet_fn = recording
    try:
        result = pipe(words(100), "blurry", cfg=5.0, clip_skip=2, num_images=2, batch_size=2, **FAST)
    finally:
        pipe._unet_fn = unet
    assert contexts[0].shape == (4, 154, 32)  # [uncond x 2, cond x 2], both padded to 2 chunks
    assert result.params[0].clip_skip == 2 and "Clip skip: 2" in format_parameters(result.params[0])
    cond, _ = encode_prompt_pair(pipe.text_encoder, words(100), "blurry", clip_skip=2)
    assert torch.equal(contexts[0][2:3], cond)


def test_stage2_validation_samples_use_prompt_syntax(pipe, fresh_accelerate):
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from ldm.unet.config import SampleConfig
    from ldm.unet.validation_grid import sample_grid

    cfg = SampleConfig(prompts=["a (red:1.3) car BREAK at night, " + words(80)], steps=2, cfg=5.0, sampler="euler",
                       seed=4)
    cfg.validate()
    grid = sample_grid(Accelerator(cpu=True), pipe.unet, pipe.vae, pipe.text_encoder,
                       DDPMScheduler.from_config(pipe.scheduler_config), cfg)  # one image: (3, H, W) in [0, 1]
    image = pipe(cfg.prompts[0], steps=2, cfg=5.0, sampler="euler", seed=4, show_progress=False).images[0]
    torch.testing.assert_close(grid, torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    with pytest.raises(UserError, match=r"^config key 'sample.prompts\[0\]': '\(b:x\)' is not a weight"):
        SampleConfig(prompts=["a (b:x)"]).validate()


_generate = partial(run, main)  # (argv, capsys) -> (exit code, stdout lines, stderr)


CLI_FAST = ["--steps", "2", "--height", "32", "--width", "32", "--seed", "5", "-q"]


def test_cli_clip_skip_is_recorded_and_replayed(model_dir, tmp_path, capsys):
    code, lines, err = _generate(["a (red:1.2) car BREAK at night", "--model", str(model_dir), "--clip-skip", "2",
                                  "--negative", "[blurry]", "--outdir", str(tmp_path / "a"), *CLI_FAST], capsys)
    assert code == 0, err
    text = Image.open(lines[0]).info["parameters"]
    assert text.startswith("a (red:1.2) car BREAK at night\nNegative prompt: [blurry]\n") and "Clip skip: 2" in text
    code, replay, err = _generate(["--from-png", lines[0], "--outdir", str(tmp_path / "b"), "-q"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(replay[0])), np.asarray(Image.open(lines[0])))


@pytest.mark.parametrize("argv, expected", [
    pytest.param(["(red:abc) car"], "error: prompt: '(red:abc)' is not a weight", id="malformed weight"),
    pytest.param(["car", "--negative", "(ugly:20)"], "error: negative prompt: weight 20 in '(ugly:20)' is out of range",
                 id="weight out of range"),
    pytest.param(["[cat:dog:5]"], "error: prompt: '[cat:dog:5]' is A1111 prompt editing", id="prompt editing"),
    pytest.param(["a BREAK BREAK b"], "error: prompt has an empty chunk", id="empty chunk"),
    pytest.param(["car", "--clip-skip", "0"], "error: --clip-skip must be at least 1", id="clip skip 0"),
    pytest.param(["car", "--clip-skip", "9"], "error: clip skip 9 is out of range: this text encoder allows 1..2",
                 id="clip skip too large"),
])
def test_cli_bad_prompts_are_one_line_exit_2_and_no_file(argv, expected, model_dir, tmp_path, capsys):
    outdir = tmp_path / "out"
    code, lines, err = _generate([*argv, "--model", str(model_dir), "--outdir", str(outdir), *CLI_FAST], capsys)
    assert code == 2 and lines == []
    assert err.count("\n") == 1 and err.startswith(expected), err
    assert not outdir.exists() or not any(outdir.iterdir())
