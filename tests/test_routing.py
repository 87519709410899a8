"""Routing weights (eq 8-9): references computed by hand with plain Python math."""

import math

import pytest
import torch

from elrea_hf.routing import RoutingConfig, cluster_centroids, routing_weights

# Three orthonormal centroids; the prompt (0.8, 0.6, 0) has cosines 0.8, 0.6 and 0 with them.
CENTROIDS = torch.eye(3, dtype=torch.float64)
PROMPT = torch.tensor([[0.8, 0.6, 0.0]], dtype=torch.float64)


def _reference(cosines):
    """Eq 9 written out: population std over the clusters, softmax of the z-scores."""
    mean = sum(cosines) / len(cosines)
    std = math.sqrt(sum((c - mean) ** 2 for c in cosines) / len(cosines))
    z = [(c - mean) / std for c in cosines]
    exps = [math.exp(v) for v in z]
    return 1 - max(cosines), [e / sum(exps) for e in exps]


def test_three_clusters_match_hand_computation():
    base, experts = _reference([0.8, 0.6, 0.0])
    # mean 0.4667, std 0.3399, z = (0.9806, 0.3922, -1.3728)
    assert base == pytest.approx(0.2)
    assert experts == pytest.approx([0.605954, 0.336452, 0.057594], abs=1e-6)
    w_base, w_experts = routing_weights(PROMPT, CENTROIDS)
    assert w_base.shape == (1,) and w_experts.shape == (1, 3)
    torch.testing.assert_close(w_base, torch.tensor([base], dtype=torch.float64))
    torch.testing.assert_close(w_experts, torch.tensor([experts], dtype=torch.float64))


def test_two_clusters_match_hand_computation():
    # Cosines 0.6 and 0: z = (+1, -1) whatever the gap, w = (e / (e + 1/e), ...).
    prompt = torch.tensor([[0.6, 0.0, 0.8]])
    w_base, w_experts = routing_weights(prompt, torch.eye(3)[:2])
    expected = [math.exp(1) / (math.exp(1) + math.exp(-1)), math.exp(-1) / (math.exp(1) + math.exp(-1))]
    assert w_base.item() == pytest.approx(0.4)
    assert w_experts[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert w_experts[0].tolist() == pytest.approx([0.880797, 0.119203], abs=1e-6)


def test_batch_rows_are_independent_and_1d_input_is_accepted():
    prompts = torch.tensor([[0.8, 0.6, 0.0], [0.0, 0.6, 0.8]], dtype=torch.float64)
    w_base, w_experts = routing_weights(prompts, CENTROIDS)
    torch.testing.assert_close(w_experts[1], w_experts[0].flip(0))
    single_base, single_experts = routing_weights(prompts[0], CENTROIDS)
    assert single_base.shape == () and single_experts.shape == (3,)
    torch.testing.assert_close(single_experts, w_experts[0])


def test_top_k_zeroes_the_rest_without_renormalising():
    _, experts = _reference([0.8, 0.6, 0.0])
    w_base, w_experts = routing_weights(PROMPT, CENTROIDS, top_k=2)
    assert w_base.item() == pytest.approx(0.2)
    assert w_experts[0].tolist() == pytest.approx([experts[0], experts[1], 0.0])
    _, top1 = routing_weights(PROMPT, CENTROIDS, top_k=1)
    assert top1[0].tolist() == pytest.approx([experts[0], 0.0, 0.0])
    _, all_kept = routing_weights(PROMPT, CENTROIDS, top_k=5)
    assert all_kept[0].tolist() == pytest.approx(experts)


def test_renormalize_rescales_kept_weights_to_the_original_sum():
    _, experts = _reference([0.8, 0.6, 0.0])
    _, w_experts = routing_weights(PROMPT, CENTROIDS, top_k=2, renormalize=True)
    kept = experts[0] + experts[1]
    assert w_experts[0].tolist() == pytest.approx([experts[0] / kept, experts[1] / kept, 0.0])
    assert w_experts.sum().item() == pytest.approx(1.0)


def test_min_weight_drops_small_experts_but_keeps_the_strongest():
    _, experts = _reference([0.8, 0.6, 0.0])
    _, w_experts = routing_weights(PROMPT, CENTROIDS, min_weight=0.1)
    assert w_experts[0].tolist() == pytest.approx([experts[0], experts[1], 0.0])
    _, only_top = routing_weights(PROMPT, CENTROIDS, min_weight=0.9)
    assert only_top[0].tolist() == pytest.approx([experts[0], 0.0, 0.0])


def test_equal_cosines_give_equal_weights():
    # std 0: z = 0 for every cluster, w = 1/C; w_base = 1 - 1/sqrt(3).
    prompt = torch.full((1, 3), 1 / math.sqrt(3), dtype=torch.float64)
    w_base, w_experts = routing_weights(prompt, CENTROIDS)
    assert w_base.item() == pytest.approx(1 - 1 / math.sqrt(3))
    assert w_experts[0].tolist() == pytest.approx([1 / 3] * 3)
    # Duplicate centroids in float32 tie exactly as well.
    _, dup = routing_weights(torch.tensor([[0.8, 0.6]]), torch.tensor([[0.6, 0.8], [0.6, 0.8]]))
    assert dup[0].tolist() == pytest.approx([0.5, 0.5])


def test_single_cluster_gets_weight_one():
    w_base, w_experts = routing_weights(torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0]]))
    assert w_experts.tolist() == [[1.0]]
    assert w_base.item() == pytest.approx(0.4)


