"""Notebook-specific teaching fixes of issue 11 (the conventions every notebook follows are checked by
tests/test_teaching.py): the 3D notebooks choose their Plotly renderer in one place and say "not trained here"
once, and the old notebook 04 is split into 04 (forward solve) and 04b (backward pass)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["07_oasis_brain_mri", "08_nlst_lung_ct"])
def test_3d_notebooks_choose_the_plotly_renderer_in_one_place(name):
    text = (ROOT / "notebooks" / f"{name}.py").read_text()
    assert "pio.renderers.default = viewer.plotly_renderer()" in text
    assert "notebook_connected" not in text and 'renderers.default = "' not in text
    assert "not trained here" not in text.replace("are not trained here", ""), "one note, not one per cell"


def test_old_04_path_is_gone_and_04b_is_paired():
    assert not (ROOT / "notebooks" / "04_fixed_points_and_implicit_gradients.py").exists()
    for name in ("04_fixed_points_forward", "04b_implicit_and_phantom_gradients"):
        assert (ROOT / "notebooks" / f"{name}.ipynb").exists()
