"""A checked ComfyUI graph -> what to run: one `GenerationRequest` layer per output node, as `from_a1111` is for
A1111's payloads. The graph is not interpreted node by node: each SaveImage/PreviewImage is traced back through the
node shapes this server runs, and those become the fields of the one request the pipeline takes:

    CheckpointLoaderSimple -> [LoraLoader ...] -> model / clip (-> [CLIPSetLastLayer] -> CLIPTextEncode x 2
        [-> ControlNetApplyAdvanced(ControlNetLoader, LoadImage) ...])
    EmptyLatentImage | LoadImage [-> ImageScale] -> VAEEncode | VAEEncodeForInpaint(mask) | + SetLatentNoiseMask
        -> KSampler | KSamplerAdvanced -> VAEDecode [-> ImageScale] -> SaveImage | PreviewImage
    the VAE inputs: the checkpoint's, or one VAELoader's (the request's `vae`, by its name in --vae-dir)

ComfyUI's conventions, mapped:
- seed: the request's `noise="comfy"`: the batch's initial noise is one CPU draw from torch.manual_seed(seed)
  (ComfyUI's comfy/sample.py prepare_noise);
- denoise d with s steps: ComfyUI runs the last s steps of a schedule of int(s / d) steps (comfy/samplers.py
  KSampler.set_steps); the request gets steps int(s / d) and the strength that runs exactly s of them;
- KSamplerAdvanced from start_at_step a to the end, noise added: the last steps - a steps of a `steps` schedule;
- sampler and scheduler names: ComfyUI's (`ldm.serve.comfy.nodes.SAMPLER_NAMES`); "normal" is the model's own
  timestep spacing;
- CLIPSetLastLayer -n is clip skip n; LoraLoader's strengths are a LoRA tag's two weights (text encoder, U-Net);
- ControlNetApplyAdvanced on both prompts: a ControlNet unit (its strength, start and end percent, the image as the
  control map, no preprocessor).
- KSampler -> LatentUpscale(By), bilinear -> KSampler with the same settings: the hires fix (`_hires`).
A graph of other shapes (two samplers in another chain, conditioning from two checkpoints, ...) is refused with a
node error naming the node, as unsupported here, before it is queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from ldm.controlnet.unit import ControlUnit
from ldm.errors import UserError
from ldm.image_io import open_image
from ldm.lora.prompt_tags import tag_text
from ldm.pipeline.samplers import sampler_from_label
from ldm.pipeline.seeds import MAX_SEED

SCHEDULES = {"normal": "", "karras": "karras", "sgm_uniform": "sgm_uniform"}  # ComfyUI's name -> ours
RESAMPLE = {"nearest-exact": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "area": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC,
            "lanczos": Image.Resampling.LANCZOS}


class GraphError(Exception):
    """A node this server cannot run as the graph wires it: ComfyUI's node error shape, built by the caller."""

    def __init__(self, node_id: str, input_name: str, message: str) -> None:
        super().__init__(message)
        self.node_id, self.input_name, self.message = node_id, input_name, message

    def node_error(self, class_type: str, output: str) -> dict[str, Any]:
        e = {"type": "unsupported_graph", "message": self.message, "details": self.input_name,
             "extra_info": {"input_name": self.input_name}}
        return {"errors": [e], "dependent_outputs": [output], "class_type": class_type}


@dataclass
class Resize:
    """ComfyUI's ImageScale: to width x height (0: keep the aspect ratio), `crop` centre-crops to that aspect."""

    method: str
    width: int
    height: int
    crop: str

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = self.width, self.height
        if w == 0 and h == 0:
            return image
        w = w or max(1, round(image.width * h / image.height))
        h = h or max(1, round(image.height * w / image.width))
        if self.crop == "center":
            return ImageOps.fit(image, (w, h), RESAMPLE[self.method])
        return image.resize((w, h), RESAMPLE[self.method])


