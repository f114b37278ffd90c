"""The on-disk formats, at the bottom of the house: the names inside run and pretrained
directories, atomic writes, reading a directory's config, safetensors weights, the model card.

Everything that saves or loads goes through this module, and it imports nothing of the package.
A file is written beside its final name and renamed over it only once it is complete and on
disk, so a crash leaves the previous file (or none), never half of one; a directory is written
the same way under a hidden temporary name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ArgumentError, CheckpointError, PGMError, ResourceError

CONFIG_FILE = "config.json"  # {"model": {...}} (pretrained) or {"model", "data", "train"} (run)
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_CONFIG = "tokenizer_config.json"
DATA_DIR = "data"  # a run's encoded rows and meta.json
MODEL_CARD = "README.md"


WEIGHTS = ("ema", "raw")  # a run's (or a checkpoint's) averaged or raw weights


def check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise ArgumentError(f"weights must be 'ema' or 'raw', got {weights!r}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it to read it back
    would leave a moment in which another thread creates files under the wrong mask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_umask_modes(path: Path) -> None:
    """Set `path` (a file, or a directory and all it holds) to the modes a plain open or mkdir would
    have given it under the umask. Writers that make their file through a temporary file of their
    own (safetensors) leave it 0600, and copies keep their source's modes: a run shared by a team
    must be readable as the team's umask says, whoever wrote which file."""
    mask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


