"""Sample quality during stage-2 training (`sample.metrics`; ldm/training/sample_metrics.py, ldm/training/worsening.py):
the numbers a run writes are `ldm-eval --metrics`' numbers for the same model, prompts, seeds and reference images;
the streaks of worse evaluations and their warning; the config's one-line refusals.

The 2-process run and the resumed run that write these rows too are tests/test_train_ldm.py's (they call
`check_metrics_are_ldm_evals` and `expected_warnings` from here)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import run
from ldm.config import load_config
from ldm.errors import UserError
from ldm.training.validation import ValidationLog
from ldm.training.worsening import Worsening, headline
from ldm.unet.config import LDMConfig
from ldm.unet.tiny import write_tiny_stage2_inputs

from conftest import one_process

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import train_ldm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def numbers(fid: float, kid: float, clip: float, cmmd: float) -> dict:
    """`measure`'s output shape, as val_loss.jsonl holds it."""
    return {"fid": fid, "kid": {"mean": kid, "std": 0.0}, "clip_score": clip, "cmmd": cmmd, "cmmd_unbiased": cmmd}


def test_headline_takes_one_number_per_metric():
    assert headline(numbers(3.0, 0.5, 20.0, 1.0)) == {"fid": 3.0, "kid": 0.5, "clip_score": 20.0, "cmmd": 1.0}
    assert headline({"clip_score": 7.0, "images": 4}) == {"clip_score": 7.0}


def test_a_streak_of_worse_evaluations_warns_with_the_values_and_steps():
    w = Worsening(patience=2)
    sequence = [  # (step, fid, clip score): FID lower is better, CLIP score higher is better
        (10, 50.0, 20.0),
        (20, 40.0, 21.0),  # a new best for both
        (30, 45.0, 21.0),  # FID worse than 40 (1); CLIP ties its best: no streak
        (40, 42.0, 20.5),  # FID worse than 40 (2): warn; CLIP worse than 21 (1)
        (50, 41.0, 19.0),  # FID worse (3): warn again; CLIP worse (2): warn
        (60, 39.0, 22.0),  # new bests: both streaks end
    ]
    out = {}
    for step, fid, clip in sequence:
        out[step] = w.update(step, {"fid": fid, "clip_score": clip})
        if step == 50:
            assert w.stop
    assert out[10] == out[20] == out[30] == out[60] == [] and not w.stop
    assert out[40] == ["sample quality is getting worse: fid has been worse than its best 40 (step 20, lower is "
                       "better) for 2 evaluations in a row: 45 (step 30), 42 (step 40)"]
    assert out[50] == ["sample quality is getting worse: fid has been worse than its best 40 (step 20, lower is "
                       "better) for 3 evaluations in a row: 45 (step 30), 42 (step 40), 41 (step 50)",
                       "sample quality is getting worse: clip_score has been worse than its best 21 (step 20, higher "
                       "is better) for 2 evaluations in a row: 20.5 (step 40), 19 (step 50)"]


def test_a_resume_rebuilds_the_streaks_from_the_kept_rows(tmp_path):
    """The rows up to the resumed step, replayed, leave the tracker as the uninterrupted run's was at that step: the
    next evaluation warns exactly as it would have. A tracker that forgot the history would not warn at step 40."""
    rows = [{"step": s, "metrics": numbers(f, 0.1, 20.0, 1.0)} for s, f in ((10, 5.0), (20, 6.0), (30, 7.0))]
    path = tmp_path / "val_loss.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"step": 35, "raw": {"loss": 1}}) + "\n")
    uninterrupted = Worsening(patience=3)
    for row in rows:
        uninterrupted.update(row["step"], row["metrics"])
    log = ValidationLog(tmp_path, one_process(), start_step=30)  # the row after the checkpoint is dropped
    resumed = Worsening(patience=3)
    resumed.replay(log.rows)
    assert log.rows == rows
    step40 = numbers(8.0, 0.1, 20.0, 1.0)
    warned = resumed.update(40, step40)
    assert warned == uninterrupted.update(40, step40) and len(warned) == 1 and "(step 10" in warned[0]
    assert Worsening(patience=3).update(40, step40) == []


def expected_warnings(rows: list[dict], patience: int) -> list[str]:
    """The warning lines a run writing `rows` logs, in order, each prefixed with its step as the run logs it."""
    w, lines = Worsening(patience), []
    for row in rows:
        if "metrics" in row:
            lines += [f"step {row['step']}: {text}" for text in w.update(row["step"], row["metrics"])]
    return lines


