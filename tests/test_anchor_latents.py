"""`python -m ldm.pipeline.anchor_latents`: the latents a model generates, for the VAE's decoder anchor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ldm.pipeline import anchor_latents
from ldm.pipeline.pipeline import Pipeline

DEMO = Path(__file__).resolve().parents[1] / "ldm/demo/shapes-32px"


@pytest.mark.slow
def test_the_file_holds_what_the_pipeline_decodes(tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("a small red circle in the center on a black background\n\n"
                        "a large blue square in the top left on a white background\n")
    out = tmp_path / "held" / "latents.safetensors"
    anchor_latents.main([str(DEMO), str(out), "--captions", str(captions), "--num", "3", "--steps", "2",
                          "--seed", "9"])
    assert "(3, 4, 16, 16) latents from 2 captions" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        latents, meta = f.get_tensor("latents"), f.metadata()
    assert meta["seed"] == "9" and meta["steps"] == "2"
    # image i: the i-th picked caption at seed 9 + i; decoding the stored latent gives the pipeline's image
    picked = anchor_latents.pick_captions(anchor_latents.read_captions(captions), 3, 9)
    pipe = Pipeline.from_pretrained(DEMO, device="cpu")
    result = pipe(picked[2], steps=2, seed=11, show_progress=False)
    assert torch.equal(result.latents[0], latents[2])
    with torch.no_grad():
        decoded = pipe.vae.decode(latents[2:3].to(pipe.vae.dtype)).sample.float()  # bf16 on CPUs with native bf16
        image = (decoded / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    # the pipeline rounds its image in its own dtype: bf16's step is 2^-8 on [0.5, 1)
    assert abs(image - result.decoded[0]).max() < (1e-6 if pipe.vae.dtype == torch.float32 else 2**-8)


def test_captions_from_a_dataset_directory_are_its_distinct_ones(tmp_path):
    rows = [{"file_name": f"{i}.png", "text": t} for i, t in enumerate(["b", "a", "b", " "])]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert anchor_latents.read_captions(tmp_path) == ["a", "b"]
    assert sorted(anchor_latents.pick_captions(["a", "b"], 4, 0)) == ["a", "a", "b", "b"]


@pytest.mark.parametrize("args, message", [
    (["--captions", "NOPE"], "no such file or directory"),
    (["--captions", "DIR"], "no metadata.jsonl there; pass a dataset directory or a .txt file"),
    (["--captions", "DIR", "--num", "0"], "--num must be at least 1, got 0"),
])
def test_bad_arguments_are_one_line_exit_2(args, message, tmp_path, capsys):
    args = [a.replace("NOPE", str(tmp_path / "nope")).replace("DIR", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exit_:
        anchor_latents.main([str(DEMO), str(tmp_path / "out.safetensors"), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out.safetensors").exists()
