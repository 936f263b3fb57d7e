"""bench/bench_vs_diffusers_vae.py and bench/peer_runner.py: the photo crops, the metrics on known inputs, the
matched snapshots, the settings both trainers get, and the timing child's snapshots."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_vs_diffusers_vae as bench  # noqa: E402


def test_photo_crops_cut_non_overlapping_squares_row_by_row_and_grey_becomes_rgb():
    grey = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7)
    crops = bench.photo_crops(grey, 2)
    assert len(crops) == 2 * 3  # the last row and column (partial squares) are dropped
    assert all(c.shape == (2, 2, 3) for c in crops)
    np.testing.assert_array_equal(crops[0][..., 0], [[0, 1], [7, 8]])
    np.testing.assert_array_equal(crops[4][..., 2], [[16, 17], [23, 24]])  # row 1, column 1
    assert all((c[..., 0] == c[..., 2]).all() for c in crops)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    assert bench.photo_crops(rgba, 4)[0].shape == (4, 4, 3)
    with pytest.raises(ValueError, match="uint8"):
        bench.photo_crops(np.zeros((4, 4), dtype=np.float32), 2)


class _MeanColour:
    """A 3-d stand-in feature extractor (the ldm.eval ImageFeatures protocol): each image's mean colour."""

    name, dim = "mean colour", 3

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3))


@pytest.mark.slow  # imports torchmetrics' image metrics and FID: ~9 s of CPU alone on this machine, less in the suite
def test_metrics_on_known_inputs():
    """An offset of 0.2 in [-1, 1] is 0.1 in [0, 1]: MSE 0.01, PSNR exactly 20 dB for every image. The same images
    give SSIM 1 and a Frechet distance of 0 in any feature space."""
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16) * 1.6 - 1.0  # in [-1, 0.6], so x + 0.2 stays in range
    lpips_stub = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    shifted = bench.reconstruction_metrics(x, x + 0.2, lpips_stub, None)
    assert shifted["psnr"] == pytest.approx(20.0, abs=1e-4)  # float32 rounding of the 0.1 offset
    assert shifted["lpips"] == pytest.approx(0.2, abs=1e-6)
    same = bench.reconstruction_metrics(x, x.clone(), None, _MeanColour())
    assert same["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert same["rfid"] == pytest.approx(0.0, abs=1e-6)
    assert math.isinf(same["psnr"])
    # every pixel 25.5 levels brighter: the means move by ~25.5 per channel and the covariances stay (up to the uint8
    # rounding), so the Frechet distance is |mu_1 - mu_2|^2 = 3 * 25.5^2; 2% covers the rounding
    brighter = bench.reconstruction_metrics(x, x + 0.2, None, _MeanColour())
    assert brighter["rfid"] == pytest.approx(3 * 25.5**2, rel=0.02)


def test_bicubic_keeps_a_flat_image_flat():
    x = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(bench.bicubic(x, 4), x)


def test_equal_wall_time_takes_the_last_snapshot_written_in_time():
    snaps = [{"step": 0, "time": 0.0}, {"step": 20, "time": 9.0}, {"step": 40, "time": 21.0}]
    assert bench.at_time(snaps, 20.0)["step"] == 20
    assert bench.at_time(snaps, 21.0)["step"] == 40
    assert bench.at_time([{"step": 0, "time": 3.0}, {"step": 20, "time": 9.0}], 1.0)["step"] == 0


@pytest.mark.slow  # imports diffusers' AutoencoderKL (seconds alone; shared with most of the suite)
def test_a_snapshot_loads_back_into_the_preset_and_a_wrong_one_is_refused(tmp_path):
    from ldm.vae.presets import build_vae

    torch.manual_seed(1)
    vae = build_vae("tiny", 16)
    torch.save([p.detach().clone() for p in vae.parameters()], tmp_path / "s.pt")
    loaded = bench.load_snapshot(tmp_path / "s.pt", "tiny", 16)
    assert all(torch.equal(p, q) for p, q in zip(vae.parameters(), loaded.parameters()))
    torch.save([p.detach() for p in vae.parameters()][:-1], tmp_path / "short.pt")
    with pytest.raises(ValueError, match="parameters"):
        bench.load_snapshot(tmp_path / "short.pt", "tiny", 16)


def test_both_trainers_get_the_same_settings(tmp_path):
    args = bench.parse_args(["--steps", "30", "--lr", "3e-4", "--kl-weight", "1e-5", "--perceptual-weight", "0.5",
                             "--disc-start", "7", "--disc-weight", "0.25", "--batch-size", "4"])
    cmds = bench.commands(args, tmp_path / "tak.py", tmp_path / "cfg", tmp_path / "data", tmp_path / "p.png", tmp_path)
    ours = dict(a.split("=", 1) for a in cmds["ours"] if "=" in a)
    theirs = dict(a.removeprefix("--").split("=", 1) for a in cmds["diffusers"] if "=" in a)
    pairs = {"optim.lr": "learning_rate", "optim.disc_lr": "disc_learning_rate", "loss.kl_weight": "kl_scale",
             "loss.perceptual_weight": "perceptual_scale", "loss.disc_start": "disc_start",
             "loss.disc_weight": "disc_scale", "train.batch_size": "train_batch_size",
             "train.max_steps": "max_train_steps", "data.resolution": "resolution", "loss.recon": "rec_loss",
             "optim.weight_decay": "adam_weight_decay", "optim.max_grad_norm": "max_grad_norm"}
    for key, flag in pairs.items():
        assert float(ours[key]) == float(theirs[flag]) if key != "loss.recon" else ours[key] == theirs[flag], key
    assert ours["optim.betas"] == f"[{theirs['adam_beta1']},{theirs['adam_beta2']}]"
    with pytest.raises(SystemExit):
        bench.parse_args(["--resolution", "36"])


@pytest.mark.slow  # a python subprocess that imports torch (~5-10 s on a loaded 2-core machine)
def test_the_child_times_steps_and_snapshots_only_the_tracked_optimizer(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import torch\n"
        "torch.manual_seed(0)\n"
        "a, d = torch.nn.Linear(3, 2), torch.nn.Linear(4, 4)  # 8 and 20 elements\n"
        "opt_a, opt_d = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(d.parameters(), lr=0.1)\n"
        "torch.save([p.detach().clone() for p in a.parameters()], 'initial.pt')\n"
        "for _ in range(4):\n"
        "    a(torch.ones(1, 3)).sum().backward(); opt_a.step(); opt_a.zero_grad()\n"
        "    d(torch.ones(1, 4)).sum().backward(); opt_d.step(); opt_d.zero_grad()\n"
        "torch.save([p.detach().clone() for p in a.parameters()], 'final.pt')\n"
    )
    options = {"snapshot_every": 2, "snapshot_numel": 8, "snapshot_dir": str(tmp_path / "snaps")}
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_vs_diffusers_vae.py"), "--_child", str(out), "1",
                    json.dumps(options), str(script)], cwd=tmp_path, check=True, timeout=120)
    data = json.loads(out.read_text())
    assert len(data["steps"]) == 8 and data["tracked_steps"] == 4  # every optimizer step timed, one optimizer tracked
    assert [s["step"] for s in data["snapshots"]] == [0, 2, 4]
    assert data["steps"] == sorted(data["steps"]) and data["rss_kib"] > 0
    for snap, reference in (("step-000000.pt", "initial.pt"), ("step-000004.pt", "final.pt")):
        got, want = (torch.load(p, weights_only=True) for p in (tmp_path / "snaps" / snap, tmp_path / reference))
        assert all(torch.equal(g, w) for g, w in zip(got, want))
