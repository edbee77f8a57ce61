"""The project's promises about itself: environment.yml agrees with pyproject.toml, notebooks are paired and clean."""
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(_split(r) for r in project["dependencies"])
    for extra in ("notebooks", "test"):
        wanted.update(_split(r) for r in project["optional-dependencies"][extra])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    have = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            have.update(_split(r) for r in dep["pip"] if not r.startswith("-e"))
        elif not dep.startswith(("python", "pip")) or dep.startswith("pip:"):
            have.update([_split(dep)])
    assert "torch" in have, "environment.yml must install torch"
    # torch is pinned in environment.yml (the build this project is tested with) and ranged in pyproject.toml
    assert have.pop("torch") == "==2.13.0" and wanted.pop("torch").startswith(">=")
    assert have == wanted


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_paired_clean_and_in_sync(source):
    jupytext = pytest.importorskip("jupytext")
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run `make notebooks`"
    stored = json.loads(ipynb.read_text())
    assert all(not c.get("outputs") for c in stored["cells"] if c["cell_type"] == "code"), "commit without outputs"
    from_py = jupytext.reads(source.read_text(), fmt="py:percent")
    src = lambda cells: [(c["cell_type"], "".join(c["source"]).strip()) for c in cells]
    assert src(from_py["cells"]) == src(stored["cells"]), f"{ipynb.name} is out of sync: run `make notebooks`"


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_colab_badge_install_cell_goal_exercise_summary(source):
    text = source.read_text()
    assert "colab.research.google.com/assets/colab-badge.svg" in text
    assert f"notebooks/{source.stem}.ipynb" in text
    assert "google.colab" in text, "an install cell that runs only on Colab"
    for word in ("Goal", "Exercise", "Summary"):
        assert word in text, f"{source.name} lacks a {word} section"
    assert "<details>" in text, "the exercise's solution is hidden in a <details> block"


def test_every_repository_address_comes_from_pyproject_urls():
    """The Colab badges, the notebooks' clone cells, the README and config.REPO_URL all name the repository that
    pyproject.toml's [project.urls] Repository gives (one place to change when the repository moves)."""
    import re
    import tomllib

    from deqreg_lite.config import REPO_URL

    root = Path(__file__).resolve().parent.parent
    repo = tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert REPO_URL == repo
    slug = repo.removeprefix("https://github.com/")
    files = sorted((root / "notebooks").glob("*.py")) + [root / "README.md"]
    for path in files:
        text = path.read_text()
        badges = re.findall(r"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/main/notebooks/([\w.-]+)\.ipynb",
                            text)
        clones = re.findall(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?[\"')\s]", text)
        if path.parent.name == "notebooks":
            assert badges, f"{path.name} has no Colab badge"
            assert all(nb == path.stem for _, nb in badges), f"{path.name}'s badge points at another notebook"
        for found in [b for b, _ in badges] + clones:
            assert found == slug, f"{path.name} names {found}, not {slug} ([project.urls] Repository)"
