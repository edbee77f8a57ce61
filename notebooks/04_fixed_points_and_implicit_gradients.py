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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deqreg-lite/deqreg_lite/blob/main/notebooks/04_fixed_points_and_implicit_gradients.ipynb)
#
# # 04 · Fixed points and implicit gradients
#
# **Goal.** Understand the two ideas that make DEQReg a *deep equilibrium model* (Sec. 2.2-2.3 of the paper):
#
# 1. the **forward pass** is a search for a fixed point $\mathbf z^* = g(\mathbf z^*)$, solved by iterating, damping
#    or accelerating (Anderson);
# 2. the **backward pass** needs only that fixed point, not the path to it: the **implicit function theorem**
#    (Eq. 6) gives the exact gradient, and the **phantom gradient** (Eq. 7-8) approximates it with $K$ cheap steps.
#
# You will write a fixed-point loop by hand and check it against `deqreg_lite.solvers`, see damping turn a diverging
# iteration into a converging one (with a slider), compare plain, damped and Anderson iteration, check the implicit
# gradient against an explicit matrix inverse and finite differences, watch the phantom gradient approach it as $K$
# grows, and *measure* why this matters: the memory of backpropagation through time (BPTT) grows with the number of
# steps, a DEQ's does not.
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
from deqreg_lite.deq import DEQ, correction_backward, correction_loss, state_steps
from deqreg_lite.solvers import SolverDivergedError, anderson, fixed_point
from deqreg_lite.widgets import control

seed_everything(0)
# Every problem here is tiny: one thread is fastest, and it stays fast when other programs share the CPU
# (several threads on a busy CPU wait for each other at every one of the thousands of small operations).
torch.set_num_threads(1)
F64 = torch.float64  # the toy maps use double precision, so that gradients can be compared to 1e-8
# Quick mode (CI) changes sizes and counts only, never the code path.
N_TANH = by_mode(quick=100, default=200)                         # dimension of the tanh map in section 4
MAX_ITER = by_mode(quick=300, default=500)                       # solver steps in section 4
STEPS_T = by_mode(quick=[1, 2, 4, 8, 16, 32], default=[1, 2, 4, 8, 16, 32, 64])  # T in the memory plot
FIELD = 32                                                       # the 2D field of section 7 is FIELD x FIELD
K_MAX = 16                                                       # phantom-gradient steps K = 1 .. K_MAX
print(f"mode {mode()!r} (set DEQREG_MODE=quick for a faster run), torch {torch.__version__}")


def show(fig) -> None:
    """Show a figure inside a widget's output area, then close it (so figures do not pile up)."""
    display(fig)
    plt.close(fig)


def trajectory(g, z0, **options):
    """Run the library's `fixed_point` and record its inputs z_0, z_1, ... with the solver's callback.

    Returns (zs, z, info): zs is (steps, ...) for plotting, z and info are what `fixed_point` returned.
    """
    zs = []
    z, info = fixed_point(g, z0, callback=lambda k, z_k: zs.append(z_k.clone()), **options)
    return torch.cat(zs), z, info


# %% [markdown]
# ## 1. A fixed point, by hand
#
# A **fixed point** of a map $g$ is a point that the map leaves where it is: $\mathbf z^* = g(\mathbf z^*)$.
# The simplest way to look for one is to apply the map again and again,
#
# $$\mathbf z_{k+1} = g(\mathbf z_k), \qquad k = 0, 1, 2, \dots$$
#
# and to stop when the **relative residual** $\|g(\mathbf z_k) - \mathbf z_k\| \,/\, \|g(\mathbf z_k)\|$ falls below a
# tolerance. If $g$ is a *contraction* (it brings any two points closer, $\|g(\mathbf a) - g(\mathbf b)\| \le
# c\,\|\mathbf a - \mathbf b\|$ with $c < 1$), this converges to the unique fixed point from any start (Banach).
#
# In DEQReg, $\mathbf z$ is the displacement field $\phi$ and $g_\theta(\phi) = \phi + f_\theta(I_f, I_m, \phi)$ is
# one learned update (Eq. 5): the fixed point is the field that the network no longer wants to change.
# (`deqreg_lite` names the map you pass to a solver `f`; here it is our $g$.)
#
# Our first map is $g(z) = \cos z$. Type `cos` on a calculator again and again: you reach $0.739085\ldots$,
# the *Dottie number*. Here is the loop, written by hand. The library's solvers want a batch axis, so
# $z$ is a `(1, 1)` tensor.

# %%
def g_cos(z):
    return torch.cos(z)


