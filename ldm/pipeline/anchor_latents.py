"""Latents a model generates, saved for a VAE fine-tune to keep decoding them as the old decoder does.

    python -m ldm.pipeline.anchor_latents MODEL OUT.safetensors --captions DATA_DIR_OR_TXT [--num 512] [--seed 1000]

A U-Net's samples are not the encoder's latents: they sit off the encoded images, in ways the encoder never
produces. A fine-tuned decoder that agrees with the old one on every encoded image can still draw those differently
(in the pink demo, generated orange and yellow latents came out pink). `loss.decoder_anchor_weight` in
`train/train_vae.py` keeps the new decoder's output equal to the old one on the latents this writes.

One image per caption, seed `--seed + i`; captions are the distinct ones of a dataset's metadata.jsonl (`text`) or a
text file (one per line), in a shuffled order fixed by the seed, repeated if fewer than `--num`. The file holds
`latents` (N, C, h, w), float32, as the VAE decodes them (divided by the scaling factor), and in its header the
model, sampler settings and a digest of the captions.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from ldm.errors import OneLineArgumentParser, UserError, exit_on_user_error
from ldm.files import atomic_write_safetensors
from ldm.pipeline.pipeline import Pipeline
from ldm.progress import progress_bar


def read_captions(source: str | Path, caption_column: str = "text") -> list[str]:
    """The distinct non-empty captions of a dataset directory's metadata.jsonl, or of a text file, sorted."""
    path = Path(source)
    if path.is_dir():
        meta = path / "metadata.jsonl"
        if not meta.is_file():
            raise UserError(f"--captions {path}: no metadata.jsonl there; pass a dataset directory or a .txt file")
        captions = []
        for number, line in enumerate(meta.read_text().splitlines(), 1):
            if line.strip():
                try:
                    captions.append(str(json.loads(line).get(caption_column, "")))
                except json.JSONDecodeError as e:
                    raise UserError(f"{meta}:{number}: not JSON ({e.msg}); fix or remove that line") from None
    elif path.is_file():
        captions = path.read_text().splitlines()
    else:
        raise UserError(f"--captions {path}: no such file or directory")
    distinct = sorted({c.strip() for c in captions if c.strip()})
    if not distinct:
        raise UserError(f"--captions {path}: no captions found (key '{caption_column}' in metadata.jsonl)")
    return distinct


def pick_captions(captions: list[str], num: int, seed: int) -> list[str]:
    """`num` captions: a seeded shuffle of all of them, repeated (reshuffled) as often as needed."""
    rng, picked = random.Random(seed), []
    while len(picked) < num:
        order = list(captions)
        rng.shuffle(order)
        picked += order
    return picked[:num]


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = OneLineArgumentParser(prog="python -m ldm.pipeline.anchor_latents", description=__doc__.splitlines()[0])
    p.add_argument("model", help="the model whose U-Net samples (directory or single file)")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--captions", required=True, help="a dataset directory (metadata.jsonl) or a text file")
    p.add_argument("--caption-column", default="text")
    p.add_argument("--num", type=int, default=512)
    p.add_argument("--seed", type=int, default=1000, help="image i uses seed + i (default 1000)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--sampler", default="euler_a")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.num < 1:
        raise UserError(f"--num must be at least 1, got {args.num}")
    if not args.out.endswith(".safetensors"):
        raise UserError(f"{args.out}: the output must be a .safetensors file")
    captions = pick_captions(read_captions(args.captions, args.caption_column), args.num, args.seed)
    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    latents = [
        pipe(caption, steps=args.steps, cfg=args.cfg, sampler=args.sampler, seed=args.seed + i,
             show_progress=False).latents
        for i, caption in enumerate(progress_bar(captions, desc="sampling", unit="image"))
    ]
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    settings = dict(model=str(args.model), steps=args.steps, cfg=args.cfg, sampler=args.sampler, seed=args.seed,
                    captions_sha256=digest)
    stacked = torch.cat(latents).contiguous()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors(args.out, {"latents": stacked}, metadata={k: str(v) for k, v in settings.items()})
    print(f"wrote {args.out}: {tuple(stacked.shape)} latents from {len(set(captions))} captions")


if __name__ == "__main__":
    main()
