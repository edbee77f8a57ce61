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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deqreg-lite/deqreg_lite/blob/main/notebooks/04b_implicit_and_phantom_gradients.ipynb)
#
# # 04b · Implicit and phantom gradients: the backward pass
#
# **Goal.** Notebook 04 found a fixed point $\mathbf z^* = g_\theta(\mathbf z^*)$ by iterating. To *train* $\theta$
# we need $\mathrm d\mathcal L / \mathrm d\theta$ for a loss of that fixed point. This notebook derives the
# **implicit gradient** (Eq. 6 of the paper) from the fixed-point equation, checks it against an explicit matrix
# inverse and finite differences, derives the **phantom gradient** (Eq. 7-8) that DEQReg trains with, and
# measures what each costs in memory, including the intermediate-state correction of Eq. 9 (Sec. 2.3).
#
# **Learning objectives.** After this notebook you can
#
# * **derive** Eq. 6 by differentiating $\mathbf z^* = g(\mathbf z^*, \theta)$, and **explain** why it needs only
#   the fixed point, not the path to it;
# * **check** a gradient three ways: the library, an explicit formula, central finite differences;
# * **write** the phantom gradient as the implicit one minus a term that shrinks like $\rho(\tau J + (1-\tau)I)^K$,
#   and **predict** how many steps $K$ a given accuracy needs;
# * **measure** the bytes autograd saves for backward, and **explain** why BPTT grows with $T$ while a DEQ does not;
# * **state** how many $K$-step graphs are alive at once with eager states, with lazy states, and in the library's
#   training step.
#
# **Prerequisites.** Notebook 04 (fixed points, Jacobians, spectral radius, damping). Maths: the chain rule for
# vectors (Jacobian matrices), $(I - J)^{-1} = \sum_k J^k$ when $\rho(J) < 1$, geometric series; PyTorch autograd
# (`backward`, `.grad`).
#
# **Study time.** Running it: 65 s in default mode (measured once, on a 2-core CPU that two training processes kept
# busy; `DEQREG_MODE=quick` is faster). Studying it: about 2 hours for the reading, the derivations and the four
# exercises (an estimate).
#
# **Notation.** The series' one notation (the toy maps here use the last rows):
#
# | symbol | meaning |
# |---|---|
# | $I_f$, $I_m$ | fixed and moving image |
# | $u$ | displacement field in voxels, shape `(B, ndim, *spatial)`; **the paper's $\phi$ is our $u$** |
# | $\phi = \mathrm{Id} + u$, $I_m\circ\phi$ | the deformation, the warped moving image |
# | $E(u) = \mathcal{L}_{sim}(I_f, I_m\circ\phi) + \lambda\,\mathcal{L}_{reg}(u)$ | the Eq. 1 energy |
# | $f_\theta(I_f, I_m\circ\phi, u)$ | the learned **update** (a U-Net) |
# | $g_\theta(u) = u + f_\theta(\dots)$ | the **update map** whose fixed point DEQReg solves (Eq. 5) |
# | $h_\theta(I_f, I_m)$ | the VoxelMorph network (predicts $u$ in one shot) |
# | $T$, $K$, $\tau$, $S$, $\gamma$ | solver steps, phantom steps, damping, sampled states, their weight |
# | $\mathbf z$, $g(\mathbf z, \theta)$, $\mathcal L$ | state, map and loss of a toy problem (in DEQReg: $u$, $g_\theta$, Eq. 9) |
# | $J = \partial g / \partial \mathbf z$, $M = \tau J + (1 - \tau) I$ | the Jacobian at $\mathbf z^*$, the damped one |
#
# > **Conventions against the paper.** The paper writes $\phi$ for the displacement (and $\phi^p$ for the phantom
# > steps); we write $u$ and $u^p$. Its $\tau \in (0, 1)$ has no stated value; the library's DEQReg uses
# > $\tau = 0.5$, $K = 3$, $S = 3$, $\gamma = 0.5$, $T = 48$. The paper measures memory as GPU
# > `max_memory_allocated` in 3D (MB); we count the bytes autograd **saves for backward** on a CPU (MiB =
# > $2^{20}$ bytes), which leaves out the constant part (weights, optimiser) that every method shares, so our ratios
# > are activation ratios and larger than the paper's.
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
    os.chdir(REPO)
    from google.colab import output

    output.enable_custom_widget_manager()  # ipywidgets 8 sliders

# %%
import math

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display
from torch import nn
from torch.autograd.functional import jacobian

from deqreg_lite.config import by_mode, mode, seed_everything
from deqreg_lite.deq import DEQ, correction_backward, correction_loss, phantom, state_steps
from deqreg_lite.solvers import fixed_point
from deqreg_lite.widgets import control

