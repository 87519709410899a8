"""GradientClusterer (BIRCH + balancing + guard) and the cluster reports, on small synthetic
unit-norm blobs."""

import json
import logging

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import adjusted_rand_score

from elrea_hf.clustering import GradientClusterer, cluster_report, format_cluster_report


def unit_blobs(sizes, dim=32, noise=0.2, shared=0.0, seed=0):
    """Unit-norm points around random unit centres; ``shared`` mixes a common direction into the
    centres (between-cluster cosine about ``shared``). Returns (features, true labels, centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    if shared:
        common = rng.normal(size=dim)
        common /= np.linalg.norm(common)
        centres = np.sqrt(shared) * common + np.sqrt(1 - shared) * centres
    points, labels = [], []
    for index, size in enumerate(sizes):
        points.append(centres[index] + noise * rng.normal(size=(size, dim)) / np.sqrt(dim))
        labels += [index] * size
    features = np.vstack(points)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features, np.array(labels), centres


def test_recovers_well_separated_blobs():
    features, truth, _ = unit_blobs([30] * 5)
    clusterer = GradientClusterer(5).fit(features)
    assert adjusted_rand_score(truth, clusterer.labels_) == 1.0
    assert clusterer.n_clusters_ == 5
    assert clusterer.report_["rounds"] == [] and clusterer.report_["merged"] == []
    assert clusterer.report_["sizes"] == [30] * 5


def test_recovers_weakly_separated_blobs_in_high_dimension():
    # Within-cluster cosine ~0.5, between ~0.15: the bisected threshold would mix clusters in
    # every BIRCH leaf; the cap (half the median pairwise distance) keeps the leaves pure.
    features, truth, _ = unit_blobs([100] * 6, dim=256, noise=1.0, shared=0.3)
    clusterer = GradientClusterer(6, max_balance_rounds=0).fit(features)
    assert adjusted_rand_score(truth, clusterer.labels_) > 0.99
    assert clusterer.report_["thresholds"][0]["threshold_search"]["capped"]


def test_labels_are_contiguous_and_ordered_by_size():
    features, truth, _ = unit_blobs([10, 40, 25])
    labels = GradientClusterer(3, max_balance_rounds=0).fit_predict(features)
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    assert np.bincount(labels).tolist() == [40, 25, 10]
    assert set(labels[truth == 1]) == {0}


def test_centroids_are_unit_norm_normalised_member_means():
    features, _, _ = unit_blobs([20, 30, 25], dim=16)
    clusterer = GradientClusterer(3).fit(features)
    assert clusterer.centroids_.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(clusterer.centroids_, axis=1), 1.0, rtol=1e-6)
    for c in range(3):
        mean = features[clusterer.labels_ == c].mean(axis=0)
        np.testing.assert_allclose(clusterer.centroids_[c], mean / np.linalg.norm(mean), rtol=1e-6)


def test_predict_assigns_to_the_most_similar_centroid():
    features, _, centres = unit_blobs([30] * 4)
    clusterer = GradientClusterer(4).fit(features)
    np.testing.assert_array_equal(clusterer.predict(features), clusterer.labels_)
    expected = [clusterer.labels_[30 * i] for i in range(4)]
    assert clusterer.predict(centres).tolist() == expected


def test_balancing_splits_an_oversized_cluster():
    # One blob is 8x the others: more than imbalance_ratio=5 times the smallest, so it is split
    # into split_schedule[0]=3 sub-clusters; the small blobs stay whole.
    features, truth, _ = unit_blobs([120, 15, 15, 15, 15])
    clusterer = GradientClusterer(5, min_cluster_size=2).fit(features)
    report = clusterer.report_
    assert report["rounds"][0]["splits"][0]["size"] == 120
    assert len(report["rounds"][0]["splits"][0]["into"]) == 3
    assert clusterer.n_clusters_ >= 7
    big_blob_clusters = set(clusterer.labels_[truth == 0].tolist())
    assert len(big_blob_clusters) >= 3
    for blob in range(1, 5):
        members = clusterer.labels_[truth == blob]
        assert len(set(members.tolist())) == 1
        assert set(members.tolist()).isdisjoint(big_blob_clusters)
    assert max(report["sizes"]) <= 5 * min(report["sizes"])


def test_balancing_can_be_disabled():
    features, _, _ = unit_blobs([120, 15, 15, 15, 15])
    clusterer = GradientClusterer(5, max_balance_rounds=0).fit(features)
    assert clusterer.report_["sizes"] == [120, 15, 15, 15, 15]


def test_small_clusters_are_merged_into_the_nearest_and_reported():
    features, truth, centres = unit_blobs([30, 30, 30])
    rng = np.random.default_rng(1)
    outlier = centres[0] + 1.2 * rng.normal(size=centres.shape[1]) / np.sqrt(centres.shape[1])
    features = np.vstack([features, outlier / np.linalg.norm(outlier)])
    clusterer = GradientClusterer(4, min_cluster_size=2).fit(features)
    assert clusterer.n_clusters_ == 3
    [merge] = clusterer.report_["merged"]
    assert merge["size"] == 1
    assert merge["into"] == clusterer.labels_[0] == clusterer.labels_[-1]
    assert clusterer.report_["rounds"] == []  # the lone outlier is not balancing's reference
    unmerged = GradientClusterer(4, min_cluster_size=1, max_balance_rounds=0).fit(features)
    assert unmerged.n_clusters_ == 4 and unmerged.report_["sizes"][-1] == 1
    # Without the guard the singleton is the "smallest cluster" of balancing, and every blob is
    # more than 5x larger: the paper's rule then splits them all.
    exploded = GradientClusterer(4, min_cluster_size=1).fit(features)
    assert exploded.n_clusters_ > 4


def test_too_few_rows_reduce_the_number_of_clusters(caplog):
    features, _, _ = unit_blobs([1, 1, 1])
    with caplog.at_level(logging.WARNING, logger="elrea_hf.clustering"):
        clusterer = GradientClusterer(5, min_cluster_size=1).fit(features)
    assert clusterer.n_clusters_ == 3
    assert sorted(clusterer.labels_.tolist()) == [0, 1, 2]
    assert clusterer.report_["n_clusters_requested"] == 5
    assert clusterer.report_["n_clusters_initial"] == 3
    assert any("3 rows cannot form 5 clusters" in m for m in clusterer.report_["warnings"])
    assert "cannot form 5 clusters" in caplog.text


def test_identical_features_give_one_cluster():
    row = np.full(8, 1 / np.sqrt(8))
    clusterer = GradientClusterer(5).fit(np.tile(row, (10, 1)))
    assert clusterer.n_clusters_ == 1
    assert clusterer.labels_.tolist() == [0] * 10
    np.testing.assert_allclose(clusterer.centroids_[0], row)
    assert clusterer.report_["warnings"]


def test_few_distinct_rows_never_produce_empty_clusters():
    features, _, _ = unit_blobs([1, 1], dim=8)
    repeated = np.repeat(features, [12, 8], axis=0)
    clusterer = GradientClusterer(5, min_cluster_size=1).fit(repeated)
    assert clusterer.n_clusters_ == 2
    assert sorted(clusterer.report_["sizes"]) == [8, 12]


def test_single_row():
    clusterer = GradientClusterer(5).fit(np.array([[0.6, 0.8]]))
    assert clusterer.labels_.tolist() == [0] and clusterer.n_clusters_ == 1


def test_invalid_input_is_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="no rows"):
        GradientClusterer().fit(np.zeros((0, 4)))
    features, _, _ = unit_blobs([5, 5])
    features[3, 1] = np.nan
    with pytest.raises(ValueError, match="Row 3 .*non-finite"):
        GradientClusterer().fit(features)
    with pytest.raises(ValueError, match="shape"):
        GradientClusterer().fit(np.ones(4))
    with pytest.raises(ValueError, match="split_schedule"):
        GradientClusterer(split_schedule=(1,)).fit(np.eye(3))


def test_same_input_and_seed_give_identical_labels():
    # max_fit_samples < n_samples: BIRCH is fitted on a seeded subsample and predicts the rest.
    features, _, _ = unit_blobs([60, 25, 40, 30], noise=0.6, seed=3)
    params = dict(max_fit_samples=80, threshold_search_samples=50, random_state=7)
    first = GradientClusterer(4, **params).fit(features)
    second = GradientClusterer(4, **params).fit(features.copy())
    np.testing.assert_array_equal(first.labels_, second.labels_)
    np.testing.assert_array_equal(first.centroids_, second.centroids_)
    assert first.report_ == second.report_
    json.dumps(first.report_)  # stored in the bundle's cluster report


def test_fixed_threshold_and_sklearn_clone():
    features, truth, _ = unit_blobs([30] * 3)
    clusterer = GradientClusterer(3, threshold=0.05)
    fitted = clone(clusterer).fit(features)
    assert fitted.threshold_ == 0.05
    assert adjusted_rand_score(truth, fitted.labels_) == 1.0
    assert clone(clusterer).get_params()["threshold"] == 0.05


def test_cluster_report_composition():
    report = cluster_report([0, 0, 1, 1, 1], task=["add", "add", "sort", "sort", "add"], level=[1, 2, 1, 1, 1])
    assert report["sizes"] == [2, 3]
    assert report["clusters"][0]["composition"]["task"] == {"add": 2}
    assert report["clusters"][1]["composition"]["task"] == {"sort": 2, "add": 1}
    assert report["clusters"][1]["composition"]["level"] == {"1": 3}
    assert report["columns"]["task"] == {"purity": pytest.approx(0.8), "n_values": 2}
    text = format_cluster_report(report)
    assert "sort 2, add 1" in text
    assert "task: purity 0.800" in text
    with pytest.raises(ValueError, match="'task' has 1 entries"):
        cluster_report([0, 1], task=["add"])


def test_format_cluster_report_shows_the_clusterer_decisions():
    features, truth, _ = unit_blobs([120, 15, 15, 15, 15])
    clusterer = GradientClusterer(5).fit(features)
    text = format_cluster_report(clusterer.report_)
    assert "BIRCH threshold" in text and "balancing round 1" in text
    combined = {**cluster_report(clusterer.labels_, task=[f"t{t}" for t in truth]), "clusterer": clusterer.report_}
    text = format_cluster_report(combined)
    assert "t0 " in text and "balancing round 1 (smallest 15): 120 ->" in text
