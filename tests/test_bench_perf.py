"""The speed benchmarks run end to end (tiny model, tiny sizes) and report every promised key."""

import pytest

from elrea_hf.bench_perf import bench_efficiency, bench_features, bench_inference, efficiency_markdown
from elrea_hf.testing import save_tiny_backbone


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny"))


def test_bench_features_reports_naive_batched_and_floor(backbone):
    r = bench_features(backbone, n=8, batch_size=4, d_proj=64, rank=2, targets="q_proj,v_proj", naive_examples=2)
    for key in ("naive_s", "batched_s", "floor_s", "projection_s", "speedup_vs_naive", "ratio_to_floor", "setup"):
        assert key in r
    # The naive loop and the batched extractor compute the same features.
    assert r["naive_vs_batched_min_cosine"] > 0.9999
    for kind in ("rademacher", "countsketch"):
        assert 0 <= r["projections"][kind]["distortion_vs_exact"]["mean_abs_cos_error"] < 0.5
        assert set(r["projections"][kind]["ari_vs_exact"]) == {"4"}
    assert r["batched_s"] == r["projections"][r["default_projection"]]["batched_s"]


def test_bench_inference_reports_side_by_side_figures(backbone):
    r = bench_inference(backbone, n_prompts=2, batch_size=2, prompt_tokens=40, new_tokens=3, n_experts=2, rank=2,
                        targets="q_proj,v_proj", d_proj=64, projection_kind="both")
    for key in ("base_s", "elrea_s", "elrea_top2_s", "routing_s", "routing_floor_s", "decode_step_base_s",
                "decode_step_elrea_s", "base_peak_mem_gib", "elrea_peak_mem_gib", "time_ratio", "time_ratio_top2",
                "memory_ratio", "routing_s_rademacher"):
        assert key in r, key
    assert r["rows_per_prompt"]["elrea"] == 3 and r["rows_per_prompt"]["elrea_top2"] == 3  # C=2: top-2 keeps all


def test_bench_efficiency_fills_every_table_row(backbone):
    r = bench_efficiency(backbone, n_train=8, n_test=2, words=4, epochs=1, batch_size=4, new_tokens=2, n_experts=2,
                         rank=2, targets="q_proj,v_proj", d_proj=64)
    for key in ("base_finetune_s", "train_features_s", "test_features_s", "clustering_s", "experts_finetune_s",
                "elrea_finetune_total_s", "base_infer_s", "elrea_infer_s", "base_peak_mem_gib", "elrea_peak_mem_gib",
                "train_features_floor_s", "finetune_ratio", "infer_ratio", "memory_ratio", "setup"):
        assert key in r, key
    assert sum(r["setup"]["cluster_sizes"]) == 8
    assert "| Inference |" in efficiency_markdown(r)


def test_isometric_coordinates_keep_inner_products():
    import torch

    from elrea_hf.bench_perf import _isometric_coordinates

    x = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    c = _isometric_coordinates(x, chunk=300)
    assert c.shape == (6, 6)
    torch.testing.assert_close(c @ c.T, x.double() @ x.double().T, rtol=1e-9, atol=1e-8)
