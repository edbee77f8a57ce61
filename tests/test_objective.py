"""One registration objective: ``losses.Objective``; ``methods.loss.RegistrationLoss`` is it with training defaults.

``RegistrationLoss(lam=...)`` must give exactly the values and gradients of ``1 - lncc(f, warp(m, d)) + lam *
diffusion(d)`` (what the old, separate class computed), ``terms()`` one typed record everywhere, and ``LossFn`` one
declaration.
"""
import pytest
import torch

from deqreg_lite import losses
from deqreg_lite.datasets.synthetic import synthetic_pair
from deqreg_lite.losses import Objective, Terms, diffusion, lncc
from deqreg_lite.warp import warp


def _pair(seed=0, shape=(24, 28)):
    g = torch.Generator().manual_seed(seed)
    fixed = torch.rand(2, 1, *shape, generator=g)
    moving = torch.rand(2, 1, *shape, generator=g)
    disp = torch.randn(2, len(shape), *shape, generator=g) * 0.7
    return fixed, moving, disp


def _reference(fixed, moving, disp, lam, win=5):
    # the formula RegistrationLoss computed before it became the Objective (methods/loss.py, up to issue 9)
    return (1.0 - lncc(fixed, warp(moving, disp), win=win)) + lam * diffusion(disp)


@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0, 2.5])
def test_registration_loss_is_the_objective_exactly(lam):
    from deqreg_lite.methods.loss import RegistrationLoss

    loss = RegistrationLoss(lam=lam)
    assert isinstance(loss, Objective)
    fixed, moving, disp = _pair()
    d1 = disp.clone().requires_grad_(True)
    d2 = disp.clone().requires_grad_(True)
    value, expected = loss(fixed, moving, d1), _reference(fixed, moving, d2, lam)
    assert torch.equal(value, expected)
    value.backward()
    expected.backward()
    assert torch.equal(d1.grad, d2.grad)
    assert torch.equal(loss.grad(fixed, moving, disp), Objective(lam=lam).grad(fixed, moving, disp))
    assert repr(loss) == f"RegistrationLoss(lam={lam:g}, win=5, dice_weight=0)"


def test_terms_is_one_typed_record():
    from deqreg_lite.methods.loss import RegistrationLoss

    fixed, moving, disp = _pair(1)
    for obj in (Objective(lam=0.5), RegistrationLoss(lam=0.5)):
        t = obj.terms(fixed, moving, disp)
        assert type(t) is Terms
        energy, sim, reg = t
        assert energy is t.energy and sim is t.similarity and reg is t.regulariser
        assert torch.equal(t.energy, sim + 0.5 * reg)
        # the keys of the old RegistrationLoss.terms dict still read
        assert t["loss"] is t.energy and t["similarity"] is sim and t["regulariser"] is reg
        with pytest.raises(KeyError):
            t["dice"]


def test_soft_dice_extension_lives_on_the_objective():
    from deqreg_lite.methods import loss as loss_module

    assert loss_module.soft_dice is losses.soft_dice
    p = synthetic_pair((32, 32), seed=1, n_labels=4)
    plain = Objective()
    assert plain.with_segs(p["fixed_seg"], p["moving_seg"]) is plain
    fn = Objective(dice_weight=0.7).with_segs(p["fixed_seg"], p["moving_seg"])
    zero = torch.zeros(1, 2, 32, 32)
    labels = sorted((set(p["fixed_seg"].unique().tolist()) | set(p["moving_seg"].unique().tolist())) - {0})
    ids = torch.tensor(labels).view(1, -1, 1, 1)
    dice = losses.soft_dice(warp((p["moving_seg"] == ids).float(), zero), (p["fixed_seg"] == ids).float())
    assert torch.equal(fn(p["fixed"], p["moving"], zero),
                       plain(p["fixed"], p["moving"], zero) + 0.7 * (1.0 - dice))
    with pytest.raises(ValueError, match="dice_weight"):
        Objective(dice_weight=-1)
    with pytest.raises(ValueError, match="win"):
        Objective(win=4)


def test_loss_fn_declared_once():
    from deqreg_lite.methods import LossFn, base, loss

    assert LossFn is losses.LossFn and base.LossFn is losses.LossFn and loss.LossFn is losses.LossFn
