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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deqreg-lite/deqreg_lite/blob/main/notebooks/06_convergence_analysis.ipynb)
#
# # 06 · Convergence analysis: Figure 3, Table 2 and Table 1
#
# **Goal.** Reproduce the paper's central experiment at laptop scale: what happens when a learned iterative
# registration network is run for **more steps than it was trained for**? You sweep six shipped models (the paper's
# 3-level Unrolling, the single-level Unrolling of notebook 03, GraDIRN, RIIR, DEQReg-12 and DEQReg) from 1 to 96
# inference steps on **real brains that no model has seen**, draw the paper's Figure 3 with its standard-deviation
# bands, build its Table 2 (trained against best step count) and a Table 1 analogue whose DEQ rows carry the
# convergence certificate, measure how far DEQReg's field still moves between 48 and 500 solver steps, and test
# the differences with Wilcoxon tests, saying what those tests assume.
#
# **Learning objectives.** After this notebook you can
#
# * **measure** Dice and folding against the number of inference steps for any iterative method (`step_sweep`), and
#   **draw** mean and standard-deviation bands as the paper's Figure 3 does;
# * **compute** the paper's Table 2 (trained steps against best steps) by hand from a sweep, and **check** it against
#   `trained_vs_best`;
# * **read** a DEQ's convergence columns (final relative residual, converged, spectral radius of the map the solver
#   iterates, at the returned field) and **explain** what a spectral radius below 1 promises about running longer;
# * **measure** the drift of a field between 48 and 500 solver steps in voxels;
# * **explain** what a paired Wilcoxon test over 30 pairs of 3 subjects assumes, and **compute** it on subject-pair
#   means instead.
#
# **Prerequisites.** Notebooks [01](01_classical_registration.ipynb) (Eq. 1; the metrics: see 01, Metrics),
# [03](03_unrolling_and_its_failure.ipynb) (Eq. 3, the Unrolling and its failure past $T$),
# [04](04_fixed_points_forward.ipynb) (fixed points, contraction, the spectral radius), [05](05_deqreg.ipynb)
# (DEQReg) and **[05b](05b_learned_optimisers.ipynb) (the learned optimisers: Unrolling, GraDIRN, RIIR and the Eq. 4
# loss are taught there; this notebook only compares them)**. Maths: mean and standard deviation, a paired
# signed-rank test at the level of "it ranks the differences".
#
# **Study time.** Running it: about 11 minutes in default mode (all 30 unseen pairs: 10 min 39 s, measured once on a
# 2-core CPU that two training processes kept busy; a free laptop core should be faster), about 2 minutes in quick
# mode (`DEQREG_MODE=quick`, 3 unseen pairs: 1 min 49 s under pytest, same machine). Studying it: about 75 minutes
# for the reading, the predictions and the four exercises (an estimate).
#
# **Notation.** The series' one notation:
#
# | symbol | meaning |
# |---|---|
# | $I_f$, $I_m$ | fixed and moving image |
# | $u$ | displacement field in voxels, shape `(B, ndim, *spatial)`; **the paper's $\phi$ is our $u$** |
# | $\phi = \mathrm{Id} + u$, $I_m\circ\phi$ | the deformation, the warped moving image |
# | $E(u) = \mathcal{L}_{sim}(I_f, I_m\circ\phi) + \lambda\,\mathcal{L}_{reg}(u)$ | the Eq. 1 energy |
# | $f_\theta(I_f, I_m\circ\phi, u)$ | the learned **update** (a U-Net) |
# | $g_\theta(u) = u + f_\theta(\dots)$ | the **update map** whose fixed point DEQReg solves; $u_t = g_\theta(u_{t-1})$, $u_0 = 0$ |
# | $h_\theta(I_f, I_m)$ | the VoxelMorph network (predicts $u$ in one shot) |
# | $T$, $K$, $\tau$, $S$, $\gamma$ | unrolled / solver steps, phantom steps, damping, sampled states, their weight |
# | $g^\tau_\theta(u) = u + \tau\,(g_\theta(u) - u)$ | the **damped map** the solver iterates (the retrained DEQReg: $\tau = 0.5$; $g^1_\theta = g_\theta$) |
# | $\rho(J_{g^\tau_\theta})$ | spectral radius of the iterated map's Jacobian at the returned field (< 1: locally a contraction) |
#
# > **Conventions against the paper.**
# > * The paper writes $\phi$ for the displacement; we write $u$ (code: `disp`).
# > * The shipped models are **2D and work at 80 x 96** (run on 160 x 192 pairs through `HalfResolution`); the
# >   paper's are 3D at 128³ on OASIS (300/30/84 train/val/test scans) and NLST (170/10/30 pairs). Their numbers are
# >   not the paper's and are not comparable in absolute value.
# > * λ is in voxel units here (1 to 3) against the paper's 0.1 (OASIS); the classical row uses λ = 3.
# > * **HD95** here (95th percentile of the boundary distances, in mm) against the paper's **HD**; **SDlogJ** in
# >   Table 1 is Learn2Reg's $\operatorname{std}(\log(\operatorname{clip}(J + 3)))$, much smaller than the paper's
# >   $\operatorname{std}(\log|J|)$ (the +3 squeezes $\log$ near $\log 4$; both are defined in 01, Metrics).
# > * The paper's Table 2 is measured on its validation set; the main numbers here are on **unseen** pairs.
# > * Step counts: "steps" of the multi-level models (Unrolling 3 x 3, GraDIRN) are those of the finest level.
#
# **Caveat on the checkpoints.** The comparison is only as fair as the training behind each model. The setup cell
# prints each checkpoint's provenance from `data/checkpoints/manifest.json`: `init` (`scratch`, or the model it was
# warm-started from), training iterations and budget. A model warm-started or trained on another budget than the
# others is not an equal-budget comparison (`data/checkpoints/README.md`); some of the shipped checkpoints are being
# retrained. That is why this notebook **prints** every model number and writes its prose around what is printed.

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

    output.enable_custom_widget_manager()  # ipywidgets 8 widgets

