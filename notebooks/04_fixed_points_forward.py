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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deqreg-lite/deqreg_lite/blob/main/notebooks/04_fixed_points_forward.ipynb)
#
# # 04 · Fixed points: the forward solve
#
# **Goal.** DEQReg (Sec. 2.2 of the paper) does not run its network a fixed number of times: it looks for the
# displacement that its update map no longer changes, a **fixed point** $u^* = g_\theta(u^*)$. This notebook is
# about that search, the *forward pass* of a deep equilibrium model, on maps small enough to see every number:
# what a fixed point is, when iterating a map finds it, how fast, and what damping and Anderson acceleration
# change. The *backward pass* (how to train through a fixed point without storing the path to it) is notebook
# 04b.
#
# **Learning objectives.** After this notebook you can
#
# * **write** a fixed-point loop with a relative-residual stop by hand, and check it against
#   `deqreg_lite.solvers.fixed_point`;
# * **predict** from the slope $g'(z^*)$, or the eigenvalues of the Jacobian $J$, whether plain iteration converges
#   and at what rate, and **measure** that rate in the solver's residual trace;
# * **explain** what damping $\tau$ does to the eigenvalues ($\mu = 1 - \tau + \tau\lambda$), and **compute** the
#   largest and the best $\tau$;
# * **compare** plain, damped and Anderson iteration by the number of map calls to a tolerance, and **recognise** a
#   divergence when the solver reports one.
#
# **Prerequisites.** Notebook 00 (the registration setting) and 03 (unrolling, and why a fixed number of steps is a
# problem). Maths: eigenvalues of a 2x2 matrix, complex numbers $|a + ib|$, the chain rule; a little Python and
# PyTorch.
#
# **Study time.** Running it: 28 s in default mode (measured once, on a 2-core CPU that two training processes kept
# busy; `DEQREG_MODE=quick` is faster). Studying it: about 1.5 hours for the reading and the four exercises (an
# estimate).
#
# **Notation.** The series' one notation (this notebook mostly uses its toy maps, in the last rows):
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
# | $\mathbf z$, $g$ | the state and the map of a toy problem here (in DEQReg: $u$ and $g_\theta$) |
# | $J = \partial g / \partial \mathbf z$, $\lambda$, $\rho(J)$ | its Jacobian, an eigenvalue, the spectral radius $\max|\lambda|$ |
#
# > **Conventions against the paper.** The paper writes $\phi$ for the displacement; we write $u$ (and $\phi$ for
# > $\mathrm{Id} + u$). The paper solves with plain (undamped) fixed-point iteration, at most $T = 48$ steps; its
# > $\tau \in (0, 1)$ is the damping of the phantom gradient (04b), value not given. Here $\tau$ also damps the
# > forward solve (the library's `tau` of `fixed_point`, `solver_tau` of `DEQ`), which the paper does not do. The
# > library's stopping test is the **relative** residual $\|g(\mathbf z) - \mathbf z\| / \|g(\mathbf z)\|$;
# > torchdeq's default is an absolute one on the whole field, which a registration field never reaches.
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
from torch.autograd.functional import jacobian

from deqreg_lite.config import by_mode, mode, seed_everything
from deqreg_lite.solvers import SolverDivergedError, anderson, fixed_point
from deqreg_lite.widgets import control

seed_everything(0)
# Every problem here is tiny: one thread is fastest, and it stays fast when other programs share the CPU.
torch.set_num_threads(1)
F64 = torch.float64  # the toy maps use double precision, so that rates can be compared to 6 digits
# Quick mode (CI) changes sizes and counts only, never the code path.
N_TANH = by_mode(quick=100, default=200)                         # dimension of the tanh map in section 3
MAX_ITER = by_mode(quick=300, default=500)                       # solver steps in section 3
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
# In DEQReg, $\mathbf z$ is the displacement field $u$ and $g_\theta(u) = u + f_\theta(I_f, I_m\circ\phi, u)$ is
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
# * $g(z) = -1.5\,z + 2.5$ (fixed point $z^* = 1$): slope $-1.5$;
# * the same map **damped** with $\tau = 0.5$: $z_{k+1} = \tau\, g(z_k) + (1-\tau)\, z_k$, whose slope is
#   $\tau \cdot (-1.5) + (1 - \tau) = -0.25$.

