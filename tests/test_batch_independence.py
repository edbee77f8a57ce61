"""Batch independence: every member of a batch gets the result it gets alone, whatever shares its batch.

The solvers stop, select and judge divergence per sample; ``register`` steps each pair on its own energy. Checked
here for the solvers, for every learned method (freshly built and shipped) and for ``register``, on batches of
mixed pairs, to 1e-4 voxel.

Float rounding is taken out of the comparison for the networks: on CPU, oneDNN picks batch-size-dependent conv
kernels whose results differ by ~1e-6 per call, and DEQReg's 48 non-contracting steps amplify that to ~2e-4 voxel.
With oneDNN off, convolutions round alike for any batch, so what is left is the algorithm's dependence (0 here).
"""
import contextlib
import warnings

import pytest
import torch

from deqreg_lite import load_pretrained, load_sample
from deqreg_lite.classical import register
from deqreg_lite.datasets import synthetic_pair
from deqreg_lite.methods import METHODS, build_method
from deqreg_lite.pretrained import available_pretrained
from deqreg_lite.solvers import SOLVERS, solve
from deqreg_lite.warp import resize_image

F64 = torch.float64
TOL = 1e-4  # voxels


@contextlib.contextmanager
def plain_convs():
    """oneDNN off for the block (torch warns about TF32 on Intel GPUs when the flag is set: irrelevant here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def mixed_pairs(shape):
    """The brain2d pair resampled to ``shape``, a deformed synthetic pair and an unrelated one: ``(3, 1, *shape)``."""
    brain = load_sample("brain2d")
    pairs = [(resize_image(brain["fixed"], shape), resize_image(brain["moving"], shape))]
    for seed, mode in ((1, "deformed"), (2, "independent")):
        p = synthetic_pair(shape, seed=seed, mode=mode)
        pairs.append((p["fixed"], p["moving"]))
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def per_member_gap(batched, solo):
    """Largest displacement difference (voxels, L2 over the channels) per member."""
    return [float(x) for x in (batched - solo).norm(dim=1).flatten(1).amax(dim=1)]


# ---------------------------------------------------------------------------------------------------- solvers
def rates_map():
    """Sample i iterates z -> rho_i z + c_i: contractions of very different speed, and one slow expansion."""
    gen = torch.Generator().manual_seed(0)
    rho = torch.tensor([0.3, 0.9, 0.99, 1.05], dtype=F64).view(4, 1)
    c = torch.randn(4, 8, generator=gen, dtype=F64)
    return (lambda z, rho=rho, c=c: rho[: z.shape[0]] * z + c[: z.shape[0]]), rho, c


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("policy", ["lowest", "last"])
def test_solver_samples_are_solved_on_their_own(name, policy):
    _, rho, c = rates_map()
    z0 = torch.zeros(4, 8, dtype=F64)
    opts = dict(max_iter=60, tol=1e-3, return_policy=policy, on_diverge="flag")
    z, info = solve(lambda z: rho * z + c, z0, name, **opts)
    for i in range(4):
        zi, ii = solve(lambda z, i=i: rho[i] * z + c[i], z0[i:i + 1], name, **opts)
        assert torch.allclose(z[i], zi[0], rtol=0, atol=1e-10), (name, i)
        assert info.sample_nstep[i] == ii.nstep and info.sample_best_step[i] == ii.best_step, (name, i)
        assert info.sample_converged[i] == ii.converged and info.sample_diverged[i] == ii.diverged, (name, i)
        assert info.sample_residual[i] == pytest.approx(ii.residual, rel=1e-9, nan_ok=True)
    assert info.nstep == max(info.sample_nstep) == len(info.rel_trace) and info.nfe == info.nstep
    if name == "fixed_point":  # the fast sample stops long before the slow ones; the expansion diverges
        assert info.sample_nstep[0] < info.sample_nstep[1] < info.sample_nstep[2]
        assert info.sample_diverged == [False, False, False, True] and info.diverged and not info.converged


@pytest.mark.parametrize("name, slow", [("fixed_point", lambda z: 0.999 * z + 1.0),
                                        ("anderson", lambda z: z * z + 2.0),   # no fixed point: it wanders
                                        ("broyden", lambda z: 0.5 * torch.sin(3 * z) + 2.0)])
def test_a_stopped_sample_is_frozen(name, slow):
    seen = []
    f = lambda z: torch.cat([0.1 * z[:1] + 1.0, slow(z[1:])])
    z, info = solve(f, torch.zeros(2, 3, dtype=F64), name, max_iter=40, tol=1e-6, growth_window=0,
                    on_diverge="flag", callback=lambda k, z: seen.append(z.clone()))
    stop = info.sample_nstep[0]
    assert stop < info.sample_nstep[1] and info.sample_converged[0]
    assert all(torch.equal(s[0], z[0]) for s in seen[stop:])  # its input stays at its answer
    assert torch.allclose(z[0], torch.full((3,), 1 / 0.9, dtype=F64), atol=1e-6)


# ----------------------------------------------------------------------------------------- learned methods
def check_method(model, fixed, moving, steps=None):
    with torch.no_grad(), plain_convs():
        batched = model(fixed, moving, steps=steps)
        solos = [model(fixed[i:i + 1], moving[i:i + 1], steps=steps) for i in range(fixed.shape[0])]
    gaps = per_member_gap(batched.disp, torch.cat([s.disp for s in solos]))
    assert max(gaps) <= TOL, gaps
    return batched, solos


@pytest.mark.parametrize("name", sorted(METHODS))
def test_built_method_members_match_their_solo_runs(name):
    torch.manual_seed(0)
    model = build_method(name, ndim=2).eval()
    fixed, moving = mixed_pairs((32, 40))
    check_method(model, fixed, moving)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_pretrained_members_match_their_solo_runs(name):
    if not available_pretrained().get(name):
        pytest.skip(f"no shipped checkpoint for {name}")
    fixed, moving = mixed_pairs((80, 96))  # the wrapper halves it: 40 x 48 inside
    check_method(load_pretrained(name), fixed, moving)


@pytest.mark.parametrize("name, tol", [("deqreg", 0.03), ("deqreg12", 0.05)])
def test_deqreg_members_that_stop_at_different_steps(name, tol):
    """A tolerance that the pairs reach at different steps (or never): DEQReg stops each pair on its own.
    (With these pairs and the retrained checkpoints, solo: deqreg stops at steps 7, 8 and 7; deqreg12 stops at 8
    and runs out at 12 twice.)"""
    if not available_pretrained().get(name):
        pytest.skip(f"no shipped checkpoint for {name}")
    model = load_pretrained(name)
    model.method.tol = tol
    batched, solos = check_method(model, *mixed_pairs((80, 96)))
    steps = batched.info["sample_steps"]
    assert steps == [s.info["steps"] for s in solos] and min(steps) < max(steps)
    assert batched.info["sample_converged"] == [s.info["converged"] for s in solos]
    assert batched.info["sample_best_step"] == [s.info["best_step"] for s in solos]


# ------------------------------------------------------------------------------------------------ register
@pytest.mark.parametrize("optimizer", ["gd", "adam"])
def test_register_members_match_their_solo_runs(optimizer):
    fixed, moving = mixed_pairs((32, 40))
    opts = dict(optimizer=optimizer, iterations=20, device="cpu")
    batched = register(fixed, moving, **opts).disp
    solo = torch.cat([register(fixed[i:i + 1], moving[i:i + 1], **opts).disp for i in range(3)])
    gaps = per_member_gap(batched, solo)
    assert max(gaps) <= TOL, gaps
    same = register(fixed[:1].repeat(4, 1, 1, 1), moving[:1].repeat(4, 1, 1, 1), **opts).disp
    assert max(per_member_gap(same, solo[:1].expand(4, -1, -1, -1))) <= TOL
