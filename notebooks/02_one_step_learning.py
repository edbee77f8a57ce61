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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deqreg-lite/deqreg_lite/blob/main/notebooks/02_one_step_learning.ipynb)
#
# # 02 · One-step learning: VoxelMorph
#
# **Goal.** Replace the hundreds of optimiser iterations of notebook `01` by **one pass of a network**. VoxelMorph
# learns a U-Net that maps the pair $[I_f, I_m]$ straight to the displacement $\mathbf u$. It is trained over many
# pairs with the *same* energy that classical registration minimises for one pair (1 - LNCC + λ·diffusion), so at
# test time it gives an approximate answer for a new pair without any optimisation: *amortised* registration.
# You will check the training loss by hand, compare the pretrained VoxelMorph with the classical result of `01` on
# the shipped brain pair (Dice, folding and time), train a small VoxelMorph yourself, and see how it does on
# held-out pairs.
#
# Quick mode (`DEQREG_MODE=quick`) loads the pretrained checkpoint only; the default mode also trains a small model
# from scratch for a few hundred iterations (a minute or two on a laptop CPU).

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

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from deqreg_lite import viz
from deqreg_lite.classical import register
from deqreg_lite.config import by_mode, mode, seed_everything
from deqreg_lite.datasets import load_sample
from deqreg_lite.datasets.pairs import PairDataset
from deqreg_lite.evaluate import evaluate, format_table, identity_method, pair_metrics
from deqreg_lite.losses import Objective, diffusion, lncc
from deqreg_lite.methods import build_method
from deqreg_lite.pretrained import HalfResolution, load_pretrained
from deqreg_lite.train import Trainer
from deqreg_lite.warp import warp

seed_everything(0)
torch.set_num_threads(1)  # images this small run as fast on one CPU thread, and stay fast on a busy machine
LAM_TRAIN = 1.0                                  # λ of the training loss (the checkpoints' setting)
LAM_CLASSICAL = 3.0                              # λ of notebook 01's classical registration
CLASSICAL_ITERATIONS = by_mode(quick=60, default=150)   # Adam iterations per level (2 levels), as in 01
TRAIN_FROM_SCRATCH = by_mode(quick=False, default=True)  # section 4: train a small VoxelMorph yourself
TRAIN_ITERATIONS = by_mode(quick=30, default=600)
N_VAL = by_mode(quick=3, default=9)              # validation pairs in section 5 (item 0 is the real pair)
print(f"mode {mode()!r}: classical 2 levels x {CLASSICAL_ITERATIONS} iterations, "
      f"train from scratch: {TRAIN_FROM_SCRATCH} ({TRAIN_ITERATIONS} iterations), {N_VAL} validation pairs")

# %% [markdown]
# ## 1. The idea: learn the map from a pair to its displacement
#
# Classical registration solves, for *each* pair, $\mathbf u^* = \arg\min_{\mathbf u} E(\mathbf u; I_f, I_m)$ with
# Eq. 1. VoxelMorph instead learns a function $\mathbf u = g_\theta(I_f, I_m)$ (a U-Net with two input channels and
# one output channel per axis) and trains $\theta$ to minimise the *average* energy over a training set of pairs:
#
# $$\min_\theta\;\mathbb E_{(I_f, I_m)}\Big[\big(1 - \mathrm{LNCC}(I_f, I_m\circ(\mathrm{id} + g_\theta))\big)
# + \lambda\,\mathcal L_{\text{diff}}\big(g_\theta\big)\Big].$$
#
# No ground-truth deformations are needed (unsupervised). The training loss is the energy of notebook `01`, the same
# `Objective("lncc", "diffusion", lam=1.0)` (the learned methods' `RegistrationLoss(lam=1.0)` is this class under its
# training name), with the displacement in voxels. Let us check it by hand on the pretrained model's output.
#
# The pretrained models work at 80 x 96 internally (`HalfResolution`): the 160 x 192 images are downsampled, the
# network runs there, and the displacement is brought back to 160 x 192 (in voxels of that grid).

