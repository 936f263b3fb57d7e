"""Training objectives side by side (issue 28): the shapes demo's U-Net trained from the same start for the same steps
with each objective, then its validation loss and its held-out prompt adherence.

    python bench/objectives.py                                  # all arms, 1500 steps each (hours on 2 cores)
    python bench/objectives.py --steps 20 --arms baseline,flow --images 512 --num-val 32 --eval-prompts 4 --seeds 1
    mkdir -p runs/bench-objectives && nohup python bench/objectives.py > runs/bench-objectives/bench.log 2>&1 &

Each arm is one `train/train_ldm.py` run of configs/ldm/shapes-demo.yaml (its U-Net size, data, optimizer, lr
schedule over `--steps`), with the shipped demo model's frozen text encoder and VAE (ldm/demo/shapes-32px), its own
output directory under `--root`, and the overrides of ARMS below. Every arm starts from the same initial U-Net
(train.seed 0: the same init, data order and draws), except the second baseline seed (train.seed 1), whose distance
from the first is the table's measure of seed noise. The latent cache is encoded once and shared.

Every arm is trained without offset noise by default (`--offset-noise` sets it for all): the demo found that SD's
schedule leaks each latent's mean (its background) at the last timestep, which offset noise hides and ZTSNR and flow
matching remove; offset noise in every arm would hide what those two are for. Use the same options when rerunning.

Resumable: rerunning skips arms whose `model/` exists, resumes the others from their latest checkpoint (every 250
steps), and evaluates each finished arm once (`eval.json` in its directory). Each evaluated arm is also recorded in
`--record` (bench/objectives-results/ARM.json, committed), with the settings it ran under: a later run with the same
settings takes the arm from there, so a table whose arms take longer than one sitting can be finished in several
(on other machines too) and `--table-only` prints it from the records alone. A `--root` holds one setting's runs:
use a new one when changing `--steps`, `--batch-size` or the data.

Reported per arm: the EMA weights' validation loss at the last step (`data.num_val` held-out images, fixed noise and
timesteps; ldm/unet/val_loss.py) as the unweighted MSE of the arm's own target: eps for the eps arms, v for ZTSNR + v,
the velocity eps - x0 for flow matching. Those three are different quantities: compare val MSE within the eps arms
only. Then the all-five accuracy (shape, colour, size, position, background all read back right; ldm/demo/reader.py),
and the mean of the five attributes' accuracies (which still separates arms early in training, when few images get
all five right), of 4 seeds of each of the 63 held-out prompt combinations (never captions in training) at cfg 7.5
and cfg 1.0, 25 Euler steps (flow matching: its flow-matching Euler; ZTSNR: trailing spacing from its scheduler
config and guidance rescale 0.7, Lin et al.'s recipe, at cfg 7.5). A difference from the baseline is called larger
than seed noise when it exceeds both the two baseline seeds' difference and, for the accuracies, twice the binomial
standard error of a difference (2 sqrt(2 p (1 - p) / n)).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "ldm/demo/shapes-32px"
CONFIG = ROOT / "configs/ldm/shapes-demo.yaml"

# arm -> (train_ldm.py overrides on top of the demo config, what the val MSE measures, sampler extras)
ARMS: dict[str, tuple[list[str], str]] = {
    "baseline": ([], "eps"),
    "baseline-seed1": (["train.seed=1"], "eps"),
    "logit-normal": (["noise.timestep_sampling=logit_normal"], "eps"),
    "huber": (["loss.type=pseudo_huber", "loss.huber_schedule=snr", "loss.huber_c=0.1"], "eps"),
    "debiased": (["noise.min_snr_gamma=0", "loss.weighting=debiased"], "eps"),
    # without min-SNR: its v weight min(SNR, 5) / (SNR + 1) is 0 at the pure-noise timestep ZTSNR adds (Lin et al.
    # train the plain v loss)
    "ztsnr-v": (["noise.prediction_type=v_prediction", "noise.zero_terminal_snr=true", "noise.min_snr_gamma=0"], "v"),
    "immiscible": (["noise.immiscible=true"], "eps"),
    "flow": (["noise.prediction_type=flow", "noise.min_snr_gamma=0"], "velocity"),
}
ATTRIBUTES = ("shape", "color", "background", "size", "position")  # ldm.demo.reader's, as evaluate() stores them
ALIASES = {"flow-matching": "flow", "ztsnr": "ztsnr-v", "logit_normal": "logit-normal"}


def train_args(arm: str, a: argparse.Namespace) -> list[str]:
    out = Path(a.root) / arm
    return [
        "--config", str(CONFIG), f"train.output_dir={out}", f"text_encoder.path={DEMO}", f"cache.vae={DEMO / 'vae'}",
        f"cache.dir={Path(a.root) / 'latents'}", f"data.shapes_count={a.images}", f"data.num_val={a.num_val}",
        f"train.max_steps={a.steps}", f"optim.warmup_steps={min(200, max(1, a.steps // 8))}",
        f"train.val_every={a.val_every}", f"train.checkpoint_every={a.checkpoint_every}", "train.report_to=none",
        "train.cpu=true", "sample.every=0", f"train.batch_size={a.batch_size}", f"noise.offset_noise={a.offset_noise}",
        *ARMS[arm][0],
    ]


def train(arm: str, a: argparse.Namespace) -> float:
    """Train (or resume) the arm; returns the seconds spent here."""
    out = Path(a.root) / arm
    if (out / "model/unet").is_dir():
        return 0.0
    resume = ["--resume", "latest"] if any((out / "checkpoints").glob("step-*")) else []
    cmd = [sys.executable, str(ROOT / "train/train_ldm.py"), *train_args(arm, a), *resume]
    out.mkdir(parents=True, exist_ok=True)
    print(f"[{arm}] {'resuming' if resume else 'training'}: {shlex.join(cmd)}", flush=True)
    start = time.monotonic()
    with open(out / "train.log", "a") as log:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        result = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"[{arm}] train_ldm.py failed (exit {result.returncode}); see {out / 'train.log'}")
    return time.monotonic() - start


def evaluate(arm: str, a: argparse.Namespace) -> dict:
    """The arm's eval.json: val loss (EMA, last step) and held-out all-five accuracy at cfg 7.5 and 1.0."""
    out = Path(a.root) / arm
    path = out / "eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    from ldm.demo.adherence import Settings, generate
    from ldm.demo.prompts import prompt_sets, spread
    from ldm.demo.reader import attribute_accuracy, read_attributes
    from ldm.demo.shapes import canonical_caption
    from ldm.pipeline.pipeline import Pipeline

    rows = [json.loads(line) for line in (out / "checkpoints/val_loss.jsonl").read_text().splitlines()]
    last = rows[-1]
    weights = last.get("ema", last["raw"])
    val = {"step": last["step"], "mse": weights.get("mse", weights["loss"]), "loss": weights["loss"],
           "bands": {k: v.get("mse", v["loss"]) for k, v in weights.get("bands", {}).items()}}
    pipe = Pipeline.from_pretrained(out / "model", device="cpu", dtype="fp32")
    combos = spread(prompt_sets().heldout, a.eval_prompts)
    s = Settings(steps=25, seeds=a.seeds, sampler="euler")
    adherence = {}
    for cfg in (7.5, 1.0):
        extra = {"guidance_rescale": 0.7} if arm == "ztsnr-v" and cfg > 1 else {}
        pairs = []
        for combo in combos:
            images = generate(pipe, canonical_caption(combo), s, cfg=cfg, **extra)
            pairs += [(combo, read_attributes(image)) for image in images]
        adherence[str(cfg)] = {"images": len(pairs), **attribute_accuracy(pairs)}
    result = {"arm": arm, "target": ARMS[arm][1], "val": val, "adherence": adherence}
    path.write_text(json.dumps(result, indent=1))
    return result