seed_everything(0)
# Every problem here is tiny: one thread is fastest, and it stays fast when other programs share the CPU.
torch.set_num_threads(1)
F64 = torch.float64  # the toy maps use double precision, so that gradients can be compared to 1e-8
# Quick mode (CI) changes sizes and counts only, never the code path.
STEPS_T = by_mode(quick=[1, 2, 4, 8, 16, 32], default=[1, 2, 4, 8, 16, 32, 64])  # T in the memory plot
FIELD = 32                                                       # the 2D field of sections 3-4 is FIELD x FIELD
K_MAX = 16                                                       # phantom-gradient steps K = 1 .. K_MAX
print(f"mode {mode()!r} (set DEQREG_MODE=quick for a faster run), torch {torch.__version__}")


def show(fig) -> None:
    """Show a figure inside a widget's output area, then close it (so figures do not pile up)."""
    display(fig)
    plt.close(fig)

# %% [markdown]
# ## 1. The implicit function theorem (Eq. 6)
#
# The fixed point depends on the parameters $\theta$ of the map: $\mathbf z^*(\theta) =
# g(\mathbf z^*(\theta), \theta)$. To train, we need $\mathrm d\mathcal L / \mathrm d\theta$ for a loss
# $\mathcal L(\mathbf z^*)$. BPTT would differentiate through every solver step. Instead, differentiate the
# fixed-point equation itself with respect to $\theta$:
#
# $$\frac{\mathrm d\mathbf z^*}{\mathrm d\theta} = \frac{\partial g}{\partial \mathbf z}
# \frac{\mathrm d\mathbf z^*}{\mathrm d\theta} + \frac{\partial g}{\partial \theta}
# \quad\Longrightarrow\quad
# \Big(I - \frac{\partial g}{\partial \mathbf z}\Big)\frac{\mathrm d\mathbf z^*}{\mathrm d\theta}
# = \frac{\partial g}{\partial \theta}
# \quad\Longrightarrow\quad
# \frac{\mathrm d\mathcal L}{\mathrm d\theta} = \frac{\partial \mathcal L}{\partial \mathbf z^*}
# \Big(I - \frac{\partial g}{\partial \mathbf z}\Big)^{-1} \frac{\partial g}{\partial \theta},$$
#
# all evaluated at $\mathbf z^*$: this is Eq. 6 of the paper. (The inverse exists when $\rho(J) < 1$.) Only the
# fixed point matters, not how the solver got there, so nothing of the forward trajectory has to be stored.
#
# Nobody forms the inverse of a matrix with as many rows as a displacement field has voxels. Write the row vector
# $\mathbf y^\top = \frac{\partial \mathcal L}{\partial \mathbf z^*}(I - J)^{-1}$; it solves
# $\mathbf y = \frac{\partial \mathcal L}{\partial \mathbf z^*}^\top + J^\top \mathbf y$, **another fixed-point
# problem**, solved with vector-Jacobian products (one backward pass of $g$ each). Then
# $\frac{\mathrm d\mathcal L}{\mathrm d\theta} = \mathbf y^\top \frac{\partial g}{\partial \theta}$.
# That is what `DEQ(grad="ift")` does.
#
# Let us check it three ways on a small map $g(\mathbf z, \theta) = \tanh(W\mathbf z + U\mathbf x + \mathbf b)$ with
# $n = 6$ and $\theta = (W, \mathbf b)$ (42 numbers), loss $\mathcal L = \mathbf c \cdot \mathbf z^*$, in float64:
#
# * (a) the library's `DEQ(grad="ift")` and `backward()`;
# * (b) Eq. 6 with an explicit inverse, the Jacobians from `torch.autograd.functional.jacobian`;
# * (c) central finite differences of $\mathcal L(\mathbf z^*(\theta))$, re-solving for each perturbed $\theta$.

# %%
N, P_X = 6, 3
gen = torch.Generator().manual_seed(3)
W_init = torch.randn(N, N, generator=gen, dtype=F64)
W_init = 0.9 * W_init / torch.linalg.eigvals(W_init).abs().max()        # spectral radius 0.9
U_s = torch.randn(N, P_X, generator=gen, dtype=F64) / P_X ** 0.5
x_s = torch.randn(1, P_X, generator=gen, dtype=F64)                       # the "input" of the layer
c_s = torch.randn(1, N, generator=gen, dtype=F64)                         # the loss is L(z) = c . z
theta = torch.cat([W_init.flatten(), 0.1 * torch.randn(N, generator=gen, dtype=F64)]).requires_grad_()


def g_small(z, theta):
    """(1, N), (N*N + N,) -> (1, N): tanh(W z + U x + b) with theta = (W, b) flattened."""
    W_, b_ = theta[:N * N].view(N, N), theta[N * N:]
    return torch.tanh(z @ W_.T + x_s @ U_s.T + b_)


def loss_fn(z):
    return (c_s * z).sum()


z0_small = torch.zeros(1, N, dtype=F64)
SOLVE = dict(max_iter=500, tol=1e-13)

