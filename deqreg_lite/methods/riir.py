"""RIIR-style recurrent registration: a U-Net feature extractor, a ConvGRU memory and a small update head.

One step, with hidden state ``h`` (``h_0 = 0``, ``phi_0 = 0``)::

    x        = [If, Im o phi_t, phi_t, g_t]         # g_t: normalised LNCC gradient (use_grad=True, the default)
    h_{t+1}  = ConvGRU(UNet(x), h_t)                # U-Net: VoxelMorph configuration, ``hidden`` output features
    phi_{t+1} = phi_t + Conv3x3(h_{t+1})             # the head starts near zero (normal, std 1e-5)

Design choices:

* **Similarity gradient as input** (``use_grad=True``): RIIR descends from recurrent inference machines, whose
  input is the gradient of the data term. It is computed like GraDIRN's
  (:func:`~deqreg_lite.methods._common.similarity_grad`: central-difference image gradient, strong LNCC variance
  floor), without a graph and normalised by its max-abs per sample; ``use_grad=False`` gives the plain
  ``[If, Im o phi, phi]`` input of the other iterative methods.
* **Loss** (Eq. 4 with the paper's RIIR weights)::

      L_total = L(phi_T) + sum_{t=1..T} w_t L(phi_t),     w_t = 10**((t-1)/(T-1))   (w_1 = 1 for T = 1)

  The weights are **not normalised** and the final term is there twice (once alone, once with ``w_T = 10``), as
  in the equation: for ``T = 6`` the weights on ``L(phi_1) .. L(phi_6)`` are 1, 1.58, 2.51, 3.98, 6.31 and 11
  (26.4 in all), so the reported ``loss`` is about 26 times a per-step loss, and its gradient too (AdamW's steps
  are nearly invariant to that scale; a ``grad_clip`` threshold is not). Trained by BPTT through ``T`` steps.
  (Before issue 10 the loss was ``sum_t w_t L(phi_t) / sum_t w_t``: no separate ``L(phi_T)`` and normalised weights;
  the shipped ``riir.pt`` was trained with that loss.)
* The ConvGRU runs at full resolution, ``hidden`` channels (16), 3x3 gates.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_bool
from ..nets import UNet
from ..warp import warp
from .base import Backward, LossFn
from ._common import check_count, check_pair, similarity_grad, unet_apply
from .unrolling import RecurrentMethod

__all__ = ["RIIR", "ConvGRU", "riir_weights"]


def riir_weights(T: int) -> list[float]:
    """The paper's RIIR weights of Eq. 4, ``w_t = 10**((t-1)/(T-1))`` for ``t = 1..T`` (from 1 to 10; ``[1.0]`` for
    ``T = 1``), **not normalised**. The loss is ``L(phi_T) + sum_t w_t L(phi_t)`` (:meth:`RIIR.training_step`)."""
    T = check_count(T, "T")
    return [10.0 ** ((t - 1) / (T - 1)) if T > 1 else 1.0 for t in range(1, T + 1)]


class ConvGRU(nn.Module):
    """Convolutional GRU cell: ``h' = (1 - z) h + z tanh(W_q [x, r h])`` with ``z, r = sigmoid(W_g [x, h])``.

    ``x`` ``(B, in_channels, *spatial)``, ``h`` ``(B, hidden, *spatial)``; returns ``(B, hidden, *spatial)``.
    """

    def __init__(self, ndim: int, in_channels: int, hidden: int) -> None:
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.hidden = hidden
        self.gates = conv(in_channels + hidden, 2 * hidden, 3, padding=1)
        self.candidate = conv(in_channels + hidden, hidden, 3, padding=1)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        z, r = torch.sigmoid(self.gates(torch.cat([x, h], dim=1))).chunk(2, dim=1)
        q = torch.tanh(self.candidate(torch.cat([x, r * h], dim=1)))
        # under autocast the convolutions give float16 while the state stays float32: mix in the state's dtype
        return torch.lerp(h, q.to(h.dtype), z.to(h.dtype))


class RIIR(RecurrentMethod):
    """Recurrent registration with a ConvGRU hidden state (see the module docstring).

    Args:
        ndim: 2 or 3.
        T: training steps (the paper: 6).
        hidden: channels of the U-Net's features and of the ConvGRU state.
        use_grad: feed the normalised similarity gradient as an extra input.
    """

    name = "riir"

    def __init__(self, ndim: int, T: int = 6, hidden: int = 16, use_grad: bool = True) -> None:
        super().__init__(ndim)
        self.T = self.trained_steps = check_count(T, "T")
        self.hidden = check_count(hidden, "hidden")
        self.use_grad = check_bool(use_grad, "use_grad")
        self.features = UNet(ndim, 2 + ndim + (ndim if use_grad else 0), hidden)
        self.features.head.reset_parameters()  # features, not an update: the default init, not a near-zero one
        self.gru = ConvGRU(ndim, hidden, hidden)
        self.head = (nn.Conv2d if ndim == 2 else nn.Conv3d)(hidden, ndim, 3, padding=1)
        nn.init.normal_(self.head.weight, std=1e-5)
        nn.init.zeros_(self.head.bias)

    def _start(self, fixed: Tensor) -> Tensor:
        return fixed.new_zeros(fixed.shape[0], self.hidden, *fixed.shape[2:])

    def _update(self, fixed: Tensor, moving: Tensor, phi: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        x = [fixed, warp(moving, phi), phi]
        if self.use_grad:
            x.append(similarity_grad(fixed, moving, phi))
        h = self.gru(unet_apply(self.features, torch.cat(x, dim=1)), h)
        return phi + self.head(h), h

    def training_step(self, fixed: Tensor, moving: Tensor, loss_fn: LossFn,
                      backward: Backward = Tensor.backward) -> dict[str, float]:
        """BPTT through ``T`` steps on Eq. 4, ``L(phi_T) + sum_{t=1..T} w_t L(phi_t)`` with
        ``w_t = 10**((t-1)/(T-1))`` (:func:`riir_weights`, not normalised), one ``backward`` call.

        Returns ``loss`` (that total), ``loss_final`` (``L(phi_T)``), ``steps``, ``nfe`` and ``residual`` (the last
        step's relative update)."""
        check_pair(fixed, moving, self.ndim, model=self)
        _, phis, info = self._iterate(fixed, moving, self.T, keep=True)
        losses = [loss_fn(fixed, moving, p) for p in phis]
        loss = losses[-1] + sum(w * l for w, l in zip(riir_weights(self.T), losses))
        backward(loss)
        return {"loss": float(loss.detach()), "loss_final": float(losses[-1].detach()), "steps": float(self.T),
                "nfe": float(info.nfe), "residual": info.residuals[-1]}
