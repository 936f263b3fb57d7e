"""Textual-inversion embeddings: images equal to diffusers' `load_textual_inversion` on the same tiny random models
and files, A1111's chunking and name matching, ComfyUI's embedding:NAME, the files' formats and refusals, the PNG's
TI hashes and their replay, prompt lists and the server's listing.

Tolerance: SD 1.x and SDXL images are compared bit for bit (max abs diff 0): diffusers puts the vectors in as new
rows of the token-embedding matrix and we put them in the same layer's output with a hook, so the text encoder sees
the same numbers and every later operation is the one `tests/test_pipeline.py`/`test_sdxl_pipeline.py` compare.
"""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import run

from ldm.errors import UserError
from ldm.generate import main
from ldm.models.spec import inspect_model
from ldm.pipeline.metadata import format_parameters, parse_parameters
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.request import GenerationRequest
from ldm.pipeline.samplers import make_scheduler
from ldm.prompts_file import read_prompts_file
from ldm.text.embedding_files import EmbeddingLibrary, embedding_hash, read_embedding
from ldm.text.embeddings import EmbeddingDatabase, references, token_vectors
from ldm.text.prompt_encoding import apply_weights, chunk_input_ids, chunk_tokens, encode_chunks, encode_prompt
from ldm.text.prompt_syntax import parse_prompt
from ldm.text.tiny import tiny_clip_text_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

generate = partial(run, main)  # (argv, capsys) -> (exit code, stdout lines, stderr)
FAST = ["--steps", "2", "--height", "32", "--width", "32", "--seed", "5", "--sampler", "ddim", "-q"]
NEGATIVE = "blurry"


def _vectors(n: int, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory) -> Path:
    """One embeddings/ folder as an A1111 user has it: every format, SD and SDXL files side by side, a subfolder."""
    root = tmp_path_factory.mktemp("embeddings")
    (root / "styles").mkdir()
    # A1111's .pt: 3 vectors; diffusers' .bin: one 1-D vector under its token; kohya's .safetensors: 2 vectors
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": _vectors(3, seed=1)}, "name": "inkstyle",
                "step": 500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "sd15"},
               root / "styles" / "inkstyle.pt")
    torch.save({"<glow>": _vectors(1, seed=2)[0]}, root / "glowfx.bin")
    save_file({"emb_params": _vectors(2, seed=3)}, root / "washtone.safetensors")
    save_file({"clip_l": _vectors(2, seed=4), "clip_g": _vectors(2, seed=5)}, root / "xlstyle.safetensors")
    (root / "notes.txt").write_text("not an embedding: other suffixes are passed over")
    return root


@pytest.fixture(scope="module")
def sd_pipe(tiny_model, emb_dir):
    return Pipeline.open(inspect_model(tiny_model), "cpu", "fp32", embeddings_dir=emb_dir)


@pytest.fixture(scope="module")
def sd_db(sd_pipe) -> EmbeddingDatabase:
    return sd_pipe.embeddings


def _chunks(db: EmbeddingDatabase, prompt: str):
    from ldm.text.embeddings import escape_references

    return chunk_tokens(db.encoder, parse_prompt(escape_references(prompt)), db)


def _fixes(chunks) -> list[list[tuple[int, str]]]:
    return [[(offset, e.name) for offset, e in c.fixes] for c in chunks]


# ------------------------------------------------------------------------------------------- equal to diffusers


@pytest.mark.slow
def test_sd_images_equal_diffusers_load_textual_inversion(sd_pipe, tiny_model, emb_dir):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = make_scheduler("euler_a", sd_pipe.scheduler_config)
    # the same three files, read by diffusers (A1111's .pt, diffusers' .bin, a one-key .safetensors)
    ref.load_textual_inversion([str(emb_dir / "styles" / "inkstyle.pt"), str(emb_dir / "glowfx.bin"),
                                str(emb_dir / "washtone.safetensors")], token=["inkstyle", "glowfx", "washtone"])
    prompt, negative = "inkstyle on a hill, washtone", "glowfx, blurry"
    ours = sd_pipe(prompt, negative, steps=3, seed=1, height=32, width=32, show_progress=False)
    theirs = ref(prompt, negative_prompt=negative, num_inference_steps=3, guidance_scale=7.5, height=32, width=32,
                 generator=[torch.Generator().manual_seed(1)], output_type="np").images
    assert np.abs(ours.decoded - theirs).max() == 0
    plain = sd_pipe("a cat on a hill, a dog", negative, steps=3, seed=1, height=32, width=32, show_progress=False)
    assert np.abs(ours.decoded - plain.decoded).max() > 1e-3  # the vectors do condition the image
    hashes = ours.params[0].ti_hashes
    assert hashes == (f"inkstyle: {embedding_hash(emb_dir / 'styles' / 'inkstyle.pt')}, "
                      f"washtone: {embedding_hash(emb_dir / 'washtone.safetensors')}, "
                      f"glowfx: {embedding_hash(emb_dir / 'glowfx.bin')}")


