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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deqreg-lite/deqreg_lite/blob/main/notebooks/05b_learned_optimisers.ipynb)
#
# # 05b · Learned optimisers: the paper's Unrolling, GraDIRN and RIIR
#
# **Goal.** Notebook 06 compares DEQReg with three *learned optimisers*, the baselines of the paper: **Unrolling**
# (its Figure 1 model: 3 resolution levels of 3 weight-tied steps), **GraDIRN** (ref. [22]: each step also sees,
# and takes, a step along the gradient of the similarity term, as gradient descent does) and **RIIR** (ref. [27]: a
# recurrent update with a hidden memory, trained with the weighted loss of **Eq. 4**). This notebook teaches the
# three before they are compared: you write each one's update by hand and assert that the library agrees, write
# Eq. 4 by hand and check it against what RIIR back-propagates, measure what training them costs in memory, and
# then run the shipped models for more steps than they were trained with, after predicting what you will see.
#
# **Learning objectives.** After this notebook you can
#
# * **write** the multi-level Unrolling and one GraDIRN step by hand (resampling between levels, the normalised
#   similarity gradient, the learned step size $\eta_l$) and **check** them against the library;
# * **write** the Eq. 4 loss with the paper's RIIR weights $w_t = 10^{(t-1)/(T-1)}$ and **verify** that its value and
#   its parameter gradients are what `RIIR.training_step` back-propagates;
# * **explain** what the three share with DEQReg (a learned update iterated from $u_0 = 0$, Eq. 3) and what they lack
#   (a fixed-point condition: nothing in their training says what happens after step $T$);
# * **measure** the training memory of backpropagation through time against the number of steps, live;
# * **measure** Dice, folding and the relative update of the shipped models past their trained steps, and **read**
#   such a sweep with its caveats.
#
# **Prerequisites.** Notebooks 01 (Eq. 1-2, gradient descent, metrics), 03 (Eq. 3, BPTT, the single-level
# Unrolling), 04b (the memory of BPTT against a DEQ) and 05 (DEQReg). Maths: the chain rule, gradient descent, a
# gated recurrent unit (GRU: $h' = (1 - z)\,h + z\,\tilde h$) at the level of "a learned, gated running average".
#
# **Study time.** Running it: about 1 minute in default mode (measured once, on a 2-core CPU that two training
# processes kept busy; quick mode about 40 s). Studying it: about 90 minutes for the reading, the hand-written
# checks and the four exercises (an estimate).
#
# **Notation.** The series' one notation:
#
# | symbol | meaning |
# |---|---|
# | $I_f$, $I_m$ | fixed and moving image |
# | $u$ | displacement field in voxels, shape `(B, ndim, *spatial)`; **the paper's $\phi$ is our $u$** |
# | $\phi = \mathrm{Id} + u$, $I_m\circ\phi$ | the deformation, the warped moving image |
# | $E(u) = \mathcal{L}_{sim}(I_f, I_m\circ\phi) + \lambda\,\mathcal{L}_{reg}(u)$ | the Eq. 1 energy |
# | $f_\theta(I_f, I_m\circ\phi, u)$ | the learned **update** (a U-Net); $f_{\theta,l}$ the one of level $l$ |
# | $g_\theta(u) = u + f_\theta(\dots)$ | the **update map** whose fixed point DEQReg solves (Eq. 5) |
# | $h_\theta(I_f, I_m)$ | the VoxelMorph network (predicts $u$ in one shot) |
# | $T$, $K$, $\tau$, $S$, $\gamma$ | unrolled / solver steps, phantom steps, damping, sampled states, their weight |
# | $\nabla_u \mathcal L_{sim}$, $\hat g$, $\eta_l$ | the similarity gradient, its normalised form (GraDIRN, RIIR), GraDIRN's step size at level $l$ |
# | $\mathbf h_t$, $w_t$ | RIIR's hidden state (not a map: a memory), the Eq. 4 weight of step $t$ |
#
# > **Conventions against the paper.**
# > * The paper writes $\phi$ for the displacement; we write $u$ (code: `disp`).
# > * λ is in voxel units here (λ = 1 for the shipped models) against the paper's 0.1 (OASIS), set in its own code's
# >   units; with displacements in voxels λ = 0.1 let unrolled models fold (notebook 01, `deqreg_lite/losses.py`).
# > * The shipped models are **2D, 80 x 96** (run on the 160 x 192 `brain2d` pair through `HalfResolution`); the
# >   paper's are 3D at 128³ (OASIS). Their numbers are not the paper's.
# > * GraDIRN's and RIIR's similarity gradient here is an *input* computed without a graph, by the chain rule with
# >   the moving image's central-difference gradient, with a strong LNCC variance floor (0.2 of the image's
# >   variance, against 1e-5 in the loss), normalised to max-abs 1 per pair, so $\eta_l$ is in voxels. The paper
# >   leaves these choices open; `deqreg_lite/methods/gradirn.py` says why they were made.
# > * The shipped `riir.pt` is trained with Eq. 4 as written, from scratch, 5000 steps; an earlier `riir.pt` was
# >   trained with $\sum_t w_t \mathcal L(u_t) / \sum_t w_t$ (normalised, no separate $\mathcal L(u_T)$), and
# >   exercise 2 computes both losses. The DEQ checkpoints are still being retrained
# >   (`data/checkpoints/README.md`), which is why this notebook prints its numbers rather than quoting them.
# > * Section 1 writes the paper's multi-level Unrolling by hand with untrained weights; the sweeps use its shipped
# >   checkpoint `unrolling_ml` beside the single-level $T = 3$ model of notebook 03.

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
import copy
import io

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from deqreg_lite import viz
from deqreg_lite.config import by_mode, mode, seed_everything
from deqreg_lite.datasets import load_sample
from deqreg_lite.datasets.pairs import PairDataset
from deqreg_lite.evaluate import pair_metrics, step_sweep, training_memory
from deqreg_lite.losses import Objective, lncc
from deqreg_lite.methods import RegistrationLoss, build_method
from deqreg_lite.methods.riir import riir_weights
from deqreg_lite.pretrained import available_pretrained, load_pretrained
from deqreg_lite.warp import resize_disp, resize_image, warp
from deqreg_lite.widgets import control

