# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,jupyter,-all
#     notebook_metadata_filter: kernelspec,language_info,jupytext,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
#   language_info:
#     codemirror_mode:
#       name: ipython
#       version: 3
#     file_extension: .py
#     mimetype: text/x-python
#     name: python
#     nbconvert_exporter: python
#     pygments_lexer: ipython3
#     version: 3.11.7
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deqreg-lite/deqreg_lite/blob/main/notebooks/00_welcome.ipynb)
#
# # 00 · Welcome: deformable registration in pictures
#
# **Goal.** Learn the vocabulary that every later notebook uses: the *fixed* and *moving* images, the
# *displacement field* $u$, how an image is *warped* with it, and how the *Jacobian determinant* tells a plausible
# deformation from one that folds space onto itself. You will bend a real brain slice with random smooth
# deformations of growing strength, count the folded pixels, and test whether integrating a velocity field (scaling
# and squaring) changes that count.
#
# **Learning objectives.** After this notebook you can:
#
# * **write** a displacement field by hand (a translation, an affine map) and predict which way `warp` moves the
#   image content (warping *pulls*);
# * **compute** the Jacobian determinant $J = \det(\mathrm{I} + \nabla u)$ of an affine field by hand and check
#   it against `jacobian_det`;
# * **measure** the Dice overlap of two label maps and the % of folded pixels ($J \le 0$) of a field;
# * **explain** why integrating a velocity by scaling and squaring keeps a deformation (almost) fold-free, and
#   **implement** it with `warp`.
#
# **Prerequisites.** None of the series: this is the first notebook. Python and a little `torch` (tensors,
# indexing); from maths, partial derivatives and the determinant of a 2x2 matrix.
#
# **Study time.** About 50 minutes: running every cell in the default mode took 32 s (measured once, on a 2-core
# CPU that was busy with two training jobs), and reading, the explorer and the four exercises take about 40-60
# minutes (an estimate).
#
# **Notation.** One notation for the whole series (notebooks 00-08):
#
# | symbol | meaning | in code |
# |---|---|---|
# | $I_f$, $I_m$ | fixed and moving image | `fixed`, `moving`: `(B, C, *spatial)` |
# | $u$ | displacement field, in voxels | `disp`: `(B, ndim, *spatial)`, channels in array-axis order |
# | $\phi = \mathrm{Id} + u$ | the deformation, $\phi(x) = x + u(x)$ | |
# | $I_m\circ\phi$ | the warped moving image, $I_m(x + u(x))$ | `warp(moving, disp)` |
# | $E(u) = \mathcal{L}_{sim}(I_f, I_m\circ\phi) + \lambda\,\mathcal{L}_{reg}(u)$ | the energy of Eq. 1 | `Objective` |
# | $J = \det(\mathrm{I} + \nabla u)$ | Jacobian determinant of $\phi$ | `jacobian_det` |
# | $h_\theta(I_f, I_m)$ | VoxelMorph: predicts $u$ in one shot (`02`) | `build_method("voxelmorph")` |
# | $f_\theta(I_f, I_m\circ\phi, u)$, $g_\theta(u) = u + f_\theta(\dots)$ | the learned **update** and the **update map** whose fixed point DEQReg solves (`03`-`05`) | |
# | $T$, $K$, $\tau$, $S$, $\gamma$ | solver / unrolled steps, phantom steps, damping, sampled states, their weight | `steps`, `K`, `tau`, `S`, `gamma` |
#
# The paper writes $\phi$ for the displacement too: **the paper's $\phi$ is our $u$**.

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
from deqreg_lite.datasets import deform_sample, load_sample, random_deformation, random_velocity
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
# Registration looks for a **displacement field** $u$ that tells, for every pixel $x$ of the fixed image, where
# the matching anatomy sits in the moving image. The **deformation** is
#
# $$\phi(x) = x + u(x), \qquad \phi = \mathrm{Id} + u,$$
#
# and the moving image, resampled through it, is the **warped** image
#
# $$(I_m \circ \phi)(x) = I_m(x + u(x)).$$
#
# Three conventions hold everywhere in `deqreg_lite` (they are Learn2Reg's):
#
# * **Pull, not push.** `warp(moving, disp)` *reads* the moving image at $x + u(x)$ for every fixed pixel $x$.
#   So $u$ lives on the fixed grid and points *into* the moving image.
# * **Voxel units.** `disp` holds displacements in voxels (pixels in 2D), not millimetres and not $[-1, 1]$.
# * **Array-axis order.** `disp` has shape `(B, ndim, H, W)`; channel 0 moves along axis 0 (rows, downwards),
#   channel 1 along axis 1 (columns, to the right). It is *not* `(x, y)` order.
#
# Finding $u$ is an optimisation problem (Eq. 1 of the DEQReg paper), which notebook `01` solves:
#
# $$u^* = \arg\min_u \; E(u) = \mathcal L_{sim}(I_f, I_m\circ\phi) + \lambda\, \mathcal L_{reg}(u).$$
#
# ## 2. The shipped 2D pair
#
# `load_sample("brain2d")` returns a dict of tensors: images are `(1, 1, H, W)` floats in $[0, 1]$, label maps
# `(1, 1, H, W)` integers (1 CSF, 2 grey matter, 3 white matter; the colour key is in the panels).