# %%
import json
import time

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display

from deqreg_lite import evaluate as E
from deqreg_lite.config import by_mode, checkpoints_dir, mode, seed_everything
from deqreg_lite.datasets import unseen_brain_pairs
from deqreg_lite.datasets.pairs import PairDataset
from deqreg_lite.pretrained import load_pretrained
from deqreg_lite.viz import plot_jacobian, show_labels
from deqreg_lite.warp import warp

seed_everything(0)
# One thread is fastest for these small networks, and stays fast when other programs share the CPU.
torch.set_num_threads(1)
# Quick mode (CI) changes sizes and counts only, never the code path.
N_UNSEEN = by_mode(quick=3, default=30)            # real unseen pairs (the main test set)
N_HELDOUT = by_mode(quick=1, default=4)            # generated held-out pairs (a secondary set)
N_DRIFT = by_mode(quick=1, default=6)              # unseen pairs for the 48 -> 500 step drift (500 steps are slow)
SWEEP_STEPS = by_mode(quick=(1, 2, 3, 6, 12, 24, 48, 96),
                      default=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96))
CLASSICAL_ITERS = by_mode(quick=30, default=60)    # gradient-descent iterations per level of the classical row
LONG_STEPS = 500
ITERATIVE = ["unrolling_ml", "unrolling", "gradirn", "riir", "deqreg12", "deqreg"]
print(f"mode {mode()!r} (set DEQREG_MODE=quick for a faster run), torch {torch.__version__}")

