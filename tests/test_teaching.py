"""The teaching conventions of the upgraded notebooks (issue 11), checked on their sources.

Every notebook in ``UPGRADED`` must have:

* a top block (the title's markdown cell) with **Goal.**, **Learning objectives.** (3-5 bullets), **Prerequisites.**,
  **Study time.** and a **Notation.** table;
* at least one ``**Predict.**`` prompt (a markdown cell that starts with it) before a result;
* 3 to 5 graded exercises ``### Exercise N (★)``, numbered 1..N, each followed by a code cell tagged ``exercise``
  (a TODO) and, after it, a code cell tagged ``solution`` whose source is hidden in JupyterLab (the stored .ipynb has
  ``jupyter.source_hidden: true``) and which asserts its result (nbval runs it in CI);
* a ``> **Conventions against the paper.**`` box;
* a ``## References`` section that names the DEQReg paper and Learn2Reg, before the ``## Summary``.

``teaching_problems`` returns what is missing; the last test feeds it notebooks with one piece removed, so every
check is shown to bite.
"""
import copy
import json
import re
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
UPGRADED = ["00_welcome", "01_classical_registration", "02_one_step_learning", "03_unrolling_and_its_failure",
            "04_fixed_points_forward", "04b_implicit_and_phantom_gradients", "05_deqreg", "05b_learned_optimisers",
            "06_convergence_analysis", "07_oasis_brain_mri", "08_nlst_lung_ct", "09_capstone"]

TOP_FIELDS = ("Goal", "Learning objectives", "Prerequisites", "Study time", "Notation")
EXERCISE = re.compile(r"^###\s+Exercise\s+(\d+)\s+\((★{1,3})\)", re.M)
PAPER_TITLE = "bridging classical and learning-based iterative registration through deep equilibrium models"


def _src(cell) -> str:
    s = cell["source"]
    return s if isinstance(s, str) else "".join(s)


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _hidden(cell) -> bool:
    return cell.get("metadata", {}).get("jupyter", {}).get("source_hidden") is True


def _section(markdown: str, field: str) -> str:
    """The text after ``**field.**`` up to the next bold field of the top block (or the end)."""
    m = re.search(rf"\*\*{re.escape(field)}\.\*\*(.*?)(?=\n\s*\*\*[A-Z][^*]*\.\*\*|\Z)", markdown, re.S)
    return m.group(1) if m else ""


def teaching_problems(cells: list, stored_cells: list) -> list[str]:
    """What ``cells`` (from the .py source) and ``stored_cells`` (the paired .ipynb) lack; empty when all is there."""
    problems: list[str] = []
    md = [(i, _src(c)) for i, c in enumerate(cells) if c["cell_type"] == "markdown"]

    # top block: the markdown cell holding the "# NN · title" line
    top = next((s for _, s in md if re.search(r"^#\s+\d\d[a-z]?\s", s, re.M)), "")
    if not top:
        problems.append("no title cell ('# NN · ...')")
    for field in TOP_FIELDS:
        if not _section(top, field).strip():
            problems.append(f"top block lacks **{field}.**")
    bullets = re.findall(r"^\s*[*-]\s+\S", _section(top, "Learning objectives"), re.M)
    if not 3 <= len(bullets) <= 5:
        problems.append(f"learning objectives: {len(bullets)} bullets, want 3-5")
    notation = _section(top, "Notation")
    if notation.count("|") < 6 or not all(sym in notation for sym in ("I_f", "I_m", "\\phi", "u")):
        problems.append("notation box: want a markdown table naming $I_f$, $I_m$, $u$ and $\\phi$")
    if not re.search(r"\b(min(ute)?s?|hours?)\b", _section(top, "Study time")):
        problems.append("study time: give it in minutes (measured run time + reading/exercises)")

    if not any(re.search(r"^\*\*Predict\.\*\*", s, re.M) for _, s in md):
        problems.append("no '**Predict.**' prompt")

    # exercises: heading, then an `exercise` code cell, then a hidden, asserting `solution` code cell
    heads = [(i, m) for i, s in md for m in EXERCISE.finditer(s)]
    numbers = [int(m.group(1)) for _, m in heads]
    if not 3 <= len(heads) <= 5:
        problems.append(f"{len(heads)} exercises, want 3-5 ('### Exercise N (★)')")
    if numbers != list(range(1, len(numbers) + 1)):
        problems.append(f"exercises numbered {numbers}, want 1..N")
    stored_by_source = {_src(c).strip(): c for c in stored_cells if c["cell_type"] == "code"}
    for k, (i, m) in enumerate(heads):
        end = heads[k + 1][0] if k + 1 < len(heads) else len(cells)
        code = [(j, cells[j]) for j in range(i + 1, end) if cells[j]["cell_type"] == "code"]
        ex = [j for j, c in code if "exercise" in _tags(c)]
        sol = [(j, c) for j, c in code if "solution" in _tags(c)]
        name = f"exercise {m.group(1)}"
        if not ex:
            problems.append(f"{name}: no code cell tagged 'exercise'")
        elif "TODO" not in _src(cells[ex[0]]):
            problems.append(f"{name}: its 'exercise' cell has no TODO")
        if not sol:
            problems.append(f"{name}: no code cell tagged 'solution'")
            continue
        j, c = sol[0]
        if ex and j < ex[0]:
            problems.append(f"{name}: the solution comes before the exercise cell")
        if not re.search(r"^\s*assert\b", _src(c), re.M):
            problems.append(f"{name}: the solution does not assert its result")
        stored = stored_by_source.get(_src(c).strip())
        if not (_hidden(c) and stored is not None and _hidden(stored) and "solution" in _tags(stored)):
            problems.append(f"{name}: the solution's source is not hidden (jupyter.source_hidden) in the .ipynb")

    if not any(re.search(r"^> \*\*Conventions against the paper\.\*\*", s, re.M) for _, s in md):
        problems.append("no '> **Conventions against the paper.**' box")

    heading = lambda title: next((i for i, s in md if re.search(rf"^##\s+{title}\b", s, re.M)), None)  # noqa: E731
    refs, summary = heading("References"), heading("Summary")
    if refs is None:
        problems.append("no '## References' section")
    else:
        text = " ".join(_src(cells[i]).lower() for i in range(refs, len(cells)) if cells[i]["cell_type"] == "markdown")
        text = re.sub(r"\s+", " ", text.split("## summary")[0])
        if PAPER_TITLE not in text:
            problems.append("references do not name the DEQReg paper (its title)")
        if "learn2reg" not in text:
            problems.append("references do not name Learn2Reg")
    if summary is None:
        problems.append("no '## Summary' section")
    elif refs is not None and refs > summary:
        problems.append("the References come after the Summary")
    return problems