# %%
sample = load_sample("brain2d")
fixed, moving = sample["fixed"], sample["moving"]
voxelmorph = load_pretrained("voxelmorph")
print(voxelmorph)
print(f"{sum(p.numel() for p in voxelmorph.parameters()):,} parameters; trained steps: {voxelmorph.trained_steps}")

loss_fn = Objective("lncc", "diffusion", lam=LAM_TRAIN)   # the training loss: E of Eq. 1, as in notebook 01
with torch.no_grad():
    disp = voxelmorph(fixed, moving).disp
    energy, sim, reg = loss_fn.terms(fixed, moving, disp)
    by_hand = (1 - lncc(fixed, warp(moving, disp), win=5)) + LAM_TRAIN * diffusion(disp)
print(f"loss {energy:.4f} = (1 - LNCC) {sim:.4f} + λ·diffusion {reg:.4f}; by hand {by_hand:.4f}")
assert torch.allclose(by_hand, energy)
assert disp.shape == (1, 2, *fixed.shape[2:])

# %% [markdown]
# ## 2. One pass against hundreds of iterations
#
# The same pair three ways: no registration (identity), the classical registration of notebook `01` (Adam, λ = 3,
# two levels), and one VoxelMorph pass. We time the network a few times and keep the fastest run (the first call
# pays one-off start-up costs).

# %%
classical = register(fixed, moving, lam=LAM_CLASSICAL, iterations=CLASSICAL_ITERATIONS, levels=2)
print(f"classical: {2 * CLASSICAL_ITERATIONS} iterations in {classical.time:.2f} s")

vm_times = []
with torch.no_grad():
    for _ in range(3):
        t0 = time.perf_counter()
        vm_result = voxelmorph(fixed, moving)
        vm_times.append(time.perf_counter() - t0)
vm_time = min(vm_times)

rows = {
    "identity (u = 0)": {**pair_metrics(sample, torch.zeros_like(disp)), "time_s": 0.0},
    f"classical (λ={LAM_CLASSICAL:g}, {2 * CLASSICAL_ITERATIONS} its)": {**pair_metrics(sample, classical.disp),
                                                                          "time_s": classical.time},
    "VoxelMorph (1 pass)": {**pair_metrics(sample, vm_result.disp), "time_s": vm_time},
}
print(format_table(rows, ["dice", "hd95", "folding_pct", "sdlogj", "time_s"],
                   {"dice": "Dice", "hd95": "HD95 mm", "folding_pct": "fold %", "sdlogj": "SDlogJ",
                    "time_s": "time s"}))
ident, classic, vm = rows.values()
print(f"speed-up of one pass over the optimisation: {classical.time / vm_time:.0f}x")

assert vm["dice"] > ident["dice"] + 0.1, "VoxelMorph should beat the identity clearly (0.65 vs 0.47)"
assert vm["folding_pct"] < 1.0
assert vm_time < classical.time / 10, "one pass should be far faster than the optimisation"

# %% [markdown]
# On this pair VoxelMorph reaches about the classical Dice (≈ 0.65 against ≈ 0.64-0.65) with little folding, in a
# few hundredths of a second instead of seconds. Two caveats keep this honest:
#
# * the network runs at half resolution, so part of the speed comes from the 4x smaller grid;
# * the classical optimiser is *tuned for this pair* and will get better with more iterations, while the network is
#   fixed after training: its quality depends on how close a new pair is to its training pairs (section 5).

# %%
fig = viz.registration_figure(fixed, moving, vm_result.disp,
                              title=f"VoxelMorph, one pass: Dice {ident['dice']:.3f} → {vm['dice']:.3f}, "
                                    f"folding {vm['folding_pct']:.2f} %, {1000 * vm_time:.0f} ms")
plt.show()

# %% [markdown]
# ## 3. Where the two fields differ
#
# Both fields minimise (nearly) the same energy, but one is the optimum for this pair and the other is a learned
# guess. The difference map shows where the network's guess departs from the optimiser's answer.

