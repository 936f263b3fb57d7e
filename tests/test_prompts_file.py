"""`ldm-generate --prompts-file`: lines parsed and checked up front, deterministic names, resume, atomic writes, and
the split across 2 real processes (accelerate launch)."""

from __future__ import annotations

import errno
import os
import subprocess
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import accelerate_launch, run
from ldm.errors import UserError
from ldm.generate import main
from ldm.prompts_file import default_seed, read_prompts_file

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate")
FILE = (
    "a red car\n"
    "\n"
    "# a comment\n"
    '{"prompt": "a blue door", "negative": "blurry", "seed": 7, "cfg": 5, "count": 3}\n'
    '{"prompt": "a green tree", "width": 16, "height": 16, "sampler": "DPM++ 2M Karras"}\n'
)
# fp32: batches of 1 and 2 give the same pixels (bf16 kernels may round differently per batch size)
FAST = ["--dtype", "fp32", "--steps", "2", "--height", "32", "--width", "32", "--seed", "1", "-q"]


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model  # tests/conftest.py: written once per session, read-only


generate = partial(run, main)  # (argv, capsys) -> (exit code, stdout lines, stderr)


def read(text: str, tmp_path: Path, **defaults):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    model = SimpleNamespace(vae_factor=2, default_size=32, train_timesteps=1000, inpainting_unet=False, arch="sd")
    return read_prompts_file(path, defaults, model)


def test_lines_take_their_settings_or_the_command_lines(tmp_path):
    lines = read(FILE, tmp_path, seed=11)
    assert [(l.number, l.request.prompt, l.request.seed, l.request.num_images) for l in lines] == [
        (1, "a red car", 11, 1), (4, "a blue door", 7, 3), (5, "a green tree", 11, 1)]
    assert (lines[1].request.negative_prompt, lines[1].request.cfg, lines[0].request.cfg) == ("blurry", 5.0, 7.5)
    r2, r0 = lines[2].request, lines[0].request
    assert (r2.sampler, r2.schedule, r2.width, r0.width) == ("dpmpp_2m", "karras", 16, 32)
    # without --seed: a seed from the prompt text, the same in every run (so a rerun finds its images)
    unseeded = read(FILE, tmp_path)
    assert unseeded[0].request.seed == default_seed("a red car") == 1341639179 and unseeded[1].request.seed == 7


BAD_LINES = {
    "bad JSON": ('{"prompt": "x",}', "line 2: not valid JSON (Expecting property name enclosed in double quotes"),
    "unknown key": ('{"prompt": "x", "cfgscale": 5}', "line 2: unknown key 'cfgscale'; known keys: prompt, negative"),
    "wrong type": ('{"prompt": "x", "seed": "7"}', 'line 2: "seed" must be an integer, got "7"'),
    "bool is not a number": ('{"prompt": "x", "cfg": true}', 'line 2: "cfg" must be a number, got true'),
    "no prompt": ('{"seed": 3}', 'line 2: no prompt (a JSON line needs a non-empty "prompt")'),
    "not an object": ('{"prompt"}', "line 2: not valid JSON"),
    "size": ('{"prompt": "x", "width": 33}', "line 2: width 33 is not a multiple of 2"),
    "negative cfg": ('{"prompt": "x", "cfg": -1}', "line 2: cfg (guidance scale) must be a finite number >= 0"),
    "count": ('{"prompt": "x", "count": 0}', "line 2: num-images must be at least 1, got 0"),
    "sampler": ('{"prompt": "x", "sampler": "DPM++ SDE"}', "line 2: unknown sampler 'DPM++ SDE'"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_a_bad_line_refuses_the_whole_file_naming_line_and_reason(case, tmp_path):
    line, expected = BAD_LINES[case]
    with pytest.raises(UserError) as e:
        read(f"a fine prompt\n{line}\nanother fine prompt\n", tmp_path)
    message = str(e.value)
    assert message.startswith(f"prompts file '{tmp_path / 'prompts.txt'}' {expected}"), message
    assert message.endswith("nothing was generated: fix the file and run again") and "\n" not in message


def test_every_bad_line_is_counted_and_an_empty_file_refused(tmp_path):
    with pytest.raises(UserError, match=r"line 1: .* \(and 2 more bad line\(s\): 3, 4\); nothing was generated"):
        read('{"cfg": 1}\nok\n{"x": 1}\n{"prompt": 3}\n', tmp_path)
    with pytest.raises(UserError, match="has no prompts"):
        read("\n# only a comment\n", tmp_path)


@pytest.mark.slow
def test_cli_writes_deterministic_names_resumes_and_regenerates_edited_lines(model, tmp_path, capsys):
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text(FILE)
    argv = ["--prompts-file", str(prompts), "--model", str(model), "--outdir", str(out), "--batch-size", "2", *FAST]
    code, lines, err = generate(argv, capsys)
    assert code == 0, err
    names = sorted(Path(p).name for p in lines)
    assert len(names) == 5 and sorted(p.name for p in out.iterdir()) == names
    assert names[0].startswith("00001-1-a-red-car-") and names[1].startswith("00004-7-a-blue-door-")
    assert "5 image(s) written, 0 already there (skipped), 3 line(s), 1 process(es)" in err
    # an image is what ldm-generate gives for the same settings
    code, single, err = generate(["a blue door", "--negative", "blurry", "--seed", "8", "--cfg", "5", "--model",
                                  str(model), "--outdir", str(tmp_path / "single"), *FAST[:-3], "-q"], capsys)
    assert code == 0, err
    made = next(p for p in lines if "-8-a-blue-door-" in p)
    np.testing.assert_array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(single[0])))
    assert Image.open(made).info["parameters"] == Image.open(single[0]).info["parameters"]
    # a rerun writes nothing
    code, again, err = generate(argv, capsys)
    assert code == 0 and again == [] and "0 image(s) written, 5 already there (skipped)" in err
    # an edited line (another cfg) is another image: only its images are made, under new names
    prompts.write_text(FILE.replace('"cfg": 5', '"cfg": 6'))
    code, edited, err = generate(argv, capsys)
    assert code == 0 and len(edited) == 3 and all("-a-blue-door-" in p for p in edited)
    assert not set(Path(p).name for p in edited) & set(names)


