"""Gradient features on disk, written and read in row chunks (safetensors parts + a JSON index).

A feature store is a folder::

    index.json                      format, number of rows, d_proj, storage dtype, part list, metadata
    part_000000000.safetensors      rows [start, stop): "features" [rows, d_proj], "example_index" [rows]
    ...                             (+ "norms" [rows] when stored in 16-bit)

so that N x d_proj features never have to be in memory at once: the callback writes one part at a
time and averages epochs part by part, and readers can load any row slice (``load(start, stop)``
reads only the parts it overlaps, through safetensors' lazy slices). ``index.json`` is written last,
so a folder without it is an unfinished write and is never read.

16-bit storage (``dtype="float16"``/``"bfloat16"``) keeps each row as its unit-norm direction in
that dtype and its norm in float32: the relative precision (about 1e-3 for float16) then does not
depend on the rows' scale, which for unnormalised per-epoch features is that of the learning rate.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "elrea-features-v2"
INDEX_FILE = "index.json"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"feature storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    return STORAGE_DTYPES[dtype]


class FeatureWriter:
    """Writes a feature store part by part; ``finish`` makes it readable.

    Any earlier store in ``directory`` is removed first (a store is always written whole)."""

    def __init__(self, directory: str, d_proj: int, dtype: str = "float32", meta: dict | None = None):
        self.directory = str(directory)
        self.d_proj = int(d_proj)
        self.dtype = dtype
        self._torch_dtype = _check_dtype(dtype)
        self.meta = dict(meta or {})
        self._parts: list[dict] = []
        if os.path.isdir(self.directory):
            shutil.rmtree(self.directory)
        os.makedirs(self.directory)

    def write_part(self, start: int, features: torch.Tensor, example_index: Sequence[int] | torch.Tensor) -> None:
        """Rows ``start ... start + len(features)`` of the store."""
        features = features.detach().to("cpu", torch.float32)
        example_index = torch.as_tensor(example_index, dtype=torch.int64).reshape(-1)
        if features.dim() != 2 or features.shape[1] != self.d_proj or len(example_index) != len(features):
            raise ValueError(f"a part needs features [rows, {self.d_proj}] and one example index per row; got "
                             f"{tuple(features.shape)} and {len(example_index)} indices")
        stop = start + len(features)
        tensors = {"example_index": example_index.contiguous()}
        if self._torch_dtype == torch.float32:
            tensors["features"] = features.contiguous()
        else:
            norms = features.norm(dim=1)
            tensors["features"] = (features / norms.clamp_min(1e-30)[:, None]).to(self._torch_dtype).contiguous()
            tensors["norms"] = norms.contiguous()
        name = f"part_{start:09d}.safetensors"
        path = os.path.join(self.directory, name)
        save_file(tensors, path + ".tmp")
        os.replace(path + ".tmp", path)
        self._parts.append({"file": name, "start": int(start), "stop": int(stop)})

    def finish(self, n_rows: int) -> "FeatureStore":
        parts = sorted(self._parts, key=lambda p: p["start"])
        at = 0
        for p in parts:
            if p["start"] != at:
                raise ValueError(f"feature parts do not cover rows {at}..{p['start']} of {self.directory}")
            at = p["stop"]
        if at != n_rows:
            raise ValueError(f"feature parts in {self.directory} cover {at} rows, expected {n_rows}")
        index = {"format": FORMAT, "n": int(n_rows), "d_proj": self.d_proj, "dtype": self.dtype,
                 "parts": parts, "meta": self.meta}
        path = os.path.join(self.directory, INDEX_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(index, f, indent=1)
        os.replace(path + ".tmp", path)
        return FeatureStore(self.directory)


class FeatureStore:
    """Read access to a finished feature store (see the module docstring for the layout)."""

    def __init__(self, directory: str):
        self.directory = str(directory)
        path = os.path.join(self.directory, INDEX_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no finished ELREA feature store at {self.directory} (missing {INDEX_FILE})")
        with open(path) as f:
            index = json.load(f)
        if index.get("format") != FORMAT:
            raise OSError(f"{path} is not an ELREA feature index (format {index.get('format')!r}, expected {FORMAT!r})")
        self.n: int = index["n"]
        self.d_proj: int = index["d_proj"]
        self.dtype: str = index["dtype"]
        self.parts: list[dict] = index["parts"]
        self.meta: dict = index.get("meta", {})

    @staticmethod
    def exists(directory: str) -> bool:
        return os.path.isfile(os.path.join(str(directory), INDEX_FILE))

    def __len__(self) -> int:
        return self.n

    def _read(self, part: dict, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``lo ... hi`` (store coordinates) of one part, as float32 features and indices."""
        a, b = lo - part["start"], hi - part["start"]
        path = os.path.join(self.directory, part["file"])
        try:
            with safe_open(path, framework="pt") as f:
                feats = f.get_slice("features")[a:b].float()
                if "norms" in f.keys():
                    feats *= f.get_slice("norms")[a:b][:, None]
                index = f.get_slice("example_index")[a:b]
        except Exception as err:  # noqa: BLE001 - any read error means a broken store
            raise OSError(f"cannot read feature part {path}: {err}") from err
        return feats, index

    def _overlapping(self, start: int, stop: int):
        for part in self.parts:
            lo, hi = max(start, part["start"]), min(stop, part["stop"])
            if lo < hi:
                yield part, lo, hi

    def load(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Features of rows ``start ... stop`` (float32), reading only the parts they fall in."""
        stop = self.n if stop is None else min(stop, self.n)
        if not 0 <= start <= stop:
            raise IndexError(f"row slice {start}:{stop} is outside the store's {self.n} rows")
        out = torch.empty(stop - start, self.d_proj)
        for part, lo, hi in self._overlapping(start, stop):
            out[lo - start : hi - start] = self._read(part, lo, hi)[0]
        return out

    def features(self) -> torch.Tensor:
        """All rows at once, [n, d_proj] float32 (what the clusterer needs)."""
        return self.load()

    @property
    def example_index(self) -> torch.Tensor:
        """The data-set position of every row, [n] (int64)."""
        out = torch.empty(self.n, dtype=torch.int64)
        for part in self.parts:
            with safe_open(os.path.join(self.directory, part["file"]), framework="pt") as f:
                out[part["start"] : part["stop"]] = f.get_tensor("example_index")
        return out

    def iter_parts(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(start row, features, example_index)`` one part at a time."""
        for part in self.parts:
            feats, index = self._read(part, part["start"], part["stop"])
            yield part["start"], feats, index


def average_feature_stores(stores: Sequence[FeatureStore], writer: FeatureWriter, normalize: bool = True) -> FeatureStore:
    """Eq 7 part by part: the mean over ``stores`` (one per epoch) of each row, L2-normalised.

    Only one part of every store is in memory at a time. All stores must list the same examples."""
    from .features import normalize_rows

    if not stores:
        raise ValueError("no per-epoch features to average")
    first = stores[0]
    for other in stores[1:]:
        if other.n != first.n or other.d_proj != first.d_proj:
            raise ValueError(f"feature stores {first.directory} ({first.n} x {first.d_proj}) and {other.directory} "
                             f"({other.n} x {other.d_proj}) describe different examples or projections")
    for start, feats, index in first.iter_parts():
        stop = start + len(feats)
        for other in stores[1:]:
            for part, lo, hi in other._overlapping(start, stop):
                more, other_index = other._read(part, lo, hi)
                if not torch.equal(other_index, index[lo - start : hi - start]):
                    raise ValueError(f"feature stores {first.directory} and {other.directory} list different "
                                     f"examples in rows {lo}..{hi}")
                feats[lo - start : hi - start] += more
        feats /= len(stores)
        if normalize:
            feats = normalize_rows(feats, example_ids=index.tolist())
        writer.write_part(start, feats, index)
    return writer.finish(first.n)


__all__ = ["FeatureStore", "FeatureWriter", "STORAGE_DTYPES", "average_feature_stores"]