# %%
diff = (vm_result.disp - classical.disp).norm(dim=1)[0]
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), constrained_layout=True)
viz.plot_grid(axes[0], classical.disp, title="classical")
viz.plot_grid(axes[1], vm_result.disp, title="VoxelMorph")
im = axes[2].imshow(diff.numpy(), cmap="magma")
axes[2].set_title("|u_VoxelMorph - u_classical| (voxels)")
axes[2].axis("off")
fig.colorbar(im, ax=axes[2], shrink=0.8)
plt.show()
print(f"mean |Δu| = {diff.mean():.2f} voxels, 95th percentile {diff.quantile(0.95):.2f} voxels; "
      f"mean |u| classical {classical.disp.norm(dim=1).mean():.2f}, VoxelMorph {vm_result.disp.norm(dim=1).mean():.2f}")

# %% [markdown]
# ## 4. Train a small VoxelMorph yourself
#
# `Trainer` runs AdamW over a `PairDataset` of generated pairs (random smooth deformations and intensity changes of
# the two shipped brain slices). We train at 80 x 96, the size at which the checkpoint was trained (it used 1500
# iterations; we take a few hundred). Each iteration: one pair, one forward pass, the loss of section 1, one
# backward pass, one optimiser step. Set `TRAIN_FROM_SCRATCH = True` to run this in quick mode too.