# %%
sample = load_sample("brain2d")
fixed, moving = sample["fixed"], sample["moving"]
names = sample["label_names"]
for key in ("fixed", "moving", "fixed_seg", "moving_seg"):
    print(f"{key:10s} {tuple(sample[key].shape)} {sample[key].dtype}")
print("labels:", names, "| spacing (mm):", sample["spacing"], "| ids:", sample["ids"])
print("axes:", sample["axes"])

fig, axes = plt.subplots(1, 4, figsize=(15, 3.8), constrained_layout=True)
viz.show_image(axes[0], fixed, "fixed $I_f$ (template)")
viz.show_image(axes[1], moving, "moving $I_m$ (another brain)")
viz.show_labels(axes[2], fixed, sample["fixed_seg"], "fixed + labels", names=names)
viz.show_labels(axes[3], moving, sample["moving_seg"], "moving + labels", names=names)
plt.show()

# %% [markdown]
# ### Metrics, part 1: Dice and folding
#
# Two of the metrics that every table of the series reports are defined here; notebook `01` (section "Metrics")
# defines the rest (HD95, SDlogJ in both conventions, TRE).
#
# * **Dice** of one label: $2|A\cap B| / (|A| + |B|)$ for the pixel sets $A$ (fixed label map) and $B$ (warped
#   moving label map): 1 for a perfect overlap, 0 for none. We report the mean over the labels, as a fraction
#   (the paper reports it in %).
# * **% folding**: the percentage of pixels with $J \le 0$ (section 4), the paper's "$|J_\phi|_{\le 0}$".
#
# A zero displacement is the *identity* transform, i.e. "no registration". How well do the two label maps overlap
# before any registration?

# %%
zero = torch.zeros(1, 2, *fixed.shape[2:])  # (B, ndim, H, W): the identity transform
before = pair_metrics(sample, zero)
print("Dice before registration:", {names[l]: round(before[f"dice_{l}"], 3) for l in sample["labels"]},
      f"mean {before['dice']:.3f}; folding {before['folding_pct']:.1f} %")

# %% [markdown]
# ## 3. Warping pulls: a translation
#
# The simplest displacement is a constant one. Take $u(x) = (0, 10)$: every fixed pixel reads the moving image
# 10 pixels to its right.

# %% [markdown]
# **Predict.** Will the content of the warped image appear shifted to the left or to the right?

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
# The grid points move right, but the content moves **left**: pixel $(r, c)$ of the result shows what sat at
# $(r, c + 10)$. This is the pull convention, and it is the most common source of sign errors in registration code.
#
# ## 4. The Jacobian determinant, and folding
#
# Locally, a deformation $\phi$ behaves like the linear map given by its Jacobian matrix
# $D\phi = \mathrm{I} + \nabla u$. Its determinant
#
# $$J(x) = \det\big(\mathrm I + \nabla u(x)\big)$$
#
# is the factor by which $\phi$ changes the area (volume in 3D) of a tiny square around $x$:
# $J > 1$ expands, $0 < J < 1$ shrinks, and $J \le 0$ means the square was turned inside out: **folding**.
# A folded deformation is not invertible and physically implausible (tissue does not pass through itself), so
# papers report the percentage of voxels with $J \le 0$ ("$|J_\phi|_{\le 0}$" in the DEQReg tables).
#
# For an **affine** displacement $u(x) = A(x - c)$ the gradient is $A$ everywhere, so $J = \det(\mathrm I + A)$ is
# a known constant. Let us build one by hand and check that the library's `jacobian_det` (central finite
# differences) gives exactly that number.

