"""The teaching conventions of the upgraded notebooks (issue 11), checked on their py:percent sources and .ipynb.

Every notebook listed here has: a top block (Goal, Learning objectives, Prerequisites, Study time, Notation) in the
first markdown cell; 3 to 5 graded exercises, each with an ``exercise``-tagged code cell and, after it, a
``solution``-tagged code cell that is hidden in JupyterLab (``jupyter.source_hidden`` in the .ipynb) and asserts its
result (nbval runs it in CI); a "Conventions against the paper" box; a References section naming the DEQReg paper
and Learn2Reg, before the Summary; and the CI-only checks last. To be merged with tests/test_teaching.py.
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["04_fixed_points_forward", "04b_implicit_and_phantom_gradients", "07_oasis_brain_mri",
             "08_nlst_lung_ct"]
TOP_BLOCK = ("**Goal.**", "**Learning objectives.**", "**Prerequisites.**", "**Study time.**", "**Notation.**")
EXERCISE = re.compile(r"^###\s+Exercise\s+(\d+)\s+\((★{1,3})\)", re.M)


def _read(name: str):
    jupytext = pytest.importorskip("jupytext")
    source = ROOT / "notebooks" / f"{name}.py"
    nb = jupytext.reads(source.read_text(), fmt="py:percent")
    stored = json.loads(source.with_suffix(".ipynb").read_text())
    return nb["cells"], stored["cells"]


def _text(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _tags(cell) -> list:
    return list(cell.get("metadata", {}).get("tags", []))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_top_block(name):
    cells, _ = _read(name)
    first = _text(next(c for c in cells if c["cell_type"] == "markdown"))
    assert re.search(r"^# \S", first, re.M), "the first markdown cell holds the title"
    positions = [first.find(key) for key in TOP_BLOCK]
    assert all(p >= 0 for p in positions), f"top block lacks {[k for k, p in zip(TOP_BLOCK, positions) if p < 0]}"
    assert positions == sorted(positions), "Goal, Learning objectives, Prerequisites, Study time, Notation, in order"
    objectives = first[first.find("**Learning objectives.**"):first.find("**Prerequisites.**")]
    assert 3 <= len(re.findall(r"^\* ", objectives, re.M)) <= 5, "3-5 learning objectives"
    study = first[first.find("**Study time.**"):first.find("**Notation.**")]
    assert "STUDYTIME" not in study and re.search(r"\d", study), "a measured study time"
    notation = first[first.find("**Notation.**"):]
    assert "|---|" in notation and "$u$" in notation and "the paper's $\\phi$ is our $u$" in notation


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_exercises_have_a_todo_and_an_executed_hidden_solution(name):
    cells, stored = _read(name)
    assert len(cells) == len(stored)
    headings = [(i, m) for i, c in enumerate(cells) if c["cell_type"] == "markdown"
                for m in EXERCISE.finditer(_text(c))]
    assert 3 <= len(headings) <= 5, f"{len(headings)} graded exercises, want 3-5"
    assert [int(m.group(1)) for _, m in headings] == list(range(1, len(headings) + 1)), "numbered 1, 2, ..."
    bounds = [i for i, _ in headings] + [len(cells)]
    for (start, m), end in zip(headings, bounds[1:]):
        block = list(range(start + 1, end))
        ex = [i for i in block if "exercise" in _tags(cells[i]) and cells[i]["cell_type"] == "code"]
        sol = [i for i in block if "solution" in _tags(cells[i]) and cells[i]["cell_type"] == "code"]
        assert len(ex) == 1 and len(sol) == 1 and ex[0] < sol[0], f"exercise {m.group(1)}: one TODO, then one solution"
        assert "TODO" in _text(cells[ex[0]]), f"exercise {m.group(1)}: the exercise cell says TODO"
        assert re.search(r"^\s*assert\b", _text(cells[sol[0]]), re.M), f"exercise {m.group(1)}: the solution asserts"
        meta = stored[sol[0]]["metadata"]
        assert "solution" in meta.get("tags", []) and meta.get("jupyter", {}).get("source_hidden") is True, \
            f"exercise {m.group(1)}: the .ipynb hides the solution's source (jupyter.source_hidden)"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_conventions_references_summary_and_ci_checks(name):
    cells, _ = _read(name)
    markdown = "\n".join(_text(c) for c in cells if c["cell_type"] == "markdown")
    assert re.search(r"^> \*\*Conventions against the paper\.\*\*", markdown, re.M)
    refs, summary, checks = (markdown.find(h) for h in ("## References", "## Summary", "## Checks (for CI)"))
    assert 0 <= refs < summary < checks, "References, then Summary, then the CI checks last"
    references = markdown[refs:summary]
    assert "Bridging Classical and Learning-based Iterative Registration" in references, "the DEQReg paper"
    assert "Learn2reg" in references, "Learn2Reg, cited as the paper cites it"
    assert "**Predict.**" in markdown, "predict-before-you-run prompts"
    last_markdown = max(i for i, c in enumerate(cells) if c["cell_type"] == "markdown")
    assert "## Checks (for CI)" in _text(cells[last_markdown]), "nothing for the student after the CI checks"


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
