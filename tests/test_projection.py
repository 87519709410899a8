"""Both projection kinds: seeded, chunking-independent, equal to their dense matrix, and (on
random vectors) inner-product preserving at the JL level."""

import pytest
import torch

from elrea_hf.projection import CountSketchProjector, ProjectionSpec, make_projector


@pytest.mark.parametrize("kind", ["rademacher", "countsketch"])
def test_projection_equals_its_dense_matrix_and_ignores_chunking(kind):
    spec = ProjectionSpec(dim=1000, d_proj=64, seed=5, block_size=128, kind=kind)
    proj = make_projector(spec)
    x = torch.randn(6, 1000)
    whole = proj.project(x)
    parts = torch.cat([proj.project(x[:2]), proj.project(x[2:])])
    torch.testing.assert_close(whole, parts, rtol=1e-4, atol=1e-4)  # BLAS blocking: fp32 round-off
    torch.testing.assert_close(whole, x @ proj.dense_matrix().T, rtol=1e-4, atol=1e-4)
    again = make_projector(ProjectionSpec(dim=1000, d_proj=64, seed=5, block_size=128, kind=kind))
    assert torch.equal(again.project(x), whole)
    other = make_projector(ProjectionSpec(dim=1000, d_proj=64, seed=6, block_size=128, kind=kind))
    assert not torch.equal(other.project(x), whole)


def test_countsketch_has_one_signed_entry_per_column():
    R = CountSketchProjector(ProjectionSpec(dim=500, d_proj=32, seed=1, block_size=64, kind="countsketch")).dense_matrix()
    assert torch.equal((R != 0).sum(0), torch.ones(500, dtype=torch.long))
    assert set(R[R != 0].unique().tolist()) == {-1.0, 1.0}
    # Buckets are spread over all outputs, not a few.
    assert (R != 0).any(1).all()


@pytest.mark.parametrize("kind", ["rademacher", "countsketch"])
def test_cosines_are_preserved_at_the_jl_level(kind):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 20000, generator=g)
    x = torch.cat([base + s * torch.randn(1, 20000, generator=g) for s in (0.3, 0.6, 1.0, 3.0)]
                  + [torch.randn(4, 20000, generator=g)])
    proj = make_projector(ProjectionSpec(dim=20000, d_proj=2048, seed=0, kind=kind))
    y = proj.project(x)
    cos = lambda a: torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(a, dim=1).T  # noqa: E731
    err = (cos(x) - cos(y)).abs().max().item()
    assert err < 0.1  # JL: ~3/sqrt(2048) = 0.066 at most here


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="unknown projection kind 'fjlt'"):
        make_projector(ProjectionSpec(dim=10, d_proj=8, kind="fjlt"))


def test_default_kind_and_specs_written_before_kinds_existed():
    assert ProjectionSpec(dim=10).kind == "countsketch"
    # A spec stored without a kind (older bundles) is the dense Rademacher one it was made with.
    assert ProjectionSpec.from_dict({"dim": 10, "d_proj": 8, "seed": 1, "block_size": 4}).kind == "rademacher"
    spec = ProjectionSpec(dim=10, d_proj=8)
    assert ProjectionSpec.from_dict(spec.to_dict()) == spec
