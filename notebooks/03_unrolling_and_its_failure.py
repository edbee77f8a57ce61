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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deqreg-lite/deqreg_lite/blob/main/notebooks/03_unrolling_and_its_failure.ipynb)
#
# # 03 · Unrolling, and how it fails
#
# **Goal.** Learn an *update* instead of a displacement, and repeat it: the unrolled network of Eq. 3,
#
# $$\boldsymbol\phi_{t+1} = \boldsymbol\phi_t + f_\theta\big([I_f,\; I_m\circ\boldsymbol\phi_t,\; \boldsymbol\phi_t]\big),
# \qquad \boldsymbol\phi_0 = 0,\quad t = 0, \dots, T-1, \qquad\text{(Eq. 3)}$$
#
# trained with backpropagation through time (BPTT) through $T = 3$ steps. It looks like a learned optimiser, so
# running it for *more* steps at test time should help, like more iterations of gradient descent in notebook `01`.
# You will see that it does not: Dice peaks just after the trained $T$ and then collapses, while the field folds
# (Figure 1 of the DEQReg paper). You will also measure the other problem of BPTT: its training memory grows
# linearly with $T$ (Figure 2c). Both motivate DEQReg (notebook `04` onwards).
#
# Runs in under a minute on a laptop CPU; `DEQREG_MODE=quick` uses fewer pairs.

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
import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display

from deqreg_lite import viz
from deqreg_lite.config import by_mode, mode, seed_everything
from deqreg_lite.datasets import load_sample
from deqreg_lite.datasets.pairs import PairDataset
from deqreg_lite.evaluate import pair_metrics, step_sweep, trained_vs_best, training_memory
from deqreg_lite.methods import RegistrationLoss, build_method
from deqreg_lite.pretrained import load_pretrained
from deqreg_lite.warp import warp
from deqreg_lite.widgets import control

seed_everything(0)
torch.set_num_threads(1)  # images this small run as fast on one CPU thread, and stay fast on a busy machine
SWEEP_STEPS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96]   # inference steps (the trained T = 3 is one)
N_HELDOUT = by_mode(quick=2, default=8)          # held-out generated pairs, besides the real pair
MEMORY_TS = by_mode(quick=[1, 2, 4], default=[1, 2, 4, 8])     # BPTT lengths for the memory measurement
MEMORY_SIZE = (80, 96)                           # the size at which the models train
print(f"mode {mode()!r}: steps {SWEEP_STEPS}, real pair + {N_HELDOUT} held-out pairs, memory for T in {MEMORY_TS}")

# %% [markdown]
# ## 1. The unrolled update, by hand
#
# `load_pretrained("unrolling")` is a U-Net $f_\theta$ with $2 + 2$ input channels (fixed, warped moving, and the
# two components of the current displacement) trained with $T = 3$ (see `data/checkpoints/README.md`). Like every
# pretrained model it works at 80 x 96 internally. We write Eq. 3 by hand with the bare 80 x 96 method
# (`unrolling.method`) and check it against the library.

# %%
sample = load_sample("brain2d")
fixed, moving = sample["fixed"], sample["moving"]
unrolling = load_pretrained("unrolling")
T = unrolling.trained_steps
net = unrolling.method.net
f80, m80 = unrolling.downsample(fixed, moving)        # the images as the method sees them (80 x 96)

with torch.no_grad():
    phi = torch.zeros(1, 2, *f80.shape[2:])
    for t in range(T):
        phi = phi + net(torch.cat([f80, warp(m80, phi), phi], dim=1))   # Eq. 3
    library = unrolling.method(f80, m80).disp
print(f"T = {T}; max |phi_hand - phi_library| = {(phi - library).abs().max():.2e} voxels (80 x 96 grid)")
assert T == 3
assert torch.allclose(phi, library, atol=1e-4)

# %% [markdown]
# Training runs these $T$ steps with the graph kept, computes the loss (1 - LNCC + λ·diffusion) on
# $\boldsymbol\phi_T$ only and back-propagates through all of them: BPTT. Nothing in this loss says what should
# happen at step $T + 1$.
#
# ## 2. More steps at test time (Figure 1)
#
# `step_sweep` registers each pair once with 96 steps and `return_states=True`, then scores the state after each
# step count in `SWEEP_STEPS`. We sweep the real pair and a few held-out generated pairs.