def test_prompt_equal_to_a_centroid_routes_to_it_with_zero_base_weight():
    generator = torch.Generator().manual_seed(0)
    centroids = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    w_base, w_experts = routing_weights(centroids[2:3], centroids)
    assert w_experts[0].argmax().item() == 2
    assert w_base.item() == pytest.approx(0.0, abs=1e-6)


def test_routing_rejects_mismatched_dimensions_and_nan():
    with pytest.raises(ValueError, match="dimensions"):
        routing_weights(torch.ones(1, 4), torch.eye(3))
    with pytest.raises(ValueError, match="Prompt 1"):
        routing_weights(torch.tensor([[1.0, 0.0, 0.0], [float("nan"), 0.0, 0.0]]), torch.eye(3))
    with pytest.raises(ValueError, match="top_k"):
        routing_weights(PROMPT, CENTROIDS, top_k=0)


def test_cluster_centroids_are_normalised_means():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    centroids = cluster_centroids(features, torch.tensor([0, 0, 1]), 2)
    # mean (0.5, 0.5) normalised is (1/sqrt 2, 1/sqrt 2); a single member is its own centroid.
    torch.testing.assert_close(centroids, torch.tensor([[2**-0.5, 2**-0.5], [0.6, 0.8]]))
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(2))


def test_cluster_centroids_reject_empty_or_out_of_range_clusters():
    features = torch.eye(3)
    with pytest.raises(ValueError, match="Cluster 2 has no members"):
        cluster_centroids(features, torch.tensor([0, 1, 1]), 3)
    with pytest.raises(ValueError, match="0..1"):
        cluster_centroids(features, torch.tensor([0, 1, 2]), 2)


def test_routing_config_round_trips_and_validates():
    config = RoutingConfig(top_k=2, min_weight=0.05, renormalize=True)
    assert RoutingConfig.from_dict(config.to_dict()) == config
    assert RoutingConfig.from_dict(None) == RoutingConfig()
    assert RoutingConfig.from_dict({"top_k": 3, "from_the_future": 1}) == RoutingConfig(top_k=3)
    w = routing_weights(PROMPT, CENTROIDS, **config.to_dict())
    torch.testing.assert_close(w[1], routing_weights(PROMPT, CENTROIDS, top_k=2, min_weight=0.05, renormalize=True)[1])
    with pytest.raises(ValueError, match="min_weight"):
        RoutingConfig(min_weight=1.5)
