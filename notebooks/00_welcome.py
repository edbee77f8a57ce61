# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     notebook_metadata_filter: kernelspec,jupytext,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deqreg-lite/deqreg_lite/blob/main/notebooks/00_welcome.ipynb)
#
# # 00 · Welcome: deformable registration in pictures
#
# **Goal.** Learn the vocabulary that every later notebook uses: the *fixed* and *moving* images, the
# *displacement field* $\mathbf u$, how an image is *warped* with it, and how the *Jacobian determinant* tells a
# plausible deformation from one that folds space onto itself. By the end you will have bent a real brain slice with
# random smooth deformations, seen folding appear as they grow stronger, and seen why integrating a velocity field
# (scaling and squaring) prevents it.
#
# Everything runs on a laptop CPU in seconds. Set `DEQREG_MODE=quick` for an even faster run.

# %%
# Colab only: fetch the repository and install the package. In a local checkout this cell does nothing.
import os
import subprocess
import sys

if "google.colab" in sys.modules:
    REPO = "/content/deqreg_lite"
    if not os.path.isdir(REPO):
        subprocess.run(["git", "clone", "--depth", "1", "https://github.com/deqreg-lite/deqreg_lite", REPO],
                       check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", REPO], check=True)
    sys.path.insert(0, REPO)  # this kernel started before the install: make the package importable now
    os.environ["DEQREG_SAMPLES_DIR"] = os.path.join(REPO, "data", "samples")
    os.chdir(REPO)
    from google.colab import output

    output.enable_custom_widget_manager()  # ipywidgets 8 sliders

# %%
import matplotlib.pyplot as plt
import torch

from deqreg_lite import viz
from deqreg_lite.config import by_mode, mode, seed_everything
from deqreg_lite.datasets import deform_sample, load_sample, random_deformation
from deqreg_lite.evaluate import pair_metrics
from deqreg_lite.metrics import folding_percent, jacobian_det
from deqreg_lite.warp import identity, warp
from deqreg_lite.widgets import deformation_explorer

seed_everything(0)
torch.set_num_threads(1)  # images this small run as fast on one CPU thread, and stay fast on a busy machine
# Quick mode (CI) changes sizes and counts only, never the code path.
N_SEEDS = by_mode(quick=1, default=4)          # random fields averaged per strength in the folding plot
STRENGTHS = by_mode(quick=[0, 2, 4, 6, 8, 12, 16], default=[0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16])
print(f"mode {mode()!r} (set DEQREG_MODE=quick for a faster run), torch {torch.__version__}")

# %% [markdown]
# ## 1. What is deformable registration?
#
# We have two images of the same kind of anatomy: a **fixed** image $I_f$ and a **moving** image $I_m$
# (here: a coronal slice of the MNI152 brain template, and a slice of another person's brain).
# Registration looks for a **displacement field** $\mathbf u$ that tells, for every pixel $\mathbf x$ of the fixed
# image, where the matching anatomy sits in the moving image. The **deformation** is
#
# $$\phi(\mathbf x) = \mathbf x + \mathbf u(\mathbf x),$$
#
# and the moving image, resampled through it, is the **warped** image
#
# $$(I_m \circ \phi)(\mathbf x) = I_m(\mathbf x + \mathbf u(\mathbf x)).$$
#
# Three conventions hold everywhere in `deqreg_lite` (they are Learn2Reg's):
#
# * **Pull, not push.** `warp(moving, disp)` *reads* the moving image at $\mathbf x + \mathbf u(\mathbf x)$ for every
#   fixed pixel $\mathbf x$. So $\mathbf u$ lives on the fixed grid and points *into* the moving image.
# * **Voxel units.** `disp` holds displacements in voxels (pixels in 2D), not millimetres and not $[-1, 1]$.
# * **Array-axis order.** `disp` has shape `(B, ndim, H, W)`; channel 0 moves along axis 0 (rows, downwards),
#   channel 1 along axis 1 (columns, to the right). It is *not* `(x, y)` order.
#
# Finding $\mathbf u$ is an optimisation problem (Eq. 1 of the DEQReg paper), which notebook `01` solves:
#
# $$\phi^* = \arg\min_\phi \; \mathcal L_{\text{sim}}(I_f, I_m\circ\phi) + \lambda\, \mathcal L_{\text{reg}}(\phi).$$
#
# ## 2. The shipped 2D pair
#
# `load_sample("brain2d")` returns a dict of tensors: images are `(1, 1, H, W)` floats in $[0, 1]$, label maps
# `(1, 1, H, W)` integers (1 CSF, 2 grey matter, 3 white matter).

# %%
sample = load_sample("brain2d")
fixed, moving = sample["fixed"], sample["moving"]
for key in ("fixed", "moving", "fixed_seg", "moving_seg"):
    print(f"{key:10s} {tuple(sample[key].shape)} {sample[key].dtype}")
print("labels:", sample["label_names"], "| spacing (mm):", sample["spacing"], "| ids:", sample["ids"])
print("axes:", sample["axes"])

fig, axes = plt.subplots(1, 4, figsize=(15, 3.8), constrained_layout=True)
viz.show_image(axes[0], fixed, "fixed $I_f$ (template)")
viz.show_image(axes[1], moving, "moving $I_m$ (another brain)")
viz.show_labels(axes[2], fixed, sample["fixed_seg"], "fixed + labels")
viz.show_labels(axes[3], moving, sample["moving_seg"], "moving + labels")
plt.show()

# %% [markdown]
# Before any registration, how well do the two label maps overlap? The **Dice** score of a label is
# $2|A\cap B| / (|A| + |B|)$: 1 for a perfect overlap, 0 for none. A zero displacement is the *identity*
# transform, i.e. "no registration".

# %%
zero = torch.zeros(1, 2, *fixed.shape[2:])  # (B, ndim, H, W): the identity transform
before = pair_metrics(sample, zero)
print("Dice before registration:", {sample["label_names"][l]: round(before[f"dice_{l}"], 3) for l in sample["labels"]},
      f"mean {before['dice']:.3f}")
assert before["folding_pct"] == 0.0 and 0.3 < before["dice"] < 0.7

# %% [markdown]
# ## 3. Warping pulls: a translation
#
# The simplest displacement is a constant one. Take $\mathbf u(\mathbf x) = (0, 10)$: every fixed pixel reads the
# moving image **10 pixels to its right**. So the content of the warped image appears shifted **to the left**: this
# is the pull convention, and it is the most common source of sign errors in registration code.

# %%
shift = torch.zeros(1, 2, *moving.shape[2:])
shift[:, 1] = 10.0  # channel 1 = columns (axis 1); +10 voxels
shifted = warp(moving, shift)

# Check the convention: warped[:, :, r, c] == moving[:, :, r, c + 10] wherever c + 10 is inside the image.
assert torch.allclose(shifted[..., :-10], moving[..., 10:], atol=1e-5)

fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), constrained_layout=True)
viz.show_image(axes[0], moving, "moving")
viz.show_image(axes[1], shifted, "warp(moving, u = (0, +10))")
viz.plot_grid(axes[2], shift, step=8, title="grid x + u(x): every point moved right")
plt.show()

