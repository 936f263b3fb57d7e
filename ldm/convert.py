"""`ldm-convert SRC DST`: a diffusers model directory -> one `.safetensors` file in the original (CompVis) layout,
or such a file -> a diffusers directory. The direction follows from SRC.

    ldm-convert runs/ldm-tiny/model model.safetensors            # directory -> single file (A1111, ComfyUI)
    ldm-convert runs/ldm-tiny/model model-fp16.safetensors --half
    ldm-convert v1-5-pruned-emaonly.safetensors sd15/            # single file -> diffusers directory

The output is written atomically (never half a file or directory) and never over an existing one (checked before
the work and again when the output is put in place). A file written
here reads back in diffusers' `StableDiffusionPipeline.from_single_file(DST, config=SRC)` (SDXL directories, with
text_encoder_2: `StableDiffusionXLPipeline`, in Stability's layout); its header also holds
the component configs, so `ldm-generate --model DST` rebuilds the model exactly (ldm/singlefile/__init__.py).
An SD 2.x file holds OpenCLIP's whole text tower (its last block, text_projection and logit_scale: kept in the
directory's text_encoder/open_clip_extra.safetensors, or neutral; ldm/singlefile/open_clip_extra.py).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.errors import OneLineArgumentParser, UserError, exit_on_user_error


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    examples = "\n".join(line for line in __doc__.splitlines() if line.startswith("    ldm-convert"))
    p = OneLineArgumentParser(prog="ldm-convert", description=__doc__.splitlines()[0], epilog="examples:\n" + examples,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a diffusers model directory, or a .safetensors single file")
    p.add_argument("dst", help="the .safetensors file to write (from a directory), or the directory (from a file)")
    p.add_argument("--half", action="store_true", help="store floating-point weights as fp16")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="file -> directory: what the U-Net predicts, written to the scheduler config (default: the "
                   "file's metadata, NAME.yaml next to it, or the detected family's)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("ldm").addHandler(handler)
    logging.getLogger("ldm").setLevel(logging.INFO)
    try:
        # stdout carries only the written path: libraries' prints (DeepSpeed's accelerator notice when
        # save_pretrained imports it) go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            run(Path(args.src).expanduser(), Path(args.dst).expanduser(), args.half, args.prediction_type)
    finally:
        logging.getLogger("ldm").removeHandler(handler)
    print(Path(args.dst).expanduser())


def run(src: Path, dst: Path, half: bool = False, prediction_type: str | None = None) -> None:
    from ldm.singlefile.save import directory_to_file, file_to_directory

    if not src.exists():
        raise UserError(f"'{src}' does not exist")
    if dst.exists():
        raise UserError(f"'{dst}' already exists; choose a new name (ldm-convert never overwrites)")
    if src.is_dir():
        if prediction_type is not None:
            raise UserError("--prediction-type applies to file -> directory; a directory's scheduler config says it")
        parts = directory_to_file(src, dst, half=half)
        print(f"{dst}: {', '.join(f'{n} {k} tensors' for k, n in parts.items())}"
              f"{' (fp16)' if half else ''}", file=sys.stderr)
    else:
        if dst.suffix.lower() == ".safetensors":
            raise UserError(f"'{src}' is a single file, so DST is the diffusers directory to write, but '{dst}' ends in "
                            ".safetensors: name a directory (file -> file is not a conversion)")
        file_to_directory(src, dst, half=half, prediction_type=prediction_type)


if __name__ == "__main__":
    main()