def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# (a) the library: DEQ with the implicit gradient
theta.grad = None
z_deq, _, info_deq = DEQ(grad="ift", ift_tol=1e-13, ift_max_iter=500, **SOLVE)(lambda z: g_small(z, theta), z0_small)
loss_fn(z_deq).backward()
grad_ift = theta.grad.clone()
print(f"(a) DEQ: forward {info_deq.nstep} steps (converged={info_deq.converged}), "
      f"backward fixed-point solve {info_deq.backward.nstep} steps (converged={info_deq.backward.converged})")

# (b) Eq. 6 with an explicit inverse
with torch.no_grad():
    z_star_s, _ = fixed_point(lambda z: g_small(z, theta), z0_small, **SOLVE)
th = theta.detach()
J_z = jacobian(lambda z: g_small(z, th), z_star_s).reshape(N, N)          # dg/dz at z*
J_theta = jacobian(lambda t: g_small(z_star_s, t), th).reshape(N, -1)     # dg/dtheta at z*
eye = torch.eye(N, dtype=F64)
grad_explicit = c_s[0] @ torch.linalg.inv(eye - J_z) @ J_theta

# (c) central finite differences
eps = 1e-6
grad_fd = torch.zeros_like(th)
for i in range(len(th)):
    values = []
    for sign in (1.0, -1.0):
        t = th.clone()
        t[i] += sign * eps
        values.append(loss_fn(fixed_point(lambda z: g_small(z, t), z0_small, **SOLVE)[0]).item())
    grad_fd[i] = (values[0] - values[1]) / (2 * eps)



print(f"eigenvalues of J at z*: {torch.linalg.eigvals(J_z).numpy().round(2)}")
print(f"|(a) - (b)| / |(b)| = {rel_error(grad_ift, grad_explicit):.1e}   (IFT by fixed point vs explicit inverse)")
print(f"|(c) - (b)| / |(b)| = {rel_error(grad_fd, grad_explicit):.1e}   (finite differences vs explicit inverse)")
assert info_deq.converged and info_deq.backward.converged
assert rel_error(grad_ift, grad_explicit) < 1e-9
assert rel_error(grad_fd, grad_explicit) < 1e-7

# %% [markdown]
# ## 2. The phantom gradient (Eq. 7-8)
#
# The implicit gradient still needs a backward *solve*, which can take many steps and fails when $I - J$ is
# nearly singular. DEQReg uses the cheaper **phantom gradient**: starting from the fixed point, run $K$ damped
# steps *with* the graph on,
#
# $$u^{p+1} = \tau\, g_\theta(u^p) + (1-\tau)\, u^p, \qquad u^0 = u^*, \tag{7}$$
#
# and backpropagate through those $K$ steps only (`deqreg_lite.deq.phantom`, used by `DEQ(grad="phantom")`).
# This gives Eq. 8 (the paper writes $\phi^p$ for our $u^p$). At the fixed point every $u^p = u^*$, so all
# Jacobians are the same $J$ and, with $M = \tau J + (1-\tau) I$, the sum in Eq. 8 is a geometric series:
#
# $$\mathbf A = \tau \sum_{k=0}^{K-1} M^{K-1-k}\, \frac{\partial g}{\partial\theta}
# = \tau\,(I - M)^{-1}(I - M^K)\,\frac{\partial g}{\partial\theta}
# = (I - J)^{-1}\big(I - M^K\big)\,\frac{\partial g}{\partial\theta},$$
#
# because $I - M = \tau (I - J)$. Compare with Eq. 6: the phantom gradient is the implicit gradient **minus a term
# that shrinks like $\rho(M)^K$**. $K = 1$, $\tau = 1$ keeps only $\partial g / \partial\theta$ (the
# "Jacobian-free" gradient); $K \to \infty$ recovers the IFT. The damping $\tau$ plays the same role as in
# notebook 04, section 2: it pulls eigenvalues of $J$ near $-1$ inside (faster, and stable even when
# $\rho(J) \ge 1$), and pushes those near $+1$ towards $1$ (slower). The paper takes $\tau \in (0, 1)$.
#
# First a check of this formula against the library for one $K$ and $\tau$:

# %%
def phantom_grad(K, tau):
    """dL/dtheta from the library's DEQ with the phantom gradient (K steps, damping tau)."""
    theta.grad = None
    z, _, _ = DEQ(grad="phantom", K=K, tau=tau, **SOLVE)(lambda z: g_small(z, theta), z0_small)
    loss_fn(z).backward()
    return theta.grad.clone()


K_check, tau_check = 5, 0.5
M = tau_check * J_z + (1 - tau_check) * eye
grad_formula = c_s[0] @ torch.linalg.inv(eye - J_z) @ (eye - torch.linalg.matrix_power(M, K_check)) @ J_theta
print(f"K = {K_check}, tau = {tau_check}: |library - formula| / |formula| = "
      f"{rel_error(phantom_grad(K_check, tau_check), grad_formula):.1e}")