def _load(name: str) -> tuple[list, list]:
    py = ROOT / "notebooks" / f"{name}.py"
    cells = jupytext.reads(py.read_text(), fmt="py:percent")["cells"]
    stored = json.loads(py.with_suffix(".ipynb").read_text())["cells"]
    return cells, stored


@pytest.mark.parametrize("name", UPGRADED)
def test_notebook_follows_the_teaching_conventions(name):
    cells, stored = _load(name)
    problems = teaching_problems(cells, stored)
    assert not problems, f"{name}: " + "; ".join(problems)


def _drop_field(field):
    def mutate(cells, stored):
        for c in cells:
            c["source"] = _src(c).replace(f"**{field}.**", "")
    return mutate


def _drop_tag(tag, which=0):
    def mutate(cells, stored):
        tagged = [c for c in cells if tag in _tags(c)]
        tagged[which]["metadata"]["tags"] = []
    return mutate


def _unhide_solutions(cells, stored):
    for c in stored:
        c.get("metadata", {}).pop("jupyter", None)


def _strip_asserts(cells, stored):
    for c in cells:
        if "solution" in _tags(c):
            c["source"] = re.sub(r"^(\s*)assert\b", r"\1print", _src(c), flags=re.M)


def _drop_cells_with(text):
    def mutate(cells, stored):
        cells[:] = [c for c in cells if text not in _src(c)]
    return mutate


def _only_two_exercises(cells, stored):
    keep, seen = [], 0
    for c in cells:
        if c["cell_type"] == "markdown" and EXERCISE.search(_src(c)):
            seen += 1
        if seen <= 2 or not (EXERCISE.search(_src(c)) or {"exercise", "solution"} & set(_tags(c))):
            keep.append(c)
    cells[:] = keep


def _no_learn2reg_reference(cells, stored):
    for c in cells:
        if re.search(r"^##\s+References", _src(c), re.M):
            c["source"] = re.sub("learn2reg", "L2R", _src(c), flags=re.I)


MUTATIONS = {
    **{f"no {f}": _drop_field(f) for f in TOP_FIELDS},
    "no exercise tag": _drop_tag("exercise"),
    "no solution tag": _drop_tag("solution", -1),
    "solution not hidden": _unhide_solutions,
    "solution without assert": _strip_asserts,
    "two exercises": _only_two_exercises,
    "no predict": _drop_cells_with("**Predict.**"),
    "no conventions box": _drop_cells_with("> **Conventions against the paper.**"),
    "no references": _drop_cells_with("## References"),
    "no Learn2Reg reference": _no_learn2reg_reference,
    "no summary": _drop_cells_with("## Summary"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_checker_catches_what_is_missing(mutation):
    cells, stored = _load(UPGRADED[0])
    assert not teaching_problems(cells, stored)
    cells, stored = copy.deepcopy(cells), copy.deepcopy(stored)
    MUTATIONS[mutation](cells, stored)
    assert teaching_problems(cells, stored), f"the checker missed: {mutation}"
