"""Generate images with a trained model: text-to-image, img2img and inpainting.

    python inference/generate.py "a red circle" --model runs/ldm-tiny/model [--steps 25 --cfg 7.5 --seed 42 ...]
    python inference/generate.py "a red car at night" --model DIR --init-image car.png --strength 0.6
    python inference/generate.py "a blue door" --model DIR --init-image house.png --mask door-mask.png

The entry script next to train/'s: the same command as `ldm-generate` and `python -m ldm.generate` (ldm/generate.py,
where every option is documented: `--help`), with the same arguments, images and exit codes. The PNGs go to
`--outdir` (default `outputs/`) with A1111-style `parameters` metadata, stdout carries only their paths, and a bad
input is one line on stderr (`error: ...`, exit code 2) with no file written. `--model` takes a diffusers-format
directory, such as `<train.output_dir>/model` written by train/train_ldm.py, or a hub id; without it, the bundled
32-px shapes demo.
"""

from __future__ import annotations

from ldm.generate import main

if __name__ == "__main__":
    main()