tol = 1e-10
z = torch.tensor([[1.0]], dtype=F64)
for k in range(100):
    gz = g_cos(z)
    rel_residual = (gz - z).abs().item() / (gz.abs().item() + 1e-9)
    if rel_residual <= tol:
        break
    z = gz
z_by_hand, steps_by_hand = gz, k + 1
print(f"by hand: z* = {z_by_hand.item():.12f} after {steps_by_hand} steps (relative residual {rel_residual:.1e})")

# %% [markdown]
# The library's `fixed_point` does the same (plus bookkeeping: residual traces, divergence checks). Step $k$ calls
# the map once at $z_k$; the answer is the candidate $g(z_k)$ of the step with the lowest residual.

# %%
z_lib, info = fixed_point(g_cos, torch.tensor([[1.0]], dtype=F64), max_iter=100, tol=tol)
print(f"library: z* = {z_lib.item():.12f} after {info.nstep} steps, converged={info.converged}, "
      f"calls of g (nfe) = {info.nfe}, last relative residual {info.rel_trace[-1]:.1e}")
assert info.converged and info.nstep == steps_by_hand
assert torch.allclose(z_lib, z_by_hand, rtol=0, atol=1e-14)
assert abs(z_lib.item() - 0.7390851332151607) < 1e-9  # the Dottie number

# %% [markdown]
# ### Cobweb plots
#
# A **cobweb plot** draws 1D iteration: from $(z_k, z_k)$ on the diagonal go vertically to the curve,
# $(z_k, g(z_k))$, then horizontally back to the diagonal, $(z_{k+1}, z_{k+1})$. The fixed point is where the curve
# crosses the diagonal. Whether the web closes in depends on the **slope** $g'(z^*)$: near $z^*$ the error is
# multiplied by $g'(z^*)$ at every step, so $|g'(z^*)| < 1$ converges and $|g'(z^*)| > 1$ diverges; a negative
# slope makes the iterates jump from one side of $z^*$ to the other (a square spiral).
#
# Three examples (the trajectories are recorded from the library's solver with its `callback`):
#
# * $g(z) = \cos z$: slope $-\sin z^* \approx -0.67$, a spiral that closes in;
# * $g(z) = -1.5\,z + 2.5$ (fixed point $z^* = 1$): slope $-1.5$, a spiral that flies out;
# * the same map **damped** with $\tau = 0.5$: $z_{k+1} = \tau\, g(z_k) + (1-\tau)\, z_k$, whose slope is
#   $\tau \cdot (-1.5) + (1 - \tau) = -0.25$: it converges fast.

# %%
def g_line(z):
    return -1.5 * z + 2.5


def cobweb(ax, g, zs, tau, lo, hi, title):
    """Cobweb plot of the damped map z -> tau g(z) + (1 - tau) z, with the iterates zs (plotting only)."""
    grid = torch.linspace(lo, hi, 200, dtype=F64)
    ax.plot(grid, tau * g(grid) + (1 - tau) * grid, "C0", label=r"$\tau g(z) + (1-\tau) z$" if tau < 1 else "$g(z)$")
    ax.plot(grid, grid, "k--", lw=0.8, label="$y = z$")
    z = zs.flatten().tolist()
    xs, ys = [z[0]], [z[0]]
    for a, b in zip(z[:-1], z[1:]):
        xs += [a, b]
        ys += [b, b]
    ax.plot(xs, ys, "C3-", lw=1, marker=".", ms=4, label="iterates")
    ax.plot(z[0], z[0], "C2o", label="start $z_0$")
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="$z_k$", ylabel="$z_{k+1}$", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)


start = lambda v: torch.tensor([[v]], dtype=F64)
zs_cos, _, _ = trajectory(g_cos, start(0.1), max_iter=12, tol=0.0)
zs_line, _, info_line = trajectory(g_line, start(1.2), max_iter=6, tol=0.0, on_diverge="flag")
zs_damped, z_damped, _ = trajectory(g_line, start(1.2), max_iter=12, tol=0.0, tau=0.5)

fig, axes = plt.subplots(1, 3, figsize=(15, 5), constrained_layout=True)
cobweb(axes[0], g_cos, zs_cos, 1.0, 0.0, 1.1, r"$g(z)=\cos z$: slope $-0.67$, converges")
cobweb(axes[1], g_line, zs_line, 1.0, -1.5, 3.5, r"$g(z)=-1.5z+2.5$: slope $-1.5$, diverges")
cobweb(axes[2], g_line, zs_damped, 0.5, 0.75, 1.25, r"damped, $\tau=0.5$: slope $-0.25$, converges (zoomed)")
plt.show()
print(f"undamped: |z_k - 1| = {[round(abs(v - 1), 3) for v in zs_line.flatten().tolist()]}")
print(f"damped:   z after 12 steps = {z_damped.item():.8f}")
assert abs(zs_line[-1].item() - 1) > 5 * abs(zs_line[0].item() - 1)   # the error grew (x 1.5 per step)
assert abs(z_damped.item() - 1) < 1e-6                                # the damped iteration found z* = 1