seed_everything(0)
torch.set_num_threads(1)  # small 2D networks: one thread is fastest, and stays fast on a busy machine
# Quick mode (CI) changes sizes and counts only, never the code path.
SWEEP_STEPS = by_mode(quick=[1, 2, 3, 6, 12], default=[1, 2, 3, 4, 6, 8, 12, 16, 24])  # inference steps
N_HELDOUT = by_mode(quick=0, default=4)          # held-out generated pairs besides the real one, in the sweep
MEMORY_TS = by_mode(quick=[1, 2, 4], default=[1, 2, 4, 8])   # BPTT lengths of the memory measurement
MEMORY_SIZE = (64, 64)                           # the memory measurement runs fresh models at this size
TINY = (32, 32)                                  # the Eq. 4 check runs at this size
MODELS = ["unrolling", "gradirn", "riir"] + (["unrolling_ml"] if available_pretrained().get("unrolling_ml") else [])
print(f"mode {mode()!r} (set DEQREG_MODE=quick for a faster run): steps {SWEEP_STEPS}, real pair + {N_HELDOUT} "
      f"held-out pairs; shipped models used: {MODELS}")

sample = load_sample("brain2d")
fixed, moving = sample["fixed"], sample["moving"]
models = {name: load_pretrained(name) for name in MODELS}
for name, model in models.items():
    print(f"{name:12s} {type(model.method).__name__:20s} trained steps {model.trained_steps}, "
          f"config {model.method.config()}")

# %% [markdown]
# ## 1. The paper's Unrolling: Eq. 3 at three resolutions
#
# Notebook 03 unrolled Eq. 3 at one resolution with $T = 3$. The paper's **Unrolling** baseline (its Sec. 3,
# "the vanilla version of GraDIRN without incorporating similarity gradients", and the model of its Figure 1) runs
# Eq. 3 **coarse to fine**: levels $l = 0, 1, 2$ at $1/4$, $1/2$ and full resolution, 3 weight-tied steps per
# level, one U-Net $f_{\theta,l}$ per level,
#
# $$u \leftarrow u + f_{\theta,l}\big([I_f^{(l)},\; I_m^{(l)}\circ\phi,\; u]\big) \quad\text{(3 times per level)},
# \qquad u \leftarrow \mathrm{up}(u)\ \text{between levels},$$
#
# where $I^{(l)}$ is the image blurred and resampled to level $l$ and $\mathrm{up}$ resamples the field to the
# next grid **and doubles its values** (a displacement of 1 coarse voxel is 2 fine voxels). At test time the paper
# varies the steps at the finest level only; the coarser levels always run their 3.
#
# We write that loop by hand. The U-Nets need sizes divisible by $2^4$; at $20 \times 24$ and $40 \times 48$ they are
# not, so `unet` pads the far end of each axis (replicating the border) and crops the output back.

# %%
def unet(net, x):
    """net(x) for any spatial size: pad the far end of each axis up to a multiple of 2**net.levels, crop back."""
    m = 2 ** net.levels
    h, w = x.shape[2:]
    y = net(F.pad(x, [0, (-w) % m, 0, (-h) % m], mode="replicate"))
    return y[:, :, :h, :w]