@pytest.mark.slow
def test_sdxl_images_equal_diffusers_two_load_textual_inversion_calls(tiny_sdxl_model, emb_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = Pipeline.open(inspect_model(tiny_sdxl_model), "cpu", "fp32", embeddings_dir=emb_dir)
    assert set(pipe.embeddings.loaded) == {"xlstyle"}
    assert set(pipe.embeddings.skipped) == {"inkstyle", "glowfx", "washtone"}
    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = make_scheduler("euler_a", pipe.scheduler_config)
    state = read_embedding(emb_dir / "xlstyle.safetensors").vectors  # diffusers names the 2 vectors xlstyle, xlstyle_1
    ref.load_textual_inversion(state["clip_l"], token="xlstyle", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token="xlstyle", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    prompt = "a photo of xlstyle on a hill"
    ours = pipe(prompt, NEGATIVE, steps=3, seed=2, show_progress=False)
    theirs = ref(prompt, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5,
                 generator=[torch.Generator().manual_seed(2)], output_type="np").images
    assert np.abs(ours.decoded - theirs).max() == 0


@pytest.mark.parametrize("kind", ["clip", "open_clip"])
def test_the_hook_puts_in_what_a_new_embedding_row_would(kind, emb_dir):
    """The hook equals diffusers' way (a token's row of the embedding matrix set to the vector), for both kinds of
    text tower (a transformers CLIP, an open_clip one: SD 2.x models trained here)."""
    if kind == "clip":
        encoder = tiny_clip_text_encoder()
        layer = encoder.model.get_input_embeddings()
    else:
        from ldm.text.openclip import OpenCLIPTextEncoder
        from ldm.text.tiny import tiny_open_clip_model

        encoder = OpenCLIPTextEncoder(tiny_open_clip_model())
        layer = encoder.token_embedding
    db = EmbeddingDatabase(EmbeddingLibrary.read(emb_dir), encoder)
    glow = db.loaded["glowfx"]
    z = encode_prompt(encoder, "a glowfx cat", embeddings=db).context
    (zebra,) = encoder.token_ids(["zebra"])[0]
    with torch.no_grad():
        layer.weight[zebra] = glow.vectors[""][0]
    assert torch.equal(z, encoder.encode(["a zebra cat"]))
    assert not layer._forward_hooks  # nothing left on the model
    with token_vectors(encoder, [(2, glow.vectors[""])]):
        assert len(layer._forward_hooks) == 1


# ------------------------------------------------------------------------------------------------- chunking


def test_an_embedding_that_does_not_fit_starts_the_next_chunk_as_in_a1111(sd_db):
    a = sd_db.encoder.token_ids(["a"])[0][0]
    fits = _chunks(sd_db, "a " * 72 + "inkstyle")  # 72 + 3 = 75: it fits
    assert [len(c.ids) for c in fits] == [75] and _fixes(fits) == [[(72, "inkstyle")]]
    moved = _chunks(sd_db, "a " * 73 + "inkstyle a")  # 73 + 3 > 75: the chunk is padded, inkstyle opens the next
    assert [c.ids for c in moved] == [[a] * 73, [0, 0, 0, a]] and _fixes(moved) == [[], [(0, "inkstyle")]]
    first = chunk_input_ids(sd_db.encoder, moved[0])[0].tolist()
    assert first == [49406] + [a] * 73 + [49407] * 3  # start, words, end, padding: 77 ids
    cond = encode_prompt(sd_db.encoder, "a " * 73 + "inkstyle a", embeddings=sd_db)
    assert cond.context.shape == (1, 154, 32)
    # comma backtracking moves an embedding with its tokens (A1111 leaves its vectors in the old chunk's padding)
    backtracked = _chunks(sd_db, "a " * 56 + ", a a a inkstyle " + "a " * 13)
    assert [len(c.ids) for c in backtracked] == [57, 19] and _fixes(backtracked) == [[], [(3, "inkstyle")]]


def test_emphasis_weights_an_embeddings_positions_as_a_words(sd_db):
    (chunk,) = _chunks(sd_db, "a (inkstyle:1.5) cat")
    assert chunk.weights == [1.0, 1.5, 1.5, 1.5, 1.0]
    plain = encode_chunks(sd_db.encoder, [type(chunk)(chunk.ids, [1.0] * 5, chunk.fixes)]).context
    weights = torch.ones(77)
    weights[1:6] = torch.tensor(chunk.weights)
    expected = apply_weights(plain, weights[None])
    for prompt in ("a (inkstyle:1.5) cat", "a (embedding:inkstyle:1.5) cat"):
        assert torch.equal(encode_prompt(sd_db.encoder, prompt, embeddings=sd_db).context, expected)


# ------------------------------------------------------------------------------------------------------- names


def test_names_match_as_a1111_matches_them(sd_db, tmp_path, caplog):
    save_file({"emb_params": _vectors(2)}, tmp_path / "ink.safetensors")
    save_file({"emb_params": _vectors(1)}, tmp_path / "ink wash.safetensors")  # its tokens start with ink's
    db = EmbeddingDatabase(EmbeddingLibrary.read(tmp_path), sd_db.encoder)
    assert _fixes(_chunks(db, "INK Wash and Ink")) == [[(0, "ink wash"), (2, "ink")]]  # longest first, any case
    for words in ("inky cats", "a cat, pink inks"):  # no embedding's tokens: left alone
        assert _chunks(db, words)[0].ids == db.encoder.token_ids([words])[0]
    # of two files with one name, the one that fits the model is used, as A1111 ends up doing
    for folder, vectors in (("a", {"clip_l": _vectors(1), "clip_g": _vectors(1)}), ("b", {"emb_params": _vectors(1)})):
        (tmp_path / folder).mkdir()
        save_file(vectors, tmp_path / folder / "twin.safetensors")
    db = EmbeddingDatabase(EmbeddingLibrary.read(tmp_path), sd_db.encoder)
    assert db.loaded["twin"].path == tmp_path / "b" / "twin.safetensors" and "twin" not in db.skipped
    # an embedding of another family in the folder is read as words, with one warning (A1111 skips it)
    caplog.set_level(logging.WARNING)
    assert _fixes(_chunks(sd_db, "xlstyle")) == [[]]
    assert "the prompt's 'xlstyle' is the name of an SDXL embedding (clip_l 32 + clip_g 32)" in caplog.text


def test_comfyui_embedding_references(sd_db):
    expected = _fixes(_chunks(sd_db, "a cat inkstyle"))
    for prompt in ("a cat embedding:inkstyle", "a cat embedding:inkstyle.pt", "a cat embedding:styles/inkstyle",
                   "a cat (embedding:inkstyle)"):
        assert _fixes(_chunks(sd_db, prompt)) == expected, prompt
    commas = _chunks(sd_db, "embedding:inkstyle, a cat")  # trailing commas are text
    assert _fixes(commas) == [[(0, "inkstyle")]] and commas[0].ids[3] == sd_db.encoder.token_ids([","])[0][0]
    assert references("a (embedding:inkstyle:1.2), embedding:glowfx BREAK x") == ["inkstyle", "glowfx"]
    assert references("noembedding:inkstyle") == []  # only where a word starts
    with pytest.raises(UserError, match=r"embedding:nosuch names no embedding in --embeddings-dir"):
        _chunks(sd_db, "a embedding:nosuch cat")
    with pytest.raises(UserError, match=r"xlstyle.safetensors' \(embedding:xlstyle\) is an SDXL embedding \(clip_l "
                                        r"32 \+ clip_g 32\), but this model's text encoder takes 32-wide vectors"):
        _chunks(sd_db, "embedding:xlstyle")


# ------------------------------------------------------------------------------------------------- the files


def test_formats_and_their_metadata(emb_dir):
    inkstyle = read_embedding(emb_dir / "styles" / "inkstyle.pt")
    assert (inkstyle.name, inkstyle.num_vectors, inkstyle.shape) == ("inkstyle", 3, 32)
    assert (inkstyle.step, inkstyle.sd_checkpoint, inkstyle.sd_checkpoint_name) == (500, "abcdef12", "sd15")
    assert read_embedding(emb_dir / "glowfx.bin").vectors[""].shape == (1, 32)  # a 1-D vector is one vector
    xl = read_embedding(emb_dir / "xlstyle.safetensors")
    assert (xl.num_vectors, xl.shape, set(xl.vectors)) == (2, 64, {"clip_l", "clip_g"})
    digest = hashlib.sha256((emb_dir / "glowfx.bin").read_bytes()).hexdigest()
    assert embedding_hash(emb_dir / "glowfx.bin") == digest[:12]  # A1111's shorthash: sha256 of the file, 12 digits


class _Global:  # a pickle that needs a class to load
    pass


@pytest.mark.parametrize("case", ["pickle class", "parameter dict", "two tensors", "too many", "sdxl counts", "3-d"])
def test_files_that_are_no_embedding_are_one_line(case, tmp_path):
    path = tmp_path / ("x.pt" if case in ("pickle class", "parameter dict") else "x.safetensors")
    if case == "pickle class":
        torch.save({"string_to_param": {"*": _vectors(1)}, "extra": _Global()}, path)
        message = r"needs test_embeddings._Global to load, which a weights-only load refuses"
    elif case == "parameter dict":  # how torch 1.11 saved A1111's embeddings: not plain tensors
        torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(_vectors(1))})}, path)
        message = r"needs torch.nn.modules.container.ParameterDict to load"
    elif case == "two tensors":
        save_file({"a": _vectors(1), "b": _vectors(1)}, path)
        message = r"is not a textual-inversion embedding \(it holds a, b;"
    elif case == "too many":
        save_file({"emb_params": _vectors(76)}, path)
        message = r"has 76 vectors; at most 75 fit in a prompt chunk"
    elif case == "sdxl counts":
        save_file({"clip_l": _vectors(1), "clip_g": _vectors(2)}, path)
        message = r"clip_l has 1 vectors, clip_g 2"
    else:
        save_file({"emb_params": torch.zeros(1, 2, 32)}, path)
        message = r"its vectors are \(1, 2, 32\), not \(n, width\) floats"
    with pytest.raises(UserError, match=message) as e:
        read_embedding(path)
    assert "\n" not in str(e.value)


