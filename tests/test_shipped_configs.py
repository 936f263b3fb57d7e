"""Every shipped config loads, and every command, path, config and link the README, docs/ or a config names exists."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from ldm.config import load_config
from ldm.demo.text_tower import PretrainConfig
from ldm.unet.config import LDMConfig
from ldm.vae.config import VAEConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
LOADERS = {"vae": VAEConfig, "ldm": LDMConfig, "text": PretrainConfig}  # configs/<folder>/ -> its dataclass
SCRIPT_LOADERS = {  # a training script -> the dataclass its --config must fill
    "train/train_vae.py": VAEConfig,
    "train/train_ldm.py": LDMConfig,
    "train/cache_latents.py": LDMConfig,
    "train/train_text_encoder.py": PretrainConfig,
}
COMMANDS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "RELIABILITY.md"]  # the markdown documentation
DOCUMENTS = [*CONFIGS, *PAGES]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
COMMAND_NAME = re.compile(r"(?<![\w/.-])(ldm-[a-z][a-z0-9-]*)(?![\w.-]*/)")
REPO_PATH = re.compile(r"(?<![\w/.$~-])((?:ldm|train|configs|bench|tools|inference|tests)/[\w./*<>-]*)")
MODULE_RUN = re.compile(r"(?<![\w.-])-m\s+(ldm(?:\.\w+)*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
OVERRIDE = re.compile(r"^[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*=")
PLACEHOLDER = re.compile(r"\$|\.\.\.|…|<|\b[A-Z][A-Z_]+\b")  # $out, ..., …, <preset>, DIR, FILE, PATH: not a real value


def path_exists(name: str) -> bool:
    """A repository path as the docs write it; `<preset>`-style placeholders and `*` match any name."""
    name = name.rstrip(".,:;-")
    pattern = re.sub(r"<[^>]*>", "*", name).rstrip("/")
    return any(ROOT.glob(pattern)) if "*" in pattern else (ROOT / pattern).exists()


def module_exists(dotted: str) -> bool:
    base = ROOT / dotted.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__main__.py").exists()


def code_commands(text: str) -> list[str]:
    """The shell commands in fenced blocks and inline code spans: continuation lines joined, comments dropped."""
    blocks = FENCE.findall(text)
    inline = [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", FENCE.sub("", text))]
    lines = []
    for block in blocks:
        lines += block.replace("\\\n", " ").splitlines()
    commands = []
    for line in lines + inline:
        line = re.sub(r"(^|\s)#.*", "", line)  # a shell comment (a `#` inside a word, as in a URL, stays)
        commands += [part.strip() for part in re.split(r"&&|;|\|(?!\|)", line) if part.strip()]
    return commands


def config_problems(command: str) -> list[str]:
    """`--config FILE [key=value ...]` (or accelerate's `--config_file FILE`) in one command: the file loads with
    the dataclass of the script the command runs (else of its configs/ folder), overrides included."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = command.split()
    problems = []
    for i, token in enumerate(tokens[:-1]):
        if token not in ("--config", "--config_file"):
            continue
        name = tokens[i + 1]
        if re.fullmatch(r"configs/[\w/-]*<[\w.-]+>\.yaml", name):  # configs/ldm/<preset>.yaml: any preset will do
            paths = sorted(ROOT.glob(re.sub(r"<[^>]*>", "*", name)))
        elif PLACEHOLDER.search(name):
            continue  # `--config ...`, `--config FILE`: nothing to load
        else:
            paths = [ROOT / name] if (ROOT / name).is_file() else []
        if not paths:
            problems.append(f"{command!r}: no config file {name}")
            continue
        if token == "--config_file":
            for path in paths:
                load_config_from_file(str(path))  # accelerate's own loader: unknown keys are a TypeError
            continue
        scripts = [t for t in tokens if t in SCRIPT_LOADERS]
        overrides = [t for t in tokens[i + 2:] if OVERRIDE.match(t) and not PLACEHOLDER.search(t)]
        errors = []
        for path in paths:
            cls = SCRIPT_LOADERS[scripts[0]] if scripts else LOADERS[path.parent.name]
            try:
                load_config(cls, path, overrides)
            except Exception as e:  # a UserError (unknown key, bad value) or a TypeError: name the command
                errors.append(f"{command!r}: {type(e).__name__}: {e}")
        if len(errors) == len(paths):  # for a <preset>, one shipped preset that loads is enough
            problems.append(errors[0])
    return problems


def headings(path: Path) -> set[str]:
    """GitHub's anchors for a markdown file's headings (code blocks left out; repeats get -1, -2, ...)."""
    anchors: set[str] = set()
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*$", FENCE.sub("", path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n, unique = 0, slug
        while unique in anchors:
            n += 1
            unique = f"{slug}-{n}"
        anchors.add(unique)
    return anchors


def test_configs_are_found():
    assert len(CONFIGS) >= 14 and {p.parent.name for p in CONFIGS} == {*LOADERS, "accelerate"}


def test_the_docs_are_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "training.md", "inference.md", "formats.md", "serving.md", "data.md", "multi-gpu.md",
            "demo.md", "development.md"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_config_loads_and_validates(path):
    folder = path.parent.name
    if folder == "accelerate":
        config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys are a TypeError
        assert config.distributed_type is not None
        return
    assert folder in LOADERS, f"no dataclass for configs/{folder}/: add it to LOADERS"
    config = load_config(LOADERS[folder], path)  # unknown keys, wrong types and impossible values raise
    assert type(config) is LOADERS[folder]


def check_document(path: Path) -> None:
    text = path.read_text()
    commands = set(COMMAND_NAME.findall(text))
    assert not commands - COMMANDS, f"{path.name} names commands that pyproject.toml does not install: " \
                                    f"{sorted(commands - COMMANDS)}"
    missing = sorted({p for p in REPO_PATH.findall(text) if not path_exists(p)})
    assert not missing, f"{path.name} names paths that do not exist: {missing}"
    modules = sorted({m for m in MODULE_RUN.findall(text) if not module_exists(m)})
    assert not modules, f"{path.name} runs modules that do not exist (python -m): {modules}"
    shell = code_commands(text)
    launches = [c for c in shell if c.startswith("accelerate launch")]  # a bare script name is one in train/
    bad_launch = [c for c in launches if any(t.endswith(".py") and not path_exists(t if "/" in t else f"train/{t}")
                                             for t in c.split())]
    assert not bad_launch, f"{path.name}: accelerate launch of scripts that do not exist: {bad_launch}"
    problems = [p for c in shell for p in config_problems(c)]
    assert not problems, f"{path.name} names configs that do not load: {problems}"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_scripts_and_configs_named_in_docs_exist(path):
    check_document(path)


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path):
    broken = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in headings(dest):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{path.name} has broken links: {broken}"


