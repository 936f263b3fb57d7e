"""Encode a dataset once with a trained VAE: the latent cache that stage 2 trains the U-Net on.

    accelerate launch train/cache_latents.py --config configs/ldm/<preset>.yaml [key=value ...]

Takes the stage-2 config (its data, cache and train sections) and does what train_ldm.py does first, alone: writes
`cache.dir` (default `<train.output_dir>/latents`): shard-<rank>-<k>.safetensors from every process and, last,
manifest.json. Rerunning after an interruption keeps the shards already written; rerunning on a complete cache
only checks it. A cache built from another VAE, dataset or transform is refused unless cache.rebuild=true.
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import Accelerator

from ldm.errors import UserError, exit_on_user_error
from ldm.latents import ensure_latent_cache
from ldm.training.args import parse_train_args
from ldm.training.logs import setup_logging
from ldm.unet.config import LDMConfig
from ldm.vae.load_vae import check_vae

log = logging.getLogger("cache_latents")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg, resume = parse_train_args(LDMConfig, argv, description=__doc__.splitlines()[0])
    if resume is not None:
        raise UserError("--resume is not used by cache_latents.py: rerun the same command and it resumes by itself")
    # a missing or damaged VAE or a bad resolution is one line before any work; the VAE itself is loaded only if a
    # shard is to be encoded
    check_vae(cfg.latent_cache().vae, cfg.data.resolution)
    accelerator = Accelerator(cpu=cfg.train.cpu, mixed_precision=cfg.train.mixed_precision)
    setup_logging(accelerator.is_main_process, accelerator.process_index)
    cache = ensure_latent_cache(accelerator, cfg.data, cfg.latent_cache(), Path(cfg.train.output_dir) / "latents",
                                family=cfg.family)  # SD or SDXL: a cache built for the other is refused
    log.info(
        "latent cache %s is ready: %d latents of shape %s (scaling_factor %.4g), %d images skipped",
        cache.directory, len(cache), cache.latent_shape, cache.scaling_factor, len(cache.skipped),
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