# %% [markdown]
# ## 2. Damping, in 2D
#
# In more than one dimension the slope becomes the **Jacobian matrix** $J = \partial g / \partial \mathbf z$ at
# $\mathbf z^*$, and near the fixed point the error $\mathbf e_k = \mathbf z_k - \mathbf z^*$ evolves as
# $\mathbf e_{k+1} \approx J\,\mathbf e_k$. It shrinks when every **eigenvalue** $\lambda$ of $J$ has $|\lambda| < 1$,
# i.e. when the *spectral radius* $\rho(J) = \max |\lambda| < 1$.
#
# **Damping** (also called relaxation) takes only a fraction $\tau \in (0, 1]$ of each step:
#
# $$\mathbf z_{k+1} = \tau\, g(\mathbf z_k) + (1 - \tau)\, \mathbf z_k
# \quad\Longrightarrow\quad \mathbf e_{k+1} \approx \big(\tau J + (1-\tau) I\big)\, \mathbf e_k .$$
#
# The damped map has the same fixed points, and its eigenvalues are $\mu = 1 - \tau + \tau\lambda$: each eigenvalue
# $\lambda$ is pulled towards $1$ along the straight segment from $1$ to $\lambda$. If the segment enters the unit
# disc (which happens whenever $\operatorname{Re}\lambda < 1$), a small enough $\tau$ puts $\mu$ inside it, and the
# damped iteration converges even though the plain one diverges. Damping cannot help an eigenvalue with
# $\operatorname{Re}\lambda \ge 1$, and too small a $\tau$ brings every $\mu$ close to $1$: slow.
#
# Our 2D map is a **rotation-scaling**: $g(\mathbf z) = A\mathbf z + \mathbf c$ with $A = 1.2\,R(2.5\ \text{rad})$,
# whose eigenvalues $1.2\,e^{\pm 2.5 i}$ lie outside the unit circle. First, by hand and with the library
# ($\tau = 0.4$): the two trajectories must be identical.

# %%
RHO_A, ANGLE = 1.2, 2.5
A = RHO_A * torch.tensor([[math.cos(ANGLE), -math.sin(ANGLE)], [math.sin(ANGLE), math.cos(ANGLE)]], dtype=F64)
z_star2 = torch.tensor([[1.0, 0.5]], dtype=F64)               # chosen fixed point, (B, 2)
c2 = z_star2 @ (torch.eye(2, dtype=F64) - A).T                 # so that z* = A z* + c


def g_rot(z):
    """(B, 2) -> (B, 2): z -> A z + c."""
    return z @ A.T + c2


z0_2d = torch.tensor([[-1.0, -1.0]], dtype=F64)
tau = 0.4
hand = [z0_2d]
for k in range(29):
    hand.append(tau * g_rot(hand[-1]) + (1 - tau) * hand[-1])
hand = torch.cat(hand)

zs_lib, z_lib2, info2 = trajectory(g_rot, z0_2d, max_iter=30, tol=0.0, tau=tau)
print(f"hand-made and library trajectories: max difference {(hand - zs_lib).abs().max().item():.1e}; "
      f"z after 30 steps {z_lib2.tolist()} (z* = {z_star2.tolist()})")
assert torch.allclose(hand, zs_lib, rtol=0, atol=1e-12)
assert torch.allclose(z_lib2, z_star2, atol=1e-6)

# %% [markdown]
# The theory predicts more than "converges": for this map the damped matrix $\tau A + (1-\tau)I$ is again a
# rotation-scaling, so the residual shrinks by **exactly** $|\mu|$ at every step. The solver records the residual
# norms in `info.abs_trace`; their ratios must equal $|\mu| = |1 - \tau + \tau\lambda|$.

# %%
J2 = jacobian(g_rot, z_star2).reshape(2, 2)                   # dg/dz at z*: here simply A
lam2 = torch.linalg.eigvals(J2)
mu2 = torch.linalg.eigvals(tau * J2 + (1 - tau) * torch.eye(2, dtype=F64))
ratios = np.array(info2.abs_trace[1:16]) / np.array(info2.abs_trace[:15])  # later, rounding errors dominate
print(f"eigenvalues of J: {lam2.numpy().round(4)}, |lambda| = {lam2.abs().max():.3f}")
print(f"eigenvalues of tau J + (1 - tau) I at tau = {tau}: {mu2.numpy().round(4)}, |mu| = {mu2.abs().max():.4f}")
print(f"measured residual ratios, steps 1-15: {ratios.min():.6f} .. {ratios.max():.6f}")
assert torch.allclose(J2, A)
assert np.allclose(ratios, mu2.abs().max().item(), rtol=1e-6)

