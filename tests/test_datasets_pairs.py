"""Generated 2D training / evaluation pairs: determinism, disjoint seeds, shapes, labels, collate."""
import pytest
import torch

from deqreg_lite.datasets import (PAIR_KEYS, SEED_RANGES, PairDataset, brain_pairs, collate, item_seed,
                                  load_sample)
from deqreg_lite.metrics import dice

SIZE = (32, 32)



def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_items_are_deterministic_and_order_free():
    ds = brain_pairs("train", n=6, size=SIZE)
    late = ds[4]
    first = [ds[i] for i in range(6)]
    same(late, first[4])
    again = brain_pairs("train", n=6, size=SIZE)
    for i in (0, 2, 5):
        same(first[i], again[i])
    same(ds[-1], first[5])
    other = brain_pairs("train", n=6, size=SIZE, seed=1)
    assert not torch.equal(other[0]["fixed"], first[0]["fixed"])


def test_seed_ranges_are_disjoint():
    lo_t, hi_t = SEED_RANGES["train"]
    lo_v, hi_v = SEED_RANGES["val"]
    assert hi_t <= lo_v  # ranges do not overlap
    train = set()
    for base in (0, 1, 7):
        train |= set(PairDataset("train", 2000, SIZE, seed=base).seeds())
    val = set(brain_pairs("val", n=2000, size=SIZE).seeds()) | set(brain_pairs("val", 50, SIZE, seed=3).seeds())
    test = set(brain_pairs("test", n=50, size=SIZE).seeds())
    assert train and val and test
    assert not train & val and not train & test and not val & test
    assert all(lo_t <= s < hi_t for s in train) and all(lo_v <= s < hi_v for s in val)
    assert len(PairDataset("train", 2000, SIZE).seeds()) == 2000  # distinct within a dataset
    assert item_seed("train", 10**6 + 3) == item_seed("train", 3)  # wraps inside its range
    with pytest.raises(ValueError, match="split"):
        item_seed("eval", 0)


def test_keys_shapes_and_kinds():
    ds = brain_pairs("train", n=6, size=SIZE)
    kinds = [ds[i]["kind"] for i in range(6)]
    assert kinds == ["brain", "inter", "synth"] * 2
    for i in range(3):
        s = ds[i]
        assert tuple(s) == PAIR_KEYS
        assert s["fixed"].shape == s["moving"].shape == (1, 1, *SIZE)
        assert s["fixed"].dtype == torch.float32 and s["fixed_seg"].dtype == torch.int64
        assert s["fixed_seg"].shape == (1, 1, *SIZE)
        assert 0 <= float(s["fixed"].min()) and float(s["moving"].max()) <= 1
        assert len(s["spacing"]) == 2 and isinstance(s["ids"], tuple) and s["seed"] == ds.item_seed(i)
    assert ds[0]["labels"] == [1, 2, 3] and ds[2]["labels"] == list(range(1, 26))
    # resizing scales the spacing: 160 rows of 0.825 mm become 32 rows of 4.125 mm
    full = load_sample("brain2d")
    assert ds[0]["spacing"][0] == pytest.approx(full["spacing"][0] * 160 / 32)


def test_labels_are_warped_with_nearest():
    ds = PairDataset("train", 3, (48, 48), kinds=("brain",), intensity=False)
    for i in range(3):
        s = ds[i]
        for k in ("fixed_seg", "moving_seg"):
            assert set(torch.unique(s[k]).tolist()) <= {0, 1, 2, 3}
        assert not torch.equal(s["fixed_seg"], s["moving_seg"])  # two different deformations
        d = torch.nanmean(dice(s["fixed_seg"], s["moving_seg"], [1, 2, 3]))
        assert 0.3 < float(d) < 0.99  # the same anatomy, moved
        # the labels move with the image: background voxels (seg 0) stay dark in the image
        for side in ("fixed", "moving"):
            bg = s[f"{side}_seg"] == 0
            assert float(s[side][bg].mean()) < float(s[side][~bg].mean())


def test_eval_set_starts_with_the_real_pair_full_size():
    ds = brain_pairs("val", n=2)  # full size, 160 x 192: only two items
    real, full = ds[0], load_sample("brain2d")
    assert real["kind"] == "real" and real["seed"] is None and ds.item_seed(0) is None
    for k in ("fixed", "moving", "fixed_seg", "moving_seg"):
        assert torch.equal(real[k], full[k])
    real["fixed"].zero_()  # items are copies: the cache stays intact
    assert torch.equal(ds[0]["fixed"], full["fixed"])
    held_out = ds[1]
    assert held_out["fixed"].shape == (1, 1, 160, 192) and held_out["kind"] == "brain"
    assert held_out["seed"] >= SEED_RANGES["val"][0]
    assert brain_pairs("train", n=3, size=SIZE)[0]["kind"] != "real"


def test_collate_stacks_a_batch():
    ds = brain_pairs("train", n=3, size=SIZE)
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["fixed"].shape == (3, 1, *SIZE) and batch["moving_seg"].shape == (3, 1, *SIZE)
    assert batch["kind"] == ["brain", "inter", "synth"] and len(batch["labels"]) == 3
    with pytest.raises(ValueError, match="shape"):
        collate([ds[0], PairDataset("train", 1, (16, 16))[0]])
    with pytest.raises(ValueError):
        collate([])


def test_bad_arguments():
    with pytest.raises(ValueError, match="kinds"):
        PairDataset("train", 2, SIZE, kinds=("brain", "ct"))
    with pytest.raises(ValueError, match="split"):
        PairDataset("eval", 2, SIZE)
    with pytest.raises(ValueError, match="size"):
        PairDataset("train", 2, (32, 32, 32))
    with pytest.raises(IndexError):
        brain_pairs("train", n=2, size=SIZE)[2]
    with pytest.raises(TypeError):
        PairDataset("train", 2, SIZE, bogus=1)