def test_the_folder_is_read_again_when_it_changes(sd_db, emb_dir, tmp_path, caplog):
    folder = tmp_path / "emb"
    folder.mkdir()
    save_file({"a": _vectors(1), "b": _vectors(1)}, folder / "broken.safetensors")  # skipped with a warning
    (folder / "empty.pt").write_bytes(b"")  # empty files are passed over, as A1111 does
    caplog.set_level(logging.WARNING)
    library = EmbeddingLibrary.read(folder)
    assert library.embeddings == [] and "--embeddings-dir: skipping" in caplog.text and "broken" in caplog.text
    db = EmbeddingDatabase(library, sd_db.encoder)
    (folder / "sub").mkdir()
    (folder / "sub" / "inkstyle.pt").write_bytes((emb_dir / "styles" / "inkstyle.pt").read_bytes())
    db.refresh()
    assert set(db.loaded) == {"inkstyle"} and _fixes(_chunks(db, "inkstyle")) == [[(0, "inkstyle")]]


# --------------------------------------------------------------------------------------------- CLI, PNG, lists


def test_ti_hashes_round_trip_in_the_parameters_text():
    p = GenerationRequest(prompt="inkstyle", seed=1, width=32, height=32,
                          ti_hashes="inkstyle: 0123456789ab, glowfx: ba9876543210")
    text = format_parameters(p)
    assert 'TI hashes: "inkstyle: 0123456789ab, glowfx: ba9876543210"' in text
    assert parse_parameters(text)["ti_hashes"] == "inkstyle: 0123456789ab, glowfx: ba9876543210"


