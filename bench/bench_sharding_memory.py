"""Peak memory per process of stage-2 training under DDP, FSDP2 and DeepSpeed ZeRO-2, with 2 CPU processes.

    python bench/bench_sharding_memory.py [--preset base] [--steps 4] [--batch 2]

Runs train/train_ldm.py itself three times on the same tiny latent cache (the test inputs of ldm.unet.tiny, latents
4x16x16), launched as the tests launch it (FSDP and DeepSpeed through tests/fsdp_on_cpu.py and
tests/deepspeed_on_cpu.py, since accelerate sets both up only for GPUs). Every process records its peak resident set
(VmHWM) at exit. The other process is the one to read for training state: the main process also gathers the whole
model and optimizer state for the final checkpoint and export, so its peak includes a whole copy of both. The theory column counts the bytes
of fp32 weights, gradients and AdamW moments each setup keeps per process. Activations, the frozen VAE and text
encoder, and the libraries are the same in every run. On GPUs the same split applies to GPU memory.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDER = """
import atexit, os, runpy, sys
def record():
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    with open(os.path.join(os.environ["PEAK_DIR"], f"rank{os.environ.get('RANK', '0')}.kib"), "w") as f:
        f.write(hwm)
atexit.register(record)
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(kind: str, recorder: Path, args: list[str]) -> list[str]:
    train = str(ROOT / "train/train_ldm.py")
    if kind == "zero2":
        head = ["--config_file", str(ROOT / "configs/accelerate/deepspeed-zero2.yaml"), "--num_processes", "2",
                "--mixed_precision", "no"]
        target = [str(ROOT / "tests/deepspeed_on_cpu.py"), train]
    else:
        head = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]
        target = [str(ROOT / "tests/fsdp_on_cpu.py"), train] if kind == "fsdp2" else [train]
    return [sys.executable, "-m", "accelerate.commands.launch", *head, "--main_process_port", free_port(),
            str(recorder), *target, *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    opts = parser.parse_args()

    from ldm.unet.presets import build_unet
    from ldm.unet.tiny import write_tiny_stage2_inputs

    work = Path(tempfile.mkdtemp(prefix="bench-sharding-"))
    parts = write_tiny_stage2_inputs(work / "parts", num_images=32)
    recorder = work / "record_peak.py"
    recorder.write_text(RECORDER)
    params = sum(p.numel() for p in build_unet(opts.preset, sample_size=16, latent_channels=4,
                                               cross_attention_dim=32).parameters())
    mib = 4 * params / 2**20  # one fp32 copy of the U-Net
    # weights, gradients, 2 AdamW moments; ZeRO-2 keeps whole weights plus a partitioned fp32 master copy
    theory = {"ddp": 4 * mib, "fsdp2": 4 * mib / 2, "zero2": mib + (1 + 1 + 2) * mib / 2}
    rows = []
    for kind in ("ddp", "fsdp2", "zero2"):
        peak_dir = work / f"peak-{kind}"
        peak_dir.mkdir()
        args = ["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"model.preset={opts.preset}",
                f"data.path={parts['data']}", f"cache.vae={parts['vae']}", f"text_encoder.path={parts['text']}",
                f"cache.dir={work / 'latents'}", "train.report_to=none", "train.cpu=true",
                f"train.max_steps={opts.steps}", f"train.batch_size={opts.batch}", "train.ema_decay=0",
                f"train.checkpoint_every={10 * opts.steps}", "sample.every=0", f"train.output_dir={work / kind}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PEAK_DIR": str(peak_dir)}
        result = subprocess.run(launch(kind, recorder, args), capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            sys.exit(f"{kind} run failed:\n{result.stderr[-3000:]}")
        main_peak, other_peak = (int((peak_dir / f"rank{r}.kib").read_text()) / 1024 for r in (0, 1))
        rows.append((kind, other_peak, main_peak, theory[kind]))
    ddp_peak = rows[0][1]
    print(f"U-Net preset {opts.preset!r}: {params / 1e6:.1f}M parameters ({mib:.0f} MiB per fp32 copy); "
          f"2 processes, batch {opts.batch}, {opts.steps} steps, fp32, no EMA\n")
    print("| setup | peak RSS, process 1 (MiB) | saving vs DDP (MiB) | weights+grads+moments per process, in theory "
          "(MiB) | peak RSS, main process (MiB) |")
    print("|---|---|---|---|---|")
    for kind, peak, main_peak, state in rows:
        print(f"| {kind} | {peak:.0f} | {ddp_peak - peak:.0f} | {state:.0f} | {main_peak:.0f} |")


if __name__ == "__main__":
    main()
