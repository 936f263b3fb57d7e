"""Textual-inversion embedding files: reading and checking them, the files a run may use, and their hashes.

    library = EmbeddingLibrary.read("embeddings/", ["extra/ink.safetensors"])   # --embeddings-dir, --embedding
    loaded, skipped = library.split(fits)   # name -> Embedding, for a model (ldm/text/embeddings.py says what fits)
    loaded["ink"].vectors   # {"": (n, 768)} for SD 1.x; {"clip_l": (n, 768), "clip_g": (n, 1280)} SDXL

The formats (A1111 modules/textual_inversion/textual_inversion.py `load_from_file`; diffusers
loaders/textual_inversion.py), vectors (n, D), or (D,) for one:
- A1111's: {"string_to_param": {"*": (n, D)}, "name", "step", "sd_checkpoint", "sd_checkpoint_name", ...};
- one tensor under any key: diffusers' {token: (n, D)}, kohya's and A1111's .safetensors {"emb_params": (n, D)};
- SDXL: {"clip_l": (n, 768), "clip_g": (n, 1280)}, one set of vectors per text tower.
`.safetensors` files are read as such; `.pt`/`.bin` only with `torch.load(weights_only=True)` (tensors and plain
values: `ldm.weights.read_weights_only_pickle`), and one that needs more is refused. D is the text tower's width:
768 for SD 1.x, 1024 for SD 2.x (ldm/text/embeddings.py decides what fits a model). Embeddings stored in images
(A1111's .png/.webp) are not read.

An embedding is called by its file's stem, as in A1111 (`bad-hands-5.pt` -> bad-hands-5). Its hash, as A1111 writes
it into the PNG (`TI hashes: "name: 0123456789ab, ..."`), is the first 12 hex digits of the sha256 of the whole
file (A1111's `Embedding.set_hash(hashes.sha256(filename, ...))`, `shorthash = hash[0:12]`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.files import sha256_file
from ldm.weights import check_safetensors_file, read_safetensors, read_weights_only_pickle

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".pt", ".bin")
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL's towers, in the encoder's order (the refiner has clip_g alone)
MAX_VECTORS = 75  # one prompt chunk (77 - start - end)
SHORT_HASH_LENGTH = 12
_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x"}


@dataclass(eq=False)
class Embedding:
    name: str  # A1111's: the file's stem
    path: Path
    vectors: dict[str, torch.Tensor]  # "" -> (n, D) for SD 1.x/2.x; "clip_l"/"clip_g" -> (n, 768)/(n, 1280): fp32 CPU
    relative: str = ""  # the path below --embeddings-dir ('styles/ink.pt'), or the file's name
    step: int | None = None  # A1111's training metadata, when the file has it
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def shape(self) -> int:
        """A1111's `shape`: the width of one vector, both towers' together for SDXL (768 + 1280 = 2048)."""
        return sum(v.shape[1] for v in self.vectors.values())

    @property
    def kind(self) -> str:
        """'an SDXL embedding (clip_l 768 + clip_g 1280)', 'an SD 1.x embedding (768 wide)'."""
        return widths_text({k: v.shape[1] for k, v in self.vectors.items()}, "embedding")

    @property
    def short_hash(self) -> str:
        return embedding_hash(self.path)


def widths_text(widths: dict[str, int], noun: str = "") -> str:
    """{"": 768} -> 'an SD 1.x embedding (768 wide)' with a noun, '768-wide vectors (SD 1.x)' without; SDXL's
    {"clip_l": 768, "clip_g": 1280} -> 'an SDXL embedding (clip_l 768 + clip_g 1280)' / '... vectors (SDXL)'."""
    if "" in widths:
        width = widths[""]
        family = _FAMILIES.get(width)
        if noun:
            return f"an {family} {noun} ({width} wide)" if family else f"a {width}-wide {noun}"
        return f"{width}-wide vectors" + (f" ({family})" if family else "")
    parts = " + ".join(f"{k} {w}" for k, w in widths.items())
    return f"an SDXL {noun} ({parts})" if noun else f"{parts} vectors (SDXL)"


# ------------------------------------------------------------------------------------------------ reading the files

_hashes: dict[tuple[str, int, int], str] = {}
_read: dict[tuple[str, int, int], Embedding | UserError] = {}


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def embedding_hash(path: str | Path) -> str:
    """A1111's short hash of an embedding file: the first 12 hex digits of the sha256 of all its bytes."""
    key = _stamp(Path(path))
    if key not in _hashes:
        _hashes[key] = sha256_file(path)[:SHORT_HASH_LENGTH]
    return _hashes[key]