@pytest.mark.slow
def test_cli_records_ti_hashes_and_replays_them_from_the_png(tiny_model, emb_dir, tmp_path, capsys):
    argv = ["a cat, inkstyle", "--negative", "embedding:washtone", "--model", str(tiny_model), "--embeddings-dir",
            str(emb_dir), "--outdir", str(tmp_path / "a"), *FAST]
    code, lines, err = generate(argv, capsys)
    assert code == 0, err
    text = Image.open(lines[0]).info["parameters"]
    inkstyle = embedding_hash(emb_dir / "styles" / "inkstyle.pt")
    washtone = embedding_hash(emb_dir / "washtone.safetensors")
    assert f'TI hashes: "inkstyle: {inkstyle}, washtone: {washtone}"' in text
    code, replay, err = generate(["--from-png", lines[0], "--embeddings-dir", str(emb_dir), "--outdir",
                                  str(tmp_path / "b"), "-q"], capsys)
    assert code == 0 and err == "", err
    np.testing.assert_array_equal(np.asarray(Image.open(replay[0])), np.asarray(Image.open(lines[0])))
    assert Image.open(replay[0]).info["parameters"] == text
    # a changed file of the recorded name: used, with one warning naming both hashes
    changed = tmp_path / "changed"
    changed.mkdir()
    torch.save({"string_to_param": {"*": _vectors(3, seed=9)}}, changed / "inkstyle.pt")
    (changed / "washtone.safetensors").write_bytes((emb_dir / "washtone.safetensors").read_bytes())
    code, _, err = generate(["--from-png", lines[0], "--embeddings-dir", str(changed), "--outdir",
                             str(tmp_path / "c"), "-q"], capsys)
    expected = (f"warning: embedding 'inkstyle': {changed / 'inkstyle.pt'} has hash "
                f"{embedding_hash(changed / 'inkstyle.pt')}, but the image was made with {inkstyle}; the result may "
                "differ")
    assert code == 0 and expected in err and err.count("\n") == 1, err