# %% [markdown]
# **Predict.** The second field below is $A = \mathrm{diag}(-2, 0)$, so $\mathrm I + A = \mathrm{diag}(-1, 1)$.
# What will its deformed grid look like, and what % of its pixels fold?

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
# with a Gaussian of width `smoothness` voxels, and scales it to an RMS of `strength` voxels. That field $v$ is then
# treated as a **velocity** and integrated over unit time,
#
# $$\phi = \exp(v), \qquad \text{computed by scaling and squaring:}\quad
# \phi_{1/2^N} = \mathrm{Id} + v / 2^N,\quad \phi_{1/2^{k-1}} = \phi_{1/2^k}\circ\phi_{1/2^k},$$
#
# i.e. $N$ = `steps` compositions of a tiny deformation with itself. Each tiny step is nearly the identity and
# cannot fold, and composing invertible maps gives an invertible map: the result is a **diffeomorphism**
# (smooth, invertible, no folding) as long as the steps resolve the flow. With `steps=0` no integration happens:
# the velocity is used directly as the displacement.
#
# In the Jacobian maps below, blue shrinks ($0 < J < 1$), red expands ($J > 1$), and **black is folded**
# ($J \le 0$); the colour bar shows the same black below 0.

# %%
fig, axes = plt.subplots(2, 4, figsize=(16, 7.2), constrained_layout=True)
for row, steps in enumerate([7, 0]):
    for col, strength in enumerate([2.0, 8.0]):
        d = deform_sample(moving, sample["moving_seg"], strength=strength, smoothness=8.0, seed=1, steps=steps)
        fold = folding_percent(d.disp).item()
        viz.show_labels(axes[row, 2 * col], d.image, d.seg, f"strength {strength:.0f} vx, steps={steps}",
                        names=names)
        viz.plot_jacobian(axes[row, 2 * col + 1], d.disp, title=f"det J (folding {fold:.2f} %, black)",
                          colorbar=True)
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
# Panels: the original with its labels, the warped image and labels, the deformed grid $x + u(x)$, and the
# Jacobian determinant (blue: shrinking, red: expanding, black: folded). The title gives the % of folded pixels.
# Try: steps 0, strength 4 → 8 → 12; then the same strengths with steps 7. The widget keeps the numbers it shows in
# `explorer.result`.

# %%
explorer = deformation_explorer(moving, sample["moving_seg"], strength=4.0, steps=0, label_names=names)
explorer

# %% [markdown]
# ## 7. Folding against strength
#
# The same experiment as a curve: for each strength, the % of folded pixels for the raw field (`steps=0`) and for
# the integrated one (`steps=7`), averaged over `N_SEEDS` random fields (4 in the default mode, 1 in quick mode: with
# one seed a point is one field, not an average, so expect a jagged curve).

# %% [markdown]
# **Predict.** At strength 16 voxels (smoothness 8), roughly what % of pixels will the raw field fold? And the
# integrated one?

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

# %% [markdown]
# No folding for gentle deformations; plenty for strong raw fields; integration removes almost all of it. Why does
# the integrated field still fold a little at the largest strengths? Scaling and squaring composes fields by
# *bilinear interpolation* on a grid of pixels, and very large, fast-changing velocities are no longer resolved by
# that grid. More steps or smoother velocities fix it. Learning-based methods (notebooks `02`+) mostly predict
# displacements directly, and their folding is what the DEQReg paper tracks as inference goes on.
#
# > **Conventions against the paper.** The paper's $\phi$ is our $u$ (a displacement in voxels). Its folding
# > $|J_\phi|_{\le 0}$ is the same definition as ours (% of voxels with $J \le 0$), but counted over 3D OASIS
# > volumes and lung CTs; here it is counted over the pixels of one 2D slice of 160 x 192, so the numbers are not
# > comparable in size. The paper reports Dice in % over OASIS's anatomical structures; we report it as a fraction
# > (0-1) over 3 tissue classes (CSF, grey and white matter), which are large and easy to overlap.
#
# ## Exercises
#
# Each exercise has a code cell with a `TODO` (it runs as given and prints `TODO`), then a hidden solution cell
# (click the "..." to reveal it) that runs the solution and checks it with `assert`. Try first.
#
# ### Exercise 1 (★)
#
# **Pull, once more.** Write the displacement $u$ that moves the *content* of the moving image **down** by 5 pixels,
# warp the image with it, and check your sign with an `assert` on the pixels.

