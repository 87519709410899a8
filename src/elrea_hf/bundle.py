"""Reading and writing the ELREA bundle (``../shared/design.md`` §7).

```
config.json, generation_config.json, tokenizer files
routing.safetensors                      centroids [C, d_proj]
gradient_state/epoch_<e>.safetensors     LoRA weights + Adam state of the feature adapter
base/, expert_<c>/                       PEFT adapters (adapter_config.json, adapter_model.safetensors)
README.md                                model card
```

At most one folder deep (``PushToHubMixin`` and the Hub UI handle that), safetensors and JSON only:
nothing here is ever unpickled. Writes go to a temporary sibling directory that is moved into place
only when complete, so a killed build never leaves a half bundle behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save_file

ROUTING_FILE = "routing.safetensors"
GRADIENT_STATE_DIR = "gradient_state"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class BundleError(OSError):
    """A bundle file is missing, unreadable or unsafe."""


def save_adapter(model, name: str, target: str, info: dict, info_file: str = "elrea_expert.json") -> None:
    """Save adapter ``name`` of a PEFT model in PEFT's layout at ``target``, with ``info`` as JSON in
    ``info_file`` (what resuming compares against), atomically: a killed save leaves no half folder."""
    import json

    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    try:
        model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
        src = tmp if name == "default" else os.path.join(tmp, name)
        with open(os.path.join(src, info_file), "w") as f:
            json.dump(info, f)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(src, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_directory(output_dir: str, overwrite: bool = False):
    """Yield a temporary directory that replaces ``output_dir`` only if the block succeeds."""
    output_dir = os.path.abspath(output_dir)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True to replace it")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        yield tmp
        if os.path.exists(output_dir):
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
            os.replace(output_dir, os.path.join(trash, "old"))
            os.replace(tmp, output_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def save_routing(path: str, centroids: torch.Tensor) -> None:
    save_file({"centroids": centroids.detach().float().contiguous().cpu()}, path)


def load_routing(bundle_dir: str) -> torch.Tensor:
    path = os.path.join(bundle_dir, ROUTING_FILE)
    tensors = _load_safetensors(path)
    if "centroids" not in tensors or tensors["centroids"].dim() != 2:
        raise BundleError(f"{path} has no 2-D 'centroids' tensor")
    return tensors["centroids"]


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise BundleError(f"bundle file {path} is missing")
    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001
        raise BundleError(f"bundle file {path} is corrupted: {err}") from err


def check_adapter_dir(bundle_dir: str, name: str) -> str:
    """The adapter folder of ``name``, after checking its two files are present and readable."""
    folder = os.path.join(bundle_dir, name)
    for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not os.path.isfile(os.path.join(folder, fname)):
            raise BundleError(f"bundle file {os.path.join(folder, fname)} is missing")
    _load_safetensors(os.path.join(folder, ADAPTER_WEIGHTS))
    return folder


def gradient_state_paths(bundle_dir: str, epochs: list[int]) -> list[str]:
    return [os.path.join(bundle_dir, GRADIENT_STATE_DIR, f"epoch_{e}.safetensors") for e in epochs]


def pickle_files(bundle_dir: str) -> list[str]:
    """Pickle-format files present in a bundle (reported, never loaded)."""
    found = []
    for root, _, files in os.walk(bundle_dir):
        found += [os.path.join(root, f) for f in files if f.endswith(PICKLE_SUFFIXES)]
    return sorted(found)