assert rel_error(phantom_grad(K_check, tau_check), grad_formula) < 1e-9

# %% [markdown]
# Now the error of the phantom gradient relative to the exact (IFT) gradient, for $K = 1, \dots, 16$ and two
# dampings. The dashed lines show the predicted slope $\rho(M)^K$.
#
# **Predict.** Our $J$ has an eigenvalue at $-0.8$ (printed in section 1). Using $\mu = 1 - \tau + \tau\lambda$,
# which damping, $\tau = 0.5$ or $\tau = 1$, brings the phantom gradient closer to the IFT gradient for the same $K$?

# %%
Ks = list(range(1, K_MAX + 1))
TAUS = (0.5, 1.0)
phantom_err, phantom_cos, rho_M = {}, {}, {}
for tau in TAUS:
    grads = [phantom_grad(K, tau) for K in Ks]
    phantom_err[tau] = np.array([rel_error(g, grad_ift) for g in grads])
    phantom_cos[tau] = np.array([torch.cosine_similarity(g, grad_ift, dim=0).item() for g in grads])
    rho_M[tau] = torch.linalg.eigvals(tau * J_z + (1 - tau) * eye).abs().max().item()

fig, ax = plt.subplots(figsize=(7.5, 4.5), constrained_layout=True)
for i, tau in enumerate(TAUS):
    ax.semilogy(Ks, phantom_err[tau], f"C{i}o-", label=rf"phantom, $\tau$ = {tau}")
    ax.semilogy(Ks, phantom_err[tau][0] * rho_M[tau] ** (np.array(Ks) - 1.0), f"C{i}--", lw=1,
                label=rf"$\propto \rho(M)^K$, $\rho(M)$ = {rho_M[tau]:.2f}")
ax.set(xlabel="phantom steps K", ylabel="relative error vs the IFT gradient",
       title="Phantom gradient (Eq. 8) approaches the implicit gradient (Eq. 6)")
ax.legend(fontsize=8)
ax.grid(alpha=0.3, which="both")
plt.show()
for tau in TAUS:
    print(f"tau = {tau}: error K=1 {phantom_err[tau][0]:.2e}, K=4 {phantom_err[tau][3]:.2e}, "
          f"K={K_MAX} {phantom_err[tau][-1]:.2e}; cosine K=1 {phantom_cos[tau][0]:.4f}, K={K_MAX} "
          f"{phantom_cos[tau][-1]:.6f}")
    assert phantom_err[tau][-1] < phantom_err[tau][3] < phantom_err[tau][0]
    assert phantom_err[tau][-1] < 0.05 * phantom_err[tau][0] and phantom_cos[tau][-1] > 0.999

# %% [markdown]
# ### Try it: $K$ and $\tau$
#
# The scatter plot compares the 42 entries of the phantom gradient with those of the IFT gradient: on the diagonal
# they agree. Even $K = 1$ points roughly the right way (cosine similarity well above 0): the phantom gradient is a
# *descent direction*, which is what training needs.

# %%
def phantom_demo(K, tau):
    g_ph = phantom_grad(K, tau)
    err = rel_error(g_ph, grad_ift)
    cos = torch.cosine_similarity(g_ph, grad_ift, dim=0).item()
    fig, ax = plt.subplots(figsize=(5, 4.6), constrained_layout=True)
    lim = 1.1 * grad_ift.abs().max().item()
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8, label="equal")
    ax.plot(grad_ift, g_ph, "C3o", ms=4, label="entries of dL/dθ")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="IFT gradient (Eq. 6)",
           ylabel=f"phantom gradient (K = {K}, τ = {tau:.2f})",
           title=f"relative error {err:.2e}, cosine {cos:.5f}")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    show(fig)
    return {"K": K, "tau": tau, "rel_error": err, "cosine": cos}


phantom_widget = W.interactive(
    phantom_demo,
    K=W.IntSlider(value=1, min=1, max=K_MAX, description="K", continuous_update=False),
    tau=W.FloatSlider(value=0.5, min=0.1, max=1.0, step=0.05, description="damping τ", continuous_update=False))
phantom_widget

# %% [markdown]
# ## 3. Memory: BPTT against a DEQ
#
# This is the practical reason for all of the above (the paper's Figure 2c: on a 24 GB GPU, unrolled methods run
# out of memory after a handful of steps, DEQReg does not). To backpropagate, autograd **saves tensors** during the
# forward pass (the inputs of each convolution, the outputs of each `tanh`, ...). BPTT saves them for all $T$
# steps; a DEQ runs its $T$ solver steps under `torch.no_grad()` and saves only those of its $K$ phantom steps
# (or the single call of $g$ for the IFT).
#
# We count those bytes live, with `torch.autograd.graph.saved_tensors_hooks`: autograd calls a *pack* hook with
# every tensor it saves, and `deqreg_lite.memory.SavedBytes` adds up their storages (each once). Its `total` is every
# byte saved, its `peak` the most alive together.
#
# The update map is a small conv net on a $2 \times 32 \times 32$ field, a toy version of a DEQReg update.
#
# **Predict.** Sketch the three curves before you run the cell: saved bytes against the solver steps $T$, for
# BPTT, for the phantom gradient with $K = 3$ and for the IFT.