# %% tags=["exercise"]
u_down = None  # TODO: a (1, 2, H, W) displacement; which channel, and which sign?
print("TODO" if u_down is None else warp(moving, u_down).shape)

# %% tags=["solution"] jupyter={"source_hidden": true}
u_down = torch.zeros(1, 2, *shape)
u_down[:, 0] = -5.0  # channel 0 = rows; pull from 5 rows *above*, so the content moves down
moved_down = warp(moving, u_down)
assert torch.allclose(moved_down[..., 5:, :], moving[..., :-5, :], atol=1e-5)  # row r shows old row r - 5
print("content moved down by 5 rows with u = (-5, 0)")

# %% [markdown]
# ### Exercise 2 (★★)
#
# **A rotation.** Rotations preserve area, so the Jacobian determinant of a rotation should be exactly 1 everywhere.
#
# 1. Use `affine_disp` to build the displacement of a rotation by 20° about the image centre.
# 2. Warp the moving image and its labels with it and show them.
# 3. Check with `jacobian_det` that $J = 1$ everywhere and with `folding_percent` that nothing folds.
# 4. Which way does the image turn on screen, and why? (Remember: warping pulls.)
#
# <details><summary>Hint</summary>
#
# $\phi(x) = c + R(x - c)$, so $u(x) = \phi(x) - x = (R - \mathrm I)(x - c)$: call `affine_disp(R - torch.eye(2))`.
# Labels are warped with `warp(seg, u, mode="nearest")`.
#
# </details>

# %% tags=["exercise"]
u_rot = None  # TODO: affine_disp(R - I) for the 20° rotation matrix R
print("TODO" if u_rot is None else jacobian_det(u_rot).mean())

# %% tags=["solution"] jupyter={"source_hidden": true}
import math

t = math.radians(20)
R = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
u_rot = affine_disp(R - torch.eye(2))
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), constrained_layout=True)
viz.show_labels(axes[0], warp(moving, u_rot), warp(sample["moving_seg"], u_rot, mode="nearest"), "rotated",
                names=names)
viz.plot_grid(axes[1], u_rot, step=10)
viz.plot_jacobian(axes[2], u_rot, colorbar=True)
plt.show()
J = jacobian_det(u_rot)
print(f"J in [{J.min():.5f}, {J.max():.5f}], folding {folding_percent(u_rot).item():.1f} %")
assert torch.allclose(J, torch.ones_like(J), atol=1e-4)  # det R = cos² + sin² = 1
assert folding_percent(u_rot).item() == 0.0

# %% [markdown]
# Axis 0 points down and axis 1 right, so $R$ turns the *sampling positions* by +20° from the row axis towards the
# column axis, which on screen is counter-clockwise. Because warping pulls, the image content turns the opposite
# way: clockwise. Use $R^\top$ (angle -20°) to turn the image counter-clockwise.
#
# ### Exercise 3 (★★)
#
# **Dice by hand.** Compute the Dice of white matter (label 3) between `sample["fixed_seg"]` and
# `sample["moving_seg"]` (no registration) with plain `torch` operations, and check that it matches
# `before["dice_3"]` from `pair_metrics`.

# %% tags=["exercise"]
dice_wm = None  # TODO: 2 |A ∩ B| / (|A| + |B|) for A = fixed_seg == 3, B = moving_seg == 3
print("TODO" if dice_wm is None else dice_wm)

# %% tags=["solution"] jupyter={"source_hidden": true}
A = sample["fixed_seg"] == 3
B = sample["moving_seg"] == 3
dice_wm = (2 * (A & B).sum() / (A.sum() + B.sum())).item()
print(f"white matter Dice by hand {dice_wm:.4f}, pair_metrics {before['dice_3']:.4f}")
assert abs(dice_wm - before["dice_3"]) < 1e-6