def check_metrics_are_ldm_evals(rows: list[dict], model: Path, reference: Path, prompts: list[str], count: int,
                                settings: dict, tmp: Path, capsys) -> None:
    """The last row's numbers against `ldm-eval --metrics` on `model` (the run's exported EMA weights, which the last
    evaluation measured): the same reference directory, and one prompts-file line per generated image k (prompt
    k % P, seed seed + k), so the same images from the same denoising loop."""
    from ldm.eval.cli import main

    lines = [json.dumps({"prompt": prompts[k % len(prompts)], "seed": settings["seed"] + k}) for k in range(count)]
    (tmp / "prompts.txt").write_text("\n".join(lines) + "\n")
    code, _, err = run(main, ["--metrics", "fid,kid,clip,cmmd", "--features", "demo", "--model", str(model),
                              "--reference", str(reference), "--prompts", str(tmp / "prompts.txt"), "--device", "cpu",
                              "--dtype", "fp32",
                              "--steps", str(settings["steps"]), "--cfg", str(settings["cfg"]), "--sampler", "ddim",
                              "--json", str(tmp / "eval.json")], capsys)
    assert code == 0, err
    theirs = json.loads((tmp / "eval.json").read_text())["numbers"]
    ours = rows[-1]["metrics"]
    assert ours["images"] == count
    # the same images and extractor; only the feature batching may differ (float32 rounding, ~1e-7 relative),
    # amplified by FID's matrix square root on a few images: 1e-4 relative
    for key in ("fid", "clip_score", "cmmd", "cmmd_unbiased"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    assert ours["kid"] == pytest.approx(theirs["kid"], rel=1e-4, abs=1e-7)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_stage2_inputs(tmp_path_factory.mktemp("parts"), num_images=16)


def held_out_folder(data: Path, target: Path, names: list[str]) -> Path:
    """An imagefolder of some of `data`'s images (PNG files and metadata.jsonl lines, unchanged)."""
    target.mkdir()
    lines = [line for line in (data / "metadata.jsonl").read_text().splitlines()
             if json.loads(line)["file_name"] in names]
    (target / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    for name in names:
        shutil.copy(data / name, target / name)
    return target


@pytest.mark.slow  # a 4-step run and an ldm-eval run: ~10 s on an idle core
def test_a_run_writes_ldm_evals_numbers_at_each_sample_step_and_warns(tmp_path, parts, fresh_accelerate, capsys):
    """Validation on a separate held-out folder (data.val_path), which is also the metrics' reference; a metric worse
    at step 4 than at step 2 stops the run there (sample.stop_when_worse at patience 1)."""
    from safetensors.torch import load_file

    from ldm.latents.cache import LatentCache
    from ldm.text.load_encoder import load_text_encoder
    from ldm.training.validation import timestep_bands
    from ldm.unet.objective import build_noise_scheduler
    from ldm.unet.presets import build_unet
    from ldm.unet.val_loss import unet_val_loss

    val = held_out_folder(Path(parts["data"]), tmp_path / "val", [f"0000{i}.png" for i in range(5)])
    prompts = ["a red circle", "a blue square"]
    settings = {"seed": 3, "steps": 2, "cfg": 7.5}
    out = tmp_path / "run"
    argv = ["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"train.output_dir={out}", f"data.path={parts['data']}",
            f"cache.vae={parts['vae']}", f"text_encoder.path={parts['text']}", "train.report_to=none",
            "train.max_steps=6", "train.batch_size=4", "train.checkpoint_every=6", "sample.every=2",
            "sample.prompts=[a red circle]", f"sample.metric_prompts=[{','.join(prompts)}]", "sample.metric_images=3",
            f"sample.seed={settings['seed']}", f"sample.steps={settings['steps']}", f"sample.cfg={settings['cfg']}",
            "sample.metrics=[fid,kid,clip,cmmd]", "sample.features=demo", "sample.worse_patience=1",
            "sample.stop_when_worse=true",
            f"data.val_path={val}", "train.val_every=4"]
    train_ldm.main(argv)
    err = capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "checkpoints/val_loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    assert rows[0].keys() == {"step", "metrics"} and rows[1].keys() == {"step", "metrics", "raw", "ema"}
    assert rows[0]["metrics"]["reference"] == 5 and rows[0]["metrics"]["kid"]["subset_size"] == 3
    assert rows[0]["metrics"] != rows[1]["metrics"]  # the weights changed between the evaluations
    logged = [line.split("ldm.training.sample_metrics: ", 1)[1] for line in err.splitlines() if "getting worse" in line]
    assert logged == expected_warnings(rows, patience=1) and logged  # with 4 metrics at patience 1, one worsened
    assert "stopping at step 4 (sample.stop_when_worse)" in err  # saved, exported, and no step 5
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000004"]
    # the held-out images are the val folder's own: the reference the metrics used, and ldm-eval's
    check_metrics_are_ldm_evals(rows, out / "model", val, prompts, 3, settings, tmp_path, capsys)

    # the validation loss is that of the val folder's 5 images, cached apart, at the raw weights of step 4
    cache = LatentCache.read(out / "latents-val")
    assert len(cache) == cache.dataset_size == 5 and len(LatentCache.read(out / "latents")) == 16  # all of data.path
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", argv[2:])
    unet = build_unet("tiny", sample_size=16, latent_channels=4, cross_attention_dim=32)
    unet.load_state_dict(load_file(out / "checkpoints/step-00000004/models/unet.safetensors"))
    here = unet_val_loss(one_process(), unet, build_noise_scheduler(cfg.noise), cache, range(5),
                         load_text_encoder(cfg.text_encoder).encode_conditioning, cfg.noise, timestep_bands(1000, 4),
                         batch_size=4)
    assert rows[1]["raw"]["count"] == here["count"] == 20
    # the same batches through the same float32 kernels in the same process: equal up to thread-count reordering
    assert rows[1]["raw"]["loss"] == pytest.approx(here["loss"], rel=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["sample.metrics=[fid,is]"], "config key 'sample.metrics': unknown metric 'is': choose from fid, kid, clip, cmmd"),
    (["sample.metrics=[fid]", "sample.every=0"], "config key 'sample.metrics': are measured every sample.every steps: "
     "set sample.every >= 1"),
    (["sample.metrics=[fid]", "sample.features=demo"], "config key 'sample.reference': is empty, which measures "
     "sample.metrics against the held-out images, but there are none: set data.num_val or data.val_path, or name a "
     "directory of reference images"),
    (["sample.metrics=[clip]", "sample.reference=x"], "config key 'sample.clip_model': is needed for sample.metrics "
     "clip/cmmd with sample.features=standard: a local transformers CLIPModel directory, or sample.features=demo"),
    (["sample.metrics=[fid]", "sample.features=demo", "sample.inception=x.pth", "sample.reference=x"],
     "config key 'sample.features': demo measures with the shapes demo's own image tower: clear sample.inception "
     "and sample.clip_model, or set sample.features=standard"),
    (["sample.metrics=[fid]", "sample.metric_images=1", "sample.reference=x"], "config key 'sample.metric_images': "
     "must be >= 2 (the metrics compare sets), got 1"),
    (["sample.metrics=[fid]", "sample.worse_patience=0", "sample.reference=x"], "config key "
     "'sample.worse_patience': must be >= 1, got 0"),
    (["sample.stop_when_worse=true"], "config key 'sample.stop_when_worse': needs sample.metrics: name the metrics "
     "to watch"),
    (["data.val_path=/no/such/dir"], "config key 'data.val_path': '/no/such/dir' does not exist: name a local folder, "
     "tar shards or a hub id 'user/name' of held-out images"),
    (["data.val_path=.", "data.num_val=4"], "config key 'data.num_val': is 4 and data.val_path is set: both choose "
     "the held-out images; set data.num_val=0 to validate on all of data.val_path, or clear data.val_path"),
    (["data.val_path=shapes"], "config key 'data.val_path': 'shapes' is the training data: name a separate held-out "
     "dataset (or use data.num_val to hold images out of data.path)"),
])
def test_bad_metric_settings_are_one_line(overrides, message):
    with pytest.raises(UserError) as error:
        load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", overrides)
    assert str(error.value) == message


def test_a_missing_reference_directory_stops_before_training(tmp_path, parts, fresh_accelerate, capsys):
    base = ["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"train.output_dir={tmp_path / 'run'}",
            f"data.path={parts['data']}", f"cache.vae={parts['vae']}", f"text_encoder.path={parts['text']}",
            "train.report_to=none", "sample.metrics=[fid]"]
    code, _, err = run(train_ldm.main, [*base, "sample.features=demo", f"sample.reference={tmp_path / 'none'}"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (f"error: sample.reference '{tmp_path / 'none'}' is not a "
                                                          "directory: pass a directory of reference images")
    assert not (tmp_path / "run/checkpoints").exists()


def test_an_unreadable_weights_file_is_named_by_its_config_key(tmp_path):
    """The extractors' errors name ldm-eval's options; in training they name the sample.* key the user set."""
    from ldm.training.sample_metrics import SampleMetrics

    bad = tmp_path / "pt_inception.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as error:
        SampleMetrics(one_process(), ["fid"], "standard", str(bad), "", [], ["a"], 2, 0, 3, False)
    message = str(error.value)
    assert message.startswith(f"sample.inception '{bad}' cannot be read as ") and "--" not in message, message