# %% [markdown]
# **Predict.** Before you run the next cell: the line $g(z) = -1.5z + 2.5$ has its fixed point at $z^* = 1$, and we
# start at $z_0 = 1.2$, close to it. Does plain iteration get there? And the damped map with $\tau = 0.5$, which
# takes only half of each step?

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
# **Predict.** Our $\lambda = 1.2\,e^{\pm 2.5i}$ has $|\lambda| = 1.2$. Using $|\mu| = |1 - \tau + \tau\lambda|$,
# guess roughly at which $\tau$ the spiral stops flying out, and whether $\tau = 0.05$ is better or worse than
# $\tau = 0.45$. Then move the slider.
#
# Left: the trajectory from $\mathbf z_0 = (-1, -1)$; right: the eigenvalues in the complex plane, with the segment
# from $1$ to $\lambda$ along which damping moves them.


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
# What you should have seen, three regimes:
#
# * $\tau = 1$: $|\mu| = 1.2 > 1$, the spiral flies out: **divergence**;
# * $\tau \approx 0.9$: $|\mu| \approx 1$, the iterates keep circling: **oscillation**;
# * $\tau \approx 0.45$: $|\mu| \approx 0.34$, fast **convergence**; smaller $\tau$ converges again more slowly.
#
# (The section "Checks (for CI)" at the end sets the slider to these values and asserts the three regimes.)
#
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
# **Predict.** Which of the four runs below reaches the tolerance in the fewest steps, and which in the most?
# Anderson is run twice, with `lam=0` and with its default `lam=1e-4`: does that small regularisation matter?

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
# **Why Anderson's default was slower.** Anderson's `lam` regularises the $m \times m$ matrix $G G^\top$ of
# residual inner products **absolutely**. Once $\|g(\mathbf z) - \mathbf z\|^2$ falls below `lam` (default
# $10^{-4}$, i.e. residual norms below $10^{-2}$), the regularisation wins and Anderson degrades towards an average
# of its last $m$ steps. On registration fields with thousands of voxels the residual norms are large and the
# default is harmless; on this small toy `lam=0` is the right choice (the dashed curve is the default).
#
# Broyden's method (`deqreg_lite.solvers.broyden`, a quasi-Newton method) is the third solver of the library; the
# DEQReg paper uses plain fixed-point iteration with at most $T = 48$ steps. On a registration DEQ trained for this
# project (2D, $64^2$), Anderson reached a relative residual of 0.014 in 48 steps where plain iteration reached
# 0.089, at the same Dice (one model, measured on a CPU during the project's early experiments; neither reached the
# $10^{-3}$ tolerance). Whether a learned map converges at all is measured in notebooks 05 and 06.

# %% [markdown]
# ## Exercises
#
# Each exercise has a cell to fill in (tagged `exercise`: it runs as given, and prints `TODO`) and a hidden
# solution below it (click the three dots to show it). Try first: the solution cell *runs* the answer and checks it.
#
# ### Exercise 1 (★) Predict the number of steps
#
# Near $z^*$ the error of $z \mapsto \cos z$ is multiplied by $|g'(z^*)| = \sin z^* \approx 0.674$ at every step,
# and so, step after step, is the residual. Run the library's solve from $z_0 = 1$ again (as in section 1), take
# its first relative residual $r_1$ (`info.rel_trace[0]`), predict the step at which the relative residual first
# falls below $10^{-10}$, then compare with the steps of section 1 (`steps_by_hand`).
#
# <details><summary>Hint</summary>
#
# $r_k \approx r_1\,\rho^{k-1}$ with $\rho = \sin z^*$; solve $r_1 \rho^{k-1} = 10^{-10}$ for $k$.
#
# </details>

# %% tags=["exercise"]
# TODO: predict the number of steps from info.rel_trace[0] and rho = sin(z*)
steps_predicted = None
print("TODO" if steps_predicted is None else f"predicted {steps_predicted:.1f}, measured {steps_by_hand}")

# %% tags=["solution"] jupyter={"source_hidden": true}
_, info_cos = fixed_point(g_cos, torch.tensor([[1.0]], dtype=F64), max_iter=100, tol=1e-10)
rho_cos = math.sin(z_lib.item())
steps_predicted = 1 + math.log(1e-10 / info_cos.rel_trace[0]) / math.log(rho_cos)
print(f"rate sin z* = {rho_cos:.4f}; predicted {steps_predicted:.1f} steps, measured {info_cos.nstep}")
assert abs(steps_predicted - info_cos.nstep) <= 2 and info_cos.nstep == steps_by_hand

# %% [markdown]
# ### Exercise 2 (★★) The largest and the best damping
#
# In section 2, $\tau = 0.9$ sat almost exactly on the border between oscillation and divergence.
#
# 1. Using $\mu = 1 - \tau + \tau\lambda$, find the **largest** $\tau$ for which the damped iteration of the
#    rotation-scaling map converges, as a formula in $\lambda$, and evaluate it for our $\lambda = 1.2\,e^{2.5i}$
#    (`lam2`).
# 2. Check it with the library: run `fixed_point(g_rot, z0_2d, ...)` with $\tau$ 2 % below and 2 % above your value.
# 3. Which $\tau$ converges fastest, and at what rate?
#
# <details><summary>Hint</summary>
#
# Write $|1 + \tau(\lambda - 1)|^2 < 1$, expand, and solve for $\tau$. The fastest $\tau$ minimises the same
# quadratic in $\tau$.
#
# </details>