def multilevel_by_hand(method, fixed, moving, steps, grad_fn=None):
    """The multi-level loop of the paper's Unrolling (grad_fn None) or GraDIRN (section 2), written out.
    Returns the final field and the fields after each step of the finest level."""
    levels, per_level = method.levels, method.steps_per_level
    u, finest = None, []
    for l in range(levels):
        size = [max(2, s // 2 ** (levels - 1 - l)) for s in fixed.shape[2:]]
        f_l, m_l = resize_image(fixed, size), resize_image(moving, size)   # blur, then resample
        u = fixed.new_zeros(1, 2, *size) if u is None else resize_disp(u, size)  # values rescaled to the new grid
        for _ in range(steps if l == levels - 1 else per_level):
            if grad_fn is None:                                              # Eq. 3 at this level
                u = u + unet(method.nets[l], torch.cat([f_l, warp(m_l, u), u], dim=1))
            else:                                                            # GraDIRN (section 2)
                g = grad_fn(f_l, m_l, u)
                u = u + unet(method.nets[l], torch.cat([f_l, warp(m_l, u), u, g], dim=1)) - method.eta[l] * g
            if l == levels - 1:
                finest.append(u)
    return u, finest


if "unrolling_ml" in models:
    unrolling_ml = models["unrolling_ml"].method
else:  # not shipped yet: fresh weights, with last layers large enough that the updates are not ~0
    unrolling_ml = build_method("unrolling_ml", 2).eval()
    for net in unrolling_ml.nets:
        torch.nn.init.normal_(net.head.weight, std=0.01)
f80, m80 = models["unrolling"].downsample(fixed, moving)   # the pair as the 80 x 96 models see it

with torch.no_grad():
    hand, _ = multilevel_by_hand(unrolling_ml, f80, m80, steps=3)
    library = unrolling_ml(f80, m80)
print(f"levels {unrolling_ml.levels} x {unrolling_ml.steps_per_level} steps; network calls {library.info.nfe}; "
      f"max |u| {library.disp.abs().max():.3f} voxels; max |hand - library| {(hand - library.disp).abs().max():.2e}")
assert torch.allclose(hand, library.disp, atol=1e-5)

# %% [markdown]
# What the extra levels buy and cost, against notebook 03's single-level $T = 3$ model, with the same U-Net:
# the coarse levels see the images at $1/4$ and $1/2$ size, so a 3-voxel update there is a 12- or 6-voxel update
# at full size (large motion, cheaply), and a U-Net call at $1/4$ size costs about $1/16$ of one at full size.

# %%
single = models["unrolling"].method
sizes = [[max(2, s // 2 ** (unrolling_ml.levels - 1 - l)) for s in f80.shape[2:]] for l in range(unrolling_ml.levels)]
pixels = [h * w / (f80.shape[2] * f80.shape[3]) for h, w in sizes]
cost_ml = unrolling_ml.steps_per_level * sum(pixels)
n_params = lambda m: sum(p.numel() for p in m.parameters())
print(f"single level: {single.T} calls at {tuple(f80.shape[2:])}, {n_params(single):,} parameters")
print(f"three levels: {unrolling_ml.steps_per_level} calls at each of {[tuple(s) for s in sizes]}, "
      f"{n_params(unrolling_ml):,} parameters; cost {cost_ml:.2f} full-resolution calls")
assert abs(cost_ml - 3 * (1 / 16 + 1 / 4 + 1)) < 0.05

# %% [markdown]
# ## 2. GraDIRN: a learned step plus a gradient step
#
# Classical registration descends the Eq. 1 energy (Eq. 2): $u \leftarrow u - \eta\,\nabla_u E(u)$. GraDIRN [22]
# keeps that step and adds a learned one: each step at level $l$ computes the **similarity gradient**, gives it to
# the network as 2 more input channels, and also steps along it with a learned step size $\eta_l > 0$:
#
# $$\hat g = \frac{\nabla_u \mathcal L_{sim}(I_f, I_m\circ\phi)}{\max|\nabla_u \mathcal L_{sim}|}, \qquad
# u \leftarrow u + f_{\theta,l}\big([I_f,\; I_m\circ\phi,\; u,\; \hat g]\big) - \eta_l\,\hat g .$$
#
# Without the network this is normalised gradient descent on the similarity term; without $\hat g$ it is the
# Unrolling of section 1. $\eta_l = \mathrm{softplus}(\rho_l)$ is learned, one per level.
#
# **The similarity gradient, by hand.** The library's `Objective` computes $\nabla_u E$ exactly by autograd
# (`Objective(...).grad`, notebook 01). GraDIRN's input is computed differently, for stability (the conventions box):
# the chain rule $\partial \mathcal L_{sim} / \partial u(x) = \partial \mathcal L_{sim} / \partial w(x) \cdot
# \nabla I_m(x + u(x))$ with $w = I_m\circ\phi$, the moving image's gradient taken *before* warping by central
# differences, and an LNCC with a strong variance floor. It is computed from a **detached** field: it is an input,
# and no gradient of the training loss flows through it (so no second derivatives are needed).

# %%
GRAD_FLOOR = 0.2   # the LNCC variance floor of GraDIRN's input, relative to each image's variance (the loss: 1e-5)


def similarity_gradient(f, m, u):
    """The normalised gradient of 1 - LNCC with respect to u, as GraDIRN and RIIR compute their input."""
    u = u.detach()                                           # an input: no graph through it
    with torch.enable_grad():
        w = warp(m, u).requires_grad_(True)
        sim = 1 - lncc(f, w, eps=GRAD_FLOOR, reduction="none").flatten(1).mean(1).sum()
        (d_sim_dw,) = torch.autograd.grad(sim, w)            # dL_sim / dw, per pixel
    grad_m = torch.cat(torch.gradient(m, dim=(2, 3)), dim=1)  # central differences, (1, 2, H, W)
    g = d_sim_dw * warp(grad_m, u, padding="zeros")           # chain rule: dL/dw * grad I_m(x + u(x))
    return g / g.abs().amax().clamp_min(1e-12)               # max |g| = 1


exact = Objective("lncc", lam=0.0)   # the Eq. 1 energy with its similarity term only
u_test = torch.zeros(1, 2, *f80.shape[2:])
cosines = {}
for name, u_at in (("u = 0", u_test), ("u = GraDIRN's result", models["gradirn"].method(f80, m80).disp.detach())):
    ours, autograd = similarity_gradient(f80, m80, u_at), exact.grad(f80, m80, u_at)
    cosines[name] = F.cosine_similarity(ours.flatten(), autograd.flatten(), dim=0).item()
    print(f"at {name:22s} cosine(GraDIRN's input, Objective.grad) = {cosines[name]:.3f}")

# %% [markdown]
# The two gradients point in related but not equal directions (the cosines above; 1 would be the same direction).
# The exact derivative of a bilinearly warped image is a one-sided difference on every grid line, and so
# *everywhere* at $u = 0$, where every method starts; and the variance floor down-weights flat patches. Both are
# design choices of this library's GraDIRN (`deqreg_lite/methods/gradirn.py`), not of the paper.
#
# **GraDIRN by hand.** With `similarity_gradient`, the loop of section 1 becomes GraDIRN. We run it on the shipped
# model and compare with the library, then split the last step into its learned part and its gradient part.

# %%
gradirn = models["gradirn"].method
with torch.no_grad():
    hand, hand_states = multilevel_by_hand(gradirn, f80, m80, steps=gradirn.steps_per_level,
                                           grad_fn=similarity_gradient)
    library = gradirn(f80, m80, return_states=True)
print(f"learned step sizes eta_l (voxels of each level): {[round(float(e), 3) for e in gradirn.eta.detach()]}")
print(f"max |hand - library| = {(hand - library.disp).abs().max():.2e} voxels (80 x 96 grid); "
      f"network calls {library.info.nfe}")
assert torch.allclose(hand, library.disp, atol=1e-4)

with torch.no_grad():  # the last step of the finest level, split into its two parts
    u_before = hand_states[-2]
    g = similarity_gradient(f80, m80, u_before)
    learned = unet(gradirn.nets[-1], torch.cat([f80, warp(m80, u_before), u_before, g], dim=1))
    gradient_part = -gradirn.eta[-1] * g
print(f"last step: RMS of the learned part {learned.pow(2).mean().sqrt():.4f}, of the gradient part "
      f"{gradient_part.pow(2).mean().sqrt():.4f} voxels; cosine between them "
      f"{F.cosine_similarity(learned.flatten(), gradient_part.flatten(), dim=0).item():.3f}")
assert torch.allclose(u_before + learned + gradient_part, hand_states[-1], atol=1e-5)

# %% [markdown]
# Read the split with care: it is one step of one trained model on one pair. Whether the network works *with* the
# gradient step (positive cosine) or corrects it (negative), and which part is larger, is something training
# decided; exercise 3 switches the gradient step off to see what it does to the result.
#
# ## 3. RIIR: a recurrent update with a memory, and Eq. 4
#
# RIIR [27] (recurrent inference machines for registration) iterates at one resolution, $T = 6$ steps in the paper,
# and carries a **hidden state** $\mathbf h_t$ besides the field: a U-Net turns the inputs into features, a
# convolutional GRU mixes them into the memory, and a small convolution reads the update out of the memory:
#
# $$\mathbf h_{t+1} = \mathrm{ConvGRU}\big(\mathrm{UNet}([I_f,\; I_m\circ\phi_t,\; u_t,\; \hat g_t]),\; \mathbf h_t\big),
# \qquad u_{t+1} = u_t + \mathrm{Conv}(\mathbf h_{t+1}), \qquad u_0 = 0,\ \mathbf h_0 = 0 .$$
#
# The GRU is a gated running average, $\mathbf h' = (1 - z)\,\mathbf h + z\,\tanh(W_q[x, r\,\mathbf h])$ with gates
# $z, r = \sigma(W_g[x, \mathbf h])$: it can carry momentum-like information from step to step, which a plain
# Eq. 3 update cannot. Its training loss is the paper's **Eq. 4**, a loss on *every* step, not only the last:
#
# $$\mathcal L_{total} = \mathcal L(I_f, I_m, u_T) + \sum_{t=1}^{T} w_t\, \mathcal L(I_f, I_m, u_t), \qquad
# w_t = 10^{\frac{t-1}{T-1}} \quad\text{(RIIR; GraDIRN and Unrolling: } w_t = 0\text{)}.$$
#
# **Predict.** With $T = 6$, the weights run from $w_1 = 1$ to $w_6 = 10$. What share of $\mathcal L_{total}$'s
# weight sits on the final field $u_T$ (it appears twice)? More or less than half?

# %%
T = models["riir"].trained_steps
w = riir_weights(T)
share_final = (1 + w[-1]) / (1 + sum(w))
print(f"T = {T}: w_t = {[round(x, 2) for x in w]}, sum {sum(w):.1f}; the final field carries "
      f"{100 * share_final:.0f} % of the total weight")
assert abs(w[0] - 1) < 1e-12 and abs(w[-1] - 10) < 1e-12
assert all(abs(a - 10 ** ((t - 1) / (T - 1))) < 1e-12 for t, a in enumerate(w, start=1))

# %% [markdown]
# **Eq. 4 by hand.** We write RIIR's $T$ steps and the Eq. 4 loss by hand, back-propagate, and compare the loss and
# every parameter's gradient with what the library's `RIIR.training_step` back-propagates. A tiny $32 \times 32$
# version of the pair keeps it fast (the U-Net is size-agnostic; the shipped weights are reused on a copy).

# %%
riir = copy.deepcopy(models["riir"].method).train()
f_tiny, m_tiny = resize_image(fixed, TINY), resize_image(moving, TINY)
loss_fn = RegistrationLoss(lam=1.0)          # L = 1 - LNCC + lam * diffusion, the shipped models' loss

u, h, losses = torch.zeros(1, 2, *TINY), torch.zeros(1, riir.hidden, *TINY), []
for t in range(T):
    x = torch.cat([f_tiny, warp(m_tiny, u), u, similarity_gradient(f_tiny, m_tiny, u)], dim=1)
    h = riir.gru(unet(riir.features, x), h)   # the memory
    u = u + riir.head(h)                      # the update, read out of the memory
    losses.append(loss_fn(f_tiny, m_tiny, u))
eq4 = losses[-1] + sum(w_t * l_t for w_t, l_t in zip(w, losses))
riir.zero_grad()
eq4.backward()
grads_hand = {n: p.grad.clone() for n, p in riir.named_parameters()}

riir.zero_grad()
out = riir.training_step(f_tiny, m_tiny, loss_fn)
grads_lib = {n: p.grad.clone() for n, p in riir.named_parameters()}
worst = max(((grads_hand[n] - grads_lib[n]).abs().max() / grads_lib[n].abs().max().clamp_min(1e-12)).item()
            for n in grads_lib)
print(f"Eq. 4 by hand {eq4.item():.6f}, training_step {out['loss']:.6f}; per-step losses "
      f"{[round(l.item(), 4) for l in losses]}")
print(f"{len(grads_lib)} parameter tensors; largest gradient difference, relative to that tensor's largest "
      f"gradient: {worst:.1e}")
assert abs(eq4.item() - out["loss"]) < 1e-5 * abs(out["loss"])
assert worst < 1e-4

# %% [markdown]
# <details><summary>Why <code>u.detach()</code> in <code>similarity_gradient</code> matters here</summary>
#
# Without it, the gradient of Eq. 4 would also flow through $\hat g_t$ into $u_t$ (through the warped image
# gradient), a second path that the library does not take. The loss value would be the same, but the parameter
# gradients would differ: try it, and the check above fails by a wide margin. Whether a learned optimiser should
# differentiate through its gradient input is a design choice; the library's answer (no) saves second derivatives.
#
# </details>
#
# ## 4. What they share with DEQReg, and what they lack
#
# All three repeat a learned update from $u_0 = 0$, like DEQReg's map $g_\theta(u) = u + f_\theta(\dots)$ (Eq. 3 and
# Eq. 5). What differs is how they are trained, and so what their training says about the steps after $T$:
#
# | | Unrolling (paper) | GraDIRN [22] | RIIR [27] | DEQReg |
# |---|---|---|---|---|
# | one step | $u + f_{\theta,l}([I_f, I_m\circ\phi, u])$ | $u + f_{\theta,l}([\dots, \hat g]) - \eta_l \hat g$ | $u + \mathrm{Conv}(\mathbf h')$, $\mathbf h' = \mathrm{GRU}(\dots, \mathbf h)$ | $u + f_\theta([I_f, I_m\circ\phi, u])$ |
# | state | $u$ | $u$ | $(u, \mathbf h)$ | $u$ |
# | levels x trained steps | 3 x 3 | 3 x 3 | 1 x 6 | 1 x (up to) 48 |
# | loss | $\mathcal L(u_T)$ | $\mathcal L(u_T)$ | Eq. 4 | Eq. 9 (fixed point + $S$ states) |
# | gradient | BPTT | BPTT | BPTT | phantom gradient ($K$ steps) |
# | training memory | linear in $T$ | linear in $T$ | linear in $T$ | flat in $T$ |
# | after step $T$ | nothing in training | nothing in training | nothing in training | the fixed-point condition $u^* = g_\theta(u^*)$ |
#
# GraDIRN's explicit step $-\eta_l \hat g$ is the one piece of the three that descends the similarity term by
# construction (GraDIRN's and RIIR's networks *see* $\hat g$, but may do anything with it). Even that piece does
# not make GraDIRN stop: the learned part can keep moving the field, and the normalisation ($\max|\hat g| = 1$)
# keeps the gradient step the same size however close to stationary $u$ is; only an exactly zero gradient stops
# it. RIIR's state includes $\mathbf h$: a fixed point would have to hold for $(u, \mathbf h)$ together, and
# nothing in its training asks for one.
#
# **Memory, measured live.** Backpropagation through time keeps every step's activations until the backward pass.
# `training_memory` counts the bytes saved for backward in one training step (fresh models at
# $64 \times 64$; notebook 04b explains the counting), for RIIR with $T$ steps and for GraDIRN and the multi-level
# Unrolling with $T$ steps per level, against DEQReg, whose phantom gradient back-propagates through $K = 3$ steps
# whatever the solver's $T$.

# %%
f_mem, m_mem = resize_image(fixed, MEMORY_SIZE), resize_image(moving, MEMORY_SIZE)
mib = lambda method: training_memory(method, f_mem, m_mem, loss_fn) / 2**20
memory = {"riir": {}, "gradirn": {}, "unrolling_ml": {}, "deqreg": {}}
for t in MEMORY_TS:
    memory["riir"][t] = mib(build_method("riir", 2, T=t))
    memory["gradirn"][t] = mib(build_method("gradirn", 2, steps_per_level=t))
    memory["unrolling_ml"][t] = mib(build_method("unrolling_ml", 2, steps_per_level=t))
for t in (12, 48):
    memory["deqreg"][t] = mib(build_method("deqreg", 2, T=t))
for name, row in memory.items():
    print(f"{name:12s} " + ", ".join(f"T = {t}: {v:.1f} MiB" for t, v in row.items()))

fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
for name, marker in (("riir", "o-"), ("gradirn", "s-"), ("unrolling_ml", "^--")):
    ts = list(memory[name])
    label = f"{name} (T steps per level)" if name != "riir" else "riir (T steps)"
    ax.plot(ts, [memory[name][t] for t in ts], marker, label=label)
ax.plot(list(memory["deqreg"]), list(memory["deqreg"].values()), "k*:", ms=10, label="deqreg (solver T; K = 3)")
ax.set(xlabel="T (linear axis)", ylabel="saved for backward (MiB)", title=f"training memory at {MEMORY_SIZE}")
ax.set_xticks(MEMORY_TS + [12, 48], [str(t) for t in MEMORY_TS + [12, 48]])
ax.grid(alpha=0.3)
ax.legend()
plt.show()

for name in ("riir", "gradirn", "unrolling_ml"):
    vals = [memory[name][t] for t in MEMORY_TS]
    assert all(b > a for a, b in zip(vals, vals[1:])), f"{name}: memory grows with T"
    assert vals[-1] / vals[0] > 0.6 * MEMORY_TS[-1] / MEMORY_TS[0], f"{name}: about linearly"
assert abs(memory["deqreg"][48] - memory["deqreg"][12]) < 0.02 * memory["deqreg"][12]  # flat in T

# %% [markdown]
# > **Caveat.** These are activation bytes of fresh 2D models on a CPU, at $64 \times 64$; the paper reports GPU
# > `max_memory_allocated` in 3D (its Figure 2c and Table 1), which also holds weights and optimiser state. The
# > *shape* (linear against flat) carries over; the ratios do not.
#
# ## 5. Past the trained steps
#
# The shipped models were trained with 3 steps (Unrolling; GraDIRN: per level) and 6 (RIIR). We now run them for up
# to `max(SWEEP_STEPS)` steps (for GraDIRN: at the finest level) on the real `brain2d` pair (and, in default mode,
# held-out generated pairs), and score every step count with Dice and % folding (notebook 01, "Metrics").
#
# **Predict.** Before you run the next cell, write down for each model:
# 1. Does Dice keep rising after the trained steps, stay, or fall?
# 2. Does the folding grow? Faster for the model without a similarity gradient?
# 3. Does the relative update $\|u_{t+1} - u_t\| / \|u_{t+1}\|$ go to zero, as it would at a fixed point?
#
# (Notebook 03 answered these for the Unrolling, the paper's 3-level model and the single-level one; the point here
# is whether the gradient input, the learned step size or the memory change the answer.)

# %%
pairs = [sample]
if N_HELDOUT:
    val = PairDataset("val", N_HELDOUT + 1, (160, 192))
    pairs += [val[i] for i in range(1, N_HELDOUT + 1)]     # item 0 of "val" is the real pair itself
sweeps, runs = {}, {}
with torch.no_grad():
    for name, model in models.items():
        sweeps[name] = step_sweep(model, pairs, steps=SWEEP_STEPS)
        runs[name] = model(fixed, moving, steps=max(SWEEP_STEPS), return_states=True)  # the real pair, every step
        sw, k = sweeps[name], SWEEP_STEPS.index(min(model.trained_steps, max(SWEEP_STEPS)))
        print(f"{name:12s} Dice at 1 / {sw['steps'][k]} (trained) / {sw['steps'][-1]} steps: "
              f"{sw['dice'][0]:.3f} / {sw['dice'][k]:.3f} / {sw['dice'][-1]:.3f};  folding "
              f"{sw['folding_pct'][k]:.2f} % -> {sw['folding_pct'][-1]:.2f} %;  last relative update "
              f"{runs[name].info['residuals'][-1]:.3f}")

identity_dice = float(np.mean([pair_metrics(p, torch.zeros(1, 2, 160, 192))["dice"] for p in pairs]))
fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
for i, (name, sw) in enumerate(sweeps.items()):
    c = f"C{i}"
    for ax, key in ((axes[0], "dice"), (axes[1], "folding_pct")):
        mean, std = np.array(sw[key]), np.array(sw[f"{key}_std"])
        ax.plot(sw["steps"], mean, "o-", color=c, label=name)
        ax.fill_between(sw["steps"], mean - std, mean + std, color=c, alpha=0.15)
        ax.axvline(models[name].trained_steps, color=c, ls=":", lw=1)
    res = runs[name].info["residuals"]
    axes[2].semilogy(range(1, len(res) + 1), res, "-", color=c, label=name)
axes[0].axhline(identity_dice, color="gray", ls="--", lw=1, label="identity")
axes[0].set(xlabel="inference steps", ylabel="Dice", title=f"Dice (mean ± std over {len(pairs)} pair(s))")
axes[1].set(xlabel="inference steps", ylabel="% folding (det J <= 0)", title="folding (dotted: trained steps)")
axes[1].set_ylim(bottom=0)
axes[2].set(xlabel="step t (finest level)", ylabel="relative update", title="relative update, real pair")
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Compare what you see with your predictions. How to read it, whatever the numbers:
#
# * A model whose Dice still rises past its trained steps is using the extra steps; one whose Dice falls while its
#   folding grows is pushing the field further than its training ever did. The paper saw both, for different
#   models and step counts (its Figure 3 and Table 2).
# * A relative update that levels off above zero means the iteration has **not converged** from $u_0 = 0$ within
#   these steps. It does not prove that no fixed point exists, and a falling one does not prove that one will be
#   reached: only a map trained to be solved (DEQReg, notebooks 04-05) comes with a condition to check.
# * These are the shipped CPU-trained checkpoints on one real pair (plus a few generated ones in default mode), one
#   training seed each. A gap of a few hundredths in Dice between them is within what another seed or another pair
#   could change; notebook 06 pools more pairs and tests the differences.

# %%
with torch.no_grad():  # steps=None is the trained number of steps: the same field as the sweep's state there
    for name, model in models.items():
        at_trained = model(fixed, moving).disp
        assert torch.allclose(at_trained, runs[name].states[model.trained_steps - 1], atol=1e-5), name
for name, sw in sweeps.items():
    assert all(np.isfinite(sw["dice"])) and all(np.isfinite(sw["folding_pct"])), name

# %% [markdown]
# ## 6. Step through them yourself
#
# A slider over the number of inference steps and a menu over the three models (the states of the runs above;
# nothing is recomputed). Left: the warped moving image with its labels; middle: the Jacobian determinant (black:
# folded); right: the field as a grid.

# %%
picture = W.Image(format="png", layout=W.Layout(max_width="100%", height="auto"))


def show_state(model: str, t: int) -> dict:
    disp = runs[model].states[t - 1]
    m = pair_metrics(sample, disp)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    viz.show_labels(axes[0], warp(moving, disp), warp(sample["moving_seg"], disp, mode="nearest"),
                    "warped moving + its labels", names=sample.get("label_names"))
    im = viz.plot_jacobian(axes[1], disp, title=f"det J, folding {m['folding_pct']:.2f} %")
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    viz.plot_grid(axes[2], disp, title="deformed grid")
    fig.suptitle(f"{model}: {t} steps (trained with {models[model].trained_steps}): Dice {m['dice']:.3f}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=70)
    plt.close(fig)
    picture.value = buf.getvalue()
    return {"model": model, "steps": t, "dice": m["dice"], "folding_pct": m["folding_pct"]}


step_widget = W.interactive(
    show_state,
    model=W.Dropdown(options=list(models), value="gradirn", description="model"),
    t=W.IntSlider(value=3, min=1, max=max(SWEEP_STEPS), description="inference steps",
                  style={"description_width": "initial"}, layout=W.Layout(width="420px"), continuous_update=False))
step_widget.children = (*step_widget.children[:-1], picture, step_widget.out)
step_widget

# %% [markdown]
# ## Exercises
#
# Each exercise has a cell to fill in (tagged `exercise`: it runs as given, and prints `TODO`) and a hidden
# solution below it (click the three dots to show it). Try first: the solution cell *runs* the answer and checks it.
#
# ### Exercise 1 (★) Counting network calls
#
# GraDIRN and the multi-level Unrolling run `steps_per_level` steps at each coarse level and `steps` at the finest;
# RIIR runs `steps`. Write the number of network calls of each as a function of `steps`, and check it against
# `result.info.nfe` of the shipped models for `steps` = 1, 3 and 10.

# %% tags=["exercise"]
# TODO: two formulas, then compare with models[name](fixed, moving, steps=t).info.nfe
calls_gradirn = calls_riir = None
print("TODO" if calls_gradirn is None else [(t, calls_gradirn(t), calls_riir(t)) for t in (1, 3, 10)])

# %% tags=["solution"] jupyter={"source_hidden": true}
calls_gradirn = lambda t: gradirn.steps_per_level * (gradirn.levels - 1) + t
calls_riir = lambda t: t
with torch.no_grad():
    for t in (1, 3, 10):
        got = {name: models[name](fixed, moving, steps=t).info.nfe for name in ("gradirn", "riir")}
        print(f"steps = {t}: GraDIRN {calls_gradirn(t)} (library {got['gradirn']}), RIIR {calls_riir(t)} "
              f"(library {got['riir']})")
        assert got["gradirn"] == calls_gradirn(t) and got["riir"] == calls_riir(t)

# %% [markdown]
# ### Exercise 2 (★★) The loss an earlier RIIR was trained with
#
# An earlier `riir.pt` was trained with the loss of the code before issue 10: $\sum_t w_t \mathcal L(u_t) /
# \sum_t w_t$ (normalised weights, no separate $\mathcal L(u_T)$). From the per-step `losses` of section 3, compute
# that loss, and the ratio of Eq. 4 to it. Why does AdamW hardly care about that ratio, while gradient clipping at a
# fixed threshold does?
#
# <details><summary>Hint</summary>
#
# `w` holds the weights, `losses` the per-step losses (tensors: use `.item()`), `eq4` the Eq. 4 total. AdamW divides
# each step by a running estimate of the gradient's scale.
#
# </details>

# %% tags=["exercise"]
# TODO: old_loss = sum_t w_t L_t / sum_t w_t; ratio = eq4 / old_loss
old_loss = ratio = None
print("TODO" if old_loss is None else (old_loss, ratio))

# %% tags=["solution"] jupyter={"source_hidden": true}
per_step = [l.item() for l in losses]
old_loss = sum(a * b for a, b in zip(w, per_step)) / sum(w)
ratio = eq4.item() / old_loss
print(f"normalised loss (the earlier riir.pt) {old_loss:.4f}; Eq. 4 {eq4.item():.4f}; ratio {ratio:.1f}")
# Eq. 4 = L_T + sum_t w_t L_t, so the ratio is sum(w) + L_T / old_loss
assert abs(eq4.item() - (per_step[-1] + old_loss * sum(w))) < 1e-4 * eq4.item()
assert abs(ratio - (sum(w) + per_step[-1] / old_loss)) < 1e-4 * ratio

# %% [markdown]
# AdamW's update is nearly invariant to a constant scale of the loss (it normalises by the gradient's running RMS),
# so the scale printed above (about $1 + \sum_t w_t$) changes little there; a `grad_clip` threshold, compared
# with the raw gradient norm, is crossed that many times sooner. The *relative* weights of the steps are what Eq. 4 changes in earnest: the extra
# $\mathcal L(u_T)$ puts more weight on the final field than the normalised form.
#
# ### Exercise 3 (★★) GraDIRN without its gradient step
#
# Make a copy of the shipped GraDIRN whose step sizes are (almost) zero, by setting its `rho` to `-30` (so
# $\eta_l = \mathrm{softplus}(-30) \approx 10^{-13}$): the network still *sees* $\hat g$, but the explicit step is
# gone. Measure Dice and folding on the real pair at the trained 3 steps and at `max(SWEEP_STEPS)`, next to the
# original's. Does the explicit step help, hurt, or hardly matter, at the trained steps and past them?

# %% tags=["exercise"]
# TODO: no_step = copy.deepcopy(models["gradirn"]); set no_step.method.rho; score with pair_metrics
no_step_scores = None
print("TODO" if no_step_scores is None else no_step_scores)

# %% tags=["solution"] jupyter={"source_hidden": true}
no_step = copy.deepcopy(models["gradirn"])
with torch.no_grad():
    no_step.method.rho.fill_(-30.0)
    no_step_scores, differences = {}, {}
    for t in (gradirn.steps_per_level, max(SWEEP_STEPS)):
        d_without = no_step(fixed, moving, steps=t).disp
        d_with = runs["gradirn"].states[t - 1]
        no_step_scores[t] = {"with": pair_metrics(sample, d_with), "without": pair_metrics(sample, d_without)}
        differences[t] = (d_with - d_without).abs().max().item()
        print(f"{t:3d} steps: Dice {no_step_scores[t]['with']['dice']:.3f} with the step, "
              f"{no_step_scores[t]['without']['dice']:.3f} without; folding "
              f"{no_step_scores[t]['with']['folding_pct']:.2f} % / {no_step_scores[t]['without']['folding_pct']:.2f} %;"
              f" fields differ by up to {differences[t]:.2f} voxels")
assert float(no_step.method.eta.max()) < 1e-12
assert all(differences[t] > 1e-3 for t in differences)   # the step changes the field
assert all(np.isfinite(s["without"]["dice"]) for s in no_step_scores.values())

# %% [markdown]
# The network was trained *with* the step, so removing it is not "GraDIRN without the gradient" retrained: it
# shows how much of this model's field the step itself contributes. (The paper's Unrolling is the retrained
# version: the same architecture without $\hat g$ at all.)
#
# ### Exercise 4 (★★★) Extrapolate the memory of BPTT
#
# From RIIR's measured memory at the two smallest $T$ of `MEMORY_TS` (section 4), fit a line (memory = a + b T),
# predict the memory at the paper's $T = 6$ and at $T = 12$, then measure both with `mib(build_method("riir", 2,
# T=...))`. How close is the line? What does the intercept $a$ hold, and the slope $b$?

# %% tags=["exercise"]
# TODO: a, b from memory["riir"][MEMORY_TS[0]], memory["riir"][MEMORY_TS[1]]; predict and measure T = 6 and 12
predicted = measured = None
print("TODO" if predicted is None else (predicted, measured))

# %% tags=["solution"] jupyter={"source_hidden": true}
t0, t1 = MEMORY_TS[0], MEMORY_TS[1]
b = (memory["riir"][t1] - memory["riir"][t0]) / (t1 - t0)
a = memory["riir"][t0] - b * t0
predicted = {t: a + b * t for t in (6, 12)}
measured = {t: mib(build_method("riir", 2, T=t)) for t in (6, 12)}
for t in (6, 12):
    print(f"T = {t}: predicted {predicted[t]:.2f} MiB, measured {measured[t]:.2f} MiB "
          f"({100 * (measured[t] / predicted[t] - 1):+.1f} %)")
print(f"intercept a = {a:.2f} MiB (what every step count shares: inputs, the loss), slope b = {b:.2f} MiB per step "
      f"(one U-Net + ConvGRU + warp + loss graph)")
assert all(abs(measured[t] / predicted[t] - 1) < 0.1 for t in (6, 12))

# %% [markdown]
# ## References
#
# As cited in the DEQReg paper's own reference list (its numbers in brackets).
#
# * Zhang, Y., Zhao, Y., Tao, Q.: Bridging Classical and Learning-based Iterative Registration through Deep
#   Equilibrium Models. (The DEQReg paper: Sec. 2.1, Eq. 2-4; Sec. 3, the baselines and the convergence analysis;
#   Figure 1, Figure 3, Table 2.)
# * [6] Balakrishnan, G., Zhao, A., Sabuncu, M.R., Guttag, J., Dalca, A.V.: Voxelmorph: a learning framework for
#   deformable medical image registration. IEEE Transactions on Medical Imaging 38(8), 1788–1800 (2019)
# * [15] Hering, A., Hansen, L., Mok, T.C., Chung, A.C., Siebert, H., Häger, S., Lange, A., Kuckertz, S., Heldmann,
#   S., Shao, W., et al.: Learn2reg: comprehensive multi-task medical image registration challenge, dataset and
#   evaluation in the era of deep learning. IEEE Transactions on Medical Imaging 42(3), 697–712 (2022)
# * [22] Qiu, H., Hammernik, K., Qin, C., Chen, C., Rueckert, D.: Embedding gradient-based optimization in image
#   registration networks. In: Medical Image Computing and Computer-Assisted Intervention–MICCAI 2022. pp. 56–65.
#   Springer (2022)
# * [27] Zhang, Y., Zhao, Y., Xue, H., Kellman, P., Klein, S., Tao, Q.: Recurrent inference machine for medical image
#   registration. arXiv preprint arXiv:2406.13413 (2024)
#
# ## Summary
#
# * The paper's **Unrolling** is Eq. 3 at three resolutions (3 x 3 weight-tied steps, one U-Net per level, the field
#   resampled and rescaled between levels); written by hand here, it matched the library. Its six coarse calls
#   cost about one full-resolution call together ($3\,(1/16 + 1/4) \approx 0.94$).
# * **GraDIRN** adds the normalised similarity gradient, as an input and as an explicit step $-\eta_l \hat g$ with a
#   learned $\eta_l$ per level; written by hand, it matched the library. Its input gradient is a stabilised chain-rule
#   form, not `Objective.grad` (the cosines in section 2).
# * **RIIR** carries a ConvGRU memory and is trained on every step with **Eq. 4**, $\mathcal L(u_T) + \sum_t w_t
#   \mathcal L(u_t)$, $w_t = 10^{(t-1)/(T-1)}$; the hand-written loss and its gradients matched `training_step`.
# * All three are trained by BPTT: their training memory grew linearly with $T$ (measured at $64 \times 64$), while
#   DEQReg's stayed flat. None has a fixed-point condition, so nothing in training says what step $T + 1$ does:
#   the sweep in section 5 measured it for the shipped models, and notebook 06 compares them with DEQReg on more
#   pairs (Figure 3, Table 2).

# %% [markdown]
# ## Checks (for CI)
#
# The step widget keeps the numbers it shows in `.result`; setting a control re-runs it, which is how the tests
# check it against the sweep. The last check compares the notebook's `similarity_gradient` with the library's own
# helper directly (an internal function of `deqreg_lite.methods`, not public API; the GraDIRN and RIIR checks above
# already imply that the two agree).

# %%
seen = {}
for name in models:
    control(step_widget, "model").value = name
    for t in (models[name].trained_steps, max(SWEEP_STEPS)):
        if t > max(SWEEP_STEPS):
            continue
        control(step_widget, "t").value = t
        seen[name, t] = step_widget.result
        k = sweeps[name]["steps"].index(t)
        assert abs(seen[name, t]["dice"] - sweeps[name]["per_pair"]["dice"][k][0]) < 1e-5, (name, t)
        assert len(picture.value) > 0
control(step_widget, "model").value = "gradirn"
control(step_widget, "t").value = 3
print({k: round(v["dice"], 4) for k, v in seen.items()})

from deqreg_lite.methods.gradirn import similarity_grad  # noqa: E402  (internal helper, checked here only)

u_check = 0.5 * torch.randn(1, 2, *f80.shape[2:], generator=torch.Generator().manual_seed(0))
assert torch.allclose(similarity_gradient(f80, m80, u_check), similarity_grad(f80, m80, u_check), atol=1e-6)
