"""Property-based tests (hypothesis): invariances that must hold for *any* input, not just the shipped pair.

Random shapes (2D and 3D), intensity scales, batch compositions and label IDs, for ``warp``, ``lncc``, the metrics,
the solvers and the learned methods. The brain2d-specific criteria of the numerics issue live in
``test_numerics.py``; exact label IDs under nearest warping in ``test_warp.py``; the shipped models' batch
independence in ``test_batch_independence.py``.
"""
import contextlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deqreg_lite.losses import lncc
from deqreg_lite.methods import build_method
from deqreg_lite.methods._common import similarity_grad
from deqreg_lite.metrics import dice, folding_percent, hd95, jacobian_det
from deqreg_lite.solvers import solve
from deqreg_lite.warp import warp

F64 = torch.float64
FAST = settings(max_examples=25, deadline=None)

shapes = st.one_of(st.tuples(st.integers(6, 20), st.integers(6, 20)),
                   st.tuples(st.integers(5, 10), st.integers(5, 10), st.integers(5, 10)))
seeds = st.integers(0, 2 ** 31 - 1)


def smooth(shape, gen, batch=1, channels=1, amplitude=1.0):
    """A smooth random field ``(batch, channels, *shape)`` in float64."""
    ndim = len(shape)
    coarse = torch.randn(batch, channels, *([3] * ndim), generator=gen, dtype=F64) * amplitude
    mode = "bilinear" if ndim == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)


