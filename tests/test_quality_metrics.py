"""Sample-quality metrics (`ldm.quality.metrics`, `.features`, `.measure`; `ldm.eval.quality`): FID, KID and CLIP
score equal torchmetrics' own computation on the same images through tiny random extractors, CMMD equals a float64
reference written here from the paper's formula, the sample-size warnings and refusals, and `ldm-eval --metrics` end to
end on the bundled demo model with `--features demo` (report, JSON, determinism, one-line errors)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import accelerate_launch, run
from ldm.errors import UserError
from ldm.quality import metrics
from ldm.eval.cli import main
from ldm.quality.features import ClipFeatures, DemoFeatures, batches, extract, find_inception
from ldm.quality.measure import Extractors, features_of, measure

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyFeatures(nn.Module):
    """uint8 (N, 3, H, W) -> (N, 16) float32: 4x4 average pooling, then a fixed random projection and tanh. Satisfies
    `ldm.quality.features.ImageFeatures` and is a module torchmetrics takes as its `feature`."""

    name = "tiny"

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(48, dim, generator=torch.Generator().manual_seed(seed)))
        self.dim = self.num_features = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)  # (N, 48)
        return torch.tanh(x @ self.w)


class AsDouble(nn.Module):
    """torchmetrics' KID computes in its features' dtype: float64 here, as ours, so the two differ only where the
    float32 features could (their batching)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(images).double()