# %%
pairs = {"real": sample}
val = PairDataset("val", N_HELDOUT + 1, (160, 192))
for i in range(1, N_HELDOUT + 1):
    pairs[f"held-out {i}"] = val[i]

sweeps = {}
with torch.no_grad():
    for name, s in pairs.items():
        sweeps[name] = step_sweep(unrolling, [s], steps=SWEEP_STEPS)
        sw = sweeps[name]
        print(f"{name:12s} Dice: {sw['dice'][0]:.3f} (1 step), {sw['dice'][2]:.3f} (3), {max(sw['dice']):.3f} "
              f"(best, {sw['steps'][int(np.argmax(sw['dice']))]} steps), {sw['dice'][-1]:.3f} (96); "
              f"folding {sw['folding_pct'][2]:.2f} % (3) -> {sw['folding_pct'][-1]:.1f} % (96)")

steps = np.array(SWEEP_STEPS)
dice = {k: np.array(v["dice"]) for k, v in sweeps.items()}
fold = {k: np.array(v["folding_pct"]) for k, v in sweeps.items()}
heldout = [k for k in pairs if k != "real"]
dice_mean, fold_mean = np.mean([dice[k] for k in pairs], axis=0), np.mean([fold[k] for k in pairs], axis=0)

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
for ax, values, mean, label in ((ax1, dice, dice_mean, "mean Dice"), (ax2, fold, fold_mean, "folding %")):
    for k in heldout:
        ax.semilogx(steps, values[k], "-", color="gray", alpha=0.4, lw=1)
    ax.semilogx(steps, values["real"], "o-", color="C0", label="real pair")
    ax.semilogx(steps, mean, "s--", color="C3", label=f"mean of {len(pairs)} pairs")
    ax.axvline(T, color="k", ls=":", label=f"trained T = {T}")
    ax.set_xlabel("inference steps")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
ax1.axhline(pair_metrics(sample, torch.zeros(1, 2, *fixed.shape[2:]))["dice"], color="C0", ls="--", lw=0.8)
ax1.set_title("Dice peaks just after T, then collapses (gray: held-out pairs)")
ax2.set_title("folding grows without bound")
plt.show()

# %% [markdown]
# Table 2 of the paper compares the trained step count with the best one (`trained_vs_best`):

# %%
tvb = trained_vs_best(sweeps["real"])
print({k: round(v, 3) if isinstance(v, float) else v for k, v in tvb.items()})
real_dice, real_fold = dice["real"], fold["real"]
i3, i96 = SWEEP_STEPS.index(3), SWEEP_STEPS.index(96)
print(f"real pair: Dice {real_dice[i3]:.3f} at 3 steps, best {real_dice.max():.3f}, {real_dice[i96]:.3f} at 96; "
      f"folding {real_fold[i3]:.2f} % -> {real_fold[i96]:.1f} %")
print(f"mean of {len(pairs)} pairs: Dice {dice_mean[i3]:.3f} at 3, best {dice_mean.max():.3f}, {dice_mean[i96]:.3f} "
      f"at 96; folding {fold_mean[i3]:.2f} % -> {fold_mean[i96]:.1f} %")

for name in pairs:
    assert dice[name][i96] < dice[name].max() - 0.1, f"{name}: Dice at 96 steps should be far below its best"
    assert fold[name][i96] >= 2 * max(fold[name][i3], 0.1), f"{name}: folding at 96 should be >= 2x that at 3"
assert tvb["trained_steps"] == 3 and tvb["best_steps"] > 3
assert real_fold[i96] > 10.0  # about 49 %: the field is no longer a deformation anyone would accept

# %% [markdown]
# ## 3. What goes wrong: 3 steps against 96
#
# The warped image and the Jacobian determinant after the trained 3 steps and after 96 (black: folded,
# $\det J \le 0$). We run the real pair once with 96 steps and keep every state, for this figure and the slider below.

# %%
with torch.no_grad():
    run96 = unrolling(fixed, moving, steps=96, return_states=True)
states = dict(zip(run96.state_steps, run96.states))

fig, axes = plt.subplots(2, 3, figsize=(12, 7.5), constrained_layout=True)
for row, t in enumerate((3, 96)):
    m = pair_metrics(sample, states[t])
    viz.show_image(axes[row, 0], warp(moving, states[t]), f"warped moving, {t} steps")
    viz.plot_grid(axes[row, 1], states[t], title=f"grid, {t} steps")
    im = viz.plot_jacobian(axes[row, 2], states[t],
                           title=f"det J: Dice {m['dice']:.3f}, folding {m['folding_pct']:.1f} %")
    fig.colorbar(im, ax=axes[row, 2], shrink=0.8)