# %% [markdown]
# ### Try it: the damping slider
#
# Move $\tau$ and watch three regimes (left: the trajectory from $\mathbf z_0 = (-1, -1)$; right: the eigenvalues in
# the complex plane, with the segment from $1$ to $\lambda$ along which damping moves them):
#
# * $\tau = 1$: $|\mu| = 1.2 > 1$, the spiral flies out: **divergence**;
# * $\tau \approx 0.9$: $|\mu| \approx 1$, the iterates keep circling: **oscillation**;
# * $\tau \approx 0.45$: $|\mu| \approx 0.34$, fast **convergence**; smaller $\tau$ converges again more slowly.

# %%
def damping_demo(tau):
    zs, _, info = trajectory(g_rot, z0_2d, max_iter=40, tol=1e-8, tau=tau, on_diverge="flag")
    mu = torch.linalg.eigvals(tau * J2 + (1 - tau) * torch.eye(2, dtype=F64))
    rho = mu.abs().max().item()
    regime = "diverges" if rho > 1.01 else "oscillates" if rho >= 0.99 else "converges"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    ax1.plot(zs[:, 0], zs[:, 1], "C3.-", lw=1, label=f"{len(zs)} iterates")
    ax1.plot(*z0_2d[0], "C2o", label="start $z_0$")
    ax1.plot(*z_star2[0], "k*", ms=14, label="fixed point $z^*$")
    ax1.set(xlim=(-4, 6), ylim=(-4.5, 5.5), xlabel="$z_1$", ylabel="$z_2$",
            title=rf"$\tau$ = {tau:.2f}: $\rho$ = {rho:.3f}, {regime}")
    ax1.set_aspect("equal")
    ax1.legend(loc="lower right", fontsize=8)
    t = np.linspace(0, 2 * np.pi, 200)
    ax2.plot(np.cos(t), np.sin(t), "k-", lw=0.8, label="unit circle")
    for lam in lam2:
        ax2.plot([1, lam.real], [0, lam.imag], "C0:", lw=1)
    ax2.plot(lam2.real, lam2.imag, "C0x", ms=10, mew=2, label=r"$\lambda$ (eigenvalues of $J$)")
    ax2.plot(mu.real, mu.imag, "C3o", ms=8, label=r"$\mu = 1-\tau+\tau\lambda$")
    ax2.set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), xlabel="real part", ylabel="imaginary part",
            title="eigenvalues of the (damped) iteration")
    ax2.set_aspect("equal")
    ax2.legend(loc="lower left", fontsize=8)
    show(fig)
    return {"tau": tau, "spectral_radius": rho, "regime": regime, "steps": info.nstep,
            "converged": info.converged, "diverged": info.diverged}


damping_widget = W.interactive(damping_demo, tau=W.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05,
                                                               description="damping τ", continuous_update=False))
damping_widget

# %% [markdown]
# The widget keeps the numbers it shows in `.result`; setting a slider's value re-runs it (this is how the tests
# check it):

# %%
regimes = {}
for t in (1.0, 0.9, 0.45, 0.05):
    control(damping_widget, "tau").value = t
    regimes[t] = damping_widget.result
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in damping_widget.result.items()})
control(damping_widget, "tau").value = 1.0
assert regimes[1.0]["regime"] == "diverges" and regimes[0.9]["regime"] == "oscillates"
assert regimes[0.45]["converged"] and regimes[0.45]["spectral_radius"] < 0.4
assert regimes[0.45]["steps"] < regimes[0.05]["steps"]  # too much damping is slow again

# %% [markdown]
# ### When the iteration diverges
#
# The solvers do not let a divergence pass silently. Four rules, each judged per sample of a batch, raise
# `SolverDivergedError` (pass `on_diverge="flag"` to get the finite iterate with the lowest *absolute* residual back
# instead, as the slider above does):
#
# 1. a NaN or inf;
# 2. a residual that grows above `diverge_factor` (1000) times the first one;
# 3. a slow **growth**: the largest norm so far rises by 25 % in each of the last two windows of `growth_window`
#    (16) steps while the residual does not fall. A slowly expanding map like $z \mapsto 1.05 z + 1$ never trips
#    rule 2 within 50 steps, and its *relative* residual even shrinks as $z$ grows, so "the lowest relative
#    residual" would pick its most diverged iterate;
# 4. an entry above `max_abs`, when the caller knows a bound (DEQReg: no displacement is longer than the image).
#
# The undamped rotation-scaling map grows by $1.2$ per step: rule 3 stops it at step 32, before rule 2 would
# (at $1.2^{38} \approx 1000$).

