"""Orthogonal projector parameterised by the matrix exponential (semantics 4).

VkD (Miles, Elezi, Deng, "VkD: Improving Knowledge Distillation using Orthogonal
Projections", CVPR 2024) projects student features with an orthogonal matrix;
kdfast parameterises it through the exponential of a skew-symmetric matrix, a
"trivialisation" of the Stiefel manifold (Lezcano-Casado and Martinez-Rubio, "Cheap
Orthogonal Constraints in Neural Networks: A Simple Parametrization of the Orthogonal and
Unitary Group", ICML 2019), optionally with their dynamic trivialisation (folding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast import linalg


def _check_size(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class OrthogonalProjector(nn.Module):
    """Linear map ``x -> x @ P^T`` with P (out x in) orthonormal: an isometry or co-isometry.

    With n = max(in, out) and k = min(in, out), Q = exp(A)[:, :k] (n x k) has orthonormal
    columns for the skew-symmetric A = [[B, -C^T], [C, 0]] (n x n); B = the skew part of the
    k x k parameter ``skew_block`` (its strict lower triangle), C = the (n - k) x k
    parameter ``coupling``. P = Q when in <= out (orthonormal columns, P^T P = I_in) and
    P = Q^T otherwise (orthonormal rows). The zero block of A costs nothing: rotations within
    the complement do not move the first k columns, and A of this form still reaches every
    point of the Stiefel manifold.

    Computation (semantics 4): for k <= n/2 the QR-free reduced form: S = C^T C,
    K = [[B, -S], [I_k, 0]] (2k x 2k), E = exp(K)[:, :k], Q = [E_top; C E_bot]. K is not
    skew, so its exponential runs in float64 (also for float32 parameters) to keep
    P^T P = I to ~1e-7 after rounding to float32. It is differentiable everywhere, including
    C = 0 and rank-deficient C. For k > n/2 the full n x n skew exponential is cheaper and is
    used directly (``skew=True``, in the parameter dtype). Gradients flow through
    :func:`kdfast.linalg.expm` (Frechet derivative).

    Parameters start at zero, so P = [I; 0] (or its transpose). Weight decay on them is
    harmless: it pulls P towards [I; 0] (towards the folded base with ``fold_every``).

    Dynamic trivialisation (``fold_every=K``; Lezcano-Casado and Martinez-Rubio 2019): Q =
    base @ exp(A)[:, :k] with an orthogonal float64 buffer ``base`` (n x n, starts at I;
    float64 so that rounding does not accumulate over folds; the arithmetic with it stays
    float64 even if ``module.float()`` casts it).
    At the start of every (K+1)-th training-mode forward since the last fold, exp(A) is folded
    into the base and the parameters are reset to zero in place, so ||A|| stays small and the
    exponential cheap and accurate. ``base`` and ``fold_counter`` (training forwards since
    the last fold) live in the state_dict. Reading the counter synchronises with the device
    once per training forward. Optimiser state is kept across a fold: Adam's moments then
    refer to the new base's frame, which differs from the old by exp(A) = I + O(||A||), a
    small perturbation when folding often; clear ``optimizer.state`` for the parameters if an
    exact restart is wanted. Weight decay then pulls towards the current base.

    Args:
        in_features: input width (Ds, the student's).
        out_features: output width (Dt, the teacher's).
        fold_every: None (no folding, default) or K >= 1.
        device, dtype: of the parameters (default dtype when None).

    Shapes: forward (..., in_features) -> (..., out_features); ``weight`` (out, in).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        fold_every: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _check_size("in_features", in_features)
        self.out_features = _check_size("out_features", out_features)
        if fold_every is not None:
            _check_size("fold_every", fold_every)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.fold_every = fold_every
        n, k = max(in_features, out_features), min(in_features, out_features)
        self.n, self.k = n, k
        self.skew_block = nn.Parameter(torch.zeros(k, k, device=device, dtype=dtype))
        self.coupling = nn.Parameter(torch.zeros(n - k, k, device=device, dtype=dtype))
        if fold_every is not None:
            self.register_buffer("base", torch.eye(n, device=device, dtype=torch.float64))
            self.register_buffer("fold_counter", torch.zeros((), device=device, dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fold_every={self.fold_every}"
        )

    def _skew(self) -> Tensor:
        lower = self.skew_block.tril(-1)
        return lower - lower.mT

    def _full_generator(self, dtype: torch.dtype) -> Tensor:
        """A = [[B, -C^T], [C, 0]] (n x n) in ``dtype``."""
        B, C = self._skew().to(dtype), self.coupling.to(dtype)
        corner = C.new_zeros(self.n - self.k, self.n - self.k)
        return torch.cat([torch.cat([B, -C.mT], 1), torch.cat([C, corner], 1)], 0)

    def _reduced_generator(self) -> Tensor:
        """K = [[B, -C^T C], [I, 0]] (2k x 2k) in float64: A restricted to span([I; 0], [0; C])."""
        B, C = self._skew().double(), self.coupling.double()
        eye, zero = torch.eye(self.k, dtype=B.dtype, device=B.device), torch.zeros_like(B)
        return torch.cat([torch.cat([B, -(C.mT @ C)], 1), torch.cat([eye, zero], 1)], 0)

    def _columns(self) -> Tensor:
        """Q = base @ exp(A)[:, :k], (n, k), in the parameter dtype."""
        dtype, k = self.skew_block.dtype, self.k
        if 2 * k <= self.n:
            E = linalg.expm(self._reduced_generator())[:, :k]
            Q = torch.cat([E[:k], self.coupling.double() @ E[k:]], 0)
        else:
            Q = linalg.expm(self._full_generator(dtype), skew=True)[:, :k]
        if self.fold_every is not None:
            Q = self.base.double() @ Q.double()
        return Q.to(dtype)

    @property
    def weight(self) -> Tensor:
        """P, (out_features, in_features), with orthonormal columns (in <= out) or rows."""
        Q = self._columns()
        return Q if self.out_features >= self.in_features else Q.mT

    def forward(self, x: Tensor) -> Tensor:
        if self.fold_every is not None and self.training:
            since_fold = int(self.fold_counter)  # host sync (a buffer)
            if since_fold >= self.fold_every:
                self.fold()
                since_fold = 0
            self.fold_counter.fill_(since_fold + 1)
        return F.linear(x, self.weight)

    @torch.no_grad()
    def fold(self) -> None:
        """base <- base @ exp(A); parameters <- 0; fold_counter <- 0 (P is unchanged)."""
        if self.fold_every is None:
            raise RuntimeError("fold() needs a base: build the projector with fold_every=K")
        k, n = self.k, self.n
        if 2 * k <= n:
            E, Phi = self._reduced_rotation()
            C = self.coupling.double()
            base1, base2 = self.base.double()[:, :k], self.base.double()[:, k:]
            base2_C = base2 @ C
            new1 = base1 @ E[:k] + base2_C @ E[k:]
            new2 = base2 - (base1 @ Phi[:k] + base2_C @ Phi[k:]) @ C.mT
            self.base.copy_(torch.cat([new1, new2], 1))
        else:
            rotation = linalg.expm(self._full_generator(torch.float64), skew=True)
            self.base.copy_(self.base.double() @ rotation)
        self.skew_block.zero_()
        self.coupling.zero_()
        self.fold_counter.zero_()

    def _reduced_rotation(self) -> tuple[Tensor, Tensor]:
        """(E, Phi) = (exp(K)[:, :k], phi1(K)[:, :k]), phi1(x) = (e^x - 1)/x, both (2k, k).

        exp(A) = [[E_top, -Phi_top C^T], [C E_bot, I - C Phi_bot C^T]] (the complement
        columns are [0; I] + sum_j A^j / j! [0; I], and A [0; I] = [-C^T; 0] stays in the
        span that K acts on), so a fold costs O(n^2 k) instead of an n x n exponential.
        Both blocks come from one exponential: exp([[K, J], [0, 0]]) = [[exp(K), phi1(K) J],
        [0, I]] with J = [I_k; 0].
        """
        K, k = self._reduced_generator(), self.k
        top = torch.cat([K, torch.eye(2 * k, k, dtype=K.dtype, device=K.device)], 1)
        X = linalg.expm(torch.cat([top, top.new_zeros(k, 3 * k)], 0))
        return X[: 2 * k, :k], X[: 2 * k, 2 * k :]
