"""Feature stores: chunked safetensors parts, slices, epoch averaging part by part, 16-bit storage."""

import numpy as np
import pytest
import torch

from elrea_hf.clustering import GradientClusterer
from elrea_hf.feature_store import FeatureStore, FeatureWriter, average_feature_stores


def _write(path, x, part=7, dtype="float32", index=None):
    w = FeatureWriter(path, x.shape[1], dtype, {"note": "test"})
    index = torch.arange(len(x)) * 3 if index is None else index
    for a in range(0, len(x), part):
        w.write_part(a, x[a : a + part], index[a : a + part])
    return w.finish(len(x))


def test_parts_slices_and_index(tmp_path):
    x = torch.randn(30, 16)
    store = _write(tmp_path / "s", x)
    assert len(store.parts) == 5 and store.meta == {"note": "test"}
    assert torch.equal(store.features(), x)
    assert torch.equal(store.load(5, 23), x[5:23])  # spans three parts
    assert store.example_index.tolist() == list(range(0, 90, 3))
    assert [a for a, _, _ in store.iter_parts()] == [0, 7, 14, 21, 28]


def test_unfinished_store_is_not_read(tmp_path):
    w = FeatureWriter(tmp_path / "s", 8)
    w.write_part(0, torch.randn(4, 8), range(4))
    with pytest.raises(FileNotFoundError, match="index.json"):
        FeatureStore(tmp_path / "s")
    with pytest.raises(ValueError, match="cover 4 rows, expected 6"):
        w.finish(6)


def test_average_part_by_part_equals_eq7(tmp_path):
    a, b = torch.randn(25, 16), torch.randn(25, 16)
    stores = [_write(tmp_path / "a", a, part=4), _write(tmp_path / "b", b, part=6)]  # parts need not align
    out = average_feature_stores(stores, FeatureWriter(tmp_path / "mean", 16))
    want = torch.nn.functional.normalize((a + b) / 2, dim=1)
    torch.testing.assert_close(out.features(), want)
    assert out.example_index.tolist() == stores[0].example_index.tolist()


def test_float16_storage_keeps_relative_precision_at_any_scale(tmp_path):
    x = torch.randn(20, 64) * 1e-6  # per-epoch features scale with the learning rate
    store = _write(tmp_path / "s", x, dtype="float16")
    got = store.features()
    assert ((got - x).norm(dim=1) / x.norm(dim=1)).max() < 1e-3
    assert torch.equal(_write(tmp_path / "z", torch.zeros(3, 64), dtype="float16").features(), torch.zeros(3, 64))


def test_clusters_identical_with_float16_and_float32_storage(tmp_path):
    """Unit-norm features of 8 noisy groups in 1024 dims (cosines within/between groups ~0.5/0): the
    clusterer's labels from float16-stored features equal those from float32."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 1024, generator=g)
    x = centers[torch.arange(1200) % 8] + 1.0 * torch.randn(1200, 1024, generator=g)
    x = torch.nn.functional.normalize(x, dim=1)
    f32 = _write(tmp_path / "f32", x, part=256).features().numpy()
    f16 = _write(tmp_path / "f16", x, part=256, dtype="float16").features().numpy()
    assert np.abs(f16 - f32).max() < 1e-3
    labels = [GradientClusterer(random_state=0).fit_predict(f) for f in (f32, f16)]
    assert labels[0].max() >= 4
    assert np.array_equal(labels[0], labels[1])
