"""Our train/train_vae.py against diffusers' own AutoencoderKL trainer (train_autoencoderkl.py), on real photos.

    python bench/bench_vs_diffusers_vae.py [--diffusers-script PATH] [--vae shapes-f4] [--resolution 32] \
        [--batch-size 8] [--steps 60] [--snapshot-every 10] [--warmup 5] [--lr 5e-4] [--kl-weight 1e-6] \
        [--perceptual-weight 0] [--disc-start 100000] [--disc-weight 0.5] [--heldout 128] [--threads 1] \
        [--workdir DIR [--reuse]]

diffusers' script (examples/research_projects/autoencoderkl/) is not in the wheel. Without `--diffusers-script` it
is downloaded at the tag of the installed diffusers into the work folder; offline that fails with a message saying
how to fetch it by hand. It imports `taming` (taming-transformers, for its NLayerDiscriminator; install it with
`pip install --no-deps taming-transformers==0.0.1`: its metadata pulls pytorch-lightning, which the script does not
use) and `lpips`.

The images: scikit-image's sample photos (BSD-3; they ship in its wheel), grey ones as RGB, cut into non-overlapping
`--resolution` squares. Whole photos are held out (`HELDOUT`), so no held-out crop shares a photo with a training
crop. Both trainers read the same training folder; ours moves one crop of it to its own validation split
(`data.num_val=1`, it needs one), so it trains on one crop fewer.

Same for both: the AutoencoderKL layout (`ldm.vae.presets`, saved as the config diffusers' script builds from; the
same seed gives both the same initial weights, which the bench checks), batch, optimizer steps, fp32, Adam betas
(0.5, 0.9) without weight decay (their AdamW at weight decay 0), eps 1e-8, constant lr without warmup for both
networks, gradient clipping 1.0, L1 reconstruction, KL weight, LPIPS-VGG weight (ours: loss.perceptual_weight, theirs:
--perceptual_scale), hinge GAN from `--disc-start` with the adaptive weight times `--disc-weight` (theirs:
--disc_scale, --disc_factor 1), a 3-layer 64-channel PatchGAN with BatchNorm, no EMA, no flips, loader workers 0.
Known differences, all theirs by design: LPIPS is computed under no_grad (it adds to their loss value, never to the
gradient: with a perceptual weight > 0 only ours learns from it); they run the discriminator and the two adaptive-weight
gradients every step even before `disc_start` (cost only, the factor is 0); after `disc_start` they alternate
autoencoder and discriminator steps and count both in their step counter (ours does both in one step), so the bench
counts autoencoder optimizer steps; the data order differs (each trainer's own shuffling). Neither logs to a tracker
(ours: train.report_to=none; theirs: `--report_to aim`, a tracker accelerate skips when its package is missing, as
here): with TensorBoard their script cannot pass step 1, where it validates (it stores the list-valued
`--validation_image` as a TensorBoard hparam, which refuses lists, and then hands `add_images` a (1, 2, 3, H, W) stack).

LPIPS offline: the `lpips` wheel ships its linear heads, but the VGG16 backbone's ImageNet weights come from
torchvision's download, which is unreachable here. Both trainers then use a RANDOM VGG16 backbone (ours:
loss.lpips_pretrained_backbone=false; theirs: the child makes lpips build its VGG16 with `pretrained=False`, what
`pnet_rand=True` does, before their script runs; their file is not touched). With a random backbone the perceptual
term is a random-feature distance, so the default is `--perceptual-weight 0`: the one setting where both minimise
exactly the same objective.

Each trainer runs unmodified in its own subprocess through bench/peer_runner.py, which times every optimizer step
and saves the autoencoder's weights (the optimizer's parameters) before the first step and every `--snapshot-every`
autoencoder steps, outside the timing. The snapshots are then evaluated here on `--heldout` evenly spaced held-out
crops (posterior mode): PSNR and SSIM (torchmetrics, images in [0, 1], mean over crops), LPIPS with a random VGG16
backbone (seed 0, the same module for every row: a feature distance, NOT the calibrated LPIPS), and an rFID-style
Frechet distance between the held-out crops and their reconstructions in the 64-d space of the shapes demo's image
tower (ldm.quality.features.DemoFeatures; the only image network with weights offline; it was trained on shapes, not
photos: NOT published rFID, comparable only within this table). "Equal steps" compares snapshots at the same step;
"equal wall time" takes the time T the faster trainer needed for all its steps (from the end of its first step,
snapshot writing excluded) and each trainer's last snapshot at or before T. A bicubic row (down by the VAE's factor
and up again) is a reference.

"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from peer_runner import child_main, peer_script, print_speed_table, run_child, speed

ROOT = Path(__file__).resolve().parents[1]
RAW_URL = ("https://raw.githubusercontent.com/huggingface/diffusers/v{version}/examples/research_projects/"
           "autoencoderkl/train_autoencoderkl.py")
ARMS = ("diffusers", "ours")  # theirs first: the run that can fail on a missing package fails early
# skimage.data photos in its wheel (grey ones become RGB); retina and hubble_deep_field are left out (large, mostly
# black: they would outnumber the rest), page and text too (documents); cat is chelsea again
TRAIN_PHOTOS = ("astronaut", "coffee", "immunohistochemistry", "camera", "brick", "grass", "gravel", "coins", "moon")
HELDOUT = ("chelsea", "rocket")
NO_TRACKER = "aim"  # a tracker whose package is not installed: accelerate then logs nowhere (checked in main)


# ---------------------------------------------------------------------------------------------------- the inputs


def photo_crops(image: np.ndarray, size: int) -> list[np.ndarray]:
    """Non-overlapping (size, size, 3) uint8 squares, row by row, of an (H, W) or (H, W, 3|4) image."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    h, w = image.shape[:2]
    return [image[y:y + size, x:x + size] for y in range(0, h - size + 1, size) for x in range(0, w - size + 1, size)]