plt.show()

# %% [markdown]
# The learned update is not a descent direction of any energy: it was only ever asked to make $\boldsymbol\phi_3$
# good. Applied again and again it keeps pushing, and nothing makes the pushes shrink. The relative update
# $\|\boldsymbol\phi_{t+1} - \boldsymbol\phi_t\| / \|\boldsymbol\phi_{t+1}\|$ (`info["residuals"]`) shows it: it
# falls for a few steps and then stalls at a few percent, so the iteration never converges to a fixed point.

# %%
residuals = np.array(run96.info["residuals"])
fig, ax = plt.subplots(figsize=(6.5, 3.6), constrained_layout=True)
ax.loglog(np.arange(1, len(residuals) + 1), residuals, "C0-")
ax.axvline(T, color="k", ls=":", label=f"trained T = {T}")
ax.set_xlabel("step t")
ax.set_ylabel("relative update")
ax.set_title("the update does not vanish: no fixed point")
ax.grid(alpha=0.3, which="both")
ax.legend()
plt.show()
print(f"relative update at steps 3, 12, 48, 96: {residuals[2]:.3f}, {residuals[11]:.3f}, {residuals[47]:.3f}, "
      f"{residuals[95]:.3f}")
assert residuals[95] > 0.01  # compare DEQReg in notebook 05: its residual keeps falling

# %% [markdown]
# ## 4. Step through it yourself
#
# Move the slider over the number of inference steps (the states of the run above; nothing is recomputed). Watch
# the brain's outline sharpen up to about 4-8 steps, then tear.

# %%
def show_step(t: int) -> dict:
    disp = states[t]
    m = pair_metrics(sample, disp)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), constrained_layout=True)
    viz.show_labels(axes[0], warp(moving, disp), warp(sample["moving_seg"], disp, mode="nearest"),
                    "warped moving + its labels")
    viz.plot_grid(axes[1], disp, title="deformed grid")
    im = viz.plot_jacobian(axes[2], disp, title=f"det J, folding {m['folding_pct']:.2f} %")
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    fig.suptitle(f"{t} steps (trained with {T}): Dice {m['dice']:.3f}")
    display(fig)
    plt.close(fig)
    return {"steps": t, "dice": m["dice"], "folding_pct": m["folding_pct"]}


step_widget = W.interactive(show_step, t=W.IntSlider(value=T, min=1, max=96, description="inference steps",
                                                     style={"description_width": "initial"},
                                                     layout=W.Layout(width="420px"), continuous_update=False))
step_widget

# %% [markdown]
# The widget keeps the numbers it shows in `.result`; setting the slider re-runs it:

# %%
seen = {}
for t in (3, 96):
    control(step_widget, "t").value = t
    seen[t] = step_widget.result
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in seen[t].items()})
control(step_widget, "t").value = T
assert abs(seen[3]["dice"] - real_dice[i3]) < 1e-6 and seen[96]["dice"] < seen[3]["dice"]

# %% [markdown]
# ## 5. The memory of BPTT grows with T (Figure 2c)
#
# To back-propagate through $T$ steps, autograd keeps the activations of all $T$ U-Net passes until the backward
# pass. `training_memory` runs one training step and records the peak of the bytes saved for backward (on the CPU;
# on a GPU it would report the CUDA peak). We measure fresh (untrained) models at 80 x 96, with VoxelMorph (one
# U-Net pass) as reference.

# %%
loss_fn = RegistrationLoss(lam=1.0)
f_small = torch.nn.functional.interpolate(fixed, size=MEMORY_SIZE, mode="bilinear", align_corners=True)
m_small = torch.nn.functional.interpolate(moving, size=MEMORY_SIZE, mode="bilinear", align_corners=True)
memory_mb = {}
for t in MEMORY_TS:
    memory_mb[t] = training_memory(build_method("unrolling", 2, T=t), f_small, m_small, loss_fn) / 2**20
    print(f"Unrolling, T = {t}: {memory_mb[t]:.1f} MB")
voxelmorph_mb = training_memory(build_method("voxelmorph", 2), f_small, m_small, loss_fn) / 2**20
print(f"VoxelMorph: {voxelmorph_mb:.1f} MB")

