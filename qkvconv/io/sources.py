"""Where a SOURCE argument points: a local directory or file, or a Hugging Face Hub repo id.

Repo ids (`org/name`) are fetched with huggingface_hub into its normal cache, only the files a
checkpoint needs (configs, safetensors and their index, or .bin when a repo has no safetensors,
adapter files), and honour HF_HUB_OFFLINE: offline, only what is already cached is used.
"""

from __future__ import annotations

import re
from pathlib import Path

from qkvconv.errors import QkvconvError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_PATTERNS = ["*.json", "*.yaml", "*.model", "*.txt"]
WEIGHT_PATTERNS = (["*.safetensors"], ["*.bin", "*.pth"])


def is_repo_id(source: str) -> bool:
    return bool(REPO_ID.match(source)) and not source.startswith(("./", "../"))


def resolve(source: str | Path, revision: str | None = None) -> Path:
    """A local path for SOURCE, downloading a Hub repo's needed files into the cache if it is one."""
    path = Path(source).expanduser()
    if path.exists():
        if revision is not None:
            raise QkvconvError(f"--revision applies to Hub repo ids, but {source} is a local path")
        return path
    text = str(source)
    if not is_repo_id(text):
        raise QkvconvError(f"{source} does not exist (neither a local path nor a Hub repo id like org/name)")
    if Path(Path(text).parts[0]).is_dir():  # "checkpoints/mymodel" beside a local checkpoints/: a typo, not a repo
        raise QkvconvError(f"no such local path: {source} ({Path(text).parts[0]}/ exists, but has no {Path(text).name})")
    try:
        return _from_hub(text, revision)
    except QkvconvError as e:
        raise QkvconvError(f"no such local path: {source}; read as a Hub repo id: {e}") from None


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=CONFIG_PATTERNS + WEIGHT_PATTERNS[0]))
        if not any(folder.glob("*.safetensors")) and not constants.HF_HUB_OFFLINE:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=CONFIG_PATTERNS + WEIGHT_PATTERNS[1]))
    except LocalEntryNotFoundError:
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if constants.HF_HUB_OFFLINE
            else "it is not cached and the Hub could not be reached"
        )
        raise QkvconvError(f"cannot get {where}: {hint} ({constants.HF_HUB_CACHE})") from None
    except GatedRepoError:
        raise QkvconvError(f"{where} is gated: accept its license on the Hub and log in (`hf auth login`)") from None
    except RevisionNotFoundError:
        raise QkvconvError(f"{where}: no such revision") from None
    except RepositoryNotFoundError:
        raise QkvconvError(f"{where}: no such repository (or it is private: log in with `hf auth login`)") from None
    except OSError as e:
        raise QkvconvError(f"cannot get {where}: {e}") from None
    return folder


def trusted_root(directory: Path) -> Path:
    """The folder a checkpoint's symlinks may point into: the directory itself, or for a Hub cache
    snapshot (models--org--name/snapshots/<commit>) the repo's cache folder, whose blobs it links to."""
    directory = directory.resolve() if not directory.is_symlink() else directory.absolute()
    parts = directory.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith(("models--", "datasets--")):
        return Path(*parts[:-2])
    return directory


def check_inside(path: Path, directory: Path) -> Path:
    """`path` (a file of the checkpoint in `directory`), refusing symlinks that leave the checkpoint."""
    if path.is_symlink():
        target = path.resolve()
        root = trusted_root(directory)
        if not target.is_relative_to(root):
            raise QkvconvError(
                f"{path} is a symlink to {target}, outside the checkpoint directory; refusing to follow it "
                "(copy the file in if you trust it)"
            )
    return path