# %%
from deqreg_lite.memory import SavedBytes  # the hooks described above, in 60 lines: read its source


class ConvUpdate(nn.Module):
    """g(z) = 0.5 z + 0.1 net(z, image): a small conv-net update of a 2-channel 2D field, a contraction."""

    def __init__(self, size=FIELD, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 2, 3, padding=1))
        self.image = torch.rand(1, 1, size, size)

    def forward(self, z):
        return 0.5 * z + 0.1 * self.net(torch.cat([z, self.image], 1))


def saved_in_one_step(T, **options):
    """Bytes saved for backward while building the loss of one training step with T solver steps."""
    g_conv = ConvUpdate()
    with SavedBytes() as mem:
        z, _, _ = DEQ(max_iter=T, tol=0.0, **options)(g_conv, torch.zeros(1, 2, FIELD, FIELD))
        loss = z.square().mean()
    loss.backward()
    assert all(p.grad is not None for p in g_conv.parameters())  # every mode trains the network
    return mem.total


settings = {"BPTT": dict(grad="bptt"), "DEQ, phantom K = 3": dict(grad="phantom", K=3),
            "DEQ, IFT": dict(grad="ift")}
memory = {name: np.array([saved_in_one_step(T, **opts) for T in STEPS_T]) for name, opts in settings.items()}

fig, ax = plt.subplots(figsize=(7.5, 4.5), constrained_layout=True)
for (name, nbytes), style in zip(memory.items(), ["C3o-", "C0s-", "C2^--"]):
    ax.plot(STEPS_T, nbytes / 2**20, style, label=name)
ax.set(xlabel="solver steps T", ylabel="saved for backward (MiB)",
       title=f"Memory of one training step, conv-net update on a 2 x {FIELD} x {FIELD} field")
ax.legend()
ax.grid(alpha=0.3)
plt.show()

bptt, phantom_mem, ift_mem = memory.values()
per_step = (bptt[-1] - bptt[0]) / (STEPS_T[-1] - STEPS_T[0])
for name, nbytes in memory.items():
    print(f"{name:20s}" + "  ".join(f"T={T}: {b / 2**10:7.0f} KiB" for T, b in zip(STEPS_T, nbytes)))
print(f"BPTT saves {per_step / 2**10:.0f} KiB per step; the DEQ saves {phantom_mem[0] / 2**10:.0f} KiB (phantom, "
      f"K = 3) or {ift_mem[0] / 2**10:.0f} KiB (IFT), whatever T")
assert np.all(phantom_mem == phantom_mem[0]) and np.all(ift_mem == ift_mem[0])          # flat in T
assert np.all(np.diff(bptt) > 0) and bptt[-1] > 20 * bptt[0]                             # grows ...
assert np.allclose(bptt - bptt[0], per_step * (np.array(STEPS_T) - STEPS_T[0]), rtol=0.01)  # ... linearly
assert bptt[-1] > 5 * phantom_mem[-1]

# %% [markdown]
# Each BPTT step saves what one phantom step saves (one call of $g$), so a phantom gradient with $K$ steps costs
# as much memory as BPTT with $T = K$ steps, whatever the number of solver steps (Exercise 3 checks it).
#
# At DEQReg's scale this was measured for this project (`benchmarks/results/memory_vs_steps.md`: 2D $128 \times 128$,
# the VoxelMorph-like U-Net, batch 1, CPU, the same saved-for-backward count): BPTT saves **17.91 MiB per step**
# (+ 1.3 MiB, a linear fit with $R^2 = 1.00000$ over $T = 1 \dots 96$), and DEQReg ($K = 3$, $S = 3$) **55.0 MiB
# whatever $T$**, exactly BPTT's memory at $T = 3.0$: one $K$-step graph.
#
# > **Caveat.** These are activation bytes on a CPU. The paper's Figure 2c and Table 1 measure the whole GPU memory
# > in 3D (DEQReg 6925 MB, VoxelMorph 2645 MB: 2.62x); the same benchmark's activation ratio is 2.88x in 2D and 2.82x
# > in 3D $32^3$. The constant part (weights, optimiser, workspace) that the paper's numbers include is left out here.