@dataclass
class Run:
    """One output node's work: a request layer for `GenerationRequest.layered`, its model, what to do after."""

    output: str  # the SaveImage / PreviewImage node id
    kind: str  # "output" (SaveImage) or "temp" (PreviewImage), ComfyUI's folder types
    prefix: str  # SaveImage's filename_prefix
    model: str  # a listed checkpoint name
    layer: dict[str, Any]
    nodes: list[str]  # the graph's nodes this run stands for, in the order ComfyUI would execute them
    sampler: str = ""  # the KSampler node: its progress is the run's
    vae_node: str = ""  # the VAELoader node, when the images are decoded with one
    after: list[Resize] = field(default_factory=list)  # ImageScale nodes after VAEDecode, in order


class _Trace:
    def __init__(self, graph: dict, input_dir: Path, max_pixels: int) -> None:
        self.graph, self.input_dir, self.max_pixels = graph, input_dir, max_pixels

    def node(self, link: list, want: set[str], node_id: str, name: str) -> tuple[str, dict, int]:
        """The node a link points to, which must be one of `want` classes."""
        source, slot = str(link[0]), link[1]
        n = self.graph[source]
        if n["class_type"] not in want:
            raise GraphError(node_id, name, f"{name} from a {n['class_type']} node is not supported by this server "
                             f"(supported: {', '.join(sorted(want))})")
        return source, n["inputs"], slot

    def model(self, link: list, node_id: str, name: str) -> tuple[str, list[str]]:
        """(checkpoint, LoRA tags) of a MODEL or CLIP chain."""
        tags: list[str] = []
        while True:
            source, inputs, _ = self.node(link, {"CheckpointLoaderSimple", "LoraLoader", "CLIPSetLastLayer"},
                                          node_id, name)
            kind = self.graph[source]["class_type"]
            if kind == "CheckpointLoaderSimple":
                return inputs["ckpt_name"], tags
            if kind == "LoraLoader":
                tags.append(tag_text(Path(inputs["lora_name"]).stem, inputs["strength_model"],
                                     inputs["strength_clip"]))
                link = inputs["model" if name == "model" else "clip"]
            else:
                link = inputs["clip"]

    def text(self, link: list, node_id: str, name: str) -> tuple[str, str, list[str], int, list]:
        """(text, checkpoint, LoRA tags, clip skip, ControlNet units) of a CONDITIONING input: CLIPTextEncode,
        through any ControlNetApplyAdvanced nodes (each one unit: ComfyUI's strength, start and end percent)."""
        units: list[tuple[str, ControlUnit]] = []
        while True:
            source, inputs, slot = self.node(link, {"CLIPTextEncode", "ControlNetApplyAdvanced"}, node_id, name)
            if self.graph[source]["class_type"] == "CLIPTextEncode":
                break
            _, loader, _ = self.node(inputs["control_net"], {"ControlNetLoader"}, source, "control_net")
            # ComfyUI scales the control image to the generation's size after a centre crop: A1111's Crop and Resize
            units.insert(0, (source, ControlUnit(
                loader["control_net_name"], self.image(inputs["image"], source, "image"), float(inputs["strength"]),
                float(inputs["start_percent"]), float(inputs["end_percent"]))))
            node_id, name = source, "positive" if slot == 0 else "negative"
            link = inputs[name]
        clip_skip, clip = 1, inputs["clip"]
        n = self.graph[str(clip[0])]
        if n["class_type"] == "CLIPSetLastLayer":
            clip_skip = -int(n["inputs"]["stop_at_clip_layer"])
        ckpt, tags = self.model(clip, source, "clip")
        return str(inputs["text"]), ckpt, tags, clip_skip, units

    def image(self, link: list, node_id: str, name: str) -> Image.Image:
        source, inputs, _ = self.node(link, {"LoadImage", "ImageScale"}, node_id, name)
        if self.graph[source]["class_type"] == "ImageScale":
            return Resize(inputs["upscale_method"], inputs["width"], inputs["height"], inputs["crop"])(
                self.image(inputs["image"], source, "image"))
        return open_image(self._file(inputs["image"], source), f"LoadImage '{inputs['image']}'", self.max_pixels)

    def mask(self, link: list, node_id: str, name: str) -> Image.Image:
        """An 'L' mask, white = repaint: ComfyUI's MASK (1 = repaint) from LoadImage's alpha (1 - alpha) or
        LoadImageMask's channel (the alpha channel inverted, as ComfyUI does)."""
        source, inputs, slot = self.node(link, {"LoadImage", "LoadImageMask"}, node_id, name)
        path = self._file(inputs["image"], source)
        open_image(path, f"mask '{inputs['image']}'", self.max_pixels)  # size and format checked before decoding
        with Image.open(path) as im:
            channel = inputs.get("channel", "alpha") if self.graph[source]["class_type"] == "LoadImageMask" \
                else "alpha"
            if channel == "alpha":
                if "A" not in im.getbands() and "transparency" not in im.info:
                    raise GraphError(source, "image", f"'{inputs['image']}' has no alpha channel to take a mask from")
                return ImageOps.invert(im.convert("RGBA").getchannel("A"))
            return im.convert("RGB").getchannel(channel[0].upper())

    def _file(self, name: str, node_id: str) -> Path:
        path = (self.input_dir / name).resolve()
        if self.input_dir.resolve() not in path.parents or not path.is_file():
            raise GraphError(node_id, "image", f"'{name}' is not an uploaded image (POST /upload/image)")
        return path