def write_crops(folder: Path, names: tuple[str, ...], size: int) -> int:
    """The crops of scikit-image's sample photos `names` as PNGs in `folder`; returns how many."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name in names:
        for i, crop in enumerate(photo_crops(getattr(data, name)(), size)):
            Image.fromarray(crop).save(folder / f"{name}-{i:03d}.png")
            count += 1
    return count


def read_crops(folder: Path, limit: int = 0) -> torch.Tensor:
    """(N, 3, H, W) float in [-1, 1], the PNGs in name order; with `limit`, at most that many, evenly spaced."""
    from PIL import Image

    files = sorted(folder.glob("*.png"))
    if 0 < limit < len(files):
        files = [files[i * len(files) // limit] for i in range(limit)]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def commands(args: argparse.Namespace, script: Path, config: Path, data: Path, probe: Path,
             out: Path) -> dict[str, list[str]]:
    """The two trainers' command lines (after `python`), with matching settings."""
    steps = args.steps
    ours = [
        str(ROOT / "train" / "train_vae.py"), "--config", str(ROOT / "configs" / "vae" / "tiny.yaml"),
        f"model.preset={args.vae}", f"data.path={data}", f"data.resolution={args.resolution}",
        "data.center_crop=true", "data.random_flip=false", "data.num_workers=0", "data.num_val=1",
        "loss.recon=l1", f"loss.perceptual_weight={args.perceptual_weight}", "loss.lpips_net=vgg",
        "loss.lpips_pretrained_backbone=false", f"loss.kl_weight={args.kl_weight}", "loss.gan=hinge",
        f"loss.disc_start={args.disc_start}", f"loss.disc_weight={args.disc_weight}", "loss.learn_logvar=false",
        "disc.num_layers=3", "disc.base_channels=64", "disc.norm=batch",
        f"optim.lr={args.lr}", f"optim.disc_lr={args.lr}", "optim.betas=[0.5,0.9]", "optim.weight_decay=0",
        "optim.warmup_steps=0", "optim.max_grad_norm=1.0",
        f"train.output_dir={out / 'ours'}", f"train.max_steps={steps}", f"train.batch_size={args.batch_size}",
        "train.mixed_precision='no'", "train.seed=0", "train.ema_decay=0", f"train.log_every={steps}",
        f"train.val_every={steps}", f"train.checkpoint_every={steps}", "train.cpu=true", "train.report_to=none",
    ]
    theirs = [
        str(script), f"--model_config_name_or_path={config}", f"--train_data_dir={data}", "--image_column=image",
        f"--resolution={args.resolution}", f"--train_batch_size={args.batch_size}", f"--max_train_steps={steps}",
        f"--learning_rate={args.lr}", f"--disc_learning_rate={args.lr}", "--lr_scheduler=constant",
        "--disc_lr_scheduler=constant", "--lr_warmup_steps=0", "--adam_beta1=0.5", "--adam_beta2=0.9",
        "--adam_weight_decay=0", "--adam_epsilon=1e-8", "--max_grad_norm=1.0", "--rec_loss=l1",
        f"--perceptual_scale={args.perceptual_weight}", f"--kl_scale={args.kl_weight}",
        f"--disc_start={args.disc_start}", "--disc_factor=1.0", f"--disc_scale={args.disc_weight}", "--disc_loss=hinge",
        "--mixed_precision=no", "--dataloader_num_workers=0", f"--output_dir={out / 'diffusers'}",
        f"--cache_dir={out / 'hf-datasets'}", f"--checkpointing_steps={10 * steps}",
        f"--validation_steps={10 * steps}", f"--validation_image={probe}", "--seed=0", f"--report_to={NO_TRACKER}",
    ]
    return {"ours": ours, "diffusers": theirs}