def images(n: int, low: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randint(low, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


REAL, FAKE = images(40, 0, 1), images(36, 120, 2)


def test_fid_is_torchmetrics_fid_of_the_same_images():
    from torchmetrics.image.fid import FrechetInceptionDistance

    tiny = TinyFeatures()
    theirs = FrechetInceptionDistance(feature=tiny)
    theirs.update(REAL, real=True)
    theirs.update(FAKE, real=False)
    ours = metrics.fid(extract(tiny, REAL, batch_size=7), extract(tiny, FAKE, batch_size=5))
    # Both accumulate in float64 from the same float32 features; only those features may differ in their last bit
    # with the batching (7 and 5 here, all at once there): 1e-6 relative is ~100 float32 ulps of headroom.
    assert ours == pytest.approx(float(theirs.compute()), rel=1e-6)
    assert ours > 0.1  # the two sets differ: a test of nothing would pass with 0 == 0
    assert metrics.fid(extract(tiny, REAL), extract(tiny, REAL)) == pytest.approx(0, abs=1e-6)


def test_kid_is_torchmetrics_kid_with_the_same_subsets_and_leaves_the_callers_random_stream_alone():
    from torchmetrics.image.kid import KernelInceptionDistance

    tiny = TinyFeatures()
    theirs = KernelInceptionDistance(feature=AsDouble(tiny), subsets=20, subset_size=12)
    theirs.update(REAL, real=True)
    theirs.update(FAKE, real=False)
    torch.manual_seed(3)  # torchmetrics draws its subsets from the global stream
    mean, std = (float(v) for v in theirs.compute())
    real, fake = extract(tiny, REAL, batch_size=7), extract(tiny, FAKE, batch_size=5)
    torch.manual_seed(11)
    before = torch.rand(3)
    torch.manual_seed(11)
    ours = metrics.kid(real, fake, subsets=20, subset_size=12, seed=3)
    assert torch.equal(torch.rand(3), before)  # ours seeds inside fork_rng
    # float64 arithmetic on both sides; the float32 features as in the FID test: 1e-6 relative
    assert ours == pytest.approx((mean, std), rel=1e-6)
    assert metrics.kid(real, fake, subsets=20, subset_size=12, seed=4)[0] != pytest.approx(mean, rel=1e-3)
    assert metrics.kid(real, fake, subsets=20, subset_size=12, seed=3) == ours  # same seed, same subsets


def tiny_clip():
    """A random 1-layer CLIPModel (32 px images, 8-d projection) and its processor, built offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ldm.text.tokenizer import offline_clip_tokenizer

    # seed 3: the mean cosine of the test's pairs is +0.41 (other seeds give negative ones, which torchmetrics'
    # CLIP score clamps to 0 and would compare 0 with 0)
    torch.manual_seed(3)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=8)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=offline_clip_tokenizer())
    return model, processor


class Transformers4Clip(nn.Module):
    """torchmetrics 1.9's CLIPScore calls get_*_features as tensors (transformers 4); transformers 5 wraps them."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


PROMPTS = ["a red circle", "a large blue square in the center", "a cat", "two dogs on a white background"] * 3


def test_clip_score_is_torchmetrics_clipscore_and_loads_from_a_directory(tmp_path):
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = tiny_clip()
    imgs = images(12, 0, 5, size=40)  # 40 px: the processor resizes and crops to 32, on both sides
    theirs = CLIPScore(model_name_or_path=lambda: (Transformers4Clip(model), processor))
    theirs.update(imgs, PROMPTS)
    clip = ClipFeatures(model, processor, "tiny clip")
    got = features_of(Extractors(clip=clip), list(imgs), PROMPTS, batch_size=5)
    ours = metrics.clip_score(got.clip, got.texts)
    # theirs normalises and averages in float32, ours in float64 from the same float32 embeddings: a score on a 0-100
    # scale agrees to ~1e-5; 1e-4 absolute leaves 10x headroom
    assert ours == pytest.approx(float(theirs.compute()), abs=1e-4) and ours > 0
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    again = features_of(Extractors(clip=ClipFeatures.from_dir(str(tmp_path / "clip"))), list(imgs), PROMPTS)
    assert metrics.clip_score(again.clip, again.texts) == pytest.approx(ours, abs=1e-5)
    shuffled = metrics.clip_score(got.clip, got.texts.roll(1, 0))
    assert shuffled != pytest.approx(ours, abs=1e-3)  # the captions are paired with their images, not pooled


def cmmd_reference(x: torch.Tensor, y: torch.Tensor, unbiased: bool) -> float:
    """The paper's CMMD, written from its formula, independently of ldm.quality.metrics: Gaussian RBF kernel
    exp(-|a - b|^2 / (2 sigma^2)), sigma 10, MMD^2 scaled by 1000; every pair counted, or (unbiased) not i == j."""
    x, y = x.double(), y.double()
    k = lambda a, b: torch.exp(-torch.cdist(a, b) ** 2 / (2 * 10.0**2))  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    if unbiased:
        n, m = len(x), len(y)
        within = (kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
    else:
        within = kxx.mean() + kyy.mean()
    return float(1000 * (within - 2 * kxy.mean()))


@pytest.mark.parametrize("unbiased", [False, True])
def test_cmmd_is_the_papers_formula_in_float64_blockwise_too(unbiased, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(30, 12, generator=g), dim=1)
    y = F.normalize(torch.randn(23, 12, generator=g) + 0.3, dim=1)
    expected = cmmd_reference(x, y, unbiased)
    # float64 throughout; cdist and the |a|^2 + |b|^2 - 2ab expansion differ by rounding only (~1e-16 on kernel values
    # near 1, ~1e-13 after the x 1000 and the cancellation): 1e-9 relative
    assert metrics.cmmd(x, y, unbiased=unbiased) == pytest.approx(expected, rel=1e-9)
    monkeypatch.setattr(metrics, "_BLOCK", 7)  # several row blocks, the last one short
    assert metrics.cmmd(x, y, unbiased=unbiased) == pytest.approx(expected, rel=1e-9)
    assert expected > 0.1


def test_the_sample_size_warning_and_the_kid_subset_refusal_are_one_line_with_the_numbers():
    assert metrics.fid_warning(2049, 5000, 2048) is None
    assert metrics.fid_warning(500, 3000, 2048) == (
        "FID on 500 reference and 3000 generated images with 2048-d features: the covariance of a set of 500 images "
        "has rank at most 499 < 2048, so this FID is biased upwards and not comparable with FIDs on other numbers of "
        "images (use at least 2049, 10000+ for published numbers)")
    with pytest.raises(UserError) as e:
        metrics.check_kid_subset(50, 40, 36)
    assert str(e.value) == ("--kid-subset-size 50 is larger than the 36 images of the smaller set (40 reference, 36 "
                            "generated): choose at most 36")
    with pytest.raises(UserError, match="--metrics: unknown metric 'fdi'; choose from fid,kid,clip,cmmd"):
        metrics.parse_metrics("fid,fdi")
    assert metrics.parse_metrics(" KID,fid,kid ") == ("kid", "fid")


def test_measure_warns_on_small_sets_and_batches_keep_order_across_sizes():
    tiny = TinyFeatures()
    mixed = [REAL[0], images(1, 0, 9, size=48)[0], REAL[1], REAL[2]]
    assert [tuple(b.shape) for b in batches(mixed, 2)] == [(1, 3, 32, 32), (1, 3, 48, 48), (2, 3, 32, 32)]
    # equal up to float rounding: on AMX CPUs oneDNN's kernels (and their summation order) depend on the batch size
    torch.testing.assert_close(extract(tiny, mixed, 2), torch.cat([tiny(im[None]) for im in mixed]), rtol=0, atol=1e-6)
    ref, gen = features_of(Extractors(tiny), list(REAL[:10])), features_of(Extractors(tiny), list(FAKE[:8]))
    numbers, warnings = measure(("fid", "kid"), ref, gen)
    assert numbers["kid"]["subset_size"] == 8 and numbers["kid"]["subsets"] == 100
    assert warnings == [metrics.fid_warning(10, 8, 16)]


def test_find_inception_refuses_what_is_not_the_fid_network(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached download
    with pytest.raises(UserError, match=r"^--metrics fid/kid need the FID Inception weights offline: pass "
                                        r"--inception PATH to pt_inception-2015-12-05-6726825d.pth"):
        find_inception(None)
    with pytest.raises(UserError, match="is not a file"):
        find_inception(str(tmp_path / "missing.pth"))
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="is not the FID Inception network's weights"):
        find_inception(str(tmp_path / "other.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot be read as pt_inception"):
        find_inception(str(tmp_path / "text.pth"))


@pytest.mark.slow
def test_inception_features_load_a_weights_file_of_the_fid_networks_layout(tmp_path):
    """torchvision's Inception3 with 1008 classes has the FID network's 566 tensor names and shapes: random weights
    saved in that layout go through --inception's checks and torchmetrics' loader (the real file is 91 MB, offline)."""
    from torchvision.models.inception import Inception3

    from ldm.quality.features import InceptionFeatures

    torch.save(Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict(), tmp_path / "w.pth")
    features = InceptionFeatures(find_inception(str(tmp_path / "w.pth")))
    out = features(images(2, 0, 3, size=40))
    assert out.shape == (2, 2048) and out.dtype == torch.float32 and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A reference directory of 12 rendered shapes (one 48 px, the rest 32 px) and a 4-line prompts file."""
    import random

    from ldm.demo.shapes import canonical_caption, render, train_combinations

    root = tmp_path_factory.mktemp("quality")
    (root / "ref" / "sub").mkdir(parents=True)
    rng, combos = random.Random(0), train_combinations()[::47][:12]
    for i, a in enumerate(combos):
        render(a, 48 if i == 0 else 32, rng).save(root / "ref" / ("sub" if i % 2 else "") / f"{i:02d}.png")
    (root / "prompts.txt").write_text("".join(canonical_caption(a) + "\n" for a in combos[:4]))
    return root / "ref", root / "prompts.txt"


def quality_args(ref: Path, prompts: Path, *extra: str) -> list[str]:
    return ["--metrics", "fid,kid,clip,cmmd", "--features", "demo", "--reference", str(ref), "--prompts",
            str(prompts), "--num-per-prompt", "2", "--steps", "2", "--device", "cpu", "--seed", "5", *extra]


@pytest.mark.slow  # two runs of the demo model: ~5 s each on an idle core
@pytest.mark.usefixtures("fresh_accelerate")
def test_cli_on_the_demo_model_reports_and_repeats_itself(demo_inputs, tmp_path, capsys):
    ref, prompts = demo_inputs
    code, out, err = run(main, quality_args(ref, prompts, "--json", str(tmp_path / "a.json")), capsys, split=False)
    assert code == 0, err
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["reference"]["images"] == 12 and report["generated"]["images"] == 8
    assert report["generated"]["seed"] == 5 and report["generated"]["steps"] == 2
    assert set(report["numbers"]) == {"fid", "kid", "clip_score", "cmmd", "cmmd_unbiased"}
    assert report["numbers"]["kid"]["subset_size"] == 8  # min(1000, 12, 8)
    assert report["numbers"]["cmmd"] > report["numbers"]["cmmd_unbiased"]  # the diagonal's bias, at n = 8 and 12
    assert report["warnings"] == [metrics.fid_warning(12, 8, 64)]  # 64-d demo features on 8 images
    assert "## Sample quality" in out and "| FID (lower is better) | " in out and "`--features demo`" in out
    assert "seeds 5..6" in out and f"Warning: {report['warnings'][0]}." in out
    assert err.count("warning: FID on 12 reference and 8 generated images") == 1
    code, _, err = run(main, quality_args(ref, prompts, "--json", str(tmp_path / "b.json")), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text())["numbers"] == report["numbers"]  # same seeds, same numbers


BAD = {
    "unknown metric": (["--metrics", "fid,is"], "--metrics: unknown metric 'is'; choose from fid,kid,clip,cmmd "
                                                "(comma-separated)"),
    "missing reference": (["--reference", "{tmp}/nowhere"], "--reference '{tmp}/nowhere' is not a directory: pass a "
                                                            "directory of reference images"),
    "empty reference": (["--reference", "{tmp}/empty"], "--reference '{tmp}/empty' holds no images (.png, .jpg, "
                                                        ".jpeg, .webp, .bmp): pass a directory of reference images"),
    "empty prompts file": (["--prompts", "{tmp}/blank.txt"], "prompts file '{tmp}/blank.txt' has no prompts (blank "
                                                             "lines and # comments are skipped)"),
    "kid subset too large": (["--kid-subset-size", "9"], "--kid-subset-size 9 is larger than the 8 images of the "
                                                         "smaller set (12 reference, 8 generated): choose at most 8"),
    "no --inception offline": (["--features", "standard", "--metrics", "fid"],
                               "--metrics fid/kid need the FID Inception weights offline: pass --inception PATH"),
    "no --clip-model": (["--features", "standard", "--metrics", "cmmd"], "--metrics cmmd need a CLIP model: pass "
                                                                         "--clip-model DIR"),
    "quality option alone": (None, "--reference belongs to the sample-quality report: add --metrics LIST"),
    "adherence option with --metrics": (["--quick"], "--quick belongs to the prompt-adherence report: drop it, or "
                                                     "drop --metrics"),
    "demo features with weights": (["--inception", "x.pth"], "--features demo measures with the shapes demo's own "
                                                             "image tower: drop --inception and --clip-model"),
}


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_are_one_line_and_nothing_is_generated(case, demo_inputs, tmp_path, capsys, monkeypatch):
    from ldm.pipeline.pipeline import Pipeline

    ref, prompts = demo_inputs
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("\n# nothing\n")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(Pipeline, "open", lambda *a, **k: pytest.fail("the model was opened"))
    extra, message = BAD[case]
    argv = ["--reference", str(ref)] if extra is None else quality_args(ref, prompts, *extra)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run(main, argv, capsys, split=False)
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: " + message.replace("{tmp}", str(tmp_path))), err


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate")
def test_two_processes_give_the_numbers_of_one(demo_inputs, tmp_path, capsys):
    ref, prompts = demo_inputs
    args = quality_args(ref, prompts)
    code, _, err = run(main, [*args, "--json", str(tmp_path / "one.json")], capsys)
    assert code == 0, err
    cmd = accelerate_launch(Path("-m"), "ldm.eval", *args, "--json", str(tmp_path / "two.json"))
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("## Sample quality") == 1  # the main process alone reports
    one, both = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert both["processes"] == 2 and both["generated"]["images"] == one["generated"]["images"] == 8
    # the same images in the same order (units and reference files dealt, then gathered and sorted by index); the
    # features' batching differs (a process holds every other reference image): float32 rounding only
    for key in ("fid", "clip_score", "cmmd", "cmmd_unbiased"):
        assert both["numbers"][key] == pytest.approx(one["numbers"][key], rel=1e-4, abs=1e-6), key
    assert both["numbers"]["kid"]["mean"] == pytest.approx(one["numbers"]["kid"]["mean"], rel=1e-4, abs=1e-7)


def test_the_demo_tower_ranks_the_true_caption_of_a_shape_first():
    """The shipped image tower serves as a feature extractor: renders are closest to their own captions."""
    import random

    from ldm.demo.shapes import canonical_caption, heldout_combinations, render
    from ldm.quality.measure import to_chw

    demo, rng = DemoFeatures(), random.Random(1)
    combos = heldout_combinations()[::9]  # 7 combinations neither tower saw
    image_rows = demo(torch.stack([to_chw(render(a, 32, rng)) for a in combos]))
    text_rows = demo.embed_texts([canonical_caption(a) for a in combos])
    similarity = image_rows @ text_rows.T  # (7 images, 7 captions)
    assert (similarity.argmax(1) == torch.arange(len(combos))).float().mean() >= 5 / 7, similarity