# %%
scratch = None
if TRAIN_FROM_SCRATCH:
    train_pairs = PairDataset("train", 4000, (80, 96), kinds=("brain", "inter"), seed=0)
    scratch = build_method("voxelmorph", 2)
    trainer = Trainer(scratch, loss_fn, train_pairs, lr=1e-3, iterations=TRAIN_ITERATIONS, log_every=10,
                      seed=0, device="cpu", progress=False)
    t0 = time.perf_counter()
    for until in range(100, TRAIN_ITERATIONS + 100, 100):  # in chunks, to print progress
        trainer.fit(until=min(until, TRAIN_ITERATIONS))
        print(f"iteration {trainer.iteration}: loss {trainer.history[-1]['loss']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)")
    rows_train = [r for r in trainer.history if r["split"] == "train"]
    its, losses = [r["iteration"] for r in rows_train], [r["loss"] for r in rows_train]

    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    ax.plot(its, losses, "o-", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (mean of 10 iterations)")
    ax.set_title("VoxelMorph from scratch: 1 - LNCC + λ·diffusion")
    ax.grid(alpha=0.3)
    plt.show()
    assert losses[-1] < losses[0], "the training loss should fall"

    scratch_wrapped = HalfResolution(scratch.eval())  # take 160 x 192 images, like the pretrained model
    with torch.no_grad():
        m = pair_metrics(sample, scratch_wrapped(fixed, moving).disp)
    print(f"after {TRAIN_ITERATIONS} iterations: Dice {m['dice']:.3f}, folding {m['folding_pct']:.2f} % "
          f"(pretrained, 1500 iterations: {vm['dice']:.3f}; identity {ident['dice']:.3f})")
    assert m["dice"] > ident["dice"] + 0.02, "a few hundred iterations should already beat the identity"
else:
    print("skipped (quick mode); set TRAIN_FROM_SCRATCH = True to train")

# %% [markdown]
# The loss is noisy (every iteration sees a different pair) and falls slowly. In our runs 300 iterations gave a
# Dice of about 0.50 on the shipped pair, 600 about 0.53-0.58 and 1000 about 0.64 (identity 0.47; the checkpoint, 1500
# iterations: 0.65), at roughly 30 ms per iteration on one CPU thread. This is the price of amortisation: training
# is expensive once (the paper trains far longer, on 3D volumes), inference is cheap ever after.

# %% [markdown]
# ## 5. Held-out pairs
#
# `PairDataset("val", n)` gives the real pair (item 0) plus generated pairs that the network never saw (unseen
# deformations and intensity changes of the same two brains). `evaluate` runs a method over them and scores each.

# %%
val_pairs = [PairDataset("val", N_VAL, (160, 192))[i] for i in range(N_VAL)]
tables = {}
for name, method in [("identity", identity_method), ("VoxelMorph", voxelmorph)]:
    tables[name] = evaluate(method, val_pairs, memory=False, hd95=False, name=name)
    print(f"{name}: done")
print(format_table({k: t.summary() for k, t in tables.items()}, ["n", "dice", "dice_std", "folding_pct", "time_s"],
                   {"dice": "Dice", "dice_std": "± std", "folding_pct": "fold %", "time_s": "time s"}))
per_pair_gain = np.array(tables["VoxelMorph"].values("dice")) - np.array(tables["identity"].values("dice"))
print("Dice gain over identity per pair:", np.round(per_pair_gain, 3))
assert (per_pair_gain > 0).all(), "VoxelMorph should improve every validation pair"

# %% [markdown]
# ## Exercise
#
# **Test-time fine-tuning.** The network is a good *starting point* for one pair, but it is not optimal for it.
# Fine-tune a copy of the pretrained VoxelMorph on the shipped pair alone (the training set is just that one
# pair) for 50 iterations and compare Dice and folding before and after.
#
# 1. Is the gain worth the time? Compare with the classical optimisation of section 2.
# 2. What happens to the fine-tuned network on the *other* validation pairs?
#
# Hint: `HalfResolution` wraps the 80 x 96 method in `voxelmorph.method`; train a `copy.deepcopy` of it on the pair
# downsampled to 80 x 96 (`torch.nn.functional.interpolate(..., size=(80, 96), mode="bilinear",
# align_corners=True)`), then wrap it again with `HalfResolution`.
#
# <details><summary>Solution</summary>
#
# ```python
# import copy
# import torch.nn.functional as F
#
# small = lambda x: F.interpolate(x, size=(80, 96), mode="bilinear", align_corners=True)
# pair80 = {"fixed": small(fixed), "moving": small(moving)}
# tuned = copy.deepcopy(voxelmorph.method)
# trainer = Trainer(tuned, loss_fn, pair80, lr=1e-4, iterations=50, device="cpu", progress=False)
# t0 = time.perf_counter(); trainer.fit(); print(f"{time.perf_counter() - t0:.1f} s")
# tuned_wrapped = HalfResolution(tuned.eval())
# with torch.no_grad():
#     print("this pair:", pair_metrics(sample, tuned_wrapped(fixed, moving).disp)["dice"])
# for name, m in [("pretrained", voxelmorph), ("fine-tuned", tuned_wrapped)]:
#     print(name, "on the other pairs:", evaluate(m, val_pairs[1:], memory=False, hd95=False).summary()["dice"])
# ```
#
# In our run the Dice on the shipped pair rose from 0.652 to 0.676 (lr 1e-4; 0.681 with lr 1e-3, with more
# folding). The loss is the same energy that the classical optimiser minimises, so this *is* an optimisation, of
# the weights rather than of $\mathbf u$, and its 50 iterations took about 2 s, as long as the classical
# registration: you are back to paying per pair. On the 8 other pairs it did not get worse (mean Dice 0.601 ->
# 0.610 with lr 1e-4, 0.604 with lr 1e-3): those pairs are deformations of the same two brains, so adapting to
# this pair helps them a little too. Fine-tuning longer, or testing on other subjects, is where over-fitting to
# one pair would show.
#
# </details>
#
# ## Summary
#
# * VoxelMorph learns $\mathbf u = g_\theta(I_f, I_m)$ by minimising the registration energy (1 - LNCC + λ·diffusion)
#   *on average over many pairs*; no ground-truth deformations are needed.
# * On the shipped pair one pass raises Dice from 0.47 (identity) to about 0.65, close to the classical
#   optimiser's result, with under 1 % folding, and hundreds of times faster than the optimisation.
# * The cost moves to training (1500 iterations for the checkpoint), and the result is a fixed guess: it cannot be
#   refined at test time without optimising again.
# * Next, notebook `03` repeats a learned *update* several times (unrolling, Eq. 3), a step from one-shot
#   prediction back towards iterative optimisation, and shows what goes wrong when it runs for longer than it was
#   trained for.