# %% [markdown]
# ## 4. The Jacobian determinant, and folding
#
# Locally, a deformation $\phi$ behaves like the linear map given by its Jacobian matrix
# $D\phi = I + \nabla \mathbf u$. Its determinant
#
# $$J(\mathbf x) = \det\big(I + \nabla \mathbf u(\mathbf x)\big)$$
#
# is the factor by which $\phi$ changes the area (volume in 3D) of a tiny square around $\mathbf x$:
# $J > 1$ expands, $0 < J < 1$ shrinks, and $J \le 0$ means the square was turned inside out: **folding**.
# A folded deformation is not invertible and physically implausible (tissue does not pass through itself), so
# papers report the percentage of voxels with $J \le 0$ ("$|J_\phi|_{\le 0}$" in the DEQReg tables).
#
# For an **affine** displacement $\mathbf u(\mathbf x) = A(\mathbf x - \mathbf c)$ the gradient is $A$ everywhere,
# so $J = \det(I + A)$ is a known constant. Let us build one by hand and check that the library's `jacobian_det`
# (central finite differences) gives exactly that number.

# %%
shape = tuple(moving.shape[2:])
grid = identity(shape)                                          # (1, 2, H, W): the coordinates of every pixel
centre = torch.tensor([(s - 1) / 2 for s in shape]).view(1, 2, 1, 1)


def affine_disp(A: torch.Tensor) -> torch.Tensor:
    """u(x) = A (x - c): a hand-made affine displacement (B, 2, H, W) in voxels."""
    return torch.einsum("ij,bjhw->bihw", A, grid - centre)