def read_embedding(path: str | Path, relative: str = "") -> Embedding:
    """An embedding file (see the module docstring) -> `Embedding`; a `UserError` naming the file if it is none.
    Read once per file version (path, size, mtime)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"embedding file '{path}' does not exist")
    key = _stamp(path)
    if key not in _read:
        try:
            _read[key] = _read_file(path, relative or path.name)
        except UserError as e:
            _read[key] = e
    found = _read[key]
    if isinstance(found, UserError):
        raise UserError(str(found))
    return found


def _read_file(path: Path, relative: str) -> Embedding:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        check_safetensors_file(path)
        data, _ = read_safetensors(path)
    elif suffix in (".pt", ".bin"):
        data = read_weights_only_pickle(path)
    else:
        raise UserError(f"'{path}' is not an embedding file: use .safetensors (or a .pt/.bin of tensors)")
    meta = data if isinstance(data, dict) else {}
    return Embedding(path.stem, path, _vectors(data, path), relative, _int(meta.get("step")),
                     _str(meta.get("sd_checkpoint")), _str(meta.get("sd_checkpoint_name")))


def _vectors(data: object, path: Path) -> dict[str, torch.Tensor]:
    """The file's contents -> {"": (n, D)} or {"clip_l": (n, 768), "clip_g": (n, 1280)}, checked."""
    if isinstance(data, dict) and "string_to_param" in data:  # A1111's
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise UserError(f"'{path}' is not a textual-inversion embedding: its string_to_param holds "
                            f"{len(params) if isinstance(params, dict) else type(params).__name__} entries, not one")
        vectors = {"": next(iter(params.values()))}
    elif isinstance(data, dict) and all(k in data for k in SDXL_KEYS):
        vectors = {k: data[k] for k in SDXL_KEYS}
    elif isinstance(data, dict) and len(data) == 1:  # diffusers' {token: tensor}, kohya's {"emb_params": ...}
        vectors = {"": next(iter(data.values()))}
    else:
        keys = ", ".join(list(map(str, data))[:5]) if isinstance(data, dict) else type(data).__name__
        raise UserError(f"'{path}' is not a textual-inversion embedding (it holds {keys or 'nothing'}; an embedding "
                        "holds A1111's string_to_param, one tensor, or SDXL's clip_l and clip_g)")
    out = {}
    for key, v in vectors.items():
        what = f"'{path}'" + (f" {key}" if key else "")
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.ndim not in (1, 2) or 0 in v.shape:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise UserError(f"{what} is not a textual-inversion embedding: its vectors are {shape}, not (n, width) "
                            "floats")
        out[key] = v.detach().reshape(-1, v.shape[-1]).to("cpu", torch.float32).contiguous()  # (n, D)
    counts = {v.shape[0] for v in out.values()}
    if len(counts) > 1:
        raise UserError(f"'{path}' is a broken SDXL embedding: clip_l has {out['clip_l'].shape[0]} vectors, clip_g "
                        f"{out['clip_g'].shape[0]}")
    if max(counts) > MAX_VECTORS:
        raise UserError(f"'{path}' has {max(counts)} vectors; at most {MAX_VECTORS} fit in a prompt chunk")
    return out


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


# -------------------------------------------------------------------------------------------- the files of a run


