"""`pgm push`: a run or a pretrained directory published on the Hugging Face Hub.

The folder uploaded is what `save_pretrained` writes (config.json, model.safetensors, tokenizer/
with the text tokenizer or the VQ model, README.md), written for the repository: its model card
carries the Hub's metadata (library, license, tags, datasets, the run's last validation number)
and the `pgm.load("OWNER/NAME")` line that loads it. `huggingface_hub` uploads it: the repository
is created when missing, and a branch named as the revision too. The folder can be written alone
(`write_folder`) to look at, or to upload by other means.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path

from .errors import CheckpointError, MissingDependency, PublishError
from .formats import TOKENIZER_CONFIG, read_config_file
from .hub import is_transformers_directory, load_pretrained_dir
from .vq_tokenizer import NAMED as VQ_NAMED_WEIGHTS

# The Hub's rule for a repository name: letters, digits, "-", "_", "." (no "--" or "..", not at
# either end), at most 96 characters; our repositories belong to a user or an organisation.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


@dataclasses.dataclass
class Published:
    """What was written (`folder`, None once a pushed folder is gone) or pushed (`url`, `revision`):
    the model's kind, the folder's files (relative paths), their bytes, and the weights they hold
    ("ema", "raw", or None where the source does not say)."""

    repo_id: str
    kind: str
    files: list[str]
    size: int
    weights: str | None
    folder: Path | None = None
    url: str | None = None
    revision: str | None = None


def check_repo_id(repo_id: str) -> None:
    owner, slash, name = str(repo_id).partition("/")
    valid = (slash and all(_NAME.fullmatch(part) and "--" not in part and ".." not in part for part in (owner, name))
             and len(name) <= 96)
    if not valid:
        raise PublishError(f"{repo_id!r} is not a Hub repository id: write OWNER/NAME, each of letters, digits, '-', "
                           "'_' and '.' (not at either end, no '--' or '..')")


def write_folder(source: str | Path, folder: str | Path, repo_id: str, *, weights: str | None = None,
                 license: str | None = None) -> Published:
    """Write into `folder` (new or empty) what a push of the run or pretrained directory `source`
    uploads to `repo_id`: `weights` ("ema", "raw"; default: the average where the run kept one),
    and `license` in the card's metadata (default: the one its card records, else the default)."""
    check_repo_id(repo_id)
    source, folder = Path(source), Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PublishError(f"{folder} already exists and is not an empty directory: the folder is written new, so "
                           "that it holds nothing but the model")
    model = _model_to_publish(source, weights)
    card = dict(model.origin.card)
    if model.origin.run_dir is not None:  # the checkpoint as a path inside the run, not this machine's
        card["source"] = Path(model.origin.source).relative_to(model.origin.run_dir.parent).as_posix()
    if license is not None:
        card["license"] = license
    model.origin = dataclasses.replace(model.origin, card=card)
    model.save_pretrained(folder, repo_id=repo_id)
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return Published(repo_id, model.config.kind, files, sum((folder / name).stat().st_size for name in files),
                     card.get("weights"), folder=folder)


def _model_to_publish(source: Path, weights: str | None):
    """The model of the run or pretrained directory `source`, refused in one sentence when it is
    anything else or names a VQ tokenizer the Hub cannot reach."""
    if source.is_file():
        raise PublishError(f"{source} is a file, not a run or a pretrained directory: convert a released checkpoint "
                           "first (pgm convert official FILE DIR) and push DIR")
    if is_transformers_directory(source):
        raise PublishError(f"{source} is in transformers' layout, not a run or a pretrained directory: convert it "
                           "first (pgm convert official DIR OUT) and push OUT")
    try:
        values = read_config_file(source, "a run or a pretrained directory")
    except CheckpointError as error:
        raise PublishError(str(error)) from None
    if "model" not in values:
        raise PublishError(f"{source} is not a run or a pretrained directory (its config.json has no model section)")
    model, _ = load_pretrained_dir(source, weights)
    tokenizer_dir = model.origin.tokenizer_dir
    if tokenizer_dir is not None and (tokenizer_dir / TOKENIZER_CONFIG).is_file():
        named = json.loads((tokenizer_dir / TOKENIZER_CONFIG).read_text()).get(VQ_NAMED_WEIGHTS)
        if named is not None:
            raise PublishError(f"{source}'s VQ tokenizer is only named ({named}), a path the Hub cannot reach: "
                               "convert again with --vq and without --vq-reference, so that tokenizer/ holds it")
    return model


def default_commit_message(published: Published) -> str:
    weights = f" ({published.weights} weights)" if published.weights else ""
    return f"Upload a partition-gm {published.kind} model{weights} with pgm push"


def push(source: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         weights: str | None = None, token: str | None = None, commit_message: str | None = None,
         license: str | None = None) -> Published:
    """Upload the folder `write_folder` makes of `source` to the Hub repository `repo_id`, creating
    it when missing (`private` then), on the branch `revision` (created from main when missing;
    default main), with `token` (default: huggingface_hub's saved login or $HF_TOKEN)."""
    check_repo_id(repo_id)
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise MissingDependency("pgm push needs huggingface_hub: pip install 'partition-gm[hf]' (or write the folder "
                                "with --folder DIR and upload it by other means)") from None
    with tempfile.TemporaryDirectory(prefix="pgm-push-") as temporary:
        published = write_folder(source, Path(temporary) / "folder", repo_id, weights=weights, license=license)
        message = commit_message or default_commit_message(published)
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=published.folder, revision=revision,
                              commit_message=message)
        except Exception as error:  # HTTP, authentication, network: whatever the Hub said, in one sentence
            said = (str(error).strip().splitlines() or [""])[0]
            raise PublishError(f"could not push to {repo_id} on the Hugging Face Hub ({type(error).__name__}"
                               f"{': ' + said if said else ''})") from None
    return dataclasses.replace(published, folder=None, url=str(url), revision=revision or "main")