def image(shape, gen, batch=1):
    """A random image in [0, 1] with a flat zero background on one side (where float32 rounding used to rule)."""
    x = smooth(shape, gen, batch)
    x = (x - x.amin()) / (x.amax() - x.amin() + 1e-12)
    x[(slice(None), slice(None), slice(0, shape[0] // 3))] = 0.0
    return x


# ------------------------------------------------------------------------------------------------------- warp
@FAST
@given(shape=shapes, seed=seeds, amplitude=st.floats(0.0, 3.0))
def test_warp_float32_matches_float64(shape, seed, amplitude):
    gen = torch.Generator().manual_seed(seed)
    img, disp = image(shape, gen), smooth(shape, gen, channels=len(shape), amplitude=amplitude)
    w64 = warp(img, disp)
    w32 = warp(img.float(), disp.float())
    assert float((w32.double() - w64).abs().max()) <= 1e-5


@FAST
@given(shape=shapes, seed=seeds, batch=st.integers(2, 4), member=st.integers(0, 3))
def test_warp_batch_member_equals_its_solo_warp(shape, seed, batch, member):
    gen = torch.Generator().manual_seed(seed)
    member = member % batch
    img, disp = image(shape, gen, batch), smooth(shape, gen, batch, channels=len(shape), amplitude=2.0)
    together = warp(img.float(), disp.float())[member]
    alone = warp(img[member:member + 1].float(), disp[member:member + 1].float())[0]
    assert torch.equal(together, alone)


# ------------------------------------------------------------------------------------------------------- lncc
@FAST
@given(shape=shapes, seed=seeds, log_c=st.floats(-3.0, 3.0))
def test_lncc_is_invariant_to_the_intensity_scale(shape, seed, log_c):
    gen = torch.Generator().manual_seed(seed)
    a, b = image(shape, gen), image(shape, gen)
    c = 10.0 ** log_c
    assert abs(float(lncc(c * a, b)) - float(lncc(a, b))) <= 1e-6  # float64: the floor is relative, so exact
    assert abs(float(lncc(a.float() * c, b.float())) - float(lncc(a, b))) <= 1e-4


@FAST
@given(shape=shapes, seed=seeds)
def test_lncc_float32_matches_float64_and_stays_in_range(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = image(shape, gen), image(shape, gen)
    m64, m32 = lncc(a, b, reduction="none"), lncc(a.float(), b.float(), reduction="none")
    assert float((m32.double() - m64).abs().max()) <= 1e-3
    assert float(m32.abs().max()) <= 1.0 and torch.isfinite(m32).all()


@FAST
@given(shape=shapes, seed=seeds, batch=st.integers(2, 4))
def test_lncc_map_of_a_batch_member_equals_its_solo_map(shape, seed, batch):
    gen = torch.Generator().manual_seed(seed)
    a, b = image(shape, gen, batch).float(), image(shape, gen, batch).float()
    together = lncc(a, b, reduction="none")
    for i in range(batch):
        assert torch.allclose(together[i], lncc(a[i:i + 1], b[i:i + 1], reduction="none")[0], atol=1e-6)


# ---------------------------------------------------------------------------------------------------- metrics
label_ids = st.lists(st.integers(-2 ** 62, 2 ** 62), min_size=2, max_size=4, unique=True)


@FAST
@given(shape=shapes, seed=seeds, ids=label_ids)
def test_dice_and_hd95_depend_on_regions_not_on_label_ids(shape, seed, ids):
    """Any int64 IDs: a map against itself scores Dice 1 and HD95 0; renaming the IDs changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    k = len(ids)
    region_a = torch.randint(0, k, (1, 1, *shape), generator=gen)
    region_b = torch.randint(0, k, (1, 1, *shape), generator=gen)
    table = torch.tensor(ids, dtype=torch.int64)
    seg_a, seg_b = table[region_a], table[region_b]
    present = [int(i) for i in torch.unique(seg_a)]
    assert torch.equal(dice(seg_a, seg_a, present), torch.ones(1, len(present), dtype=dice(seg_a, seg_a,
                                                                                              present).dtype))
    assert float(hd95(seg_a, seg_a, present).abs().max()) == 0.0
    by_region = dice(region_a, region_b, list(range(k)))
    by_id = dice(seg_a, seg_b, ids)
    assert torch.allclose(by_region, by_id, equal_nan=True)


@FAST
@given(shape=shapes, seed=seeds, amplitude=st.floats(0.0, 4.0))
def test_jacobian_and_folding_float32_match_float64(shape, seed, amplitude):
    gen = torch.Generator().manual_seed(seed)
    disp = smooth(shape, gen, channels=len(shape), amplitude=amplitude)
    assert float((jacobian_det(disp.float()).double() - jacobian_det(disp)).abs().max()) <= 1e-4
    f = float(folding_percent(disp.float()).max())
    assert 0.0 <= f <= 100.0


@FAST
@given(shape=shapes, seed=seeds, batch=st.integers(2, 4))
def test_folding_of_a_batch_member_equals_its_solo_value(shape, seed, batch):
    gen = torch.Generator().manual_seed(seed)
    disp = smooth(shape, gen, batch, channels=len(shape), amplitude=3.0)
    together = folding_percent(disp)
    alone = torch.cat([folding_percent(disp[i:i + 1]).reshape(1) for i in range(batch)])
    assert torch.allclose(together.reshape(-1), alone)


# ---------------------------------------------------------------------------------------------------- solvers
@settings(max_examples=30, deadline=None)
@given(seed=seeds, rates=st.lists(st.floats(0.0, 0.97), min_size=2, max_size=5),
       solver=st.sampled_from(["fixed_point", "anderson", "broyden"]), policy=st.sampled_from(["lowest", "last"]))
def test_solver_batch_members_get_their_solo_answers(seed, rates, solver, policy):
    """Linear contractions ``z -> A_i z + c_i`` of random speed, batched in random order: every member gets
    exactly what it gets alone (its own stop, its own iterate), and converged members meet the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    n, d = len(rates), 6
    q, _ = torch.linalg.qr(torch.randn(n, d, d, generator=gen, dtype=F64))
    a = q * torch.tensor(rates, dtype=F64).view(n, 1, 1)  # spectral norm = the rate
    c = torch.randn(n, d, generator=gen, dtype=F64)

    def f_of(idx):
        return lambda z: (a[idx] @ z.unsqueeze(-1)).squeeze(-1) + c[idx]

    opts = dict(max_iter=60, tol=1e-6, return_policy=policy)
    idx = torch.arange(n)
    z, info = solve(f_of(idx), torch.zeros(n, d, dtype=F64), solver, **opts)
    for i in range(n):
        zi, info_i = solve(f_of(idx[i:i + 1]), torch.zeros(1, d, dtype=F64), solver, **opts)
        assert torch.allclose(z[i], zi[0], rtol=0, atol=1e-10)
        assert info.sample_nstep[i] == info_i.nstep and info.sample_converged[i] == info_i.converged
        if info_i.converged:
            assert info.sample_residual[i] <= 1e-6
    assert not info.diverged


@settings(max_examples=15, deadline=None)
@given(seed=seeds, rho=st.floats(1.04, 1.3), tau=st.sampled_from([1.0, 0.7]))
def test_plain_iteration_of_an_expanding_map_is_flagged_never_converged(seed, rho, tau):
    """``z -> rho z + c`` with rho > 1 repels plain (damped) iteration: the solve must say it diverged and hand
    back a finite iterate, never the most expanded one as if converged. (Anderson and Broyden may legitimately
    find its fixed point ``c / (1 - rho)``: it exists, it just repels plain iteration.)"""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(1, 5, generator=gen, dtype=F64)
    z, info = solve(lambda z: rho * z + c, torch.zeros(1, 5, dtype=F64), "fixed_point", max_iter=60, tol=1e-6,
                    tau=tau, on_diverge="flag")
    assert info.diverged and not info.converged and torch.isfinite(z).all()
    assert float(z.norm()) <= 2 * float(c.norm())  # the least-expanded candidate, not the last


# ---------------------------------------------------------------------------------------------------- methods
@contextlib.contextmanager
def plain_convs():
    """oneDNN off: its conv kernels round differently for different batch sizes (~1e-6; see
    test_batch_independence.py). What is left is the methods' own dependence on the batch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


SMALL = {"voxelmorph": {}, "unrolling": {"T": 2}, "gradirn": {"levels": 2, "steps_per_level": 2},
         "unrolling_ml": {"levels": 2, "steps_per_level": 2},
         "riir": {"T": 2}, "deqreg": {"T": 6, "S": 1}, "deqreg12": {"T": 4}}


@pytest.mark.parametrize("name", sorted(SMALL))
@settings(max_examples=6, deadline=None)
@given(seed=seeds, order=st.permutations([0, 1, 2]))
def test_methods_are_batch_independent(name, seed, order):
    """Reordering a batch reorders the displacements: each pair's result ignores its neighbours."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(0)
    model = build_method(name, 2, **SMALL[name]).eval()
    shape = (24, 32)
    fixed, moving = image(shape, gen, 3).float(), image(shape, gen, 3).float()
    perm = torch.tensor(order)
    with torch.no_grad(), plain_convs():
        base = model(fixed, moving).disp
        permuted = model(fixed[perm], moving[perm]).disp
    assert float((permuted - base[perm]).abs().max()) <= 1e-4


@FAST
@given(shape=st.tuples(st.integers(8, 24), st.integers(8, 24)), seed=seeds, log_c=st.floats(-3.0, 3.0),
       amplitude=st.floats(0.0, 2.0))
def test_similarity_gradient_fed_to_networks_is_scale_free_and_float32_exact(shape, seed, log_c, amplitude):
    """GraDIRN's and RIIR's network input: the same for images scaled by c in [1e-3, 1e3], and float32 agrees
    with float64 to 1e-3 of its largest value (it is normalised to [-1, 1] per sample)."""
    gen = torch.Generator().manual_seed(seed)
    fixed, moving = image(shape, gen), image(shape, gen)
    disp = smooth(shape, gen, channels=2, amplitude=amplitude)
    g64 = similarity_grad(fixed, moving, disp)
    c = 10.0 ** log_c
    assert float((similarity_grad(c * fixed, c * moving, disp) - g64).abs().max()) <= 1e-6
    g32 = similarity_grad(fixed.float(), moving.float(), disp.float())
    assert float((g32.double() - g64).abs().max()) <= 1e-3
