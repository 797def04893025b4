"""`FactoredMatrix` against the dense matrix it stands for: every method equals the same computation on `AB`
(TransformerLens 4.x semantics, including its conventions: `Vh` is [rdim, k] with U diag(S) Vh^T = AB)."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm.factored_matrix import FactoredMatrix, composition_scores


def randn(*shape, g=None):
    return torch.randn(*shape, generator=g, dtype=torch.float64)  # float64: comparisons to 1e-9


def _fm(*leading, ldim=6, mdim=3, rdim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    A, B = randn(*leading, ldim, mdim, g=g), randn(*leading, mdim, rdim, g=g)
    return FactoredMatrix(A, B)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_shapes_products_and_transpose():
    m = _fm(2, 3, ldim=5, mdim=3, rdim=7)
    assert m.shape == (2, 3, 5, 7) and (m.ldim, m.mdim, m.rdim) == (5, 3, 7) and m.ndim == 4
    close(m.AB, m.A @ m.B)
    close(m.T.AB, m.AB.transpose(-2, -1))
    square = _fm(2, ldim=5, mdim=3, rdim=5)
    close(square.BA, square.B @ square.A)
    with pytest.raises(ValueError, match="ldim == rdim"):
        m.BA
    assert m.pair[0] is m.A and m.pair[1] is m.B
    close((m * 2.5).AB, 2.5 * m.AB)
    close((2.5 * m).AB, 2.5 * m.AB)


def test_leading_dims_broadcast():
    g = torch.Generator().manual_seed(1)
    A = randn(6, 3, g=g)  # one left factor for every (layer, head) of B
    B = randn(2, 4, 3, 5, g=g)
    m = FactoredMatrix(A, B)
    assert m.shape == (2, 4, 6, 5)
    close(m.AB, A @ B)
    with pytest.raises(ValueError, match="broadcast"):
        FactoredMatrix(randn(2, 6, 3), randn(3, 3, 5))


@pytest.mark.no_typecheck  # the message a user sees, not jaxtyping's
def test_factors_must_share_the_inner_dimension():
    with pytest.raises(ValueError, match="inner dimension"):
        FactoredMatrix(randn(6, 3), randn(4, 5))


def test_svd_is_the_svd_of_the_product():
    m = _fm(2, 3, ldim=8, mdim=3, rdim=6)
    U, S, Vh = m.svd()
    assert U.shape == (2, 3, 8, 3) and S.shape == (2, 3, 3) and Vh.shape == (2, 3, 6, 3)
    close(U @ torch.diag_embed(S) @ Vh.transpose(-2, -1), m.AB)  # TL's convention: Vh is transposed
    eye = torch.eye(3, dtype=torch.float64).expand(2, 3, 3, 3)
    close(U.transpose(-2, -1) @ U, eye)
    close(Vh.transpose(-2, -1) @ Vh, eye)
    close(S, torch.linalg.svdvals(m.AB)[..., :3])
    assert torch.all(S[..., :-1] >= S[..., 1:])
    assert m.U is U and m.S is S and m.Vh is Vh  # computed once


def test_norm_is_frobenius():
    m = _fm(2, 3, ldim=8, mdim=3, rdim=6)
    close(m.norm(), torch.linalg.matrix_norm(m.AB))


def test_eigenvalues_are_the_nonzero_eigenvalues_of_the_product():
    m = _fm(2, ldim=7, mdim=3, rdim=7, seed=3)
    ev = m.eigenvalues
    assert ev.shape == (2, 3) and ev.is_complex()
    dense = torch.linalg.eigvals(m.AB)  # 7 eigenvalues: these 3, and 4 zeros (rank 3)
    by_size = lambda e: e[e.abs().argsort(descending=True)]  # noqa: E731
    for i in range(2):
        top = by_size(dense[i])[:3]
        close(by_size(ev[i]), top)
        assert by_size(dense[i])[3:].abs().max() < 1e-8
    half = FactoredMatrix(m.A.half(), m.B.half())
    assert half.eigenvalues.dtype == torch.complex64  # eig has no half kernels: taken in float32


def test_matmul_with_tensors_both_sides():
    g = torch.Generator().manual_seed(4)
    m = _fm(2, ldim=6, mdim=3, rdim=6)
    wide = randn(6, 9, g=g)
    narrow = randn(6, 2, g=g)
    for other in (wide, narrow):  # rdim > mdim keeps A; otherwise the product is taken (both branches)
        out = m @ other
        assert isinstance(out, FactoredMatrix)
        close(out.AB, m.AB @ other)
        out = other.T @ m
        assert isinstance(out, FactoredMatrix)
        close(out.AB, other.T @ m.AB)
    v = randn(6, g=g)
    close(m @ v, m.AB @ v)
    close(v @ m, v @ m.AB)
    with pytest.raises(ValueError, match="inner dimensions"):
        m @ randn(5, 2)
    with pytest.raises(ValueError, match="inner dimensions"):
        randn(2, 5) @ m


def test_matmul_of_factored_matrices():
    left, right = _fm(2, ldim=5, mdim=2, rdim=6, seed=5), _fm(2, ldim=6, mdim=3, rdim=4, seed=6)
    out = left @ right
    assert isinstance(out, FactoredMatrix) and out.shape == (2, 5, 4)
    close(out.AB, left.AB @ right.AB)


def test_indexing_leading_then_matrix_dims():
    m = _fm(3, 4, ldim=6, mdim=2, rdim=5)
    close(m[1].AB, m.AB[1])
    close(m[1, 2].AB, m.AB[1, 2])
    close(m[:, 1:3].AB, m.AB[:, 1:3])
    close(m[0, 1, 2:4].AB, m.AB[0, 1, 2:4])  # rows of the matrix
    close(m[0, 1, 2].AB, m.AB[0, 1, 2:3])  # an int there keeps the dimension
    close(m[0, 1, 2:4, 1:3].AB, m.AB[0, 1, 2:4, 1:3])  # rows and columns
    close(m[0, 1, -1, -1].AB, m.AB[0, 1, -1:, -1:])
    close(m[None, 2].AB, m.AB[None, 2])  # None adds a leading dim and does not count
    with pytest.raises(ValueError, match="too long"):
        m[0, 0, 0, 0, 0]


def test_unsqueeze_collapse_make_even_corner():
    m = _fm(2, 3, ldim=6, mdim=3, rdim=5)
    close(m.unsqueeze(1).AB, m.AB.unsqueeze(1))
    close(m.U @ m.collapse_l(), m.AB)  # each drops one orthogonal factor of AB
    close(m.collapse_r() @ m.Vh.transpose(-2, -1), m.AB)
    close(m.collapse_l(), torch.diag_embed(m.S) @ m.Vh.transpose(-2, -1))
    close(m.collapse_r(), m.U @ torch.diag_embed(m.S))
    even = m.make_even()
    close(even.AB, m.AB)
    close(torch.linalg.matrix_norm(even.A), torch.linalg.matrix_norm(even.B))
    close(m.get_corner(2), m.AB[:2, :2, :2, :2])
    assert "Hidden Dim(3)" in repr(m)


def test_composition_scores_dense():
    g = torch.Generator().manual_seed(7)
    left = FactoredMatrix(randn(2, 3, 8, 2, g=g), randn(2, 3, 2, 8, g=g))
    right = FactoredMatrix(randn(2, 3, 8, 2, g=g), randn(2, 3, 2, 8, g=g))
    scores = composition_scores(left, right)
    assert scores.shape == (2, 3, 2, 3)
    L, R = left.AB, right.AB
    fro = torch.linalg.matrix_norm
    for l1, h1, l2, h2 in [(0, 0, 1, 2), (1, 2, 0, 1), (0, 1, 0, 1)]:
        expected = fro(L[l1, h1] @ R[l2, h2]) / (fro(L[l1, h1]) * fro(R[l2, h2]))
        close(scores[l1, h1, l2, h2], expected)
    paired = composition_scores(left, right, broadcast_dims=False)  # leading dims matched, not crossed
    assert paired.shape == (2, 3)
    close(paired[1, 2], scores[1, 2, 1, 2])
    with pytest.raises(ValueError, match="left.rdim == right.ldim"):
        composition_scores(left, FactoredMatrix(randn(5, 2), randn(2, 8)))