all_unseen = unseen_brain_pairs((160, 192))
unseen = all_unseen[:: len(all_unseen) // N_UNSEEN][:N_UNSEEN]  # quick: 3 pairs of 3 different subject pairs
test_ds = PairDataset("test", N_HELDOUT + 1, (160, 192))
heldout = [test_ds[i] for i in range(1, N_HELDOUT + 1)]       # item 0 is the shipped brain2d pair
models = {name: load_pretrained(name) for name in ITERATIVE + ["voxelmorph"]}
manifest = json.loads((checkpoints_dir() / "manifest.json").read_text()).get("models", {})
for name, m in models.items():
    prov = manifest.get(name, {})
    print(f"{name:12s} trained steps {m.trained_steps:2d}; init {prov.get('init')}, {prov.get('iterations')} "
          f"training iterations, budget {prov.get('budget')}")
subjects = sorted({s["fixed_subject"] for s in unseen} | {s["moving_subject"] for s in unseen})
print(f"{len(unseen)} unseen pairs of {len(subjects)} subjects {subjects}; {len(heldout)} generated held-out pairs")

# %% [markdown]
# **The pairs.** The **unseen** pairs (`unseen_brain_pairs()`, `data/samples/TEST_BRAINS.md`) are every ordered
# pair of three real T1 brains at five matched coronal planes: 30 pairs, none of whose brains any model saw in
# training or validation. They are the honest test, but a small one: **3 subjects**, so the 30 pairs are not 30
# independent samples (section 5 comes back to this). The generated **held-out** pairs (`PairDataset("test")`) are
# new deformations of the two training brains: a secondary set, easier than the unseen one.
#
# ## 1. Step sweeps (Figure 3)
#
# `step_sweep` registers each pair once with 96 steps and `return_states=True`, and scores the state after each
# $t$ in the list, so one sweep costs one 96-step run per pair. For DEQReg, state $t$ is $u_t$, exactly $t$
# fixed-point steps from $u_0 = 0$.
#
# *How the numbers are read.* With an explicit step count, DEQReg runs **exactly** $t$ steps and returns the last
# iterate $u_t$ (`steps=t` switches the tolerance off and returns the last iterate: see `DEQReg.forward`), so the
# state read from the 96-step run is the field a run with `steps=t` returns. Only the trained solve
# (`steps=None`, section 3) stops at the tolerance and returns its lowest-residual iterate.
#
# **Predict.** Before you run the next cell, write down for each of the four families what you expect Dice and
# folding to do between the trained step count and 96 steps: the Unrollings (trained with $T = 3$), GraDIRN (whose
# steps also follow the similarity gradient), RIIR (trained on every step's output by Eq. 4) and the two DEQReg
# models (trained to reach a fixed point of $g_\theta$).

# %%
def sweep(name, items):
    t0 = time.perf_counter()
    sw = E.step_sweep(models[name], items, steps=SWEEP_STEPS)
    j = sw["steps"].index(sw["trained_steps"])
    print(f"{name:12s} {time.perf_counter() - t0:5.1f} s: Dice at 1 / {sw['trained_steps']} (trained) / 96 steps "
          f"{sw['dice'][0]:.3f} / {sw['dice'][j]:.3f} / {sw['dice'][-1]:.3f}; folding % "
          f"{sw['folding_pct'][0]:.2f} / {sw['folding_pct'][j]:.2f} / {sw['folding_pct'][-1]:.2f}", flush=True)
    return sw


sweeps = {name: sweep(name, unseen) for name in ITERATIVE}

# %%
vxm_unseen = E.evaluate(models["voxelmorph"], unseen, memory=False, hd95=False).summary()
colors = dict(zip(ITERATIVE, plt.cm.tab10.colors))


def figure3(sweeps, reference, title):
    """Mean (line) and mean +- std over pairs (shaded) against steps; o: trained steps, *: best-Dice steps."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    for key, ax, label in (("dice", axes[0], "Dice"), ("folding_pct", axes[1], "folding % (det J <= 0)")):
        for name, sw in sweeps.items():
            mean, std = np.asarray(sw[key]), np.asarray(sw[f"{key}_std"])
            ax.plot(sw["steps"], mean, "-", color=colors[name], label=name)
            ax.fill_between(sw["steps"], np.maximum(mean - std, 0), mean + std, color=colors[name], alpha=0.08)
            r = E.trained_vs_best(sw)
            ax.plot(r["trained_steps"], r[f"trained_{key}"], "o", color=colors[name], ms=8, mfc="white", mew=2)
            ax.plot(r["best_steps"], r[f"best_{key}"], "*", color=colors[name], ms=13)
        ax.axhline(reference[key], color="gray", ls="--", label="voxelmorph (1 step)")
        ax.set(xscale="log", xlabel="inference steps", ylabel=label, title=f"{label} vs steps ({title})")
        ax.set_xticks(list(SWEEP_STEPS), [str(s) for s in SWEEP_STEPS])
    # folding spans 0 to tens of %: linear up to 1 %, logarithmic above; it cannot be negative
    axes[1].set_yscale("symlog", linthresh=1.0)
    axes[1].set_ylim(bottom=0)
    axes[0].legend(fontsize=8, title="o trained, * best Dice; bands: +- 1 std", title_fontsize=8)
    fig.tight_layout()
    plt.show()


figure3(sweeps, vxm_unseen, f"{len(unseen)} unseen pairs")

# %% [markdown]
# Read the plot from left to right (the printed numbers above are the same curves). The paper's Figure 3 shows
# four behaviours: **Unrolling** drops severely past its trained steps; **GraDIRN** and **RIIR** improve a little past
# theirs and then lose regularity (folding grows) and Dice; **both DEQReg variants stay stable**, DEQReg's best
# Dice lying at the largest step count. Compare each curve with that description: a curve that is flat past its
# circle has kept a stable state, a folding curve that climbs by orders of magnitude has not. The bands are $\pm 1$
# standard deviation over the pairs: they mix differences between brains and planes with differences between
# models, which is why two curves inside each other's bands can still differ consistently pair by pair (section 5).
#
# *Caveat.* With few pairs (quick mode: 3) the bands and the positions of the stars are noisy; the default mode uses
# all 30 unseen pairs.
#
# The same sweep on the generated held-out pairs (the secondary set):

# %%
sweeps_heldout = {name: sweep(name, heldout) for name in ITERATIVE}
vxm_heldout = E.evaluate(models["voxelmorph"], heldout, memory=False, hd95=False).summary()
figure3(sweeps_heldout, vxm_heldout, f"{len(heldout)} generated held-out pair(s)")

# %% [markdown]
# ## 2. Table 2: trained steps against best steps
#
# The paper's Table 2 puts each method at its trained step count beside its best step count (the one with the
# highest mean Dice), with folding at both. Its claim: methods with intermediate-state correction (RIIR, DEQReg)
# are already near their best at their trained count; DEQReg's best (79.45 % at 96 steps) is within 0.12 Dice
# points of its trained 48 steps (79.33 %), measured on the paper's OASIS validation set.

# %%
display(Markdown("**Unseen pairs** (mean (std) over pairs):\n\n" + E.table2(sweeps)))
display(Markdown("**Generated held-out pairs:**\n\n" + E.table2(sweeps_heldout)))
for name, sw in sweeps.items():
    r = E.trained_vs_best(sw)
    print(f"{name:12s} best - trained Dice: {100 * (r['best_dice'] - r['trained_dice']):+.2f} points "
          f"(best at {r['best_steps']} steps); "
          f"Dice at 96 - best: {100 * (sw['dice'][-1] - r['best_dice']):+.2f} points, "
          f"folding at 96 / at trained: {sw['folding_pct'][-1]:.3f} / {r['trained_folding_pct']:.3f} %")

# %% [markdown]
# The first column printed is the **gap to the best**: small for a method whose training already picked a good
# stopping point. The second says what running to 96 steps costs against the best: near zero for a method that
# has converged, strongly negative for one that diverges. The paper's numbers for the gap (OASIS validation):
# Unrolling 0, GraDIRN 0.75, RIIR 0.09, DEQReg-12 1.34, DEQReg 0.12 Dice points.
#
# ## 3. A Table 1 analogue, with the DEQ rows' convergence columns
#
# Now every method at its **own** setting (trained steps; DEQReg's trained solve stops at relative tolerance
# $10^{-3}$ or 48 steps), plus two non-learned rows: **identity** (no registration) and **classical** gradient
# descent on $1 - \mathrm{LNCC} + \lambda\,\mathrm{diffusion}$ ($\lambda = 3$, 2 resolution levels, Adam). The
# **elastix** row needs the optional `itk-elastix` package. `evaluate(..., certificate=True)` asks DEQ methods for
# their convergence certificate: per pair, the final **relative residual** $\|g_\theta(u) - u\| / \|u\|$, whether the
# solve **converged** (residual under the tolerance) and the **spectral radius** $\rho$ of $J_{g_\theta}$ at the
# returned field (power iteration). `evaluate` also measures one training step's memory and time for the learned
# methods (the Mem. and Time columns). The metrics are those of 01, Metrics.
#
# *Caveat on time.* A DEQ row's inference time includes its spectral-radius estimate (the power iteration of
# `certificate=True`), on top of the 48-step solve; without the certificate it is shorter.
#
# *Caveat.* The classical row runs only a few dozen iterations per level (`CLASSICAL_ITERS`) to keep the notebook
# short: it is a floor for classical registration, not its best (notebook 01 runs it to convergence).

# %%
tables = {}
for name, method in {"identity": E.identity_method,
                     "classical": E.classical_method(lam=3.0, iterations=CLASSICAL_ITERS, levels=2)}.items():
    t0 = time.perf_counter()
    tables[name] = E.evaluate(method, unseen, name=name)
    print(f"{name:12s} {time.perf_counter() - t0:5.1f} s, Dice {tables[name].summary()['dice']:.3f}")
if E.elastix_available():
    tables["elastix"] = E.evaluate_elastix(unseen)
else:
    print("elastix: not installed (pip install itk-elastix), so no elastix row")
for name in ["voxelmorph"] + ITERATIVE:
    t0 = time.perf_counter()
    tables[name] = E.evaluate(models[name], unseen, name=name, certificate=True)
    print(f"{name:12s} {time.perf_counter() - t0:5.1f} s, Dice {tables[name].summary()['dice']:.3f}", flush=True)

# %%
display(Markdown(E.table1(tables, reference="deqreg")))


def certificate_table(tables):
    """Markdown: the convergence columns of the DEQ rows (mean and worst pair)."""
    lines = ["| Method | steps used (mean) | residual (mean) | residual (max) | converged (fraction) | "
             "ρ (mean) | ρ (max) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in tables.items():
        s = t.summary()
        if "residual" not in s:
            continue
        lines.append(f"| {name} | {s['steps']:.1f} | {s['residual']:.2e} | {s['residual_max']:.2e} | "
                     f"{s['converged']:.2f} | {s['spectral_radius']:.3f} | {s['spectral_radius_max']:.3f} |")
    return "\n".join(lines)


display(Markdown("**Convergence columns of the DEQ rows** (same run, same pairs):\n\n" + certificate_table(tables)))

# %% [markdown]
# **Reading the convergence columns.** A DEQ's claim to "converge" is checkable on every pair: a residual under the
# tolerance ($10^{-3}$) says the solver stopped at a point where $g_\theta(u) \approx u$; $\rho < 1$ at that point
# says the map the solver iterates, $g^\tau_\theta$, is locally a **contraction** there (notebook 04), so further
# steps move $u$ by geometrically shrinking amounts and cannot walk away. Which map matters: the retrained DEQReg
# iterates the damped map ($\tau = 0.5$), and its certificate is measured on that map. The undamped $g_\theta$ may
# have a spectral radius above 1 at the same point (an eigenvalue $\lambda < -1$ of $J_{g_\theta}$ becomes
# $\frac12 + \frac12\lambda$, inside the unit disc down to $\lambda = -3$): measured on three generated training
# pairs for the step-3325 checkpoint of the retrained run, $\rho(J_{g_\theta})$ was 2.2-2.7 while the damped map
# contracted (`benchmarks/results/recipes.md`), so a plain iteration of $g_\theta$ would oscillate away. A residual far above the tolerance, or $\rho > 1$, says the opposite:
# the 48 steps ended somewhere that is not (yet) a stable fixed point, and what looks like stability in Figure 3 is
# then slowness, not convergence. The retrained DEQReg (`deqreg_lite/presets.py`, `DEQ_RECIPE`) is trained to make
# $\rho < 1$; read the table above for what the shipped checkpoints do.
#
# The same table on the generated held-out pairs (no HD95, no memory, to stay short):

# %%
tables_heldout = {"identity": E.evaluate(E.identity_method, heldout, memory=False, hd95=False, name="identity")}
for name in ["voxelmorph"] + ITERATIVE:
    tables_heldout[name] = E.evaluate(models[name], heldout, name=name, memory=False, hd95=False, certificate=True)
display(Markdown(E.table1(tables_heldout, reference="deqreg")))
if len(heldout) < E.min_pairs_for_test():
    print(E.no_test_note(len(heldout)))
display(Markdown(certificate_table(tables_heldout)))

# %% [markdown]
# ## 4. Drift: how far does DEQReg's field still move from 48 to 500 steps?
#
# Figure 3 stops at 96 steps. A fixed point should not move however long you iterate, so run DEQReg with exactly
# 48 steps (its trained setting) and with 500, and measure the **largest displacement change** over the image, in
# voxels of the 160 x 192 grid, with the change in Dice and folding.
#
# **Predict.** Before running: if the certificate above reads $\rho < 1$ and a residual under $10^{-3}$, what is the
# largest move you expect (a hundredth of a voxel? one voxel?)? And if it reads $\rho > 1$?

# %%
drift_pairs = all_unseen[12:12 + N_DRIFT]  # plane 2 (the middle), each ordered subject pair once in default mode
drift_rows = []
with torch.no_grad():
    for s in drift_pairs:
        a = models["deqreg"](s["fixed"], s["moving"], steps=48)
        b = models["deqreg"](s["fixed"], s["moving"], steps=LONG_STEPS)
        ma, mb = E.pair_metrics(s, a.disp, with_hd95=False), E.pair_metrics(s, b.disp, with_hd95=False)
        used = (int(a.info.get("steps")), int(b.info.get("steps")))
        drift_rows.append({"pair": s["name"].split(":")[1], "steps used": used,
                           "max move (vox)": float((b.disp - a.disp).abs().max()),
                           "Dice change (points)": 100 * (mb["dice"] - ma["dice"]),
                           "folding change (pp)": mb["folding_pct"] - ma["folding_pct"]})
        print(drift_rows[-1], flush=True)
max_move = max(r["max move (vox)"] for r in drift_rows)
print(f"DEQReg, 48 -> {LONG_STEPS} steps on {len(drift_rows)} unseen pair(s): largest move {max_move:.3f} voxels")

# %% [markdown]
# Both runs take exactly the steps asked for (the printed "steps used"; an explicit step count switches the
# tolerance off), so the move is what the 452 extra steps did. Compare the largest move with the certificate: a
# contractive iteration ($\rho < 1$) that has reached its linear regime moves by at most about $\frac{\rho}{1-\rho}$
# times its last step, far below a voxel when that step is small; a move of a voxel or more means the 48-step field
# was not a fixed point (exercise 4 computes this bound). The acceptance target of issue 10 for the retrained
# model is a move of at most 0.25 voxels.
#
# ## 5. Are the differences real? Wilcoxon tests and what they assume
#
# `table1` marks with † a cell whose **paired Wilcoxon signed-rank test** against DEQReg gives $p < 0.05$. The test
# ranks the per-pair differences and asks whether positive and negative ones are balanced. It assumes the pairs are
# **independent** draws. Ours are not: 30 pairs from **3 subjects** (every ordered subject pair at 5 planes), so
# neighbouring planes of the same two brains are strongly correlated. A small p over the 30 pairs says "on these
# three brains, one model beats the other consistently", not "it will on the next brain". A more honest (and much
# weaker) test averages each **ordered subject pair** over its planes and tests those 6 means: with 6 values the
# smallest possible two-sided p is $2/2^6 \approx 0.031$.
#
# **Predict.** DEQReg against VoxelMorph: will the p-value over the pairs be smaller or larger than over the
# subject-pair means?

# %%
def subject_pair_table(table, items):
    """A Table with one row per ordered subject pair (moving -> fixed): the mean of each metric over its planes."""
    groups = {}
    for s, row in zip(items, table.rows):
        groups.setdefault(f"{s['moving_subject']}->{s['fixed_subject']}", []).append(row)
    rows = [{"pair": k, **{c: float(np.mean([r[c] for r in g])) for c in ("dice", "folding_pct")}}
            for k, g in groups.items()]
    return E.Table(rows=rows, name=table.name)


wilcoxon_rows = []
for other in ("voxelmorph", "unrolling_ml", "unrolling", "gradirn", "riir", "deqreg12"):
    a, b = tables["deqreg"], tables[other]
    ga, gb = subject_pair_table(a, unseen), subject_pair_table(b, unseen)
    diff = 100 * (a.summary()["dice"] - b.summary()["dice"])
    p_pairs = E.wilcoxon(a, b, "dice") if len(unseen) >= 2 else float("nan")
    p_groups = E.wilcoxon(ga, gb, "dice") if len(ga.rows) >= 2 else float("nan")
    wilcoxon_rows.append((other, diff, p_pairs, p_groups, len(ga.rows)))
lines = ["| DEQReg vs | Dice difference (points) | p over pairs | p over subject-pair means | subject pairs |",
         "|---|---:|---:|---:|---:|"]
lines += [f"| {o} | {d:+.2f} | {p:.3g} | {q:.3g} | {n} |" for o, d, p, q, n in wilcoxon_rows]
display(Markdown("\n".join(lines)))
n_groups = wilcoxon_rows[0][-1]
print(f"{len(unseen)} pairs: smallest possible two-sided p {2 / 2 ** len(unseen):.2g}; {n_groups} subject-pair means: "
      f"smallest possible p {2 / 2 ** n_groups:.3g}")
if len(unseen) < E.min_pairs_for_test():
    print(E.no_test_note(len(unseen)))

# %% [markdown]
# **About the daggers and the p-values.** With $n$ values and no ties, the smallest two-sided Wilcoxon p-value is
# $2/2^n$: 0.25 for the 3 pairs of quick mode (no dagger is possible there, however large the difference), about
# $2\cdot10^{-9}$ for the 30 pairs of default mode, and 0.031 for 6 subject-pair means. The paper tests on 84
# OASIS test scans (and 30 NLST pairs) of different subjects, where the independence assumption is much closer to
# true; our 3 subjects cannot support a claim about brains in general, whatever p the 30 pairs give.
#
# ## 6. Explore: every model, step by step
#
# The widget runs each model once for 96 steps on one unseen pair and keeps its states. Pick a model and a step:
# it shows the warped moving image with its labels, the Jacobian determinant (folds in black), and this pair's Dice
# against steps with the chosen step marked. Slide an Unrolling past step 3, then DEQReg to 96.

# %%
EXPLORE_STEPS = sorted(set(range(1, 13)) | {16, 24, 32, 48, 64, 96})
explore_pair = unseen[0]
explore_states = {}
with torch.no_grad():
    for name in ITERATIVE:
        res = models[name](explore_pair["fixed"], explore_pair["moving"], steps=96, return_states=True)
        explore_states[name] = {int(t): st for t, st in zip(res.state_steps, res.states) if int(t) in EXPLORE_STEPS}
explore_dice = {name: [E.pair_metrics(explore_pair, explore_states[name][t], with_hd95=False)["dice"]
                       for t in EXPLORE_STEPS] for name in ITERATIVE}


def show_step(model, step, show=True):
    disp = explore_states[model][step]
    m = E.pair_metrics(explore_pair, disp, with_hd95=False)
    if show:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
        show_labels(axes[0], warp(explore_pair["moving"], disp),
                    warp(explore_pair["moving_seg"], disp, mode="nearest"), "warped moving + its labels",
                    names=explore_pair.get("label_names"))
        im = plot_jacobian(axes[1], disp, title=f"det J (folding {m['folding_pct']:.2f} %)")
        fig.colorbar(im, ax=axes[1], shrink=0.8)
        for name in ITERATIVE:
            axes[2].plot(EXPLORE_STEPS, explore_dice[name], "-", color=colors[name], lw=2.5 if name == model else 1,
                         alpha=1 if name == model else 0.35, label=name)
        axes[2].plot([step], [m["dice"]], "o", color=colors[model], ms=9)
        axes[2].set(xscale="log", xlabel="inference steps", ylabel="Dice", title="this pair's Dice")
        axes[2].legend(fontsize=7)
        fig.suptitle(f"{model}, step {step} (trained: {models[model].trained_steps}): Dice {m['dice']:.3f}, "
                     f"folding {m['folding_pct']:.2f} %")
        plt.show()
    return {"model": model, "step": step, "dice": m["dice"], "folding_pct": m["folding_pct"]}


explorer = W.interactive(
    show_step,
    model=W.Dropdown(options=ITERATIVE, value="unrolling", description="model"),
    step=W.SelectionSlider(options=EXPLORE_STEPS, value=3, description="step", continuous_update=False,
                           layout=W.Layout(width="600px")),
    show=W.fixed(True),
)
display(explorer)

# %% [markdown]
# ## Exercises
#
# ### Exercise 1 (★) When does a model break?
#
# Figure 3 says some models "break" when run too long. Make that precise. For every model in `sweeps`, find
#
# 1. the **first** step count of the sweep past the trained count (`sweeps[name]["trained_steps"]`) at which the
#    mean folding exceeds both 1 % and twice its value at the trained count;
# 2. the first step count past the best-Dice step at which the mean Dice falls more than 5 Dice points (0.05)
#    below that best (before the best, the model is still improving: that is not breaking);
#
# `None` where it never happens within 96 steps. Compare both with the trained count.

# %% tags=["exercise"]
def breaking_points(sw):
    """(first step past the trained count with folding > max(1 %, 2 x trained folding), first step past the
    best-Dice step with Dice < best - 0.05); None where never."""
    fold, drop = None, None  # TODO: scan sw["steps"] together with sw["folding_pct"] and sw["dice"]
    return fold, drop


for name, sw in sweeps.items():
    print(name, "trained", sw["trained_steps"], "breaks at", breaking_points(sw), "(TODO)")

# %% tags=["solution"] jupyter={"source_hidden": true}
def breaking_points(sw):
    steps, dice, fold_pct = sw["steps"], sw["dice"], sw["folding_pct"]
    trained, j_best = sw["trained_steps"], int(np.argmax(dice))
    limit = max(1.0, 2 * fold_pct[steps.index(trained)])
    fold = next((t for t, f in zip(steps, fold_pct) if t > trained and f > limit), None)
    drop = next((t for t, d in zip(steps, dice) if t > steps[j_best] and d < dice[j_best] - 0.05), None)
    return fold, drop


breaks = {}
for name, sw in sweeps.items():
    breaks[name] = breaking_points(sw)
    print(f"{name:12s} trained {sw['trained_steps']:2d}: folding breaks from {breaks[name][0]} steps, "
          f"Dice 5 points below its best from {breaks[name][1]} steps")
    # a breaking point lies past the trained count (folding) or past the best step (Dice), and the condition holds there
    fold, drop = breaks[name]
    assert fold is None or (fold > sw["trained_steps"] and sw["folding_pct"][sw["steps"].index(fold)] > 1.0)
    assert drop is None or sw["dice"][sw["steps"].index(drop)] < max(sw["dice"]) - 0.05
# the paper's claim in the weakest form: the vanilla Unrolling (T = 3) breaks one way or the other within 96 steps
assert breaks["unrolling"] != (None, None)

# %% [markdown]
# The printout is the answer: read each model's two steps against its trained count. A step a few times the trained
# count means the model broke soon after its training horizon; `None` for both means it never left its stable
# state within 96 steps. (The paper's claim is that the vanilla Unrolling breaks and DEQReg does not; the solution
# asserts the first half in its weakest form, and `## Checks` asserts the form of both that a correct model meets.)
#
# ### Exercise 2 (★★) Table 2 by hand
#
# Using only `sweeps["riir"]["per_pair"]` (per step, a list of per-pair values) and `sweeps["riir"]["steps"]`,
# compute RIIR's Table 2 row: the mean Dice and folding at its trained step count, the step count with the highest
# mean Dice (ties: fewest steps) and the mean Dice and folding there. Check it against `E.trained_vs_best`.

# %% tags=["exercise"]
sw = sweeps["riir"]
trained_dice = best_steps = best_dice = None  # TODO: means over sw["per_pair"]["dice"][j] for the right j
print("TODO: RIIR trained Dice", trained_dice, "best", best_dice, "at", best_steps)

# %% tags=["solution"] jupyter={"source_hidden": true}
sw = sweeps["riir"]
means = [float(np.mean(v)) for v in sw["per_pair"]["dice"]]
folds = [float(np.mean(v)) for v in sw["per_pair"]["folding_pct"]]
j_tr = sw["steps"].index(sw["trained_steps"])
j_best = int(np.argmax(means))  # argmax returns the first maximum: the fewest steps
trained_dice, best_steps, best_dice = means[j_tr], sw["steps"][j_best], means[j_best]
print(f"RIIR: trained {sw['trained_steps']} steps: Dice {trained_dice:.4f}, folding {folds[j_tr]:.3f} %; "
      f"best {best_steps} steps: Dice {best_dice:.4f}, folding {folds[j_best]:.3f} %")
ref = E.trained_vs_best(sw)
assert ref["best_steps"] == best_steps
assert abs(ref["trained_dice"] - trained_dice) < 1e-9 and abs(ref["best_dice"] - best_dice) < 1e-9
assert abs(ref["best_folding_pct"] - folds[j_best]) < 1e-9 and best_dice >= trained_dice

# %% [markdown]
# ### Exercise 3 (★★) What can a Wilcoxon test over subjects say?
#
# 1. Write `min_p(n)`, the smallest two-sided p-value of a paired Wilcoxon signed-rank test over `n` values without
#    ties, and find the fewest values with which $p < 0.05$ is possible at all. Check against `E.min_pairs_for_test()`.
# 2. Our unseen pairs have 3 subjects. How many **unordered** subject pairs is that, and what is the smallest p a
#    test over their means could reach? Could any result on these three brains be "significant" that way?

# %% tags=["exercise"]
def min_p(n):
    return None  # TODO: every one of the 2^n sign patterns is equally likely under the null


print("TODO: min_p(6) =", min_p(6))

# %% tags=["solution"] jupyter={"source_hidden": true}
def min_p(n):
    # all n differences of one sign is the most extreme of 2^n equally likely sign patterns; two-sided: both signs
    return 2 / 2 ** n


fewest = next(n for n in range(1, 50) if min_p(n) < 0.05)
n_unordered = len(subjects) * (len(subjects) - 1) // 2
print(f"fewest values for p < 0.05: {fewest}; {len(subjects)} subjects give {n_unordered} unordered pairs, "
      f"smallest p {min_p(n_unordered):.3f}")
assert fewest == E.min_pairs_for_test() == 6
assert min_p(n_unordered) > 0.05 or n_unordered >= 6
for _, _, p_pairs, p_groups, n in wilcoxon_rows:  # no test beats its own floor
    assert not p_groups < min_p(n) - 1e-12 and not p_pairs < min_p(len(unseen)) - 1e-12

# %% [markdown]
# With 3 unordered subject pairs the floor is 0.25: no difference between two models can be significant at 0.05
# when the unit is the subject pair. The ordered pairs (6 means) reach 0.031 only if all six agree in sign, and even
# then the two directions of one subject pair share both brains. A test that speaks about brains in general needs
# many subjects, as the paper's 84 OASIS test scans provide.
#
# ### Exercise 4 (★★★) The contraction factor, read from the residuals
#
# For a contraction with factor $q < 1$ the step sizes $r_t = \|u_t - u_{t-1}\|$ shrink like $q^t$, and the
# remaining distance to the fixed point is at most $\frac{q}{1-q}\,r_t$ (a geometric series). Run DEQReg on
# `drift_pairs[0]` for 96 steps with `return_states=True`, compute the step sizes $r_t$ from the states, estimate $q$
# as the geometric mean of $r_{t+1}/r_t$ over the last 24 steps, and compare it with the certificate's spectral
# radius for that pair (`tables["deqreg"]` rows have it for the unseen pairs; rerun `E.evaluate(...,
# certificate=True)` on the drift pair). If $q < 1$, compute the bound $\frac{q}{1-q}\,r_{96}$ and compare it with
# the drift measured in section 4 (careful: the drift is a max-abs, $r_t$ an L2 norm; use max-abs for both).
#
# <details><summary>Hint</summary>
#
# Prepend $u_0 = 0$ to `res.states`; then `(b - a).abs().max()` over consecutive states gives $r_1, \dots, r_{96}$.
# The geometric mean of the last 24 ratios telescopes to $(r_{96} / r_{72})^{1/24}$.
#
# </details>

# %% tags=["exercise"]
q_est = None  # TODO: states -> step sizes (max-abs) -> geometric mean of the ratios over the last 24 steps
print("TODO: contraction factor estimate", q_est)

# %% tags=["solution"] jupyter={"source_hidden": true}
s = drift_pairs[0]
with torch.no_grad():
    res = models["deqreg"](s["fixed"], s["moving"], steps=96, return_states=True)
states = [torch.zeros_like(res.states[0])] + list(res.states)
r = np.array([float((b - a).abs().max()) for a, b in zip(states[:-1], states[1:])])
ratios = r[-24:] / r[-25:-1]
q_est = float(np.exp(np.mean(np.log(ratios))))
rho = E.evaluate(models["deqreg"], [s], memory=False, hd95=False, certificate=True).rows[0]["spectral_radius"]
print(f"step size (max-abs, voxels) at t = 1, 48, 96: {r[0]:.3g}, {r[47]:.3g}, {r[-1]:.3g}")
print(f"contraction estimate q = {q_est:.3f} from the last 24 steps; certificate rho = {rho:.3f}")
if q_est < 1:
    print(f"bound on the remaining move after 96 steps: {q_est / (1 - q_est) * r[-1]:.3g} voxels "
          f"(measured 48 -> {LONG_STEPS} on this pair: {drift_rows[0]['max move (vox)']:.3g})")
else:
    print("q >= 1: no bound; the iteration is not contracting at the end of the 96 steps")
assert len(r) == 96 and np.all(np.isfinite(r)) and r[0] > 0
assert abs(np.log(q_est) - np.log(r[-1] / r[-25]) / 24) < 1e-6  # the geometric mean telescopes

# %% [markdown]
# The estimate $q$ is the *observed* rate of the iteration; $\rho$ is the local linear rate at the end point. They
# agree when the iteration is already in the linear regime near a fixed point. When $q$ is close to 1, even a
# small last step hides a long way to go ($\frac{q}{1-q}$ is 9 for $q = 0.9$, 99 for $q = 0.99$), which is why a
# small residual alone does not certify a converged field and why the paper-style drift test of section 4 runs to
# 500 steps.
#
# ## References
#
# As cited in the DEQReg paper's own reference list (its numbers in brackets).
#
# * Zhang, Y., Zhao, Y., Tao, Q.: Bridging Classical and Learning-based Iterative Registration through Deep
#   Equilibrium Models. (The DEQReg paper: Sec. 3, the convergence analysis; Figure 3, Table 1, Table 2.)
# * [5] Bai, S., Kolter, J.Z., Koltun, V.: Deep equilibrium models. Advances in neural information processing systems
#   32 (2019)
# * [6] Balakrishnan, G., Zhao, A., Sabuncu, M.R., Guttag, J., Dalca, A.V.: Voxelmorph: a learning framework for
#   deformable medical image registration. IEEE Transactions on Medical Imaging 38(8), 1788–1800 (2019)
# * [15] Hering, A., Hansen, L., Mok, T.C., Chung, A.C., Siebert, H., Häger, S., Lange, A., Kuckertz, S., Heldmann,
#   S., Shao, W., et al.: Learn2reg: comprehensive multi-task medical image registration challenge, dataset and
#   evaluation in the era of deep learning. IEEE Transactions on Medical Imaging 42(3), 697–712 (2022)
# * [18] Klein, S., Staring, M., Murphy, K., Viergever, M.A., Pluim, J.P.: Elastix: a toolbox for intensity-based
#   medical image registration. IEEE transactions on medical imaging 29(1), 196–205 (2009)
# * [22] Qiu, H., Hammernik, K., Qin, C., Chen, C., Rueckert, D.: Embedding gradient-based optimization in image
#   registration networks. In: Medical Image Computing and Computer-Assisted Intervention–MICCAI 2022. pp. 56–65.
#   Springer (2022)
# * [27] Zhang, Y., Zhao, Y., Xue, H., Kellman, P., Klein, S., Tao, Q.: Recurrent inference machine for medical image
#   registration. arXiv preprint arXiv:2406.13413 (2024)
#
# ## Summary
#
# * **Figure 3** (Dice and folding against 1 to 96 steps, mean and $\pm 1$ std bands) on 30 real unseen pairs of 3
#   brains: the printed sweeps say, per model, what running past the trained step count does; the paper's claim
#   (Unrolling breaks, DEQReg stays) is asserted in `## Checks` in the form these checkpoints must meet.
# * **Table 2** puts each model's trained step count beside its best; exercise 2 computes it by hand.
# * **Table 1 analogue**: DEQ rows carry their certificate (final relative residual, converged, spectral radius
#   $\rho$ at the returned field): $\rho < 1$ with a small residual is what makes "running longer changes nothing" a
#   property rather than an observation. The **drift** from 48 to 500 steps measures it directly, in voxels.
# * **What the retrained DEQReg does** (seed 0, selected at step 3750; measured on all 30 unseen pairs, listed in
#   `data/checkpoints/README.md`): 29 of 30 trained solves converged (largest relative residual 1.18e-3), the
#   iterated map's spectral radius is below 1 on 26 of 30 (the other four, 1.09-1.32, have a negative Rayleigh
#   quotient: an oscillating direction that Anderson settles and the plain damped iteration would not), and its
#   Dice, 0.545, is below VoxelMorph's 0.557 and the paper's Unrolling's 0.578. Convergence is largely there; the
#   paper's accuracy claim is not reproduced by these small CPU-trained models.
# * **Wilcoxon tests** over 30 pairs of 3 subjects measure consistency on these brains, not generalisation; over
#   subject-pair means the floor of p is 0.031 (6 ordered) or 0.25 (3 unordered).
# * Caveats: small 2D models at 80 x 96, of the provenance printed at the top (check whether all were trained from
#   scratch on one budget); the numbers are printed by the cells above, never typed, so a re-run with new
#   checkpoints updates them.
#
# ## Checks (for CI)
#
# The claims of the paper, in the form that a correct model must meet on these pairs, and the widget.

# %%
r_deq, r_unr = E.trained_vs_best(sweeps["deqreg"]), E.trained_vs_best(sweeps["unrolling"])
deq96 = {k: sweeps["deqreg"][k][-1] for k in ("dice", "folding_pct")}
unr96 = {k: sweeps["unrolling"][k][-1] for k in ("dice", "folding_pct")}
print(f"DEQReg: best Dice {r_deq['best_dice']:.4f} at {r_deq['best_steps']} steps; at 96 steps "
      f"{deq96['dice']:.4f} with {deq96['folding_pct']:.2f}% folding")
print(f"Unrolling: best Dice {r_unr['best_dice']:.4f} at {r_unr['best_steps']} steps; at 96 steps "
      f"{unr96['dice']:.4f} with {unr96['folding_pct']:.2f}% folding (at its trained 3 steps: "
      f"{r_unr['trained_folding_pct']:.2f}%)")
# DEQReg stays within a Dice point of its best at 96 steps, with folding under 1 %
assert deq96["dice"] >= r_deq["best_dice"] - 0.01 and deq96["folding_pct"] < 1.0
# the single-level Unrolling (T = 3) loses Dice and at least doubles its folding by 96 steps
assert unr96["dice"] < r_unr["best_dice"] and unr96["folding_pct"] >= 2 * r_unr["trained_folding_pct"]
# DEQReg's certificate on the unseen pairs, as measured. Issue 10's targets are a trained solve within the
# tolerance (1e-3) and a spectral radius below 1 on every pair, and a largest move of 0.25 voxel from 48 to 500
# steps; the retrained checkpoint meets them on most pairs, not on all (the summary gives the counts). Asserted here
# is what it does meet on every pair measured:
deq_rows = tables["deqreg"].rows
print(f"DEQReg on {len(deq_rows)} unseen pair(s): residual max {max(r['residual'] for r in deq_rows):.2e}, "
      f"converged {sum(r['converged'] for r in deq_rows):.0f}/{len(deq_rows)}, spectral radius < 1 on "
      f"{sum(r['spectral_radius'] < 1 for r in deq_rows)}/{len(deq_rows)} (max "
      f"{max(r['spectral_radius'] for r in deq_rows):.3f}); largest move 48 -> {LONG_STEPS}: {max_move:.3g} voxels")
# every trained solve ends within twice the tolerance (the old-protocol checkpoint ended at 1e-2 to 4e-2) ...
assert max(r["residual"] for r in deq_rows) <= 2e-3
# ... and running on to 500 steps changes neither Dice (by more than 0.5 point) nor folding (0.05 pp): it has settled
assert all(abs(r["Dice change (points)"]) <= 0.5 and r["folding change (pp)"] <= 0.05 for r in drift_rows)
# Table 1: DEQReg well above identity; against VoxelMorph and the paper's Unrolling the gap is printed, not asserted
# (the paper's claim that DEQReg beats both is not reproduced by these checkpoints: see the summary)
dice = {n: t.summary()["dice"] for n, t in tables.items() if t.rows}
assert dice["deqreg"] > dice["identity"] + 0.05
for other in ("voxelmorph", "unrolling_ml"):
    if other in dice:
        print(f"DEQReg - {other}: {100 * (dice['deqreg'] - dice[other]):+.1f} Dice points on these pairs")
# every certificate column is there and finite for the DEQ rows
for name in ("deqreg12", "deqreg"):
    s = tables[name].summary()
    assert all(np.isfinite(s[k]) for k in ("residual_max", "converged", "spectral_radius_max")), name
assert np.isfinite(max_move) and len(drift_rows) == N_DRIFT

# %%
# the widget: the numbers it shows are those of the sweep's states
out = show_step("unrolling", 3, show=False)
assert set(out) == {"model", "step", "dice", "folding_pct"}
assert abs(out["dice"] - explore_dice["unrolling"][EXPLORE_STEPS.index(3)]) < 1e-9
assert explorer.result["model"] == "unrolling" and explorer.result["step"] == 3
j = sweeps["deqreg"]["steps"].index(96)
assert abs(show_step("deqreg", 96, show=False)["dice"] - sweeps["deqreg"]["per_pair"]["dice"][j][0]) < 1e-6