# %% [markdown]
# ## 4. Intermediate-state correction (Eq. 9)
#
# A DEQ is trained on its fixed point only, so nothing asks the *trajectory* to be good. Eq. 9 adds the loss of
# $S$ intermediate states $u_t$, sampled at equal intervals of the forward trajectory:
#
# $$\mathcal L_{\text{total}} = \mathcal L(u^*) + \gamma \sum_{t \in \mathcal S} \mathcal L(u_t), \qquad
# \gamma > 0,$$
#
# each state with its own phantom gradient. The paper uses $T = 48$, $S = 3$, $\gamma = 0.5$. In `deqreg_lite`:
# `DEQ(n_states=S)` returns the states, `state_steps(T, S)` says at which steps they are taken, and
# `correction_loss(loss_fn, z_star, states, gamma)` builds Eq. 9.
#
# **Always exactly $S$ states.** When the solver converges before step $t$, the state is the solver's answer (where
# the trajectory would have stayed), and `info.n_padded` counts such states. Our conv map converges in about 10 steps,
# before the first state at step 12:

# %%
print(f"state_steps(48, 3) = {state_steps(48, 3)}")
g_conv = ConvUpdate()
z_conv, states, info_conv = DEQ(max_iter=48, tol=1e-3, n_states=3, K=3, tau=0.5)(
    g_conv, torch.zeros(1, 2, FIELD, FIELD))
print(f"converged={info_conv.converged} after {info_conv.nstep} steps; {len(states)} states taken at steps "
      f"{info_conv.state_steps}, {info_conv.n_padded} padded with the answer")
total = correction_loss(lambda d: d.square().mean(), z_conv, states, gamma=0.5)
total.backward()
print(f"Eq. 9 loss {total.item():.5f}; gradient norm of the first conv {g_conv.net[0].weight.grad.norm():.4f}")
assert state_steps(48, 3) == [12, 24, 36]
assert info_conv.converged and info_conv.nstep < 12
assert len(states) == 3 and info_conv.n_padded == 3 and info_conv.state_steps == [info_conv.nstep] * 3

# %% [markdown]
# **How many graphs are alive?** By default (*eager* states) each state's phantom graph is built at once, so
# $S + 1$ graphs of $K$ steps ($\mathbf z^*$'s and $S$ states') are alive until `backward()`. With
# `lazy_states=True` the states are `LazyState` objects, and `correction_backward` back-propagates the terms of Eq. 9
# one at a time: each state's graph is built, back-propagated and freed before the next, but $\mathbf z^*$'s graph,
# built by `DEQ`, stays alive throughout, so **at most two** $K$-step graphs are alive at once. (The library's
# training step goes one further; see Exercise 4.) Same gradients either way.
#
# **Predict.** With $S = 3$ states, how many times one $K$-step graph is the eager peak? The lazy one?

# %%
def states_peak(lazy):
    g_conv = ConvUpdate()
    with SavedBytes() as mem:
        z, states, _ = DEQ(max_iter=12, tol=0.0, K=3, n_states=3, lazy_states=lazy)(
            g_conv, torch.zeros(1, 2, FIELD, FIELD))
        correction_backward(lambda d: d.square().mean(), z, states, gamma=0.5)
    return mem.peak, g_conv.net[0].weight.grad.clone()


(peak_eager, grad_eager), (peak_lazy, grad_lazy) = states_peak(False), states_peak(True)
one_graph = memory["DEQ, phantom K = 3"][0]  # one K = 3 graph of this map (section 3)
print(f"peak saved for backward: one K-step graph {one_graph / 2**10:.0f} KiB; eager states "
      f"{peak_eager / 2**10:.0f} KiB = {peak_eager / one_graph:.2f} graphs; lazy states with correction_backward "
      f"{peak_lazy / 2**10:.0f} KiB = {peak_lazy / one_graph:.2f} graphs")
assert torch.allclose(grad_eager, grad_lazy, rtol=1e-5, atol=1e-8)
assert peak_lazy < 0.6 * peak_eager
assert 3.5 < peak_eager / one_graph <= 4.0 and 1.9 < peak_lazy / one_graph <= 2.0

# %% [markdown]
# ## Exercises
#
# Each exercise has a cell to fill in (tagged `exercise`: it runs as given, and prints `TODO`) and a hidden
# solution below it (click the three dots to show it). Try first: the solution cell *runs* the answer and checks it.
#
# ### Exercise 1 (★) The Jacobian-free gradient
#
# With $K = 1$ and $\tau = 1$ the phantom gradient keeps only $\frac{\partial\mathcal L}{\partial\mathbf z^*}
# \frac{\partial g}{\partial\theta}$ (section 2). Compute it from `c_s` and `J_theta` (the loss is
# $\mathcal L = \mathbf c\cdot\mathbf z$, so $\partial\mathcal L / \partial\mathbf z^* = \mathbf c$), compare it with
# `phantom_grad(1, 1.0)`, and give its relative error and cosine against the IFT gradient `grad_ift`.

# %% tags=["exercise"]
# TODO: grad_jf = (dL/dz*) (dg/dtheta), a vector of 42 numbers
grad_jf = None
print("TODO" if grad_jf is None else rel_error(grad_jf, grad_ift))