# %% [markdown]
# ### Exercise 4 (★★★)
#
# **Scaling and squaring by hand.** `random_deformation(shape, ..., steps=N)` draws a velocity with
# `random_velocity(shape, ...)` (same arguments) and integrates it. Write the integration yourself with `warp`:
# start from $u = v / 2^N$ and compose the map with itself $N$ times. Composing $\phi_a = \mathrm{Id} + a$ after
# $\phi_b = \mathrm{Id} + b$ gives $\phi_a(\phi_b(x)) = x + b(x) + a(x + b(x))$, i.e. the displacement
# `b + warp(a, b)`. Check that your field matches `random_deformation` for strength 12, smoothness 8, seed 3,
# 7 steps, and compare its folding with that of the raw velocity.

# %% tags=["exercise"]
def integrate(v: torch.Tensor, n: int) -> torch.Tensor:
    """TODO: scaling and squaring with n squarings."""
    return None


print("TODO" if integrate(random_velocity(shape, 12.0, 8.0, seed=3), 7) is None else "done")

# %% tags=["solution"] jupyter={"source_hidden": true}
def integrate(v: torch.Tensor, n: int) -> torch.Tensor:
    u = v / 2 ** n
    for _ in range(n):
        u = u + warp(u, u)  # phi o phi: displacement u(x) + u(x + u(x))
    return u


v = random_velocity(shape, 12.0, 8.0, seed=3)
mine = integrate(v, 7)
library = random_deformation(shape, 12.0, 8.0, seed=3, steps=7)
print(f"max |mine - library| = {(mine - library).abs().max():.2e} voxels; folding: raw velocity "
      f"{folding_percent(v).item():.2f} %, integrated {folding_percent(mine).item():.2f} %")
assert torch.allclose(mine, library, atol=1e-4)
assert folding_percent(mine).item() < folding_percent(v).item()

# %% [markdown]
# ## References
#
# * Zhang, Y., Zhao, Y., Tao, Q.: Bridging Classical and Learning-based Iterative Registration through Deep
#   Equilibrium Models. (the DEQReg paper; its Eq. 1 is section 1's energy, its folding metric section 4's)
# * [15] Hering, A., Hansen, L., Mok, T.C., Chung, A.C., Siebert, H., Häger, S., Lange, A., Kuckertz, S., Heldmann,
#   S., Shao, W., et al.: Learn2reg: comprehensive multi-task medical image registration challenge, dataset and
#   evaluation in the era of deep learning. IEEE Transactions on Medical Imaging 42(3), 697–712 (2022)
#   (the warp, unit and axis conventions of section 1, and the metrics)
# * [2] Ashburner, J.: A fast diffeomorphic image registration algorithm. Neuroimage 38(1), 95–113 (2007)
#   (scaling and squaring of a stationary velocity field, section 5)
#
# Numbers in brackets are those of the DEQReg paper's reference list.
#
# ## Summary
#
# * Registration finds a displacement $u$ on the fixed grid; `warp(moving, disp)` **pulls**:
#   $(I_m\circ\phi)(x) = I_m(x + u(x))$, with `disp` in **voxels** and channels in **array-axis order**.
# * The **Jacobian determinant** $J = \det(\mathrm I + \nabla u)$ measures local area change; $J \le 0$ is
#   **folding**, reported as a % of voxels. For an affine field it is the constant $\det(\mathrm I + A)$, which the
#   library reproduces exactly.
# * **Dice** measures label overlap: 0.47 (mean over CSF, grey and white matter) for the shipped pair before any
#   registration.
# * Strong random fields fold; **integrating a velocity** (scaling and squaring) keeps the deformation (almost)
#   invertible.
# * Next: `01_classical_registration` finds $u$ for the brain pair by gradient descent on Eq. 1, and defines the
#   remaining metrics.
#
# ## Checks (for CI)
#
# The assertions below keep this notebook's claims true when the library changes; a student can skip them.

# %%
assert before["folding_pct"] == 0.0 and 0.3 < before["dice"] < 0.7
print(explorer.result)
assert explorer.result["steps"] == 0 and explorer.result["strength"] == 4.0
# No folding for gentle deformations; plenty for strong raw fields; integration removes (almost) all of it.
assert curves[0][0] == 0.0 and curves[0][1] == 0.0
assert curves[0][-1] > 10.0
assert curves[7][-1] < 0.1 * curves[0][-1]
