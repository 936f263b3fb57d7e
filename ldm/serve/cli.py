"""`ldm-serve`: load a model once and serve the web page and an A1111-compatible HTTP API.

    ldm-serve                                     # the bundled demo model on http://127.0.0.1:7860
    ldm-serve --model DIR --model DIR2 --api-auth me:secret --listen
    ldm-serve --models-dir models/                # each model directory and *.safetensors file in it
    ldm-serve --model DIR --controlnet-dir controlnets/   # + A1111 ControlNet units naming what is in it
    ldm-serve --model DIR --ip-adapter-dir ip-adapters/   # + the extension's IP-Adapter units, by name
    ldm-serve --models-dir models/ --comfy-dir comfy/     # ComfyUI clients' uploads and outputs kept there
    ldm-serve --models-dir models/ --vae-dir vae/         # + ComfyUI's VAELoader naming the VAEs in it
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.errors import OneLineArgumentParser, UserError, exit_on_user_error

log = logging.getLogger("ldm.serve")


def build_parser() -> argparse.ArgumentParser:
    examples = "\n".join(line for line in __doc__.splitlines() if line.startswith("    ldm-serve"))
    p = OneLineArgumentParser(prog="ldm-serve", description=__doc__.split("\n\n")[0], epilog="examples:\n" + examples,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None,
                   help="a diffusers-format model directory or a single .safetensors checkpoint (as ldm-generate "
                   "--model); repeat to list several, which clients choose among by name (sd_model_checkpoint: the "
                   "directory's name, the file's stem). Default: the bundled demo model")
    p.add_argument("--models-dir", default=None,
                   help="also list every model directory and every .safetensors single file directly under this one")
    p.add_argument("--lora-dir", default=None,
                   help="LoRA files that prompts may name as <lora:NAME:WEIGHT> (NAME.safetensors in this directory)")
    p.add_argument("--embeddings-dir", default=None,
                   help="textual-inversion embeddings that prompts may use by name (A1111's embeddings/ folder, "
                   "searched below too; GET /sdapi/v1/embeddings lists them)")
    p.add_argument("--controlnet-dir", default=None,
                   help="ControlNets that requests may name in alwayson_scripts.controlnet (A1111's ControlNet "
                   "extension): each .safetensors file (by stem) and diffusers ControlNet directory in it or below")
    p.add_argument("--ip-adapter-dir", default=None,
                   help="IP-Adapters that requests may name in alwayson_scripts.controlnet (an IP-Adapter module such "
                   "as ip-adapter_clip_sd15): each adapter .safetensors/.bin file (by stem) in it or below, its "
                   "image encoder in an image_encoder/ folder next to it")
    p.add_argument("--ip-image-encoder", default=None, metavar="DIR",
                   help="the CLIP vision model directory for every IP-Adapter, in place of an image_encoder/ folder "
                   "next to each (as ldm-generate --ip-image-encoder)")
    p.add_argument("--vae-dir", default=None,
                   help="VAEs that ComfyUI graphs may name in a VAELoader node (ComfyUI's models/vae folder): each "
                   "VAE .safetensors file (by its file name) and diffusers VAE directory (by its name) directly in "
                   "it, as ldm-generate --vae takes them")
    p.add_argument("--comfy-dir", default=None,
                   help="ComfyUI API: the folder for its input/ (uploads), output/ (SaveImage) and temp/ "
                   "(PreviewImage) files. Default: a temporary folder, removed when the server stops")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--listen", action="store_true", help="bind all interfaces (0.0.0.0); set --api-auth with it")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, as A1111)")
    p.add_argument("--api-auth", default=None, help="user:pass[,user2:pass2]: HTTP basic auth on every path")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (one worker on this device)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--queue-size", type=int, default=16, help="jobs that may wait; one more gets 429 (default 16)")
    p.add_argument("--max-pixels", type=int, default=1024 * 1024, help="width x height per image (default 1048576)")
    p.add_argument("--max-steps", type=int, default=150, help="denoising steps per request (default 150)")
    p.add_argument("--max-images", type=int, default=16, help="batch_size x n_iter per request (default 16)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="request body size in MiB (default 32)")
    p.add_argument("--quiet", "-q", action="store_true", help="warnings and errors only")
    return p


def _check_port_free(host: str, port: int) -> None:
    """Say which option to change before the model is loaded, not after (uvicorn would exit 1 with an errno)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; pass another --port") from None


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    for name, value in (("--queue-size", args.queue_size), ("--max-pixels", args.max_pixels),
                        ("--max-steps", args.max_steps), ("--max-images", args.max_images),
                        ("--max-body-mb", args.max_body_mb)):
        if value <= 0:
            raise UserError(f"{name} must be positive, got {value}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number (0..65535)")

    from ldm.serve.auth import parse_credentials

    credentials = parse_credentials(args.api_auth) if args.api_auth else None
    host = "0.0.0.0" if args.listen else args.host
    if host not in ("127.0.0.1", "localhost", "::1") and not credentials:
        log.warning("warning: listening on %s without --api-auth: anyone who can reach this port can use the "
                    "model", host)
    _check_port_free(host, args.port)
    if args.lora_dir is not None and not Path(args.lora_dir).expanduser().is_dir():
        raise UserError(f"--lora-dir '{args.lora_dir}' is not a directory")
    if args.embeddings_dir is not None and not Path(args.embeddings_dir).expanduser().is_dir():
        raise UserError(f"--embeddings-dir '{args.embeddings_dir}' is not a directory")
    for option, value in (("--controlnet-dir", args.controlnet_dir), ("--ip-adapter-dir", args.ip_adapter_dir),
                          ("--ip-image-encoder", args.ip_image_encoder)):
        if value is not None and not Path(value).expanduser().is_dir():
            raise UserError(f"{option} '{value}' is not a directory")
    if args.comfy_dir is not None and Path(args.comfy_dir).expanduser().exists() and \
            not Path(args.comfy_dir).expanduser().is_dir():
        raise UserError(f"--comfy-dir '{args.comfy_dir}' is not a directory")
    if args.ip_image_encoder is not None and args.ip_adapter_dir is None:
        raise UserError("--ip-image-encoder only applies with --ip-adapter-dir DIR")

    import uvicorn

    from ldm.pipeline import Pipeline
    from ldm.serve.api import IPAdapterDirs, Limits
    from ldm.serve.app import create_app
    from ldm.serve.models import list_models, list_vaes
    from ldm.serve.worker import Worker

    models = list_models(args.model, args.models_dir)
    vaes = list_vaes(args.vae_dir) if args.vae_dir is not None else None
    limits = Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images,
                    max_body_bytes=int(args.max_body_mb * 2**20))

    def load(name: str) -> Pipeline:
        spec = models[name]
        log.info("loading %s on %s", spec.name, args.device)
        return Pipeline.open(spec, args.device, args.dtype, lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
                             controlnet_dir=args.controlnet_dir)

    worker = Worker(load, next(iter(models)), args.queue_size)
    worker.start()
    app = create_app(models, worker, limits, credentials, args.lora_dir, args.embeddings_dir, args.controlnet_dir,
                     IPAdapterDirs(args.ip_adapter_dir, args.ip_image_encoder),
                     None if args.comfy_dir is None else str(Path(args.comfy_dir).expanduser()), vaes)
    log.info("ldm-serve: http://%s:%d/ (APIs: A1111 /sdapi/v1/..., ComfyUI /prompt /ws; models: %s)", host,
             args.port, ", ".join(models))
    config = uvicorn.Config(app, host=host, port=args.port, log_level="warning" if args.quiet else "info",
                            access_log=not args.quiet)
    try:
        uvicorn.Server(config).run()
    finally:
        worker.stop()