# %% tags=["solution"] jupyter={"source_hidden": true}
grad_jf = c_s[0] @ J_theta
print(f"|library - formula| / |formula| = {rel_error(phantom_grad(1, 1.0), grad_jf):.1e}; against the IFT "
      f"gradient: relative error {rel_error(grad_jf, grad_ift):.3f}, cosine "
      f"{torch.cosine_similarity(grad_jf, grad_ift, dim=0).item():.4f}")
assert rel_error(phantom_grad(1, 1.0), grad_jf) < 1e-10
assert torch.cosine_similarity(grad_jf, grad_ift, dim=0).item() > 0  # a descent direction, but not the gradient

# %% [markdown]
# ### Exercise 2 (★★) How many phantom steps for 1 %?
#
# From the error at $K = 1$ (`phantom_err[0.5][0]`) and the slope $\rho(M)$ (`rho_M[0.5]`), predict the smallest $K$
# whose phantom gradient is within 1 % of the IFT gradient at $\tau = 0.5$. Then read the measured one off
# `phantom_err[0.5]` (the errors for $K = 1 \dots 16$).

# %% tags=["exercise"]
# TODO: K_predicted from err_1 * rho^(K - 1) <= 0.01; K_measured from phantom_err[0.5]
K_predicted = K_measured = None
print("TODO" if K_predicted is None else (K_predicted, K_measured))

# %% tags=["solution"] jupyter={"source_hidden": true}
err_1, rho_half = phantom_err[0.5][0], rho_M[0.5]
K_predicted = 1 + math.ceil(math.log(0.01 / err_1) / math.log(rho_half))
K_measured = 1 + int(np.argmax(phantom_err[0.5] < 0.01))
print(f"error at K = 1: {err_1:.3f}, rho(M) = {rho_half:.3f}: predicted K = {K_predicted}, measured K = {K_measured}")
assert phantom_err[0.5].min() < 0.01 and abs(K_predicted - K_measured) <= 2

# %% [markdown]
# ### Exercise 3 (★★) A phantom step costs a BPTT step
#
# Section 3 claims that a phantom gradient with $K$ steps saves as many bytes as BPTT with $T = K$ steps, whatever
# the number $T$ of solver steps. Check it with `saved_in_one_step` for $K = 5$: BPTT with $T = 5$ against the
# phantom gradient with $K = 5$ after $T = 40$ solver steps.

# %% tags=["exercise"]
# TODO: two calls of saved_in_one_step
bptt_5 = phantom_5 = None
print("TODO" if bptt_5 is None else (bptt_5, phantom_5))

# %% tags=["solution"] jupyter={"source_hidden": true}
bptt_5 = saved_in_one_step(5, grad="bptt")
phantom_5 = saved_in_one_step(40, grad="phantom", K=5)
print(f"BPTT, T = 5: {bptt_5 / 2**10:.1f} KiB; phantom, K = 5 after 40 solver steps: {phantom_5 / 2**10:.1f} KiB")
assert abs(bptt_5 - phantom_5) < 0.01 * bptt_5

# %% [markdown]
# ### Exercise 4 (★★★) One graph at a time, as the library trains
#
# `correction_backward` keeps $\mathbf z^*$'s graph alive while it back-propagates the states (section 4: two
# graphs). The library's training step (`DEQReg.training_step` in `deqreg_lite/methods/deqreg.py`) does better:
# it solves **under `torch.no_grad()`**, then builds each term of Eq. 9 with `phantom(g, z, K, tau)` from the
# detached point, back-propagates it and frees it before building the next (the states first, $\mathbf z^*$ last).
# Write that loop for the conv map (`max_iter=12`, $K = 3$, $\tau = 0.5$, $S = 3$, $\gamma = 0.5$, loss
# `d.square().mean()`), measure its peak with `SavedBytes`, and check that (a) the gradient of the first
# convolution equals `grad_eager` and (b) the peak is one $K$-step graph (`one_graph`).
#
# <details><summary>Hint</summary>
#
# Under `torch.no_grad()`, `DEQ(..., n_states=3)` returns the solver's answer and the three states as plain
# tensors. Then, for each `z` in the states and the answer: `loss = w * loss_fn(phantom(g, z, 3, 0.5))`,
# `loss.backward()`, `del loss`.
#
# </details>

# %% tags=["exercise"]
# TODO: the loop, inside `with SavedBytes() as mem:`; then mem.peak / one_graph
peak_by_hand = None
print("TODO" if peak_by_hand is None else peak_by_hand / one_graph)

# %% tags=["solution"] jupyter={"source_hidden": true}
g_hand = ConvUpdate()
with torch.no_grad():
    z_answer, plain_states, _ = DEQ(max_iter=12, tol=0.0, K=3, n_states=3)(g_hand, torch.zeros(1, 2, FIELD, FIELD))