BAD = {
    # name: (extra argv, the prompt; expected message)
    "sdxl file for sd": (["--embedding", "{dir}/xlstyle.safetensors"], "a cat",
                         "xlstyle.safetensors' is an SDXL embedding (clip_l 32 + clip_g 32), but this model takes "
                         "32-wide vectors"),
    "not an embedding": (["--embedding", "{bad}"], "a cat", "is not a textual-inversion embedding (it holds a, b;"),
    "missing file": (["--embedding", "nope.pt"], "a cat", "embedding file 'nope.pt' does not exist"),
    "not a folder": (["--embeddings-dir", "{dir}/glowfx.bin"], "a cat", "glowfx.bin' is not a directory"),
    "unknown reference": (["--embeddings-dir", "{dir}"], "a cat embedding:nosuch",
                          "embedding:nosuch names no embedding in --embeddings-dir"),
    "reference without embeddings": ([], "a cat embedding:inkstyle", "the prompt names embedding:inkstyle: pass "
                                     "--embeddings-dir DIR (or --embedding FILE)"),
    "reference to another family": (["--embeddings-dir", "{dir}"], "(embedding:xlstyle:1.2)",
                                    "(embedding:xlstyle) is an SDXL embedding"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_embedding_input_is_one_line_exit_2_and_no_file(case, tiny_model, emb_dir, tmp_path, capsys):
    extra, prompt, expected = BAD[case]
    bad = tmp_path / "bad.safetensors"
    save_file({"a": _vectors(1), "b": _vectors(1)}, bad)
    extra = [a.format(dir=emb_dir, bad=bad) for a in extra]
    outdir = tmp_path / "out"
    code, lines, err = generate([prompt, "--model", str(tiny_model), "--outdir", str(outdir), *FAST, *extra], capsys)
    assert code == 2 and lines == []
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not outdir.exists() or not any(outdir.iterdir())


def test_an_sd_file_given_to_sdxl_is_refused_before_loading(tiny_sdxl_model, emb_dir, tmp_path, capsys):
    code, lines, err = generate(["inkstyle", "--model", str(tiny_sdxl_model), "--embedding",
                                 str(emb_dir / "glowfx.bin"), "--outdir", str(tmp_path), *FAST], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "glowfx.bin' is a 32-wide embedding, but this model takes clip_l + clip_g vectors (64 wide together" in err


def test_real_widths_name_the_families(tmp_path):
    """What fits, by the U-Net's cross-attention width in the spec: SD 1.x 768, SD 2.x 1024, SDXL 768 + 1280 = 2048,
    its refiner 1280 (clip_g alone)."""
    from ldm.text.embeddings import check_embedding_inputs

    files = {"sd1": {"emb_params": torch.zeros(1, 768)}, "sd2": {"emb_params": torch.zeros(2, 1024)},
             "sdxl": {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}}
    for name, tensors in files.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
    models = {"sd1": ("sd", 768), "sd2": ("sd", 1024), "sdxl": ("sdxl", 2048), "refiner": ("sdxl-refiner", 1280)}
    fits = {(f, m) for f in files for m in models
            if not _refused(lambda: check_embedding_inputs(None, [tmp_path / f"{f}.safetensors"], [], *models[m]))}
    assert fits == {("sd1", "sd1"), ("sd2", "sd2"), ("sdxl", "sdxl"), ("sdxl", "refiner")}
    with pytest.raises(UserError, match=r"sd2.safetensors' is an SD 2.x embedding \(1024 wide\), but this model "
                                        r"takes 768-wide vectors \(SD 1.x\): use an embedding made for this model's"):
        check_embedding_inputs(None, [tmp_path / "sd2.safetensors"], [], "sd", 768)
    with pytest.raises(UserError, match=r"sd1.safetensors' is an SD 1.x embedding \(768 wide\), but this model "
                                        r"takes clip_l \+ clip_g vectors \(2048 wide together, SDXL\)"):
        check_embedding_inputs(tmp_path, [tmp_path / "sd1.safetensors"], [], "sdxl", 2048)


def _refused(check) -> bool:
    try:
        check()
    except UserError:
        return True
    return False


def test_prompt_lists_check_every_line_against_the_typed_embeddings(tiny_model, emb_dir, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text('a cat, inkstyle\n{"prompt": "embedding:glowfx on a hill", "negative": "embedding:washtone"}\n'
                    "a dog embedding:nosuch\n")
    spec = inspect_model(tiny_model)
    with pytest.raises(UserError, match=r"line 3: embedding:nosuch names no embedding in --embeddings-dir .*; "
                                        "nothing was generated"):
        read_prompts_file(path, {}, spec, embeddings=EmbeddingLibrary.read(emb_dir))
    path.write_text(path.read_text().splitlines()[0] + "\n" + path.read_text().splitlines()[1] + "\n")
    lines = read_prompts_file(path, {}, spec, embeddings=EmbeddingLibrary.read(emb_dir))
    assert [line.request.negative_prompt for line in lines] == ["", "embedding:washtone"]


def test_prompt_lists_use_the_typed_embeddings_in_every_line(tiny_model, emb_dir, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text('a cat, inkstyle\n{"prompt": "embedding:glowfx on a hill", "negative": "embedding:washtone"}\n')
    code, lines, err = generate(["--prompts-file", str(path), "--model", str(tiny_model), "--embeddings-dir",
                                 str(emb_dir), "--outdir", str(tmp_path / "out"), *FAST], capsys)
    assert code == 0 and len(lines) == 2, err
    hashes = [parse_parameters(Image.open(line).info["parameters"])["ti_hashes"] for line in lines]
    assert hashes == [f"inkstyle: {embedding_hash(emb_dir / 'styles' / 'inkstyle.pt')}",
                      f"glowfx: {embedding_hash(emb_dir / 'glowfx.bin')}, "
                      f"washtone: {embedding_hash(emb_dir / 'washtone.safetensors')}"]


# ----------------------------------------------------------------------------------------------------- server


def test_server_lists_embeddings_as_a1111_and_refuses_an_unknown_reference(tiny_model, emb_dir):
    from test_serve_worker import FakePipe, app_server_for, request

    from ldm.serve.api import Limits
    from ldm.serve.app import create_app
    from ldm.serve.worker import Worker

    worker = Worker(lambda name: FakePipe(name), "tiny", queue_size=2)
    worker.start()
    try:
        app = create_app({"tiny": inspect_model(tiny_model)}, worker, Limits(), embeddings_dir=str(emb_dir))
        with app_server_for(app) as port:
            status, body = request(port, "GET", "/sdapi/v1/embeddings")
            assert status == 200
            assert body == {
                "loaded": {"glowfx": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32,
                                    "vectors": 1},
                           "inkstyle": {"step": 500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "sd15",
                                   "shape": 32, "vectors": 3},
                           "washtone": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32,
                                    "vectors": 2}},
                "skipped": {"xlstyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                        "shape": 64, "vectors": 2}},
            }
            status, body = request(port, "POST", "/sdapi/v1/txt2img", {"prompt": "a cat embedding:nosuch"})
            assert status == 422 and "embedding:nosuch names no embedding" in body["detail"], body
            assert worker.queued() == 0
    finally:
        worker.stop()
