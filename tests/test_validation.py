"""The validation mechanism both stages share (ldm/training/validation.py) and stage 2's validation loss
(ldm/unet/val_loss.py) on a tiny float64 U-Net: fixed draws, bands, the split across processes, the JSON-lines log.

The training runs that write `val_loss.jsonl` (resume, 2 processes, SDXL, LoRA, stage 1) are tested where those runs
already are: tests/test_train_ldm.py, test_train_sdxl.py, test_train_vae.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import one_process
from ldm.config import load_config
from ldm.errors import UserError
from ldm.latents.cache import LatentCache, Shard
from ldm.text.conditioning import Conditioning
from ldm.training.validation import Sums, ValidationLog, band_label, process_batches, timestep_bands
from ldm.unet.config import LDMConfig
from ldm.unet.objective import NoiseConfig, build_noise_scheduler
from ldm.unet.presets import build_unet
from ldm.unet.val_loss import unet_val_loss

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_bands_cover_every_training_timestep_once():
    assert timestep_bands(1000, 4) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert [band_label(b) for b in timestep_bands(1000, 4)] == ["0-250", "250-500", "500-750", "750-1000"]
    assert timestep_bands(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert timestep_bands(1000, 1) == [(0, 1000)]
    assert timestep_bands(3, 3) == [(0, 1), (1, 2), (2, 3)]
    for bad in (0, 4):
        with pytest.raises(ValueError):
            timestep_bands(3, bad)


def test_batches_are_cut_once_and_dealt_so_every_process_makes_as_many_passes():
    groups = [1, 0, 1, 1, 0, 2, 1, 0, 1, 1]  # e.g. aspect-ratio buckets: a batch never mixes two
    alone = process_batches(10, 3, 0, 1, groups)
    assert [b for b, _ in alone] == [[1, 4, 7], [0, 2, 3], [6, 8, 9], [5]] and all(keep for _, keep in alone)
    for world in (2, 3, 5, 6):
        shares = [process_batches(10, 3, rank, world, groups) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1  # the same number of forward passes everywhere (FSDP)
        kept = [batch for share in shares for batch, keep in share if keep]
        assert sorted(kept) == sorted(b for b, _ in alone)  # each item once, in the same batch as on one process
        padded = [batch for share in shares for batch, keep in share if not keep]
        assert all(batch == alone[0][0] for batch in padded) and len(padded) == len(shares[0]) * world - len(alone)
    assert process_batches(0, 3, 0, 2) == []


def test_the_bands_weighted_by_their_counts_average_to_the_overall_number():
    sums = Sums(["loss", "mse"], ["a", "b"])
    sums.add({"loss": torch.tensor([1.0, 2.0, 3.0]), "mse": torch.tensor([1.0, 1.0, 1.0])}, band=0)
    sums.add({"loss": torch.tensor([10.0]), "mse": torch.tensor([4.0])}, band=1)
    result = sums.reduce(one_process())
    assert result == {"loss": 4.0, "mse": 1.75, "count": 4, "bands": {"a": {"loss": 2.0, "mse": 1.0, "count": 3},
                                                                      "b": {"loss": 10.0, "mse": 4.0, "count": 1}}}
    assert Sums(["loss"]).reduce(one_process()) == {"loss": None, "count": 0}


def row(step: int) -> dict:
    return {"step": step, "raw": {"loss": 0.5, "count": 4}}


def test_the_log_appends_rows_and_a_resume_keeps_those_up_to_its_step(tmp_path):
    directory = tmp_path / "checkpoints"  # made by the log when the first validation precedes the first checkpoint
    log = ValidationLog(directory, one_process(), start_step=0)
    for step in (2, 4, 6):
        log.write(step, {"raw": row(step)["raw"]})
    log.write(6, {"raw": {"loss": 9.0, "count": 4}})  # a step already written is not written twice
    path = directory / "val_loss.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == [row(2), row(4), row(6)]
    with open(path, "a") as f:  # killed while appending the row of step 8
        f.write('{"step": 8, "raw": {"lo')
    ValidationLog(directory, one_process(), start_step=4)  # resumed from the checkpoint of step 4
    assert [json.loads(line) for line in path.read_text().splitlines()] == [row(2), row(4)]
    log = ValidationLog(directory, one_process(), start_step=4)  # nothing to change: the file is left as it is
    log.write(6, {"raw": row(6)["raw"]})
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 3
    ValidationLog(directory, one_process(), start_step=0)  # a fresh start in the same directory starts a new file
    assert path.read_text() == ""


# ---------------------------------------------------------------------------------------------- stage 2's loss


def tiny_cache(indices: list[int]) -> LatentCache:
    """A latent cache in memory: rows of (4, 8, 8) posterior means and stds for the given dataset indices."""
    g = torch.Generator().manual_seed(0)
    n = len(indices)
    tensors = {"mean": torch.randn(n, 4, 8, 8, generator=g), "std": torch.rand(n, 4, 8, 8, generator=g) * 0.2,
               "index": torch.tensor(indices), "original_size": torch.full((n, 2), 16),
               "crop_top_left": torch.zeros(n, 2, dtype=torch.long)}
    manifest = {"data": {"random_flip": False, "buckets": None, "resolution": 16, "size": max(indices) + 1},
                "vae": {"scaling_factor": 0.5, "shift_factor": None}, "latent_shape": [4, 8, 8]}
    return LatentCache(Path("."), manifest, [Shard(tensors, [f"caption {i}" for i in indices], [], "build")])


def reference_loss(unet, scheduler, cache, contexts, cfg, bands) -> dict[str, list[tuple[float, float]]]:
    """The documented draws and the objective written out by hand in float64: {band label: [(loss, mse) per item]}.
    Only the scheduler's alpha_bar table comes from diffusers."""
    alpha_bar = scheduler.alphas_cumprod.double()
    x0, draws = [], []
    for position in range(len(cache)):
        item = cache.row(position)
        g = torch.Generator().manual_seed(2**40 + item["index"])
        noise = torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
        x0.append((item["mean"].double() + item["std"].double() * noise) * 0.5)  # the cache's scaling factor
        per_band = []
        for lo, hi in bands:
            t = torch.randint(lo, hi, (), generator=g)
            eps = torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
            if cfg.offset_noise:
                eps = eps + cfg.offset_noise * torch.randn(4, 1, 1, generator=g, dtype=torch.float64)
            per_band.append((t, eps))
        draws.append(per_band)
    x0 = torch.stack(x0)  # (N, 4, 8, 8)
    context = torch.stack([contexts[c] for c in cache.captions])  # (N, 77, 32)
    out = {}
    for k, band in enumerate(bands):
        t = torch.stack([d[k][0] for d in draws])  # (N,)
        eps = torch.stack([d[k][1] for d in draws])
        a = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = eps if cfg.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        mse = (unet(x_t, t, encoder_hidden_states=context).sample - target).pow(2).mean(dim=(1, 2, 3))
        snr = (a / (1 - a)).flatten()
        if cfg.min_snr_gamma:
            weight = snr.clamp(max=cfg.min_snr_gamma) / (snr + 1 if cfg.prediction_type == "v_prediction" else snr)
        else:
            weight = torch.ones_like(snr)
        out[band_label(band)] = list(zip((mse * weight).tolist(), mse.tolist()))
    return out