def test_the_readme_fits_on_a_screen_and_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 150, "the README holds the essentials; move details to docs/"
    unlinked = [p.name for p in PAGES[1:-1] if f"(docs/{p.name}" not in text]
    assert not unlinked, f"the README's Docs list misses {unlinked}"


def test_the_readme_test_command_is_what_ci_runs():
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == ['pip install torch==2.14.1 torchvision==0.29.1 -c constraints.txt -e ".[test]" && python -m pytest -q']
    readme_lines = [line for block in FENCE.findall(README.read_text()) for line in block.splitlines()]
    assert ci[0] in readme_lines, "the README's test command must be .ci/run's, character for character"


def test_the_docs_check_catches_a_missing_command(tmp_path):
    fake = tmp_path / "bad.yaml"
    fake.write_text("# written by `ldm-text-encoder runs/x`\n")
    with pytest.raises(AssertionError, match="names commands"):
        check_document(fake)


def test_the_docs_check_catches_a_made_up_path(tmp_path):
    fake = tmp_path / "bad.md"
    fake.write_text("The request lives in `ldm/pipeline/request.py`, models open in `ldm/models/spec.py`.\n")
    check_document(fake)
    for made_up in ("ldm/requests.py", "configs/vae/huge.yaml", "bench/RESULT.md", "tools/nothing/",
                    "configs/vae/<preset>.yml"):
        fake.write_text(f"See `{made_up}` and `ldm/files.py`.\n")
        with pytest.raises(AssertionError, match=r"names paths that do not exist: \['" + re.escape(made_up)):
            check_document(fake)


def test_the_docs_check_catches_bad_modules_scripts_configs_and_overrides(tmp_path):
    fake = tmp_path / "bad.md"
    cases = {
        "python -m ldm.pipeline.nothing MODEL": "runs modules that do not exist",
        "accelerate launch --cpu -m ldm.generat --prompts-file p.txt": "runs modules that do not exist",
        "accelerate launch --cpu train/train_vea.py --config configs/vae/tiny.yaml": "names paths that do not exist",
        "accelerate launch --cpu train/train_vae.py --config configs/vae/tiny.yaml train.max_stepz=3": "do not load",
        "accelerate launch --cpu train/train_vae.py --config configs/ldm/tiny.yaml": "do not load",  # wrong stage
        "accelerate launch train/train_ldm.py --config configs/ldm/<preset>.yaml lora.rnak=8": "do not load",
        "accelerate launch --config_file configs/accelerate/fdsp.yaml train/train_ldm.py": "do not exist",
    }
    for command, message in cases.items():
        fake.write_text(f"```bash\n{command}   # a comment\n```\n")
        with pytest.raises(AssertionError, match=message):
            check_document(fake)
    fake.write_text("```bash\naccelerate launch --cpu train/train_vae.py --config configs/vae/tiny.yaml \\\n"
                    "    train.max_steps=3 model.pretrained=DIR\n```\n")
    check_document(fake)  # a real override loads; a placeholder value (DIR) is not tried


def test_the_link_check_catches_a_broken_file_or_anchor(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A page\n\n## Stage 2: the U-Net\n\n```bash\n# not a heading\n```\n")
    page = docs / "b.md"
    page.write_text("[ok](a.md#stage-2-the-u-net) [ok](#b) [web](https://example.com/x)\n\n# B\n")
    test_relative_links_and_anchors_resolve(page)
    for bad in ("(c.md)", "(a.md#stage-2)", "(a.md#not-a-heading)", "(#c)"):
        page.write_text(f"[x]{bad}\n\n# B\n")
        with pytest.raises(AssertionError, match="broken links"):
            test_relative_links_and_anchors_resolve(page)