# Temporary names, beside the final name: files `.STEM.tmp-PID.SUFFIX`, directories `.tmp-NAME-PID`
# (the PID says whose it is, so that only a dead process's leftovers are removed).
_TEMPORARY_FILE = re.compile(r"^\..+\.tmp-(?P<pid>\d+)(\.[^.]*)?$")
_TEMPORARY_DIRECTORY = re.compile(r"^\.tmp-.+-(?P<pid>\d+)$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def out_of_space(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a full disk or quota. Writers that are not Python's
    (safetensors, torch.save) raise their own types, with the system's message inside."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _disk_full(directory: Path) -> bool:
    """Whether the file system of `directory` has (next to) no room left: how a failed write is known
    to be a full disk when its writer does not say so (torch.save: "unexpected pos 576 vs 534"). Root
    may write into the blocks reserved for it, others may not."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    free = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail
    return free * stats.f_frsize < 1 << 20


def _named_if_full(error: Exception, path: Path) -> Exception:
    """`error`, or an ENOSPC OSError for `path` when the disk is full and `error` does not say so.
    Called before the temporary is removed: it is what filled the disk."""
    if not out_of_space(error) and _disk_full(path.parent):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return error


def _refusal(error: Exception, path: Path) -> Exception:
    """A write of `path` that the system refused (a full disk, no permission, a read-only file system)
    as one sentence that names it; any other failure as it was. Called before the temporary is removed."""
    error = _named_if_full(error, path)
    if isinstance(error, OSError) and not isinstance(error, PGMError):
        return ResourceError(f"cannot write {path}: {error.strerror or error}")
    return error


def make_directory(path: str | Path) -> Path:
    """`path` as a directory, made with its parents if need be; a refusal is one sentence that names it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if isinstance(error, FileExistsError) or error.errno == errno.ENOTDIR:
            raise ResourceError(_file_in_the_way(path)) from None
        raise ResourceError(f"cannot create the directory {path}: {error.strerror or error}") from None
    return path


def check_writable(directory: str | Path) -> Path:
    """Refuse, before the work that would fill it, a directory that could not be made or written:
    the nearest part of its path that exists must be a directory this process can write into (tried
    by writing there). Nothing is left behind."""
    directory = Path(directory)
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        raise ResourceError(_file_in_the_way(directory))
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ResourceError(f"cannot write into {existing}: {error.strerror or error}") from None
    return directory


def _nearest_existing(path: Path) -> Path:
    return next(part for part in (path, *path.absolute().parents) if part.exists())


def _file_in_the_way(directory: Path) -> str:
    existing = _nearest_existing(directory)
    if existing == directory:
        return f"{directory} is a file, not a directory"
    return f"the directory {directory} cannot be made: {existing} is a file"


@contextlib.contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that infer the format from
    it still work). When the block ends normally the file is given the umask's mode, synced and
    renamed over `path`; when it raises, the temporary file is removed and `path` is untouched."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield temporary
        _give_umask_modes(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    except Exception as error:
        refused = _refusal(error, path)
        temporary.unlink(missing_ok=True)
        if refused is not error:
            raise refused from error
        raise


def write_atomic(path: str | Path, data: bytes) -> None:
    with replaced_atomically(path) as temporary:
        temporary.write_bytes(data)


def write_json(path: str | Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


@contextlib.contextmanager
def replaced_directory(path: str | Path) -> Iterator[Path]:
    """Like `replaced_atomically`, for a whole directory: it is filled under a hidden name
    (`.tmp-NAME-PID`), its files synced, and renamed into place; an existing `path` is replaced.
    A process killed mid-way leaves only the hidden directory, which `remove_partial` clears."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    make_directory(path.parent)
    try:
        temporary.mkdir()
        yield temporary
        _give_umask_modes(temporary)
        for file in temporary.rglob("*"):
            if file.is_file():
                _fsync(file)
        if path.exists():
            shutil.rmtree(path)
        os.rename(temporary, path)
    except Exception as error:
        refused = _refusal(error, path)
        shutil.rmtree(temporary, ignore_errors=True)
        if refused is not error:
            raise refused from error
        raise


def remove_partial(directory: Path) -> None:
    """Remove what an interrupted `replaced_atomically` or `replaced_directory` left inside
    `directory`: temporaries of a process that no longer runs, or of this one (which is not
    writing them now, since it is here). A live process's temporary is the file it is writing."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        kind = _TEMPORARY_DIRECTORY if path.is_dir() and not path.is_symlink() else _TEMPORARY_FILE
        found = kind.match(path.name)
        if found is None or (int(found["pid"]) != os.getpid() and _process_alive(int(found["pid"]))):
            continue
        if kind is _TEMPORARY_DIRECTORY:
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def copy_directory(source: Path, target: Path) -> None:
    """Copy the directory `source` to `target` (replacing it) atomically."""
    with replaced_directory(target) as temporary:
        shutil.copytree(source, temporary, dirs_exist_ok=True)


def read_config_file(directory: str | Path, what: str = "a run directory") -> dict:
    """The parsed config.json of `directory` (a JSON object), or one sentence saying why there is none."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{directory} is not {what} (it has no {CONFIG_FILE})")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} holds a JSON {type(values).__name__}, not an object")
    return values


def save_weights(state: dict, path: Path) -> None:
    """Tensors (contiguous, on the CPU) as a safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors = {name: value.detach().contiguous().cpu() for name, value in state.items()}
    with replaced_atomically(path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})


def load_weights(path: Path, still_works: str = "") -> dict:
    """The tensors of a safetensors file; a missing or damaged one is one sentence, ending with
    `still_works` (what the caller can offer instead: other weights, an earlier checkpoint)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    after = f"; {still_works}" if still_works else ""
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist{after}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({reason}){after}") from None


@dataclasses.dataclass
class Origin:
    """Where a loaded model came from, kept on the model (`model.origin`) so that saving it again
    keeps its tokenizer and its model card.

    tokenizer_dir: a directory holding the model's tokenizer (a run's or a pretrained one's);
    tokenizer_name: a tokenizer known by name instead ("gpt2", "bert-base-uncased": the
    authors' checkpoints); run_dir: the training run, whose validation data evaluation reads;
    card: what the model card says about its training (plain JSON values)."""

    source: str
    tokenizer_dir: Path | None = None
    tokenizer_name: str | None = None
    run_dir: Path | None = None
    card: dict = dataclasses.field(default_factory=dict)


DEFAULT_LICENSE = "apache-2.0"  # the model card's license when neither its card nor `pgm push --license` names one
LIBRARY_NAME = "partition-gm"  # the Hub's library_name: the name pip installs


def model_card(config: dict, parameters: int, card: dict, repo_id: str | None = None) -> str:
    """A pretrained directory's README.md: the Hub's metadata as YAML front matter (`card_metadata`),
    then what the model is, its shape, and what `card` knows of its training (data, tokens seen,
    validation, source), and how to load it: from `repo_id` when it is published there. The text
    depends on its arguments only (no dates), so that it can be compared byte for byte."""
    kind = config.get("kind", "?")
    shape = ", ".join(f"{k}={v}" for k, v in config.items() if k != "kind")
    rows = [("kind", kind), ("parameters", f"{parameters / 1e6:.2f}M"), ("configuration", shape)]
    labels = {"data": "data", "tokens_seen": "tokens seen", "validation": "validation", "weights": "weights",
              "source": "trained or imported from", "init_from": "started from", "distillation": "distillation"}
    for key, label in labels.items():
        value = card.get(key)
        if value in (None, "", {}):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif key == "tokens_seen":
            value = f"{value / 1e6:.2f}M"
        rows.append((label, value))
    table = "\n".join(f"| {label} | {str(value).replace('|', '/')} |" for label, value in rows)
    if repo_id is None:
        loading = ("Load it with `pgm.load(\"THIS_DIRECTORY\")` in Python or `pgm sample THIS_DIRECTORY` on the "
                   "command line (pip install partition-gm).\n")
    else:
        loading = (f"Load it in Python (pip install \"partition-gm[hf]\"):\n\n```python\nimport pgm\n\n"
                   f"pipe = pgm.load(\"{repo_id}\")\n```\n\n"
                   f"or sample it on the command line: `pgm sample {repo_id}`.\n")
    front = "\n".join(yaml_lines(card_metadata(config, card, repo_id)))
    return f"---\n{front}\n---\n\n# A partition-gm {kind} model\n\n| | |\n|---|---|\n{table}\n\n{loading}"


def generation_task(config: dict) -> str:
    """What a model of `config` does, as the Hub names tasks: text or image generation (class-conditional
    code models, as `pgm.models.is_image_model` says), a VQ's reconstruction, a classifier's labels."""
    kind = config.get("kind")
    if kind == "vq":
        return "image-to-image"
    if kind == "classifier":
        return "image-classification"
    return "image-generation" if kind == "maskgit" or config.get("num_classes") else "text-generation"


def card_metadata(config: dict, card: dict, repo_id: str | None = None) -> dict:
    """The Hub's model card metadata: library, license, tags, the Hub datasets it was trained on, and
    its last validation number as a model-index result."""
    kind = config.get("kind", "?")
    task = generation_task(config)
    diffusion = ["diffusion", "masked-diffusion"] if kind in ("pgm", "mdlm") else []
    metadata = {"library_name": LIBRARY_NAME, "license": card.get("license") or DEFAULT_LICENSE,
                "tags": [LIBRARY_NAME, kind, *diffusion, task]}
    source = (card.get("data") or {}).get("source")
    hub_dataset, _, hub_config = source[3:].partition(":") if str(source).startswith("hf:") else (None, "", "")
    if hub_dataset:
        metadata["datasets"] = [hub_dataset]
    validation = {k: v for k, v in (card.get("validation") or {}).items() if k != "step"}
    if validation and source:
        label, value = next(iter(validation.items()))
        name, _, unit = label.partition(" ")  # "ELBO nats/token", as `pgm.runs.validation_metric` writes it
        dataset = {"name": hub_dataset or source, "type": hub_dataset or source}
        if hub_config:
            dataset["config"] = hub_config
        metric = {"name": f"validation {name} ({unit})" if unit else f"validation {name}", "type": name.lower(),
                  "value": value}
        metadata["model-index"] = [{"name": repo_id.split("/")[-1] if repo_id else f"{LIBRARY_NAME}-{kind}",
                                    "results": [{"task": {"type": task}, "dataset": dataset, "metrics": [metric]}]}]
    return metadata


_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9._/+-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n", "null"}  # plain, these would not read as text


def yaml_lines(value, indent: str = "") -> list[str]:
    """Nested dicts, lists and scalars as block YAML (what the Hub's front matter needs, without a
    YAML library): words plain, any other text in double quotes (JSON's escapes are YAML's)."""
    def scalar(item) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, (int, float)):
            return repr(item)
        text = str(item)
        return text if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS else json.dumps(text)

    lines = []
    for key, item in (value.items() if isinstance(value, dict) else ((None, item) for item in value)):
        lead = f"{indent}{key}:" if key is not None else f"{indent}-"
        if not isinstance(item, (dict, list)):
            lines.append(f"{lead} {scalar(item)}")
        elif not item:
            lines.append(f"{lead} {json.dumps(item)}")  # [] or {}: flow style, the only way to write them empty
        elif key is None and isinstance(item, dict):  # "- first: ..." and the rest aligned under it
            nested = yaml_lines(item, indent + "  ")
            lines += [f"{lead} {nested[0].lstrip()}", *nested[1:]]
        else:
            lines += [lead, *yaml_lines(item, indent + "  ")]
    return lines