@pytest.mark.parametrize("cfg", [NoiseConfig(), NoiseConfig(prediction_type="v_prediction", min_snr_gamma=5.0,
                                                            offset_noise=0.1, input_perturbation=0.1)],
                         ids=["eps", "v-min-snr-offset"])
def test_the_loss_equals_an_independent_float64_recomputation(cfg):
    torch.manual_seed(0)
    unet = build_unet("tiny", sample_size=8, latent_channels=4, cross_attention_dim=32).double()
    scheduler = build_noise_scheduler(cfg)
    cache = tiny_cache([3, 8, 11, 20])  # dataset indices, not positions, seed the draws
    contexts = {c: torch.randn(77, 32, dtype=torch.float64) for c in cache.captions}

    def encode(captions: list[str]) -> Conditioning:
        return Conditioning(torch.stack([contexts[c] for c in captions]))

    bands = timestep_bands(1000, 4)
    unet.train()
    rng = torch.get_rng_state()
    result = unet_val_loss(one_process(), unet, scheduler, cache, range(4), encode, cfg, bands, batch_size=4)
    assert torch.equal(torch.get_rng_state(), rng) and unet.training  # training's draws and mode are untouched
    with torch.no_grad():
        expected = reference_loss(unet.eval(), scheduler, cache, contexts, cfg, bands)
    # float64 throughout: only the order of operations differs (~1e-16 relative). The min-SNR weight is diffusers'
    # compute_snr's, which works in float32 (~1e-7 relative) whatever the inputs' dtype.
    tolerance = 1e-6 if cfg.min_snr_gamma else 1e-12
    for label, values in expected.items():
        band = result["bands"][label]
        assert band["count"] == 4
        assert band["loss"] == pytest.approx(sum(v for v, _ in values) / 4, rel=tolerance)
        if cfg.min_snr_gamma:
            assert band["mse"] == pytest.approx(sum(m for _, m in values) / 4, rel=1e-12)
    assert ("mse" in result) == bool(cfg.min_snr_gamma)
    assert result["count"] == 16
    overall = sum(band["loss"] * band["count"] for band in result["bands"].values()) / result["count"]
    assert result["loss"] == pytest.approx(overall, rel=1e-12)
    if cfg.min_snr_gamma:
        return
    # the same weights give the same numbers again; other weights other ones
    unet.train()
    assert unet_val_loss(one_process(), unet, scheduler, cache, range(4), encode, cfg, bands, batch_size=4) == result
    with torch.no_grad():
        unet.conv_out.bias.add_(1e-3)
    changed = unet_val_loss(one_process(), unet, scheduler, cache, range(4), encode, cfg, bands, batch_size=4)
    assert changed["loss"] != result["loss"]