A_shrink = torch.tensor([[-0.25, 0.10], [0.05, 0.20]])        # shear + squeeze rows + stretch columns
A_fold = torch.tensor([[-2.00, 0.00], [0.00, 0.00]])           # I + A = diag(-1, 1): an upside-down mirror
for name, A in [("shear/scale", A_shrink), ("mirror", A_fold)]:
    by_hand = torch.linalg.det(torch.eye(2) + A)
    by_lib = jacobian_det(affine_disp(A))                     # (1, H, W)
    assert torch.allclose(by_lib, by_hand.expand_as(by_lib), atol=1e-4), name
    print(f"{name:12s} det(I + A) = {by_hand:+.4f}; jacobian_det: min {by_lib.min():+.4f}, "
          f"max {by_lib.max():+.4f}; folding {folding_percent(affine_disp(A)).item():.0f} %")

fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), constrained_layout=True)
for i, (name, A) in enumerate([("shear/scale", A_shrink), ("mirror", A_fold)]):
    u = affine_disp(A)
    viz.show_image(axes[2 * i], warp(moving, u), f"warped ({name})")
    viz.plot_grid(axes[2 * i + 1], u, step=10, title=f"grid, J = {torch.linalg.det(torch.eye(2) + A):+.2f}")
plt.show()

# %% [markdown]
# The mirror has $J = -1$ everywhere: 100 % folding, although its grid looks untouched (a flip maps the lattice
# onto itself: only the sign of $J$ reveals that space was turned inside out). Real registrations are not affine:
# $J$ varies from pixel to pixel, and a few folded pixels can hide inside an otherwise smooth field.
#
# ## 5. Random smooth deformations
#
# To bend an image plausibly we need a *smooth* random field. `random_deformation` draws white noise, smooths it
# with a Gaussian of width `smoothness` voxels, and scales it to an RMS of `strength` voxels. That field $\mathbf v$
# is then treated as a **velocity** and integrated over unit time,
#
# $$\phi = \exp(\mathbf v), \qquad \text{computed by scaling and squaring:}\quad
# \phi_{1/2^N} = \mathrm{id} + \mathbf v / 2^N,\quad \phi_{1/2^{k-1}} = \phi_{1/2^k}\circ\phi_{1/2^k},$$
#
# i.e. $N$ = `steps` compositions of a tiny deformation with itself. Each tiny step is nearly the identity and
# cannot fold, and composing invertible maps gives an invertible map: the result is a **diffeomorphism**
# (smooth, invertible, no folding) as long as the steps resolve the flow. With `steps=0` no integration happens:
# the velocity is used directly as the displacement, and it folds once it is strong for its smoothness.

# %%
fig, axes = plt.subplots(2, 4, figsize=(15, 7.2), constrained_layout=True)
for row, steps in enumerate([7, 0]):
    for col, strength in enumerate([2.0, 8.0]):
        d = deform_sample(moving, sample["moving_seg"], strength=strength, smoothness=8.0, seed=1, steps=steps)
        fold = folding_percent(d.disp).item()
        viz.show_labels(axes[row, 2 * col], d.image, d.seg, f"strength {strength:.0f} vx, steps={steps}")
        viz.plot_jacobian(axes[row, 2 * col + 1], d.disp, title=f"det J (folding {fold:.2f} %, black)")
plt.show()

# %% [markdown]
# ## 6. Try it: the deformation explorer
#
# Move the sliders (they act when you release them):
#
# * **strength**: RMS of the random velocity, in voxels;
# * **smoothness**: width of the Gaussian that smooths it, in voxels (smoother fields tolerate larger strengths);
# * **integration steps**: 0 uses the raw field as a displacement; 7 integrates it (scaling and squaring);
# * **seed**: another random field.
#
# Panels: the original with its labels, the warped image and labels, the deformed grid $\mathbf x + \mathbf u(\mathbf x)$,
# and the Jacobian determinant (blue: shrinking, red: expanding, black: folded). The title gives the % of folded
# pixels. Try: steps 0, strength 4 → 8 → 12; then the same strengths with steps 7.

# %%
explorer = deformation_explorer(moving, sample["moving_seg"], strength=4.0, steps=0)
explorer

# %% [markdown]
# The widget also stores the numbers it shows, so you (and the tests) can read them:

