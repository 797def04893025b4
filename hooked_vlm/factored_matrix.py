"""A matrix kept as the product of two factors, `A @ B`, with TransformerLens 4.x's `FactoredMatrix` semantics:
the OV circuit `W_V @ W_O` is [d_model, d_model] but of rank d_head, so its SVD, norm and eigenvalues are computed
from the factors (small matrices) instead of the product.

    A [..., ldim, mdim] @ B [..., mdim, rdim]  ->  a [..., ldim, rdim] matrix of rank <= mdim

Leading dimensions ([layer, head] for a tower's `OV`/`QK`) broadcast between the factors, and index as a tensor's.
As in TransformerLens, `svd()` returns (U, S, Vh) with `U @ diag(S) @ Vh.T == AB`: `Vh` is [..., rdim, mdim], the
transpose of what `torch.linalg.svd` calls Vh.
"""

from __future__ import annotations

from typing import Union

import torch
from jaxtyping import Complex, Float
from torch import Tensor


class FactoredMatrix:
    """`A @ B`, never formed unless asked for (`AB`).

    Args:
        A: the left factor [..., ldim, mdim].
        B: the right factor [..., mdim, rdim]; leading dimensions broadcast with A's.
    """

    def __init__(self, A: Float[Tensor, "... ldim mdim"], B: Float[Tensor, "... mdim rdim"]):
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"both factors must be matrices (at least 2 dims), got shapes {tuple(A.shape)} and "
                             f"{tuple(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"the factors must match on the inner dimension: A is {tuple(A.shape)}, B is "
                             f"{tuple(B.shape)}")
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        try:
            leading = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as e:
            raise ValueError(f"the factors' leading dimensions do not broadcast: A is {tuple(A.shape)}, B is "
                             f"{tuple(B.shape)}") from e
        self.shape = torch.Size((*leading, self.ldim, self.rdim))
        self.A = A.broadcast_to((*leading, self.ldim, self.mdim))
        self.B = B.broadcast_to((*leading, self.mdim, self.rdim))
        self.has_leading_dims = len(leading) > 0
        self._svd: tuple[Tensor, Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ products
    def __matmul__(self, other: Union[Tensor, "FactoredMatrix"]) -> Union["FactoredMatrix", Tensor]:
        """`self @ other`. A vector [rdim] gives a vector [..., ldim]; a matrix keeps the product factored, the new
        inner dimension being the smaller of the two candidates (TransformerLens's rule)."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if other.ndim < 2:
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.shape[-2] != self.rdim:
            raise ValueError(f"cannot multiply a factored matrix of shape {tuple(self.shape)} by a tensor of shape "
                             f"{tuple(other.shape)}: inner dimensions differ")
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Union[Tensor, "FactoredMatrix"]) -> Union["FactoredMatrix", Tensor]:
        """`other @ self`; a vector [ldim] gives a vector [..., rdim]."""
        if isinstance(other, FactoredMatrix):
            return other.A @ (other.B @ self)
        if other.shape[-1] != self.ldim:
            raise ValueError(f"cannot multiply a tensor of shape {tuple(other.shape)} by a factored matrix of shape "
                             f"{tuple(self.shape)}: inner dimensions differ")
        if other.ndim < 2:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: int | float | Tensor) -> "FactoredMatrix":
        if isinstance(scalar, Tensor) and scalar.numel() != 1:
            raise ValueError(f"* takes a scalar, got a tensor of shape {tuple(scalar.shape)}; use @ for products")
        return FactoredMatrix(self.A * scalar, self.B)

    def __rmul__(self, scalar: int | float | Tensor) -> "FactoredMatrix":
        return self * scalar

    @property
    def AB(self) -> Float[Tensor, "... ldim rdim"]:
        """The product, formed: can be large ([d_model, d_model] per head)."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[Tensor, "... mdim mdim"]:
        """The reverse product (only where ldim == rdim): the same nonzero eigenvalues as AB, at mdim cost."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square matrix (ldim == rdim), this one is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    # ------------------------------------------------------------------ spectra
    def svd(self) -> tuple[Float[Tensor, "... ldim k"], Float[Tensor, "... k"], Float[Tensor, "... rdim k"]]:
        """(U, S, Vh) with `U @ diag(S) @ Vh.T == AB`, k = min(ldim, mdim, rdim) singular values, descending.

        From the factors' SVDs: A = Ua Sa Vha and B = Ub Sb Vhb give AB = Ua (Sa Vha Ub Sb) Vhb, and the middle
        matrix is only mdim x mdim. Computed once per FactoredMatrix."""
        if self._svd is None:
            Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)
            Ub, Sb, Vhb = torch.linalg.svd(self.B, full_matrices=False)
            middle = Sa[..., :, None] * (Vha @ Ub) * Sb[..., None, :]
            Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
            self._svd = (Ua @ Um, Sm, (Vhm @ Vhb).transpose(-2, -1))
        return self._svd

    @property
    def U(self) -> Float[Tensor, "... ldim k"]:
        return self.svd()[0]

    @property
    def S(self) -> Float[Tensor, "... k"]:
        return self.svd()[1]

    @property
    def Vh(self) -> Float[Tensor, "... rdim k"]:
        return self.svd()[2]

    @property
    def eigenvalues(self) -> Complex[Tensor, "... mdim"]:
        """The eigenvalues of BA: those of AB but for AB's (ldim - mdim) extra zeros (if BA v = k v, then
        AB (A v) = k (A v)). Half precision is taken in float32 (`eig` has no half kernels)."""
        BA = self.BA
        if BA.dtype in (torch.float16, torch.bfloat16):
            BA = BA.float()
        return torch.linalg.eigvals(BA)

    def norm(self) -> Float[Tensor, "..."]:
        """Frobenius norm: the root of the sum of squared singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    # ------------------------------------------------------------------ shape
    def __getitem__(self, idx) -> "FactoredMatrix":
        """Index the leading dimensions as a tensor's; an index one longer selects rows of the matrix (from A),
        and one longer still also its columns (from B). An int there keeps the dimension, as a length-1 slice."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        n_leading = self.ndim - 2
        length = sum(i is not None for i in idx)
        if length <= n_leading:
            return FactoredMatrix(self.A[idx], self.B[idx])
        if length == n_leading + 1:
            idx = _int_to_slice(idx, -1)
            return FactoredMatrix(self.A[idx], self.B[idx[:-1]])
        if length == n_leading + 2:
            idx = _int_to_slice(_int_to_slice(idx, -1), -2)
            return FactoredMatrix(self.A[idx[:-1]], self.B[(*idx[:-2], slice(None), idx[-1])])
        raise ValueError(f"index {idx} is too long for a factored matrix of shape {tuple(self.shape)}")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def unsqueeze(self, k: int) -> "FactoredMatrix":
        """A new leading dimension at `k` (counted among the leading dimensions; negative k is not)."""
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    @property
    def pair(self) -> tuple[Float[Tensor, "... ldim mdim"], Float[Tensor, "... mdim rdim"]]:
        return self.A, self.B

    def collapse_l(self) -> Float[Tensor, "... k rdim"]:
        """AB with its left orthogonal factor U removed: diag(S) @ Vh.T."""
        return self.S[..., :, None] * self.Vh.transpose(-2, -1)

    def collapse_r(self) -> Float[Tensor, "... ldim k"]:
        """AB with its right orthogonal factor removed: U @ diag(S)."""
        return self.U * self.S[..., None, :]

    def make_even(self) -> "FactoredMatrix":
        """The same matrix as (U sqrt(S)) @ (sqrt(S) Vh.T): both factors orthogonal, sharing the singular values."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.Vh.transpose(-2, -1))

    def get_corner(self, k: int = 3) -> Tensor:
        """The first k entries along every dimension of AB (leading ones included), forming only that corner."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.ndim))]

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"


def _int_to_slice(idx: tuple, k: int) -> tuple:
    """`idx` with an int at position k made a length-1 slice: indexing a matrix dimension keeps it."""
    i = idx[k]
    if not isinstance(i, int):
        return idx
    out = list(idx)
    out[k] = slice(i, i + 1) if i != -1 else slice(-1, None)
    return tuple(out)


def composition_scores(left: FactoredMatrix, right: FactoredMatrix,
                       broadcast_dims: bool = True) -> Float[Tensor, "..."]:
    """||L R||_F / (||L||_F ||R||_F) (Elhage et al. 2021), as TransformerLens's `utils.composition_scores`.

    With `broadcast_dims`, left's leading dimensions come first and right's after them (e.g. [layer, head] x
    [layer, head] -> [L1, H1, L2, H2]); otherwise the leading dimensions broadcast against each other. Computed on
    the factors with their orthogonal sides dropped (`collapse_l`, `collapse_r`), which leaves every norm unchanged.
    """
    if broadcast_dims:
        n_left, n_right = left.ndim - 2, right.ndim - 2
        for i in range(n_left):
            right = right.unsqueeze(i)
        for i in range(n_right):
            left = left.unsqueeze(i + n_left)
    if left.rdim != right.ldim:
        raise ValueError(f"composition needs left.rdim == right.ldim, got shapes {tuple(left.shape)} and "
                         f"{tuple(right.shape)}")
    L, R = left.collapse_l(), right.collapse_r()
    fro = lambda m: torch.linalg.matrix_norm(m)  # noqa: E731
    return fro(L @ R) / fro(L) / fro(R)


__all__ = ["FactoredMatrix", "composition_scores"]