# %%
try:
    fixed_point(g_rot, z0_2d, max_iter=100, tol=1e-8)
    raise AssertionError("the undamped iteration should have diverged")
except SolverDivergedError as err:
    print(f"SolverDivergedError: {err}")
    diverged_at = err.step
assert 30 < diverged_at < 45  # the growth rule (step 32); the blow-up rule alone would stop at 1.2 ** 38 ≈ 1000

z_slow, info_slow = fixed_point(lambda z: 1.05 * z + 1.0, torch.zeros(1, 1), max_iter=50, on_diverge="flag")
print(f"z -> 1.05 z + 1: diverged={info_slow.diverged} at step {info_slow.nstep - 1}, "
      f"returned z = {float(z_slow):.2f} (the least expanded candidate)")
assert info_slow.diverged and not info_slow.converged and float(z_slow) < 2.0

# %% [markdown]
# ## 3. Plain, damped and Anderson iteration
#
# A more realistic map: one layer $g(\mathbf z) = \tanh(W\mathbf z + \mathbf b)$ in $n = 100$ dimensions (200 in
# default mode), with a symmetric $W$ whose eigenvalues are spread over $[-0.97, 0.8]$. Near the fixed point,
# $J = \operatorname{diag}(1 - \mathbf z^{*2})\, W$ has real eigenvalues in about $[-0.95, 0.8]$:
#
# * **plain** iteration is slow, because of the eigenvalue near $-0.95$ (errors flip sign and shrink by only 5 %
#   per step);
# * **damping** moves the eigenvalues to $1 - \tau + \tau\lambda$. For a real spectrum $[\lambda_{\min},
#   \lambda_{\max}]$ the best choice balances both ends, $\tau^* = 2 / (2 - \lambda_{\min} - \lambda_{\max})$, with
#   rate $(\lambda_{\max} - \lambda_{\min}) / (2 - \lambda_{\min} - \lambda_{\max})$. We compute it from the
#   Jacobian's eigenvalues;
# * **Anderson acceleration** needs no such tuning: it keeps the last $m$ iterates and mixes their images with
#   weights $\alpha$ that minimise the mixed residual $\|\sum_i \alpha_i (g(\mathbf z_i) - \mathbf z_i)\|$
#   (with $\sum_i \alpha_i = 1$). On a linear map it behaves like GMRES.
#
# One trap: Anderson's `lam` regularises the $m \times m$ matrix $G G^\top$ of residual inner products
# **absolutely**. Once $\|g(\mathbf z) - \mathbf z\|^2$ falls below `lam` (default $10^{-4}$, i.e. residual norms
# below $10^{-2}$), the regularisation wins and Anderson degrades towards an average of its last $m$ steps. On
# registration fields with thousands of voxels the residual norms are large and the default is harmless; on this
# small toy we pass `lam=0` and also show the default.

# %%
gen = torch.Generator().manual_seed(0)
Q, _ = torch.linalg.qr(torch.randn(N_TANH, N_TANH, generator=gen, dtype=F64))
W_tanh = Q @ torch.diag(torch.linspace(-0.97, 0.8, N_TANH, dtype=F64)) @ Q.T
b_tanh = 0.1 * torch.randn(N_TANH, generator=gen, dtype=F64)


def g_tanh(z):
    """(B, n) -> (B, n): z -> tanh(W z + b)."""
    return torch.tanh(z @ W_tanh.T + b_tanh)


z0_tanh = torch.zeros(1, N_TANH, dtype=F64)
z_ref, _ = anderson(g_tanh, z0_tanh, m=5, lam=0.0, max_iter=1000, tol=1e-14)   # a very accurate reference
eig_J = torch.linalg.eigvals(jacobian(g_tanh, z_ref).reshape(N_TANH, N_TANH)).real
lo, hi = eig_J.min().item(), eig_J.max().item()
tau_best = 2 / (2 - lo - hi)
print(f"eigenvalues of J at z*: [{lo:.3f}, {hi:.3f}]; best damping tau* = {tau_best:.3f}, "
      f"predicted rate {(hi - lo) / (2 - lo - hi):.3f} per step (plain: {max(abs(lo), abs(hi)):.3f})")