with SavedBytes() as mem:
    for z_t, weight in [(s, 0.5) for s in plain_states] + [(z_answer, 1.0)]:
        loss = weight * (phantom(g_hand, z_t, 3, 0.5)).square().mean()
        loss.backward()  # frees this term's graph
        del loss
peak_by_hand = mem.peak
print(f"peak {peak_by_hand / 2**10:.0f} KiB = {peak_by_hand / one_graph:.2f} K-step graphs (eager "
      f"{peak_eager / one_graph:.2f}, correction_backward with lazy states {peak_lazy / one_graph:.2f})")
assert torch.allclose(g_hand.net[0].weight.grad, grad_eager, rtol=1e-5, atol=1e-8)
assert abs(peak_by_hand / one_graph - 1.0) < 0.01

# %% [markdown]
# ## References
#
# As cited in the DEQReg paper's own reference list (its numbers in brackets).
#
# * Zhang, Y., Zhao, Y., Tao, Q.: Bridging Classical and Learning-based Iterative Registration through Deep
#   Equilibrium Models. (The DEQReg paper: Sec. 2.2-2.3, Eq. 6-9, Figure 2c.)
# * [5] Bai, S., Kolter, J.Z., Koltun, V.: Deep equilibrium models. Advances in neural information processing
#   systems 32 (2019)
# * [10] Geng, Z., Kolter, J.Z.: Torchdeq: A library for deep equilibrium models. arXiv preprint arXiv:2310.18605
#   (2023)
# * [11] Geng, Z., Zhang, X.Y., Bai, S., Wang, Y., Lin, Z.: On training implicit models. Advances in Neural
#   Information Processing Systems 34, 24247–24260 (2021)
# * [15] Hering, A., Hansen, L., Mok, T.C., Chung, A.C., Siebert, H., Häger, S., Lange, A., Kuckertz, S., Heldmann,
#   S., Shao, W., et al.: Learn2reg: comprehensive multi-task medical image registration challenge, dataset and
#   evaluation in the era of deep learning. IEEE Transactions on Medical Imaging 42(3), 697–712 (2022)
# * [19] Krantz, S.G., Parks, H.R.: The implicit function theorem: history, theory, and applications. Springer
#   Science & Business Media (2002)
#
# ## Summary
#
# * The **implicit function theorem** (Eq. 6) gives the exact gradient from the fixed point alone:
#   $\frac{\partial\mathcal L}{\partial\mathbf z^*}(I - J)^{-1}\frac{\partial g}{\partial\theta}$, computed as a
#   second fixed-point problem; on the 6-dimensional tanh map it agreed with an explicit inverse to below $10^{-9}$
#   and with finite differences to below $10^{-7}$ (relative).
# * The **phantom gradient** (Eq. 7-8) back-propagates through $K$ damped steps from the fixed point; it is the
#   implicit gradient minus a term that shrinks like $\rho(\tau J + (1-\tau)I)^K$. Even $K = 1$ pointed the right
#   way on the toy map (cosine above 0.5); whether that holds for a learned registration map away from a
#   contraction is what notebooks 05 and 06 measure.
# * **Memory**: BPTT saves every step (linear in $T$); a DEQ saves only its $K$ phantom steps (flat in $T$), as in
#   the paper's Figure 2c. At the scale of a 2D $128^2$ U-Net that is 17.9 MiB per BPTT step on a CPU
#   (`benchmarks/results/memory_vs_steps.md`), and 55.0 MiB for DEQReg's $K = 3$, whatever $T$.
# * **Eq. 9's states**: eager states keep $S + 1$ $K$-step graphs alive until `backward()`; `correction_backward`
#   with lazy states keeps at most two ($\mathbf z^*$'s and one state's); the library's training step keeps
#   exactly one at a time (Exercise 4 measured 1.00 graph).
# * Next, **05**: DEQReg written by hand on registration, trained, and run past its training steps.
#
# ## Checks (for CI)
#
# Engineering notes: torchdeq 0.1.0 with `core="indexing"` returns *fewer* than $S$ states when the solver stops
# early, and silently drops loss terms; the library always returns exactly $S$ (section 4). The phantom widget keeps
# the numbers it shows in `.result`; setting a slider's value re-runs it, which is how the tests check it.

# %%
at_k1 = phantom_widget.result
control(phantom_widget, "K").value = K_MAX
at_kmax = phantom_widget.result
control(phantom_widget, "K").value = 1
print(f"K = 1: error {at_k1['rel_error']:.2e}, cosine {at_k1['cosine']:.4f};  "
      f"K = {K_MAX}: error {at_kmax['rel_error']:.2e}, cosine {at_kmax['cosine']:.6f}")
assert at_k1["cosine"] > 0.5 and at_kmax["rel_error"] < 0.05 * at_k1["rel_error"]
assert abs(at_kmax["rel_error"] - phantom_err[0.5][-1]) < 1e-12