def plan(graph: dict, outputs: list[str], input_dir: Path, max_pixels: int) -> list[Run]:
    """A `Run` for each output node of a graph `graph.validate` passed. Raises `GraphError` (a node this server
    cannot run as wired) or `UserError` (an image that cannot be read)."""
    return [_run(graph, out, input_dir, max_pixels) for out in outputs]


def _run(graph: dict, out: str, input_dir: Path, max_pixels: int) -> Run:
    t = _Trace(graph, input_dir, max_pixels)
    node = graph[out]
    after: list[Resize] = []
    source, inputs, _ = t.node(node["inputs"]["images"], {"VAEDecode", "ImageScale"}, out, "images")
    while graph[source]["class_type"] == "ImageScale":
        after.insert(0, Resize(inputs["upscale_method"], inputs["width"], inputs["height"], inputs["crop"]))
        source, inputs, _ = t.node(inputs["image"], {"VAEDecode", "ImageScale"}, source, "image")
    decode = source
    k_id, k, _ = t.node(inputs["samples"], {"KSampler", "KSamplerAdvanced"}, decode, "samples")
    last = k_id
    hires = _hires(t, k_id, k)
    if hires is not None:
        k_id, k = hires.pop("first")
    ckpt, tags = t.model(k["model"], k_id, "model")
    vae_ckpt, vae_name, vae_node = _vae(t, inputs["vae"], decode)
    layer: dict[str, Any] = {"noise": "comfy", "cfg": float(k["cfg"]), "model": ckpt}
    if vae_name:
        layer["vae"] = vae_name
    prompt, p_ckpt, p_tags, clip_skip, units = t.text(k["positive"], k_id, "positive")
    negative, n_ckpt, n_tags, n_skip, n_units = t.text(k["negative"], k_id, "negative")
    if [n for n, _ in units] != [n for n, _ in n_units]:
        raise GraphError(k_id, "negative", "both prompts must pass through the same ControlNetApplyAdvanced nodes "
                         "(a ControlNet steers both branches here)")
    if units:
        layer["controlnets"] = tuple(u for _, u in units)
    if {p_ckpt, n_ckpt, vae_ckpt or ckpt} != {ckpt} or p_tags != n_tags or clip_skip != n_skip:
        raise GraphError(k_id, "positive", "the model, both prompts' CLIP and the VAE (unless a VAELoader's) must "
                         "come from one checkpoint through the same LoRAs and CLIPSetLastLayer on this server")
    if sorted(p_tags) != sorted(tags):
        raise GraphError(k_id, "model", "the model and CLIP must pass through the same LoraLoader nodes")
    layer.update(prompt=" ".join([prompt, *tags]) if tags else prompt, negative_prompt=negative, clip_skip=clip_skip)
    try:
        layer["sampler"], _ = sampler_from_label(k["sampler_name"])
    except UserError as e:
        raise GraphError(k_id, "sampler_name", str(e)) from None
    layer["schedule"] = SCHEDULES[k["scheduler"]]
    if graph[k_id]["class_type"] == "KSampler":
        seed, steps, denoise = int(k["seed"]), int(k["steps"]), float(k["denoise"])
        total = steps if denoise >= 1.0 else int(steps / denoise) if denoise > 0 else 0
        run = steps
    else:
        if k["add_noise"] != "enable" or k["return_with_leftover_noise"] != "disable" or \
                k["end_at_step"] < k["steps"]:
            raise GraphError(k_id, "end_at_step", "KSamplerAdvanced runs here only to the end of its schedule with "
                             "noise added (add_noise enable, end_at_step >= steps, no leftover noise)")
        seed, total = int(k["noise_seed"]), int(k["steps"])
        run, denoise = total - min(int(k["start_at_step"]), total), 1.0
    if run <= 0 or total <= 0:
        raise GraphError(k_id, "denoise", "nothing to run: denoise 0 or start_at_step >= steps")
    if seed > MAX_SEED:
        raise GraphError(k_id, "seed", f"seeds over {MAX_SEED} are not supported by this server")
    layer.update(seed=seed, steps=total)
    _latent(t, k["latent_image"], k_id, layer, run, total, ckpt)
    if hires is not None:
        if "init_image" in layer:
            raise GraphError(k_id, "latent_image", "a latent upscale (the hires fix) follows a text-to-image pass "
                             "(EmptyLatentImage) here")
        size = hires.pop("size", None)
        if size is not None:  # LatentUpscale's width x height: one scale for both sides
            scale = size[0] / layer["width"]
            if abs(size[1] / layer["height"] - scale) > 1e-6:
                raise GraphError(hires["node"], "width", "LatentUpscale must keep the aspect ratio here (one scale "
                                 "for both sides, the hires fix)")
            hires["hires_scale"] = scale
        del hires["node"]
        layer.update(hires)
    return Run(out, "output" if node["class_type"] == "SaveImage" else "temp",
               str(node["inputs"].get("filename_prefix", "ComfyUI")), ckpt, layer, execution_order(graph, out),
               last, vae_node if vae_name else "", after)


