"""Smoke test in real JupyterLab under headless Chromium: what a student sees when they open the notebooks.

A JupyterLab server is started on a free localhost port (with a token) over a temporary copy of notebooks 01, 05
and 08, in quick mode, without ``PLOTLY_RENDERER`` or ``MPLBACKEND`` (so the kernel draws as it does for a
student: inline matplotlib, Plotly through ``plotly_mimetype``). Debian's ``chromium`` is driven by Playwright
(launched with ``executable_path``: ``playwright install`` cannot download browsers here). For each notebook:

* it is not marked as modified when it opens, nor once its kernel has started (JupyterLab adds a ``language_info``
  to a notebook that lacks one, and replaces it with the kernel's: the notebooks store the kernel's own);
* "Run All" runs every code cell, and no cell shows an error;
* moving one slider with the mouse changes what the notebook shows: an ipywidgets slider in 01 and 05; in 08 the
  Plotly figures are drawn (``.main-svg``), and the first slider of the first 3D viewer is dragged by its grip
  from the middle slice (where the viewers open) to a quarter of its rail; its active step must follow the mouse,
  its current value must name that step, the traces must hold the step's data (a ``restyle``) and the heatmaps
  must be drawn again.

Skipped only when Playwright or Chromium is missing; ``scripts/setup.sh`` installs both.
"""
from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CHROMIUM = os.environ.get("DEQREG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
NOTEBOOK_TIMEOUT_S = 300  # per notebook, "Run All" in quick mode (30-200 s each on a busy 2-core CPU)

playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (scripts/setup.sh)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"chromium not found at {CHROMIUM} (scripts/setup.sh installs Debian's package)",
                allow_module_level=True)

