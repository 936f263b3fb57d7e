"""`ldm-eval`'s output: a markdown report (ready to paste into a README) and the full numbers as JSON. Two reports:
prompt adherence (`format_report`) and, with `--metrics`, sample quality (`format_quality_report`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ldm.demo.reader import ATTRIBUTE_NAMES
from ldm.files import atomic_write_text

_COLUMNS = (*ATTRIBUTE_NAMES, "all")


def _pct(share: float) -> str:
    return f"{100 * share:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _accuracy_row(name: str, section: dict[str, Any]) -> list[str]:
    return [name, str(section["images"]), *(_pct(section["accuracy"][c]) for c in _COLUMNS)]


def format_report(r: dict[str, Any]) -> str:
    """The report as markdown: attribute accuracies, guidance gain, negative prompt, img2img, inpainting, times."""
    s = r["settings"]
    quick = " (QUICK: a smoke test on a small subset, not a measurement)" if r["quick"] else ""
    seeds = f"{s['first_seed']}..{s['first_seed'] + s['seeds'] - 1}"
    intro = (f"Model `{r['model']}` at {s['size']}x{s['size']} px on {r['device']} ({r['dtype']}): {s['steps']} "
             f"steps, sampler {s['sampler']}, {s['seeds']} image(s) per prompt (seeds {seeds}), attributes read back "
             "by pixel analysis (`ldm.demo.reader`).")
    out = [f"## Prompt adherence{quick}", "", intro, ""]
    rows = [_accuracy_row("reader on jittered renders", r["reader"]), _accuracy_row("VAE reconstructions", r["vae"])]
    rows += [_accuracy_row(f"{row['set']} prompts @ cfg {float(row['cfg'])}", row) for row in r["adherence"]["rows"]]
    rows += [_accuracy_row(f"{row['set']} prompts @ cfg {float(row['cfg'])}", row)
             for row in r.get("new_colors", {}).get("rows", [])]
    out += _table(["check", "images", *ATTRIBUTE_NAMES, "all five"], rows)
    gains = ", ".join(f"{name} {pts:+.1f}" for name, pts in r["adherence"]["guidance_gain_points"].items())
    gain = f"cfg {float(s['cfg'])} minus cfg {float(s['baseline_cfg'])}"
    out += ["", f"Guidance gain in points of all-five accuracy ({gain}): {gains}.", ""]

    n = r["negative"]
    color = n["negative"]
    out += _table(
        [f"negative prompt (colour left out of the prompt, cfg {float(n['cfg'])})", "images", f"read as {color}",
         "named attributes match"],
        [[f'"{neg}"', str(n["images"]), _pct(n["color_share"][neg]), _pct(n["prompt_match"][neg])]
         for neg in n["color_share"]]
        + [[f"chance (1 in {round(1 / n['chance'])} colours)", "", _pct(n["chance"]), ""]],
    )
    i = r["img2img"]
    out += [""] + _table(
        [f"img2img (render in colour A, prompt colour B, strength {i['strength']:g})", "images", "colour B",
         *(f"{k} kept" for k in i["kept"]), "all five"],
        [["recolour", str(i["images"]), _pct(i["target_color"]), *(_pct(v) for v in i["kept"].values()),
          _pct(i["all"])]],
    )
    p = r["inpaint"]
    out += [""] + _table(
        [f"inpainting ({p['mask']} masked, small shape in colour A, prompt colour B)", "images",
         "max abs diff outside mask", "colour B", "other attributes match"],
        [["recolour", str(p["images"]), str(p["max_outside_diff"]), _pct(p["target_color"]),
          _pct(p["others_match"])]],
    )
    times = ", ".join(f"{k} {r[k]['seconds']:.1f}s" for k in ("reader", "vae", "adherence", "new_colors", "negative",
                                                               "img2img", "inpaint") if k in r)
    out += ["", f"Wall time: {times}; total {r['total_seconds']:.1f}s."]
    return "\n".join(out)


def format_quality_report(r: dict[str, Any]) -> str:
    """`ldm-eval --metrics`' report as markdown: what was generated and compared, one row per number, the warnings."""
    g, n = r["generated"], r["numbers"]
    k = g["num_per_prompt"]
    seeds = (f"seeds {g['seed']}..{g['seed'] + k - 1}" if g["seed"] is not None
             else "seeds from each line, or its text")
    intro = (f"Model `{r['model']}` on {r['device']} ({r['dtype']}, {r['processes']} process(es)): {g['images']} "
             f"images from {g['lines']} prompt line(s) of `{g['prompts_file']}` ({k} per line, "
             f"{seeds}; {g['steps']} steps, cfg {float(g['cfg'])}, sampler {g['sampler']}, {g['size'][0]}x"
             f"{g['size'][1]} px) against {r['reference']['images']} reference images in `{r['reference']['dir']}`.")
    rows = []
    if "fid" in n:
        rows.append(["FID (lower is better)", f"{n['fid']:.3f}"])
    if "kid" in n:
        kid = n["kid"]
        rows.append([f"KID x 1000 (lower; {kid['subsets']} subsets of {kid['subset_size']}, seed {kid['seed']})",
                     f"{1000 * kid['mean']:.3f} ± {1000 * kid['std']:.3f}"])
    if "clip_score" in n:
        rows.append(["CLIP score (100 x cosine, higher is better)", f"{n['clip_score']:.2f}"])
    if "cmmd" in n:
        rows.append(["CMMD (lower; sigma 10, x 1000, the paper's estimator)", f"{n['cmmd']:.4f}"])
        rows.append(["CMMD, unbiased (U-statistic; for small sets)", f"{n['cmmd_unbiased']:.4f}"])
    out = ["## Sample quality", "", intro, ""] + _table(["metric", "value"], rows)
    used = [f"{what}: {name}" for what, name in (("FID and KID", r["extractors"]["fid_kid"]),
                                                  ("CLIP score and CMMD", r["extractors"]["clip_cmmd"])) if name]
    out += ["", f"Features ({'; '.join(used)}): numbers compare only with numbers on the same features, reference "
                "set and number of images."]
    if r["features"] == "demo":
        out += ["", "`--features demo`: the shapes demo's own image tower. These numbers compare shapes-demo runs "
                    "with each other only: they are not FID, KID, CLIP score or CMMD as published (Inception v3, "
                    "CLIP ViT-L/14)."]
    out += [""] + [f"Warning: {w}." for w in r["warnings"]] + ([""] if r["warnings"] else [])
    s = r["seconds"]
    out += [f"Wall time: reference features {s['reference']:.1f}s, generation and features {s['generation']:.1f}s, "
            f"metrics {s['metrics']:.1f}s."]
    return "\n".join(out)


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """Write atomically (`ldm.files.atomic_write_text`), so a reader never sees half a file."""
    atomic_write_text(Path(path), json.dumps(report, indent=2) + "\n")