def _hires(t: _Trace, k_id: str, k: dict) -> dict[str, Any] | None:
    """KSampler -> LatentUpscale(By) -> KSampler(denoise d, n steps): the hires fix (`ldm.pipeline.hires`, whose
    second pass runs exactly n steps of an int(n / d)-step schedule, as ComfyUI's denoise does). The second
    sampler must repeat the first's model, prompts, cfg, sampler, scheduler and seed (the hires fix's second pass
    draws fresh noise from the same seed: for one image, ComfyUI's torch.manual_seed(seed) draw), and the upscale
    be bilinear (the hires fix's "latent" upscaler). Returns the request's hires fields and the first sampler."""
    if not isinstance(k.get("latent_image"), list):
        return None
    source = str(k["latent_image"][0])
    if t.graph[source]["class_type"] not in ("LatentUpscale", "LatentUpscaleBy"):
        return None
    if t.graph[k_id]["class_type"] != "KSampler":
        raise GraphError(k_id, "latent_image", "after a latent upscale, use KSampler (the hires fix) here")
    up_id, up, _ = t.node(k["latent_image"], {"LatentUpscale", "LatentUpscaleBy"}, k_id, "latent_image")
    first_id, first, _ = t.node(up["samples"], {"KSampler"}, up_id, "samples")
    for name in ("model", "positive", "negative", "cfg", "sampler_name", "scheduler", "seed"):
        if k[name] != first[name]:
            raise GraphError(k_id, name, f"after a latent upscale, the second KSampler must have the first one's "
                             f"{name} here (the hires fix)")
    if up["upscale_method"] != "bilinear":
        raise GraphError(up_id, "upscale_method", f"upscale_method '{up['upscale_method']}' is not supported "
                         "here: use bilinear (the hires fix's latent upscale)")
    out: dict[str, Any] = {"first": (first_id, first), "node": up_id, "hires_strength": min(float(k["denoise"]), 1.0),
                           "hires_steps": int(k["steps"]), "hires_upscaler": "latent"}
    if t.graph[up_id]["class_type"] == "LatentUpscaleBy":
        out["hires_scale"] = float(up["scale_by"])
    elif up["crop"] != "disabled":
        raise GraphError(up_id, "crop", "LatentUpscale with a crop is not supported here")
    else:
        out["size"] = (int(up["width"]), int(up["height"]))
    return out