# ---------------------------------------------------------------------------------------------------- metrics


def load_snapshot(file: Path, preset: str, resolution: int):
    """The AutoencoderKL of `preset` with the snapshot's tensors (optimizer order = parameter order)."""
    from ldm.vae.presets import build_vae

    vae = build_vae(preset, resolution).eval()
    tensors = torch.load(file, weights_only=True)
    params = list(vae.parameters())
    if len(tensors) != len(params):
        raise ValueError(f"{file} holds {len(tensors)} tensors, the {preset} VAE has {len(params)} parameters")
    with torch.no_grad():
        for p, t in zip(params, tensors):
            p.copy_(t)
    return vae


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Posterior-mode reconstructions of x (N, 3, H, W) in [-1, 1], clamped to [-1, 1]."""
    return torch.cat([vae(b, sample_posterior=False).sample.clamp(-1, 1) for b in x.split(batch_size)])


@torch.no_grad()
def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, perceptual, features) -> dict[str, float]:
    """PSNR (dB) and SSIM of images in [0, 1], LPIPS under `perceptual`, and the Frechet distance between the two
    sets in the space of `features` (an ldm.eval ImageFeatures). x, x_hat: (N, 3, H, W) in [-1, 1]; means over N."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from ldm.quality.features import extract, to_uint8
    from ldm.quality.metrics import fid

    a, b = (x + 1) / 2, (x_hat + 1) / 2
    psnr = peak_signal_noise_ratio(b, a, data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")
    ssim = structural_similarity_index_measure(b, a, data_range=1.0)
    result = {"psnr": float(psnr), "ssim": float(ssim)}
    if perceptual is not None:
        result["lpips"] = float(torch.cat([perceptual(p, q) for p, q in zip(x.split(32), x_hat.split(32))]).mean())
    if features is not None:
        real, fake = (extract(features, list(to_uint8(i).unbind())) for i in (a, b))
        result["rfid"] = fid(real.double(), fake.double())
    return result


def bicubic(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Down by `factor` (antialiased bicubic) and up again: the reference a learned autoencoder must beat."""
    import torch.nn.functional as F

    small = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def at_time(snapshots: list[dict], limit: float) -> dict:
    """The last snapshot written at or before `limit` seconds (the step-0 one at the latest)."""
    return [s for s in snapshots if s["time"] <= limit + 1e-9 or s["step"] == 0][-1]


# ---------------------------------------------------------------------------------------------------- running


def child_entry(argv: list[str]) -> None:
    """The child. For diffusers' arm, LPIPS gets a random VGG16 backbone (torchvision's ImageNet download is
    unreachable offline); their file is run as it is."""
    if json.loads(argv[2]).get("diffusers_environment"):
        from lpips import pretrained_networks

        init = pretrained_networks.vgg16.__init__

        def random_backbone(self, requires_grad=False, pretrained=True):
            init(self, requires_grad=requires_grad, pretrained=False)  # what LPIPS(pnet_rand=True) asks for

        pretrained_networks.vgg16.__init__ = random_backbone
    child_main(argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-script", help="a local copy of research_projects/autoencoderkl/"
                        "train_autoencoderkl.py")
    parser.add_argument("--vae", default="shapes-f4", help="ldm.vae.presets name")
    parser.add_argument("--resolution", type=int, default=32, help="crop side, px (a multiple of 8)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60, help="autoencoder optimizer steps per trainer")
    parser.add_argument("--snapshot-every", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median step time")
    parser.add_argument("--lr", type=float, default=5e-4, help="both networks, both trainers")
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--perceptual-weight", type=float, default=0.0,
                        help="LPIPS weight (random VGG backbone offline, see above)")
    parser.add_argument("--disc-start", type=int, default=100_000, help="step the GAN terms switch on")
    parser.add_argument("--disc-weight", type=float, default=0.5)
    parser.add_argument("--heldout", type=int, default=128, help="held-out crops evaluated, evenly spaced (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trainer (2 on a loaded 2-core "
                        "machine are slower: OpenMP threads wait on each other)")
    parser.add_argument("--workdir", help="keep inputs, logs and snapshots here (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="evaluate the runs already in --workdir again")
    args = parser.parse_args(argv)
    if args.resolution % 8:
        parser.error(f"--resolution {args.resolution} is not a multiple of 8 (diffusers' script requires it)")
    if not 0 < args.snapshot_every <= args.steps:
        parser.error("--snapshot-every must be in [1, --steps]")
    if args.warmup + 2 > args.steps:
        parser.error("--steps must exceed --warmup by at least 2")
    return args


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        child_entry(sys.argv[2:])
        return
    args = parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-vae-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    import diffusers

    script = peer_script(
        args.diffusers_script, RAW_URL.format(version=diffusers.__version__),
        work / f"train_autoencoderkl-v{diffusers.__version__}.py",
        "fetch examples/research_projects/autoencoderkl/train_autoencoderkl.py at a released tag by hand (e.g. `git "
        "show v0.40.0:examples/research_projects/autoencoderkl/train_autoencoderkl.py > tak.py` in a diffusers "
        "clone) and pass --diffusers-script tak.py",
    )
    from accelerate.tracking import get_available_trackers

    if NO_TRACKER in {str(t) for t in get_available_trackers()}:
        sys.exit(f"error: {NO_TRACKER} is installed, so diffusers' script would log to it: uninstall it for this bench")
    from bench_ldm_cache import cpu_model  # noqa: PLC0415  (bench/ is on sys.path when run as a script)

    from ldm.quality.features import DemoFeatures
    from ldm.vae.perceptual import build_lpips
    from ldm.vae.presets import build_vae, downsampling_factor

    train, held, config = work / f"train-{args.resolution}", work / f"heldout-{args.resolution}", work / "vae-config"
    if not any(train.glob("*.png")):
        write_crops(train, TRAIN_PHOTOS, args.resolution)
        write_crops(held, HELDOUT, args.resolution)
    vae = build_vae(args.vae, args.resolution)
    vae.save_config(config)
    numel = sum(p.numel() for p in vae.parameters())
    probe = sorted(held.glob("*.png"))[0]
    cmds = commands(args, script, config, train, probe, work)

    runs = {}
    for arm in ARMS:
        if args.reuse and (work / f"{arm}-run.json").is_file():
            runs[arm] = json.loads((work / f"{arm}-run.json").read_text())
            continue
        shutil.rmtree(work / arm, ignore_errors=True)
        options = {"snapshot_every": args.snapshot_every, "snapshot_numel": numel,
                   "snapshot_dir": str(work / arm / "snapshots"), "diffusers_environment": arm == "diffusers"}
        runs[arm] = run_child(Path(__file__), arm, cmds[arm], args.threads, "cpu", work, options)
        (work / f"{arm}-run.json").write_text(json.dumps(runs[arm]))
        print(f"{arm}: {runs[arm]['tracked_steps']} autoencoder steps in {runs[arm]['wall_s']:.0f} s",
              file=sys.stderr)

    # ---- evaluation of the snapshots on the held-out crops
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    perceptual, features = build_lpips("vgg", pretrained_backbone=False), DemoFeatures()
    x = read_crops(held, args.heldout)
    rows, curves = [], {}

    def evaluate(arm: str, snap: dict, full: bool) -> dict:
        """PSNR and SSIM of every snapshot (the curve); LPIPS and the rFID-style number only for the table's rows
        (a VGG16 over all held-out crops costs minutes per snapshot on a loaded CPU)."""
        if full and "lpips" in snap or not full and "psnr" in snap:
            return snap
        snap_vae = load_snapshot(work / arm / "snapshots" / snap["file"], args.vae, args.resolution)
        snap.update(reconstruction_metrics(x, reconstruct(snap_vae, x), perceptual if full else None,
                                           features if full else None))
        return snap

    for arm in ARMS:
        first = runs[arm]["steps"][0]
        for snap in runs[arm]["snapshots"]:
            snap["time"] = max(0.0, snap["time"] - first)  # seconds of training after the first step
            evaluate(arm, snap, full=False)
        curves[arm] = runs[arm]["snapshots"]
    initial = [torch.load(work / a / "snapshots" / "step-000000.pt", weights_only=True) for a in ARMS]
    same_start = all(torch.equal(p, q) for p, q in zip(*initial))
    last_common = max(set(s["step"] for s in curves["ours"]) & set(s["step"] for s in curves["diffusers"]))
    limit = min(curves[a][-1]["time"] for a in ARMS)
    for arm in ARMS:
        rows.append(("equal steps", arm, evaluate(arm, next(s for s in curves[arm] if s["step"] == last_common), True)))
    for arm in ARMS:
        rows.append((f"equal wall time ({limit:.0f} s)", arm, evaluate(arm, at_time(curves[arm], limit), True)))
    f = downsampling_factor(args.vae)
    ref = {"step": 0, "time": 0.0, **reconstruction_metrics(x, bicubic(x, f), perceptual, features)}
    rows.append((f"reference: bicubic /{f} then x{f}", "-", ref))

    # ---- report
    med = {arm: speed(runs[arm], args.warmup, args.steps - args.warmup - 1, args.batch_size, "cpu") for arm in ARMS}
    print(f"date {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}, machine {cpu_model()} "
          f"({os.cpu_count()} CPUs), torch threads {args.threads}, diffusers {diffusers.__version__}, their script "
          f"{script.name}")
    print(f"VAE {args.vae} ({numel / 1e6:.2f} M), {len(list(train.glob('*.png')))} training crops of "
          f"{args.resolution} px from {len(TRAIN_PHOTOS)} photos, {len(x)} held-out crops from {', '.join(HELDOUT)}; "
          f"batch {args.batch_size}, {args.steps} steps, lr {args.lr:g}, kl {args.kl_weight:g}, perceptual "
          f"{args.perceptual_weight:g} (random VGG16), disc start {args.disc_start}; same initial weights: "
          f"{'yes' if same_start else 'NO'}")
    print("| point | trainer | AE steps | train s | PSNR dB | SSIM | LPIPS (random VGG16) | rFID-style (demo tower) |")
    print("|---|---|---|---|---|---|---|---|")
    for point, arm, r in rows:
        print(f"| {point} | {arm} | {r['step']} | {r['time']:.0f} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
              f"{r['lpips']:.3f} | {r['rfid']:.3f} |")
    print("PSNR dB by step: " + "; ".join(
        f"{arm} " + ", ".join(f"{s['step']}: {s['psnr']:.2f}" for s in curves[arm]) for arm in ARMS))
    print_speed_table(med, ARMS)
    ratio = med["ours"]["samples_per_s"] / med["diffusers"]["samples_per_s"]
    memory = med["ours"]["peak_mib"] / med["diffusers"]["peak_mib"]
    print(f"ratio ours/diffusers: {ratio:.2f}x samples/s, {memory:.2f}x peak memory")
    print(json.dumps({"same_start": same_start, "speed": med, "curves": curves,
                      "rows": [{"point": p, "trainer": a, **r} for p, a, r in rows]}))


if __name__ == "__main__":
    main()