# The slider each test moves: a CSS-free description, found by its label in the DOM.
CASES = {
    "01_classical_registration": {"widget_label": "iteration (finest level)"},
    "05_deqreg": {"widget_label": "step"},
    "08_nlst_lung_ct": {"plotly": True},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(folder: Path) -> None:
    """User settings for this server only: no autosave (nothing is written back), no news pop-up."""
    for plugin, value in {"@jupyterlab/docmanager-extension/plugin": {"autosave": False},
                          "@jupyterlab/apputils-extension/notification": {"fetchNews": "false"},
                          # every cell stays in the DOM (JupyterLab 4 detaches cells scrolled out of view)
                          "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"}}.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over a copy of the three notebooks; yields (base url, token). Always stopped."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    root.mkdir()
    shutil.copy(ROOT / "jupytext.toml", root)
    for stem in CASES:
        for suffix in (".py", ".ipynb"):
            shutil.copy(NOTEBOOKS / f"{stem}{suffix}", root)
    for stem in CASES:  # jupytext refuses an .ipynb newer than its paired .py; copies keep no order
        os.utime(root / f"{stem}.py")
    _write_settings(tmp / "settings")
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("PLOTLY_RENDERER", "MPLBACKEND", "JUPYTER_TOKEN")}
    env.update(DEQREG_MODE="quick", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
               JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.user_settings_dir={tmp / 'settings'}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited ({proc.returncode}):\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"JupyterLab did not answer:\n{(tmp / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield base, token
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


PANEL = "(window.jupyterapp && window.jupyterapp.shell.currentWidget)"
STATE_JS = f"""() => {{
  const w = {PANEL};
  const tab = document.querySelector('.lm-DockPanel .lm-TabBar-tab.lm-mod-current');
  return {{dirty: w.context.model.dirty, tabDirty: !!tab && tab.classList.contains('jp-mod-dirty'),
          kernel: w.sessionContext.kernelDisplayStatus,
          language_info: w.context.model.getMetadata('language_info')}};
}}"""
RUN_ALL_JS = """async (timeoutMs) => {
  const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error('Run All timed out')), timeoutMs));
  return await Promise.race([window.jupyterapp.commands.execute('notebook:run-all-cells'), timeout]);
}"""
CELLS_JS = f"""() => {PANEL}.content.model.toJSON().cells
  .filter(c => c.cell_type === 'code')
  .map(c => ({{count: c.execution_count,
               errors: c.outputs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue),
               head: c.source.split('\\n').slice(0, 2).join(' | ')}}))"""


def _open(page, base: str, token: str, name: str):
    page.goto(f"{base}/lab/tree/{name}.ipynb?token={token}&reset", timeout=120_000)
    page.wait_for_function(f"() => {{ const w = {PANEL}; return w && w.context && w.context.isReady "
                           f"&& w.context.path.endsWith('{name}.ipynb'); }}", timeout=120_000)


def _drag(page, handle, track, frac: float = 0.5) -> None:
    """Press the mouse on a slider's handle, drag it to ``frac`` of its track's width and release it."""
    h, t = handle.bounding_box(), track.bounding_box()
    x0, y = h["x"] + h["width"] / 2, h["y"] + h["height"] / 2
    x1 = t["x"] + frac * t["width"]
    page.mouse.move(x0, y)
    page.mouse.down()
    for f in (0.3, 0.6, 1.0):
        page.mouse.move(x0 + f * (x1 - x0), y)
    page.mouse.up()


def _move_widget_slider(page, label: str) -> tuple[str, str]:
    is_ours = page.locator(".widget-slider", has=page.locator(".widget-label").get_by_text(label, exact=True))
    area = page.locator(".jp-OutputArea-output", has=is_ours).first  # the interactive: its slider and its output
    slider = area.locator(".widget-slider", has=page.locator(".widget-label").get_by_text(label, exact=True)).first
    slider.scroll_into_view_if_needed()
    before = area.inner_html()
    _drag(page, slider.locator(".noUi-handle").first, slider.locator(".noUi-target").first)
    page.wait_for_function("([el, before]) => el.innerHTML !== before && !el.querySelector('.widget-output:empty')",
                           arg=[area.element_handle(), before], timeout=120_000)
    return before, area.inner_html()


# What a Plotly figure's first slider shows: its active step and the step count (plotly.js keeps ``layout.sliders``
# in step with the grip), the current-value text drawn above it, whether the traces its steps restyle hold that
# step's data, and the heatmap images drawn in the figure.
PLOTLY_SLIDER_JS = """el => {
  const gd = el.classList.contains('js-plotly-plot') ? el : el.querySelector('.js-plotly-plot');
  const s = gd.layout.sliders[0], step = s.steps[s.active || 0];
  const group = gd.querySelector('.slider-container .slider-group');
  const text = group && group.querySelector(':scope > text.slider-label');
  const [update, traces] = step.args;
  const holds = traces.every((t, k) => update.z[k] === null || update.z[k] === undefined
                             || JSON.stringify(gd.data[t].z) === JSON.stringify(update.z[k]));
  return {active: s.active || 0, steps: s.steps.length, label: step.label, shown: text ? text.textContent : null,
          method: step.method, holds,
          images: [...gd.querySelectorAll('.hm image')]
            .map(i => i.getAttribute('href') || i.getAttribute('xlink:href'))};
}"""


def _move_plotly_slider(page) -> tuple[dict, dict, int]:
    """Drag the grip of the first slider of the first Plotly figure that has one, to the quarter of its rail farther
    from the grip (the viewers open at the middle slice: a drag to the middle would not move them), by mouse.

    Returns the slider's state (``PLOTLY_SLIDER_JS``) before and after, and the step the release point maps to."""
    plot = page.locator(".jp-RenderedPlotly", has=page.locator(".slider-container")).first
    group = plot.locator(".slider-container .slider-group").first
    grip, rail = group.locator(".slider-grip-rect"), group.locator(".slider-rail-rect")
    rail.scroll_into_view_if_needed()  # the slider sits under a tall figure: bring it on screen before pressing
    before = plot.evaluate(PLOTLY_SLIDER_JS)
    g, r = grip.bounding_box(), rail.bounding_box()
    frac = 0.75 if g["x"] + g["width"] / 2 < r["x"] + r["width"] / 2 else 0.25
    _drag(page, grip, rail, frac)
    expected = round(frac * (before["steps"] - 1))
    try:  # the step's restyle runs on the next animation frame, then the heatmaps are drawn again
        page.wait_for_function("([el, before]) => { const s = (" + PLOTLY_SLIDER_JS + ")(el); return s.active !== "
                               "before.active && s.holds && s.images.join() !== before.images.join(); }",
                               arg=[plot.element_handle(), before], timeout=60_000)
    except playwright_sync.TimeoutError:
        pass  # the assertions below say what did not change
    return before, plot.evaluate(PLOTLY_SLIDER_JS), expected


@pytest.mark.browser
@pytest.mark.parametrize("name", list(CASES))
def test_notebook_opens_clean_runs_and_its_slider_redraws(lab, browser, name, tmp_path):
    base, token = lab
    case = CASES[name]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    t0 = time.time()
    try:
        _open(page, base, token, name)
        state = page.evaluate(STATE_JS)
        assert not state["dirty"] and not state["tabDirty"], f"{name} is marked as modified as it opens: {state}"
        page.wait_for_function(f"() => {PANEL}.sessionContext.kernelDisplayStatus === 'idle' "
                               f"&& {PANEL}.context.model.getMetadata('language_info').version", timeout=120_000)
        page.wait_for_timeout(500)  # kernel info and kernelspec updates land right after the kernel is idle
        state = page.evaluate(STATE_JS)
        stored = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["metadata"].get("language_info", {})
        if stored.get("version") == platform.python_version():
            assert not state["dirty"] and not state["tabDirty"], \
                f"{name} became modified when its kernel started: {state}"
        else:  # JupyterLab stores the running kernel's language_info: another Python version marks it modified
            warnings.warn(f"{name} stores Python {stored.get('version')}, this kernel runs "
                          f"{platform.python_version()}: not checking that it stays unmodified after the kernel starts")

        page.evaluate(RUN_ALL_JS, NOTEBOOK_TIMEOUT_S * 1000)
        cells = page.evaluate(CELLS_JS)
        errors = [(c["head"], c["errors"]) for c in cells if c["errors"]]
        assert not errors, f"{name}: cells errored in JupyterLab: {errors}"
        not_run = [c["head"] for c in cells if c["count"] is None]
        assert not not_run, f"{name}: cells did not run: {not_run}"
        t_run = time.time() - t0

        if case.get("plotly"):
            mimes = page.evaluate(f"""() => {PANEL}.content.model.toJSON().cells.filter(c => c.cell_type === 'code')
                .flatMap(c => c.outputs.map(o => Object.keys(o.data || {{}}).join(',')))""")
            print(f"{name}: output mime types {mimes}")
            assert any("application/vnd.plotly.v1+json" in m for m in mimes), f"{name}: no Plotly output: {mimes}"
            try:
                page.wait_for_selector(".jp-RenderedPlotly .main-svg", state="attached", timeout=120_000)
            except Exception:
                seen = page.evaluate("""() => ({rendered: document.querySelectorAll('.jp-RenderedPlotly').length,
                    png: document.querySelectorAll('.jp-RenderedPlotly img.plot-img').length,
                    plots: document.querySelectorAll('.js-plotly-plot').length,
                    html: (document.querySelector('.jp-RenderedPlotly') || {outerHTML: ''}).outerHTML.slice(0, 600)})""")
                pytest.fail(f"{name}: no Plotly figure drew in JupyterLab: {seen}")
            drawn = page.locator(".jp-RenderedPlotly .main-svg").count()
            assert drawn >= 3, f"{name}: only {drawn} Plotly figures drawn"
            before, after, expected = _move_plotly_slider(page)
            print(f"{name}: Plotly slider step {before['active']} ({before['shown']}) -> {after['active']} "
                  f"({after['shown']}) of {after['steps']}, released at step {expected}")
            assert before["method"] == "restyle", f"{name}: the viewer's slider steps should restyle: {before}"
            assert abs(after["active"] - expected) <= 1 and after["active"] != before["active"], \
                f"{name}: the Plotly slider did not follow the mouse: step {before['active']} -> {after['active']}, " \
                f"released at step {expected}"
            prefix = before["shown"][:len(before["shown"]) - len(before["label"])]  # "axis 0 index: "
            assert before["shown"] == prefix + before["label"] and after["shown"] == prefix + after["label"], \
                f"{name}: the slider's current value reads {after['shown']!r} at step {after['active']}"
            assert after["holds"], f"{name}: the traces do not hold step {after['active']}'s data"
            assert after["images"] != before["images"], f"{name}: the heatmaps were not drawn again"
        else:
            before, after = _move_widget_slider(page, case["widget_label"])
            assert before != after
        print(f"{name}: opened and ran in {t_run:.1f} s, slider redrew, total {time.time() - t0:.1f} s")
    except Exception:
        page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=False)
        print(f"screenshot: {tmp_path / f'{name}.png'}")
        raise
    finally:
        page.close()