def execution_order(graph: dict, out: str) -> list[str]:
    """The nodes `out` needs, in the order ComfyUI's recursive execution reaches them: depth first through each
    node's inputs in the order the graph lists them, a node after its inputs (iterative: no recursion limit)."""
    order: list[str] = []
    done: set[str] = set()
    stack: list[tuple[str, bool]] = [(out, False)]
    while stack:
        node_id, expanded = stack.pop()
        if node_id in done:
            continue
        if expanded:
            done.add(node_id)
            order.append(node_id)
            continue
        stack.append((node_id, True))
        for value in reversed(list(graph[node_id].get("inputs", {}).values())):
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in graph and str(value[0]) not in done:
                stack.append((str(value[0]), False))
    return order


def _vae(t: _Trace, link: list, node_id: str) -> tuple[str, str, str]:
    """(the checkpoint whose VAE it is, or "" for a VAELoader's; the VAELoader's vae_name, or ""; the node)."""
    source, inputs, _ = t.node(link, {"CheckpointLoaderSimple", "VAELoader"}, node_id, "vae")
    if t.graph[source]["class_type"] == "VAELoader":
        return "", inputs["vae_name"], source
    return inputs["ckpt_name"], "", source


def _latent(t: _Trace, link: list, k_id: str, layer: dict, run: int, total: int, ckpt: str) -> None:
    """The starting latent: its size and batch (EmptyLatentImage), or the init image, mask and strength."""
    source, inputs, _ = t.node(link, {"EmptyLatentImage", "VAEEncode", "VAEEncodeForInpaint", "SetLatentNoiseMask"},
                               k_id, "latent_image")
    kind = t.graph[source]["class_type"]
    if kind == "EmptyLatentImage":
        if run != total:
            raise GraphError(k_id, "denoise", "denoise < 1 (or start_at_step > 0) needs an image's latent "
                             "(VAEEncode): an empty latent only makes sense fully denoised")
        layer.update(width=int(inputs["width"]), height=int(inputs["height"]),
                     num_images=int(inputs["batch_size"]), batch_size=int(inputs["batch_size"]))
        return
    mask = None
    if kind == "SetLatentNoiseMask":
        mask = t.mask(inputs["mask"], source, "mask")
        source, inputs, _ = t.node(inputs["samples"], {"VAEEncode"}, source, "samples")
    elif kind == "VAEEncodeForInpaint":
        mask = _grow(t.mask(inputs["mask"], source, "mask"), int(inputs["grow_mask_by"]))
    vae_ckpt, vae_name, _ = _vae(t, inputs["vae"], source)
    if (vae_ckpt or ckpt, vae_name) != (ckpt, layer.get("vae", "")):
        raise GraphError(source, "vae", "the VAE must be the sampler's checkpoint's, or the VAELoader that VAEDecode "
                         "uses, on this server (one VAE per image)")
    layer["init_image"] = t.image(inputs["pixels"], source, "pixels")
    if mask is not None:
        layer["mask"] = mask
    layer["strength"] = _strength(run, total)


def _strength(run: int, total: int) -> float:
    """The strength with which `steps_to_run(total, strength)` == run (int(total * strength)), exactly."""
    strength = run / total
    while int(total * strength) < run:
        strength = math.nextafter(strength, 2.0)
    return min(strength, 1.0)


def _grow(mask: Image.Image, pixels: int) -> Image.Image:
    """VAEEncodeForInpaint's grow_mask_by: the mask dilated by a `pixels`-wide square (ComfyUI convolves with a
    ones kernel of that side; a max filter needs an odd side, so an even one grows by one more pixel)."""
    return mask if pixels <= 0 else mask.filter(ImageFilter.MaxFilter(pixels | 1))