@dataclass
class EmbeddingLibrary:
    """The embedding files a run may use: each `--embedding FILE`, then every file below `--embeddings-dir` (searched
    recursively, following links, as A1111 does; empty files and other suffixes are passed over). A directory file
    that is not a readable embedding is skipped with one warning (A1111 reports it and goes on); a FILE given by
    itself that is not one is a `UserError`. `refresh()` reads the directory again when a folder in it changed, as
    A1111 reloads its embeddings before each generation."""

    directory: Path | None
    files: tuple[Path, ...]
    embeddings: list[Embedding] = field(default_factory=list)  # the files given, then the directory's, sorted
    _folders: dict[str, int] = field(default_factory=dict)  # folder -> mtime: what refresh() compares
    version: int = 0  # how many times the files were read: users built from an older reading rebuild

    @classmethod
    def read(cls, directory: str | Path | None, files: Sequence[str | Path] = ()) -> EmbeddingLibrary:
        root = None if directory is None else Path(directory).expanduser()
        if root is not None and not root.is_dir():
            raise UserError(f"--embeddings-dir '{root}' is not a directory")
        library = cls(root, tuple(Path(f).expanduser() for f in files))
        library._load()
        return library

    def _load(self) -> None:
        self.version += 1
        self.embeddings = [read_embedding(f) for f in self.files]
        self._folders = {}
        if self.directory is None:
            return
        found = []
        for folder, _, names in os.walk(self.directory, followlinks=True):
            self._folders[folder] = os.stat(folder).st_mtime_ns
            found += [Path(folder) / n for n in names if Path(n).suffix.lower() in SUFFIXES]
        for path in sorted(found):
            if path.stat().st_size == 0:
                continue
            try:
                self.embeddings.append(read_embedding(path, path.relative_to(self.directory).as_posix()))
            except UserError as e:
                say_once(logging.WARNING, "--embeddings-dir: skipping %s", str(e))

    def refresh(self) -> bool:
        """Read the directory again if a folder in it changed (a file added, removed or renamed); True if so."""
        if self.directory is None:
            return False
        try:
            if all(os.stat(f).st_mtime_ns == t for f, t in self._folders.items()):
                return False
        except OSError:  # a folder was removed
            pass
        self._load()
        return True

    def split(self, fits: Callable[[Embedding], bool]) -> tuple[dict[str, Embedding], dict[str, Embedding]]:
        """(loaded, skipped) as A1111 lists them for a model: name -> the embedding that `fits` it, and name -> one
        that does not, for the names no file fits. One file per name: a FILE given by itself before the directory's,
        else the first by path (A1111 keeps whichever it read last); the others are named in one warning."""
        loaded: dict[str, Embedding] = {}
        skipped: dict[str, Embedding] = {}
        for e in self.embeddings:
            if not fits(e):
                skipped.setdefault(e.name, e)
            elif e.name in loaded:
                say_once(logging.WARNING, "two embeddings are named '%s': using %s, not %s", e.name,
                         loaded[e.name].path, e.path)
            else:
                loaded[e.name] = e
        return loaded, {n: e for n, e in skipped.items() if n not in loaded}

    def reference(self, name: str) -> Embedding | None:
        """ComfyUI's `embedding:NAME`: the file NAME names (its stem, its file name, or either with the folders
        above it below the directory; ComfyUI searches every folder below it), given files first."""
        name = name.replace("\\", "/")
        for e in self.embeddings:
            parts = e.relative.split("/")
            for i in range(len(parts)):
                tail = "/".join(parts[i:])
                if name in (tail, tail.rpartition(".")[0]):  # every file here has a suffix (SUFFIXES)
                    return e
        return None


_said: set[tuple] = set()


def say_once(level: int, message: str, *args: object) -> None:
    """The CLI checks the inputs before loading the model and the pipeline again: say each finding once."""
    if (message, args) not in _said:
        _said.add((message, args))
        log.log(level, message, *args)