# %% tags=["exercise"]
# TODO: tau_max as a formula in lam = lam2[0]; then run fixed_point 2 % below and above it
tau_max = None
print("TODO" if tau_max is None else f"tau_max = {tau_max:.4f}")

# %% tags=["solution"] jupyter={"source_hidden": true}
# |1 + tau (lam - 1)|^2 = 1 + 2 tau Re(lam - 1) + tau^2 |lam - 1|^2 < 1  <=>  tau < 2 (1 - Re lam) / |1 - lam|^2
lam = lam2[0]
tau_max = (2 * (1 - lam.real) / (1 - lam).abs() ** 2).item()
outcome = {}
for t in (0.98 * tau_max, 1.02 * tau_max):
    _, info_t = fixed_point(g_rot, z0_2d, tau=t, max_iter=3000, tol=1e-6, on_diverge="flag")
    rho_t = torch.linalg.eigvals(t * J2 + (1 - t) * torch.eye(2, dtype=F64)).abs().max().item()
    outcome[t] = info_t
    print(f"tau = {t:.4f}: rho = {rho_t:.4f}, converged={info_t.converged} in {info_t.nstep} steps, "
          f"diverged={info_t.diverged}")
# the fastest tau minimises the quadratic: tau* = (1 - Re lam) / |1 - lam|^2 = tau_max / 2,
# with rate |Im lam| / |1 - lam|
tau_fast = tau_max / 2
_, info_fast = fixed_point(g_rot, z0_2d, tau=tau_fast, max_iter=100, tol=1e-6)
rate = (lam.imag.abs() / (1 - lam).abs()).item()
print(f"tau_max = {tau_max:.4f}; tau* = {tau_fast:.3f}: {info_fast.nstep} steps, rate {rate:.3f} per step")
below, above = outcome.values()
assert abs(tau_max - 0.899) < 1e-3 and below.converged and above.diverged
assert info_fast.converged and info_fast.nstep < 0.1 * below.nstep and abs(rate - 0.34) < 0.01

# %% [markdown]
# ### Exercise 3 (★★) The best damping of the tanh map, measured
#
# Section 3 computed $\tau^* = 2 / (2 - \lambda_{\min} - \lambda_{\max})$ from the Jacobian's eigenvalues. Measure
# instead: run the damped solver on `g_tanh` (tolerance $10^{-8}$, `max_iter=1000`) for $\tau$ from 0.70 to 1.00 in
# steps of 0.02, and find the $\tau$ with the fewest steps. How close is it to `tau_best`, and how many steps does
# it save against $\tau = 1$?

# %% tags=["exercise"]
# TODO: steps[tau] = number of steps of fixed_point(g_tanh, z0_tanh, tau=tau, max_iter=1000, tol=1e-8)
steps = {}
print("TODO" if not steps else min(steps, key=steps.get))

# %% tags=["solution"] jupyter={"source_hidden": true}
taus = np.round(np.arange(0.70, 1.001, 0.02), 2)
steps = {float(t): fixed_point(g_tanh, z0_tanh, tau=float(t), max_iter=1000, tol=1e-8)[1].nstep for t in taus}
tau_measured = min(steps, key=steps.get)
print(f"fewest steps at tau = {tau_measured} ({steps[tau_measured]}); predicted tau* = {tau_best:.3f}; "
      f"tau = 1 takes {steps[1.0]} steps")
assert abs(tau_measured - tau_best) <= 0.05
assert steps[tau_measured] < 0.5 * steps[1.0]

# %% [markdown]
# ### Exercise 4 (★★★) When damping cannot help
#
# Damping moves each eigenvalue along the segment from $1$ to $\lambda$. Take two linear maps
# $g(\mathbf z) = A\mathbf z + \mathbf c$ with diagonal $A$: (a) eigenvalues $1.1$ and $-0.5$, (b) eigenvalues
# $0.5$ and $-3$ (both fixed points at $\mathbf z^* = (1, 1)$).
#
# 1. Before you run anything: for which $\tau \in (0, 1]$ does each converge? Which $\tau$ is best for (b), and at
#    what rate?
# 2. Check with `fixed_point(..., on_diverge="flag")` for (a) at $\tau \in \{1, 0.5, 0.1\}$ and for (b) at your
#    best $\tau$.

# %% tags=["exercise"]
# TODO: write g_a and g_b, your predictions, and run the solver
tau_b_best = None
print("TODO" if tau_b_best is None else tau_b_best)