# %%
print(explorer.result)
assert explorer.result["steps"] == 0 and explorer.result["strength"] == 4.0

# %% [markdown]
# ## 7. Folding against strength
#
# The same experiment as a curve: for each strength, the % of folded pixels (averaged over a few random seeds),
# for the raw field (`steps=0`) and for the integrated one (`steps=7`).

# %%
curves = {}
for steps in (0, 7):
    curves[steps] = [
        sum(folding_percent(random_deformation(shape, strength=s, smoothness=8.0, seed=seed, steps=steps)).item()
            for seed in range(N_SEEDS)) / N_SEEDS
        for s in STRENGTHS
    ]
    print(f"steps={steps}: " + ", ".join(f"{s}:{f:.2f}%" for s, f in zip(STRENGTHS, curves[steps])))

fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
ax.plot(STRENGTHS, curves[0], "o-", label="steps=0: velocity used as displacement")
ax.plot(STRENGTHS, curves[7], "s-", label="steps=7: integrated (scaling and squaring)")
ax.set_xlabel("strength (RMS velocity, voxels), smoothness 8 voxels")
ax.set_ylabel("folding: % of pixels with J ≤ 0")
ax.legend()
ax.grid(alpha=0.3)
plt.show()

# No folding for gentle deformations; plenty for strong raw fields; integration removes (almost) all of it.
assert curves[0][0] == 0.0 and curves[0][1] == 0.0
assert curves[0][-1] > 10.0
assert curves[7][-1] < 0.1 * curves[0][-1]

# %% [markdown]
# Why does the integrated field still fold a little at the largest strengths? Scaling and squaring composes
# fields by *bilinear interpolation* on a grid of pixels, and very large, fast-changing velocities are no longer
# resolved by that grid. More steps or smoother velocities fix it. Learning-based methods (notebooks `02`+) mostly
# predict displacements directly, and their folding is what the DEQReg paper tracks as inference goes on.
#
# ## Exercise
#
# Rotations preserve area, so the Jacobian determinant of a rotation should be exactly 1 everywhere.
#
# 1. Use `affine_disp` to build the displacement of a rotation by 20° about the image centre.
#    (Hint: $\phi(\mathbf x) = \mathbf c + R(\mathbf x - \mathbf c)$, so $\mathbf u(\mathbf x) = (R - I)(\mathbf x - \mathbf c)$.)
# 2. Warp the moving image and its labels with it and show them.
# 3. Check with `jacobian_det` that $J = 1$ everywhere and with `folding_percent` that nothing folds.
# 4. Which way does the image turn on screen, and why? (Remember: warping pulls.)
#
# <details><summary>Solution</summary>
#
# ```python
# import math
# t = math.radians(20)
# R = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
# u = affine_disp(R - torch.eye(2))
# fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), constrained_layout=True)
# viz.show_labels(axes[0], warp(moving, u), warp(sample["moving_seg"], u, mode="nearest"), "rotated")
# viz.plot_grid(axes[1], u, step=10)
# viz.plot_jacobian(axes[2], u)
# plt.show()
# J = jacobian_det(u)
# print(J.min().item(), J.max().item(), folding_percent(u).item())
# assert torch.allclose(J, torch.ones_like(J), atol=1e-4)   # det R = cos² + sin² = 1
# ```
#
# Axis 0 points down and axis 1 right, so $R$ turns the *sampling positions* by +20° from the row axis
# towards the column axis, which on screen is counter-clockwise. Because warping pulls, the image content
# turns the opposite way: clockwise. Use $R^\top$ (angle -20°) to turn the image counter-clockwise.
#
# </details>
#
# ## Summary
#
# * Registration finds a displacement $\mathbf u$ on the fixed grid; `warp(moving, disp)` **pulls**:
#   $\text{warped}(\mathbf x) = I_m(\mathbf x + \mathbf u(\mathbf x))$, with `disp` in **voxels** and channels in
#   **array-axis order**.
# * The **Jacobian determinant** $J = \det(I + \nabla\mathbf u)$ measures local area change; $J \le 0$ is
#   **folding**, reported as a % of voxels. For an affine field it is the constant $\det(I + A)$, which the
#   library reproduces exactly.
# * Strong random fields fold; **integrating a velocity** (scaling and squaring) keeps the deformation
#   invertible.
# * Next: `01_classical_registration` finds $\mathbf u$ for the brain pair by gradient descent on Eq. 1.