@pytest.mark.slow
def test_a_write_that_fails_leaves_no_half_png_and_the_rerun_completes(model, tmp_path, capsys, monkeypatch):
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text('{"prompt": "a cat", "count": 3}\n')
    argv = ["--prompts-file", str(prompts), "--model", str(model), "--outdir", str(out), *FAST]
    from ldm import files

    real, calls = files.write_synced, []

    def disk_full_on_the_second(path, content):
        calls.append(path)
        if len(calls) == 2:  # half a PNG is on disk under the temporary name when the disk fills up
            Path(path).write_bytes(b"\x89PNG\r\n\x1a\n half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, content)

    monkeypatch.setattr(files, "write_synced", disk_full_on_the_second)
    code, lines, err = generate(argv, capsys)
    assert code == 2 and err.splitlines()[-1].startswith(f"error: cannot write a PNG to '{out}': No space left"), err
    assert [p.name for p in out.iterdir()] == [Path(lines[0]).name]  # the complete first image only, no .tmp- file
    monkeypatch.setattr(files, "write_synced", real)
    code, rest, err = generate(argv, capsys)
    assert code == 0 and len(rest) == 2 and "2 image(s) written, 1 already there" in err
    for path in out.iterdir():
        Image.open(path).load()  # every PNG complete


def test_a_bad_file_on_the_command_line_is_one_line_and_writes_nothing(model, tmp_path, capsys):
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text('a red car\n{"prompt": "x", "steps": 0}\n')
    code, lines, err = generate(["--prompts-file", str(prompts), "--model", str(model), "--outdir", str(out)], capsys)
    assert code == 2 and lines == [] and err.count("\n") == 1, err
    assert err.startswith(f"error: prompts file '{prompts}' line 2: steps must be at least 1, got 0;"), err
    assert not any(out.iterdir())
    code, _, err = generate(["a prompt", "--prompts-file", str(prompts), "--model", str(model)], capsys)
    assert code == 2 and err == "error: --prompts-file takes its prompts from the file: drop a prompt\n"


@pytest.mark.slow
def test_two_processes_split_the_work_and_write_what_one_process_writes(model, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(FILE)
    common = ["--prompts-file", str(prompts), "--model", str(model), "--device", "cpu", *FAST]
    code, _, err = generate([*common, "--outdir", str(tmp_path / "one")], capsys)  # the 1-process reference
    assert code == 0, err
    cmd = accelerate_launch(Path("-m"), "ldm.generate", *common, "--outdir", str(tmp_path / "two"))
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for name in names:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one" / name)),
                                      np.asarray(Image.open(tmp_path / "two" / name)))
    # the processes' counts add up to 5, and no path is printed twice: each image written once, by one process
    assert two.stderr.count("5 image(s) written, 0 already there (skipped), 3 line(s), 2 process(es)") == 1
    printed = two.stdout.split()
    assert len(printed) == len(set(printed)) == 5, (two.stdout, two.stderr[-2000:])
    assert {Path(p).name for p in printed} == set(names)