# %% tags=["solution"] jupyter={"source_hidden": true}
def linear_map(eigenvalues):
    A_ = torch.diag(torch.tensor(eigenvalues, dtype=F64))
    c_ = torch.ones(1, 2, dtype=F64) @ (torch.eye(2, dtype=F64) - A_).T  # z* = (1, 1)
    return lambda z: z @ A_.T + c_


g_a, g_b = linear_map([1.1, -0.5]), linear_map([0.5, -3.0])
z0_ex = torch.zeros(1, 2, dtype=F64)
# (a) mu = 1 + 0.1 tau > 1 for every tau > 0: no damping converges (Re lambda >= 1)
for t in (1.0, 0.5, 0.1):
    _, info_a = fixed_point(g_a, z0_ex, tau=t, max_iter=2000, tol=1e-8, on_diverge="flag")
    print(f"(a) tau = {t}: converged={info_a.converged}, diverged={info_a.diverged} at step {info_a.nstep}")
    assert not info_a.converged
# (b) mu = 1 - 0.5 tau and 1 - 4 tau: |1 - 4 tau| < 1 needs tau < 0.5; the best tau balances the two,
# 1 - 0.5 tau = -(1 - 4 tau), so tau = 4/9 and the rate is 1 - 0.5 * 4/9 = 7/9
tau_b_best = 4 / 9
z_b, info_b = fixed_point(g_b, z0_ex, tau=tau_b_best, max_iter=500, tol=1e-10)
rates_b = np.array(info_b.abs_trace[11:21]) / np.array(info_b.abs_trace[10:20])
print(f"(b) tau = 4/9: converged={info_b.converged} in {info_b.nstep} steps, measured rate "
      f"{rates_b.mean():.4f} (predicted {7 / 9:.4f}), z = {z_b.tolist()}")
assert info_b.converged and torch.allclose(z_b, torch.ones(1, 2, dtype=F64), atol=1e-8)
assert np.allclose(rates_b, 7 / 9, rtol=1e-3)

# %% [markdown]
# ## References
#
# As cited in the DEQReg paper's own reference list (its numbers in brackets).
#
# * Zhang, Y., Zhao, Y., Tao, Q.: Bridging Classical and Learning-based Iterative Registration through Deep
#   Equilibrium Models. (The DEQReg paper: Sec. 2.2, Eq. 5, the forward solve.)
# * [5] Bai, S., Kolter, J.Z., Koltun, V.: Deep equilibrium models. Advances in neural information processing
#   systems 32 (2019)
# * [7] Broyden, C.G.: A class of methods for solving nonlinear simultaneous equations. Mathematics of computation
#   19(92), 577–593 (1965)
# * [10] Geng, Z., Kolter, J.Z.: Torchdeq: A library for deep equilibrium models. arXiv preprint arXiv:2310.18605
#   (2023)
# * [15] Hering, A., Hansen, L., Mok, T.C., Chung, A.C., Siebert, H., Häger, S., Lange, A., Kuckertz, S., Heldmann,
#   S., Shao, W., et al.: Learn2reg: comprehensive multi-task medical image registration challenge, dataset and
#   evaluation in the era of deep learning. IEEE Transactions on Medical Imaging 42(3), 697–712 (2022)
#
# ## Summary
#
# * A fixed point $\mathbf z^* = g(\mathbf z^*)$ is found by iterating $g$; near $\mathbf z^*$ the error is
#   multiplied by the Jacobian $J$, so the iteration converges when $\rho(J) < 1$, and the residual shrinks by
#   $\rho$ per step (measured: exactly $|\mu|$ on the rotation-scaling map; $\sin z^* \approx 0.674$ predicts the
#   59 steps of $\cos$ to within one step). The library's `fixed_point` is the same loop with residual traces and
#   a `SolverDivergedError` when it blows up.
# * **Damping** $\tau$ moves each eigenvalue to $1 - \tau + \tau\lambda$: it turns divergence into convergence
#   for eigenvalues with $\operatorname{Re}\lambda < 1$, and can never help one with $\operatorname{Re}\lambda
#   \ge 1$.
# * **Anderson** mixes the last $m$ iterates and, on the tanh map, needed fewer map calls than the best damping,
#   without tuning (mind its absolute `lam` on small problems).
# * These are toy maps: whether a *learned* registration map is a contraction is an empirical question, taken up
#   in notebooks 05 and 06.
# * Next, **04b**: the backward pass. How to get $\mathrm d\mathcal L / \mathrm d\theta$ from the fixed point
#   alone, and what it costs in memory.
#
# ## Checks (for CI)
#
# The damping widget keeps the numbers it shows in `.result`; setting a slider's value re-runs it. The tests use
# that to check the three regimes without a browser.

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