runs = {
    "plain (τ = 1)": fixed_point(g_tanh, z0_tanh, max_iter=MAX_ITER, tol=1e-8),
    f"damped (τ = {tau_best:.2f})": fixed_point(g_tanh, z0_tanh, max_iter=MAX_ITER, tol=1e-8, tau=tau_best),
    "Anderson (m = 5, lam = 0)": anderson(g_tanh, z0_tanh, m=5, lam=0.0, max_iter=MAX_ITER, tol=1e-8),
    "Anderson (m = 5, default lam = 1e-4)": anderson(g_tanh, z0_tanh, m=5, max_iter=MAX_ITER, tol=1e-8),
}
steps_to_tol = {}
fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
for (name, (z, info)), style in zip(runs.items(), ["C0-", "C1-", "C2-", "C2--"]):
    ax.semilogy(range(1, info.nstep + 1), info.rel_trace, style, label=f"{name}: {info.nstep} steps")
    steps_to_tol[name] = info.nstep if info.converged else math.inf
    err = (z - z_ref).norm().item() / z_ref.norm().item()
    print(f"{name:40s} converged={info.converged!s:5s} steps={info.nstep:4d}  relative error vs reference {err:.1e}")
    if info.converged:
        assert err < 1e-6
ax.axhline(1e-8, color="k", lw=0.8, ls=":", label="tolerance")
ax.set(xlabel="step k (= calls of g)", ylabel=r"relative residual $\|g(z_k)-z_k\| / \|g(z_k)\|$",
       title=rf"Solving $z = \tanh(Wz + b)$, n = {N_TANH}")
ax.legend(fontsize=8)
ax.grid(alpha=0.3, which="both")
plt.show()

plain, damped, anders, anders_default = steps_to_tol.values()
assert anders < damped < plain and damped < 0.5 * plain
assert anders < anders_default  # the absolute regularisation slows Anderson down on this tiny problem

# %% [markdown]
# Broyden's method (`deqreg_lite.solvers.broyden`, a quasi-Newton method) is the third solver of the library; the
# DEQReg paper uses plain fixed-point iteration with at most $T = 48$ steps. On a registration DEQ trained for this
# project (2D, $64^2$), Anderson reached a relative residual of 0.014 in 48 steps where plain iteration reached
# 0.089.
#
# ## 4. The implicit function theorem (Eq. 6)
#
# Now the backward pass. The fixed point depends on the parameters $\theta$ of the map: $\mathbf z^*(\theta) =
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


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


print(f"eigenvalues of J at z*: {torch.linalg.eigvals(J_z).numpy().round(2)}")
print(f"|(a) - (b)| / |(b)| = {rel_error(grad_ift, grad_explicit):.1e}   (IFT by fixed point vs explicit inverse)")
print(f"|(c) - (b)| / |(b)| = {rel_error(grad_fd, grad_explicit):.1e}   (finite differences vs explicit inverse)")
assert info_deq.converged and info_deq.backward.converged
assert rel_error(grad_ift, grad_explicit) < 1e-9
assert rel_error(grad_fd, grad_explicit) < 1e-7

# %% [markdown]
# ## 5. The phantom gradient (Eq. 7-8)
#
# The implicit gradient still needs a backward *solve*, which can take many steps and fails when $I - J$ is
# nearly singular. DEQReg uses the cheaper **phantom gradient**: starting from the fixed point, run $K$ damped
# steps *with* the graph on,
#
# $$\phi^{p+1} = \tau\, g_\theta(\phi^p) + (1-\tau)\, \phi^p, \qquad \phi^0 = \phi^*, \tag{7}$$
#
# and backpropagate through those $K$ steps only (`deqreg_lite.deq.phantom`, used by `DEQ(grad="phantom")`).
# This gives Eq. 8. At the fixed point every $\phi^p = \phi^*$, so all Jacobians are the same $J$ and, with
# $M = \tau J + (1-\tau) I$, the sum in Eq. 8 is a geometric series:
#
# $$\mathbf A = \tau \sum_{k=0}^{K-1} M^{K-1-k}\, \frac{\partial g}{\partial\theta}
# = \tau\,(I - M)^{-1}(I - M^K)\,\frac{\partial g}{\partial\theta}
# = (I - J)^{-1}\big(I - M^K\big)\,\frac{\partial g}{\partial\theta},$$
#
# because $I - M = \tau (I - J)$. Compare with Eq. 6: the phantom gradient is the implicit gradient **minus a term
# that shrinks like $\rho(M)^K$**. $K = 1$, $\tau = 1$ keeps only $\partial g / \partial\theta$ (the
# "Jacobian-free" gradient); $K \to \infty$ recovers the IFT. The damping $\tau$ plays the same role as in
# section 2: it pulls eigenvalues of $J$ near $-1$ inside (faster, and stable even when $\rho(J) \ge 1$), and pushes
# those near $+1$ towards $1$ (slower). The paper takes $\tau \in (0, 1)$.
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
# dampings. The dashed lines show the predicted slope $\rho(M)^K$. Our $J$ has an eigenvalue at $-0.8$, so here
# $\tau = 0.5$ approaches the IFT gradient faster than $\tau = 1$.

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