def test_two_processes_sum_what_one_process_computes():
    """In-process: ranks 0 and 1 of 2 each compute their batches; their tables add up to the 1-process table (the real
    2-process run, through gloo: tests/test_train_ldm.py::test_two_processes_and_the_export_loads_in_diffusers)."""
    torch.manual_seed(0)
    unet = build_unet("tiny", sample_size=8, latent_channels=4, cross_attention_dim=32)
    cache = tiny_cache(list(range(5)))
    context = torch.randn(1, 77, 32)
    def encode(captions: list[str]) -> Conditioning:
        return Conditioning(context.expand(len(captions), -1, -1))

    args = (build_noise_scheduler(NoiseConfig()), cache, range(5), encode, NoiseConfig(), timestep_bands(1000, 2), 2)
    tables = {}
    for world, ranks in ((1, [0]), (2, [0, 1])):
        for rank in ranks:
            accelerator = one_process(rank=rank, world=world)
            unet_val_loss(accelerator, unet, *args)
            tables[world, rank] = accelerator.reduced[0]
    # the same batches, computed the same way: equal up to float64 summation order
    assert torch.allclose(tables[2, 0] + tables[2, 1], tables[1, 0], rtol=1e-12, atol=0)
    assert int(tables[2, 0][0, 0, 1]) == 3 and int(tables[2, 1][0, 0, 1]) == 2  # batches [0, 1] [4] and [2, 3]


@pytest.mark.parametrize("overrides, message", [
    (["train.val_every=0"], "config key 'train.val_every': must be >= 1, got 0"),
    (["train.val_bands=0"], "config key 'train.val_bands': must be >= 1, got 0"),
    (["noise.num_train_timesteps=3", "train.val_bands=4"], "config key 'train.val_bands': 4 bands of 3 training "
     "timesteps would leave some empty: use at most noise.num_train_timesteps (4 is usual)"),
    (["data.num_val=-1"], "config key 'data.num_val': must be >= 0, got -1"),
    (["train.val_evry=5"], "unknown config key 'train.val_evry' (did you mean 'train.val_every'?)"),
])
def test_bad_validation_settings_are_one_line(overrides, message):
    with pytest.raises(UserError) as error:
        load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", overrides)
    assert str(error.value) == message


def test_stage_2_holds_nothing_out_unless_asked():
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml")
    assert cfg.data.num_val == 0 and cfg.train.val_every == 1000 and cfg.train.val_bands == 4


@pytest.mark.slow  # two `datasets` imagefolder loads: 12-29 s on the loaded shared cores
def test_stage_1_validates_a_val_folder_as_the_same_images_held_out(tmp_path):
    """data.val_path: a folder of the images data.num_val would hold out gives the same held-out inputs (pixels and
    captions, in the same order) and so the same draw-free numbers (PSNR, SSIM, KL of the posterior mode, on a tiny
    random VAE), and training keeps every image of data.path. Only the loss terms at the fixed posterior sample
    differ: an item's draws follow its index in its own dataset."""
    from ldm.data.config import DataConfig
    from ldm.data.dataset import split_train_val
    from ldm.data.loader import build_datasets
    from ldm.demo.shapes import write_dataset
    from ldm.vae.presets import build_vae
    from ldm.vae.validation import evaluate_reconstructions

    data = Path(write_dataset(tmp_path / "all", num_images=10, seed=0, size=32))
    _, val_idx = split_train_val(10, 3, seed=0)
    names = [f"{i:05d}.png" for i in val_idx]
    val = tmp_path / "val"
    val.mkdir()
    lines = (data / "metadata.jsonl").read_text().splitlines()
    (val / "metadata.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["file_name"] in names))
    for name in names:
        (val / name).write_bytes((data / name).read_bytes())
    split = build_datasets(DataConfig(path=str(data), num_val=3), one_process(), seed=0, caption_column="text")
    apart = build_datasets(DataConfig(path=str(data), num_val=0, val_path=str(val)), one_process(), seed=0,
                           caption_column="text")
    assert len(apart[0]) == 10 and len(split[0]) == 7 and len(apart[1]) == len(split[1]) == 3
    for i in range(3):  # (keys wrap around epochs: no iteration protocol)
        a, b = split[1][i], apart[1][i]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    torch.manual_seed(0)
    vae = build_vae("tiny", 32)
    numbers = [evaluate_reconstructions(vae, held_out, one_process(), None, grid_images=0)[0]
               for held_out in (split[1], apart[1])]
    for key in ("psnr", "ssim", "kl_loss"):
        assert numbers[0][key] == numbers[1][key], key  # the same batches through the same kernels: bit-equal
    assert numbers[0]["count"] == numbers[1]["count"] == 3
    assert numbers[0]["rec_loss"] != numbers[1]["rec_loss"]  # the fixed draws differ, so the test sees the data