ts = np.array(MEMORY_TS)
mem = np.array([memory_mb[t] for t in MEMORY_TS])
slope, intercept = np.polyfit(ts, mem, 1)
fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
ax.plot(ts, mem, "o-", label="Unrolling (BPTT through T steps)")
ax.plot(ts, slope * ts + intercept, ":", color="gray", label=f"fit: {slope:.1f} MB per step + {intercept:.1f} MB")
ax.axhline(voxelmorph_mb, color="C2", ls="--", label="VoxelMorph (one pass)")
ax.set_xlabel("T (training steps)")
ax.set_ylabel("saved for backward (MB)")
ax.set_title(f"training memory at {MEMORY_SIZE[0]} x {MEMORY_SIZE[1]}")
ax.set_xticks(ts)
ax.grid(alpha=0.3)
ax.legend()
plt.show()

assert all(b > a for a, b in zip(mem, mem[1:])), "memory should grow with T"
assert mem[-1] / mem[0] > 0.7 * ts[-1] / ts[0], "and about linearly"
assert abs(memory_mb[1] - voxelmorph_mb) / voxelmorph_mb < 0.2  # T = 1 costs about one VoxelMorph pass

# %% [markdown]
# Each extra step costs one more U-Net's worth of activations. In 3D, at the paper's resolution, that is why
# unrolled methods are trained with only a handful of steps, and why the few steps they are trained with are all
# they can be trusted with at test time. DEQReg trains at a constant memory cost, whatever the number of steps
# (notebook `04`, section on BPTT vs DEQ memory).
#
# ## Exercise
#
# **Can the update tell you when to stop?** On the real pair the best Dice came a few steps after $T$. Without
# labels you cannot read Dice off at test time, but you can watch the relative update `info["residuals"]`.
#
# 1. For each pair in `pairs`, find the step with the best Dice (`sweeps[name]`), and the first step at which the
#    relative update falls below 0.1, and below 0.05 (run `unrolling(s["fixed"], s["moving"], steps=96)` and read
#    `info["residuals"]`).
# 2. Would "stop when the update is small" be a good rule? What would a good rule need from the iteration?
#
# <details><summary>Solution</summary>
#
# ```python
# for name, s in pairs.items():
#     with torch.no_grad():
#         r = np.array(unrolling(s["fixed"], s["moving"], steps=96).info["residuals"])
#     best = sweeps[name]["steps"][int(np.argmax(sweeps[name]["dice"]))]
#     below = {tol: int(np.argmax(r < tol)) + 1 if (r < tol).any() else None for tol in (0.1, 0.05)}
#     print(f"{name}: best Dice at {best} steps; update < 0.1 at {below[0.1]}, < 0.05 at {below[0.05]}; "
#           f"min update {r.min():.3f}")
# ```
#
# The best Dice comes at 4-8 steps on every pair. The update falls below 0.1 around step 5-6, which happens to be
# near the best step, but that is a coincidence of this checkpoint: nothing in training ties the size of the update
# to the quality of the field. Below 0.05 it gets erratically, anywhere from step 7 to step 80 depending on the pair,
# long after the best step and while the field is tearing; its minimum over 96 steps is 2-4 %, never near zero.
# A stopping rule needs an iteration that
# *converges*: one whose update shrinks to zero at a good answer, so that "the update is small" means "we are
# there". Classical gradient descent has that (the gradient vanishes at the optimum); unrolling does not. DEQReg
# trains the network so that its fixed point, where the update vanishes, is the good answer.
#
# </details>
#
# ## Summary
#
# * Unrolling (Eq. 3) repeats one learned update $T = 3$ times and trains it with BPTT, loss on the last step only.
# * Run for longer at test time it fails: on the real pair Dice goes from 0.69 at 3 steps (best ≈ 0.69 at 4) to
#   0.14 at 96 steps, and folding from 0.1 % to about 49 %. The same happens on every held-out pair (Figure 1).
# * The reason: the learned update is not trained to vanish anywhere, so the iteration has no fixed point; its
#   relative update stalls at a few percent.
# * BPTT's training memory grows linearly with $T$ (here about one VoxelMorph pass per step, Figure 2c).
# * DEQReg fixes both: it trains the update so that its *fixed point* is the answer (stable for any number of
#   steps) and back-propagates through the fixed point only (constant memory). Notebooks `04` and `05`.