# %%
at_k1 = phantom_widget.result
control(phantom_widget, "K").value = K_MAX
at_kmax = phantom_widget.result
control(phantom_widget, "K").value = 1
print(f"K = 1: error {at_k1['rel_error']:.2e}, cosine {at_k1['cosine']:.4f};  "
      f"K = {K_MAX}: error {at_kmax['rel_error']:.2e}, cosine {at_kmax['cosine']:.6f}")
assert at_k1["cosine"] > 0.5 and at_kmax["rel_error"] < 0.05 * at_k1["rel_error"]
assert abs(at_kmax["rel_error"] - phantom_err[0.5][-1]) < 1e-12

# %% [markdown]
# ## 6. Memory: BPTT against a DEQ
#
# This is the practical reason for all of the above (the paper's Figure 2c: on a 24 GB GPU, unrolled methods run
# out of memory after a handful of steps, DEQReg does not). To backpropagate, autograd **saves tensors** during the
# forward pass (the inputs of each convolution, the outputs of each `tanh`, ...). BPTT saves them for all $T$
# steps; a DEQ runs its $T$ solver steps under `torch.no_grad()` and saves only those of its $K$ phantom steps
# (or the single call of $g$ for the IFT).
#
# We count those bytes live, with `torch.autograd.graph.saved_tensors_hooks`: autograd calls our *pack* hook with
# every tensor it saves. Several saved tensors can share one storage, so we count each storage once. (The hook
# must return `t.detach()`, not `t`: keeping `t` itself would tie it to its own graph in a reference cycle, and
# the memory would never be freed.)
#
# The update map is a small conv net on a $2 \times 32 \times 32$ field, a toy version of a DEQReg update.

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
# as much memory as BPTT with $T = K$ steps, whatever the number of solver steps. At DEQReg's scale
# (2D $128^2$ U-Net, measured for this project) that is about 15 MiB per BPTT step.
#
# ## 7. Intermediate-state correction (Eq. 9)
#
# A DEQ is trained on its fixed point only, so nothing asks the *trajectory* to be good. Eq. 9 adds the loss of
# $S$ intermediate states $\phi_t$, sampled at equal intervals of the forward trajectory:
#
# $$\mathcal L_{\text{total}} = \mathcal L(\phi^*) + \gamma \sum_{t \in \mathcal S} \mathcal L(\phi_t), \qquad
# \gamma > 0,$$
#
# each state with its own phantom gradient. The paper uses $T = 48$, $S = 3$, $\gamma = 0.5$. In `deqreg_lite`:
# `DEQ(n_states=S)` returns the states, `state_steps(T, S)` says at which steps they are taken, and
# `correction_loss(loss_fn, z_star, states, gamma)` builds Eq. 9.
#
# **Always exactly $S$ states.** When the solver converges before step $t$, the state is the solver's answer (where
# the trajectory would have stayed), and `info.n_padded` counts such states. (torchdeq 0.1.0 with
# `core="indexing"` returns *fewer* states in that case, and silently drops loss terms; the library avoids it.)
# Our conv map converges in about 10 steps, before the first state at step 12:

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
# Memory of the states: by default each state's phantom graph is built at once, so $S + 1$ graphs of $K$ steps are
# alive until `backward()`. With `lazy_states=True` the states are `LazyState` objects and
# `correction_backward` back-propagates the terms of Eq. 9 one at a time: same gradients, at most two graphs alive.

# %%
def states_peak(lazy):
    g_conv = ConvUpdate()
    with SavedBytes() as mem:
        z, states, _ = DEQ(max_iter=12, tol=0.0, K=3, n_states=3, lazy_states=lazy)(
            g_conv, torch.zeros(1, 2, FIELD, FIELD))
        correction_backward(lambda d: d.square().mean(), z, states, gamma=0.5)
    return mem.peak, g_conv.net[0].weight.grad.clone()


(peak_eager, grad_eager), (peak_lazy, grad_lazy) = states_peak(False), states_peak(True)
print(f"peak saved for backward: eager states {peak_eager / 2**10:.0f} KiB, lazy states {peak_lazy / 2**10:.0f} KiB")
assert torch.allclose(grad_eager, grad_lazy, rtol=1e-5, atol=1e-8)
assert peak_lazy < 0.6 * peak_eager