def table(results: dict[str, dict]) -> str:
    """The markdown table, and which differences from the baseline exceed seed noise."""
    base, other = results.get("baseline"), results.get("baseline-seed1")

    def noise_flag(arm: str, key: str, value: float, n: int | None) -> str:
        if base is None or other is None or arm in ("baseline", "baseline-seed1"):
            return ""
        b, o = pick(base, key), pick(other, key)
        bound = abs(b - o)
        if n is not None:
            p = min(max(b, 1 / n), 1 - 1 / n)
            bound = max(bound, 2 * math.sqrt(2 * p * (1 - p) / n))
        return " *" if abs(value - b) > bound else ""

    def pick(r: dict, key: str) -> float:
        if key == "val":
            return r["val"]["mse"]
        cfg, _, what = key.partition(":")
        acc = r["adherence"][cfg]
        return sum(acc[a] for a in ATTRIBUTES) / len(ATTRIBUTES) if what == "mean" else acc["all"]

    columns = [(f"{cfg}{what}", label) for cfg in ("7.5", "1.0")
               for what, label in (("", f"all five, cfg {cfg}"), (":mean", f"attribute mean, cfg {cfg}"))]
    lines = ["| arm | val MSE (target) | " + " | ".join(label for _, label in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for arm, r in results.items():
        flag = noise_flag(arm, "val", r["val"]["mse"], None) if r["target"] == "eps" else ""
        cells = [f"{r['val']['mse']:.4f} ({r['target']}){flag}"]
        for key, _ in columns:
            value = pick(r, key)
            cells.append(f"{value:.3f}{noise_flag(arm, key, value, r['adherence'][key.split(':')[0]]['images'])}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if base is not None and other is not None:
        gaps = ", ".join(f"{label} {abs(pick(base, key) - pick(other, key)):.3f}" for key, label in columns)
        lines.append("")
        lines.append(f"Seed noise (baseline seeds 0 and 1): val MSE {abs(pick(base, 'val') - pick(other, 'val')):.4f}, "
                     f"{gaps}. `*`: the difference from the baseline is larger than that (and, for accuracies, than "
                     "twice the binomial standard error of a difference of two proportions over that many images: "
                     "conservative for the attribute mean, whose five reads per image are not independent). Val MSE "
                     "compares only within the eps arms (v and velocity are other quantities).")
    return "\n".join(lines)


SETTINGS = ("steps", "batch_size", "images", "num_val", "val_every", "eval_prompts", "seeds", "offset_noise")


def settings(a: argparse.Namespace) -> dict:
    """What an arm's numbers depend on besides its overrides: records are reused only under equal settings."""
    return {k: getattr(a, k) for k in SETTINGS}


def recorded(arm: str, a: argparse.Namespace) -> dict | None:
    path = Path(a.record) / f"{arm}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("settings") != settings(a) or record.get("overrides") != ARMS[arm][0]:
        print(f"[{arm}] {path} was run with other settings or overrides; not used", flush=True)
        return None
    return record


def record(arm: str, result: dict, a: argparse.Namespace) -> None:
    path = Path(a.record) / f"{arm}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = {"date": time.strftime("%Y-%m-%d"), "threads": os.environ.get("OMP_NUM_THREADS", "")}
    text = json.dumps({**result, "settings": settings(a), "overrides": ARMS[arm][0], **stamp}, indent=1)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/bench-objectives", help="one directory per arm, and the shared latents")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per arm (default 1500)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (the demo's 128)")
    p.add_argument("--images", type=int, default=20000, help="shapes images in the dataset (the demo's 20000)")
    p.add_argument("--num-val", type=int, default=256, help="held-out images for the validation loss")
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--eval-prompts", type=int, default=63, help="held-out combinations scored (63 = all)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds 0..)")
    p.add_argument("--record", default=str(ROOT / "bench/objectives-results"),
                   help="where each evaluated arm's result is recorded with its settings, and reused from")
    p.add_argument("--table-only", action="store_true", help="print the table of the recorded arms; train nothing")
    p.add_argument("--offset-noise", type=float, default=0.0,
                   help="noise.offset_noise for every arm (default 0: today's objective, whose last timestep leaks the "
                        "background, which ZTSNR and flow matching address; the demo's one-stage recipe uses 0.1)")
    a = p.parse_args(argv)
    arms = [ALIASES.get(x.strip(), x.strip()) for x in a.arms.split(",") if x.strip()]
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        raise SystemExit(f"error: unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    results = {}
    for arm in arms:
        if (known := recorded(arm, a)) is not None or a.table_only:
            if known is not None:
                results[arm] = known
            continue
        seconds = train(arm, a)
        if seconds:
            print(f"[{arm}] trained in {seconds:.0f} s ({a.steps / seconds:.3f} steps/s if not resumed)", flush=True)
        start = time.monotonic()
        results[arm] = evaluate(arm, a)
        record(arm, results[arm], a)
        print(f"[{arm}] evaluated in {time.monotonic() - start:.0f} s: {json.dumps(results[arm]['adherence'])}",
              flush=True)
    missing = [arm for arm in arms if arm not in results]
    text = table(results) + (f"\n\nNot run yet: {', '.join(missing)}." if missing else "")
    command = "python bench/objectives.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if not a.table_only:
        (Path(a.root) / "table.md").write_text(f"`{command.strip()}`\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