# %% [markdown]
# ## Exercise
#
# In section 2, $\tau = 0.9$ sat almost exactly on the border between oscillation and divergence.
#
# 1. Using $\mu = 1 - \tau + \tau\lambda$, find the **largest** $\tau$ for which the damped iteration of the
#    rotation-scaling map converges, as a formula in $\lambda$. (Hint: write $|1 + \tau(\lambda - 1)|^2 < 1$ and
#    solve for $\tau$.)
# 2. Evaluate it for our $\lambda = 1.2\,e^{2.5i}$ (use `lam2`).
# 3. Check it with the library: run `fixed_point(g_rot, z0_2d, ...)` with $\tau$ 2 % below and 2 % above your
#    value. What happens?
# 4. Which $\tau$ converges fastest, and at what rate?
#
# <details><summary>Solution</summary>
#
# $|1 + \tau(\lambda - 1)|^2 = 1 + 2\tau\operatorname{Re}(\lambda - 1) + \tau^2|\lambda - 1|^2 < 1$ gives
# $\tau < \tau_{\max} = 2(1 - \operatorname{Re}\lambda) / |1 - \lambda|^2$ (positive whenever
# $\operatorname{Re}\lambda < 1$). For $\lambda = 1.2e^{\pm 2.5i}$ this is $\tau_{\max} \approx 0.899$. The fastest
# damping minimises $|1 + \tau(\lambda - 1)|$: $\tau^* = (1 - \operatorname{Re}\lambda) / |1 - \lambda|^2 =
# \tau_{\max} / 2 \approx 0.45$, with rate $|\operatorname{Im}\lambda| / |1 - \lambda| \approx 0.34$ per step.
#
# ```python
# lam = lam2[0]
# tau_max = (2 * (1 - lam.real) / (1 - lam).abs() ** 2).item()
# print(f"tau_max = {tau_max:.4f}")
# for t in (0.98 * tau_max, 1.02 * tau_max):
#     z, info = fixed_point(g_rot, z0_2d, tau=t, max_iter=3000, tol=1e-6, on_diverge="flag")
#     rho = torch.linalg.eigvals(t * J2 + (1 - t) * torch.eye(2, dtype=F64)).abs().max().item()
#     print(f"tau = {t:.4f}: rho = {rho:.4f}, converged={info.converged} in {info.nstep} steps, "
#           f"diverged={info.diverged}")
# tau_fast = tau_max / 2
# _, info = fixed_point(g_rot, z0_2d, tau=tau_fast, max_iter=100, tol=1e-6)
# rate = (lam.imag.abs() / (1 - lam).abs()).item()
# print(f"tau* = {tau_fast:.3f}: {info.nstep} steps, rate {rate:.3f} per step")
# ```
#
# 2 % below $\tau_{\max}$ the iteration converges, slowly ($\rho \approx 0.965$: about 430 steps); 2 % above it
# ($\rho \approx 1.035$) it diverges, and the solver flags it after about 200 steps. The fastest choice,
# $\tau^* \approx 0.45$, converges in 16 steps.
#
# </details>
#
# ## Summary
#
# * A fixed point $\mathbf z^* = g(\mathbf z^*)$ is found by iterating $g$; near $\mathbf z^*$ the error is
#   multiplied by the Jacobian $J$, so the iteration converges when $\rho(J) < 1$. The library's `fixed_point` is the
#   same loop with residual traces and a `SolverDivergedError` when it blows up.
# * **Damping** $\tau$ moves each eigenvalue to $1 - \tau + \tau\lambda$, which can turn divergence or oscillation
#   into convergence; **Anderson** mixes the last $m$ iterates and converges faster still without tuning
#   (mind its absolute `lam` on small problems).
# * The **implicit function theorem** (Eq. 6) gives the exact gradient from the fixed point alone:
#   $\frac{\partial\mathcal L}{\partial\mathbf z^*}(I - J)^{-1}\frac{\partial g}{\partial\theta}$, computed as a
#   second fixed-point problem; it agreed with an explicit inverse and finite differences to $10^{-9}$.
# * The **phantom gradient** (Eq. 7-8) backpropagates through $K$ damped steps from the fixed point; its error
#   shrinks like $\rho(\tau J + (1-\tau)I)^K$.
# * **Memory**: BPTT saves every step (linear in $T$); a DEQ saves only its $K$ phantom steps (flat in $T$), as in
#   the paper's Figure 2c. Eq. 9's intermediate states add $S$ phantom graphs; lazy states keep one alive at a time.
# * Next: a registration network trained as a DEQ, and what happens when inference runs past the training steps.
