"""Build the static site of the executed notebook series, and check its links.

    python scripts/build_site.py [--mode quick|default] [--out site/]      # execute, convert, index, link check
    python scripts/build_site.py --check site/                             # only check the links of a built site

Every ``notebooks/*.ipynb`` (sorted) is executed with nbconvert's ``ExecutePreprocessor`` (``DEQREG_MODE`` as
given, ``DEQREG_STATIC_HTML=1`` so that :func:`deqreg_lite.viewer.plotly_renderer` embeds plotly.js in the
notebook and the 3D viewers draw without a kernel and offline, ``PLOTLY_RENDERER`` unset, and Matplotlib's inline
backend, so that no window opens and every figure is kept as a PNG),
converted to one standalone HTML page (``HTMLExporter``, images embedded), given a previous / index / next bar, and
listed in ``index.html`` with its title and goal (read from the notebook's first markdown cell). The licence notice
of the shipped data (``data/samples/LICENSES.md``) is copied beside the pages and linked from every one.

ipywidgets need a kernel to move. On the site each widget is shown as a static snapshot of the state it was left in
by the run: its controls' values as text and the figure it drew (the library's widgets draw into an ``Image``).

The link check: every relative ``href``/``src`` of every page must name a file inside the site, and a ``#anchor``
must name an ``id`` (or ``name``) on the target page; external links are checked for syntax only (no network). It
exits non-zero and lists the broken links.
"""
from __future__ import annotations

import argparse
import base64
import html
import os
import re
import shutil
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
LICENSES = ROOT / "data" / "samples" / "LICENSES.md"
LICENSE_PAGE = "data-licences.html"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
SITE_TITLE = "deqreg_lite: the notebook series"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


# ----------------------------------------------------------------------------------------------------------------
# reading a notebook's title and goal


def title_and_goal(nb) -> tuple[str, str]:
    """The ``# `` title and the ``**Goal.**`` block (markdown, without the label: up to the next ``**Label.**``
    paragraph, a heading or the end of the cell) of the notebook's first markdown cell."""
    cell = next(c for c in nb.cells if c.cell_type == "markdown")
    text = cell.source
    m = re.search(r"^#\s+(.+)$", text, flags=re.M)
    title = m.group(1).strip() if m else ""
    g = re.search(r"\*\*Goal\.\*\*(.*?)(?=^\*\*[^*\n]+\.\*\*|^#|^>|\Z)", text, flags=re.S | re.M)
    goal = g.group(1).strip() if g else ""
    return title, goal


# ----------------------------------------------------------------------------------------------------------------
# executing and converting


def _executor_class():
    """nbconvert's ``ExecutePreprocessor`` whose mimic of the ``Output`` widget keeps the outputs it captures
    but does not send them back to the kernel. nbclient's mimic sends the whole output list (images included) to
    the kernel on every output, and a notebook that shows figures in an ``interactive``'s Output (05) then hangs
    with its kernel idle (seen here; nbclient#312). Nothing reads the kernel-side copy during a run."""
    from nbclient.output_widget import OutputWidget
    from nbconvert.preprocessors import ExecutePreprocessor

    class _OutputWidget(OutputWidget):
        def sync_state(self) -> None:
            pass

    class _Executor(ExecutePreprocessor):
        def on_comm_open_jupyter_widget(self, msg):
            self.widget_registry["@jupyter-widgets/output"] = {"OutputModel": _OutputWidget}
            return super().on_comm_open_jupyter_widget(msg)

    return _Executor


def execute(nb, path: Path, mode: str, timeout: int):
    """Run ``nb`` (read from ``path``) in place, in the notebook's folder, with the site's environment."""
    _Executor = _executor_class()
    # Matplotlib's inline backend, what a student's Jupyter uses: no window, and every figure a PNG output. (Not
    # "Agg": in a kernel it draws nothing, so plt.show() and display(fig) leave only "<Figure size ...>" text.)
    env = {"DEQREG_MODE": mode, "DEQREG_STATIC_HTML": "1", "MPLBACKEND": INLINE_BACKEND,
           "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    saved = {k: os.environ.get(k) for k in [*env, "PLOTLY_RENDERER", "PYTHONPATH"]}
    os.environ.update(env)
    os.environ.pop("PLOTLY_RENDERER", None)
    # the kernel imports deqreg_lite from this tree, whatever is installed
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), saved["PYTHONPATH"]] if p)
    try:
        ep = _Executor(timeout=timeout, kernel_name="python3", store_widget_state=True)
        ep.preprocess(nb, {"metadata": {"path": str(path.parent)}})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _buffers(model: dict) -> dict:
    """The binary buffers of a stored widget model, as ``{top-level key: base64 text}``."""
    out = {}
    for b in model.get("buffers", []) or []:
        if b.get("encoding") == "base64" and len(b.get("path", [])) == 1:
            out[b["path"][0]] = b["data"]
    return out


def _static_output(output: dict) -> str:
    data = output.get("data", {})
    if output.get("output_type") == "stream":
        return f"<pre>{html.escape(output.get('text', ''))}</pre>"
    if "image/png" in data:
        return f'<img alt="figure" src="data:image/png;base64,{data["image/png"]}">'
    if "text/html" in data:
        v = data["text/html"]
        return v if isinstance(v, str) else "".join(v)
    if "text/plain" in data:
        v = data["text/plain"]
        return f"<pre>{html.escape(v if isinstance(v, str) else ''.join(v))}</pre>"
    return ""


def widget_snapshot(model_id: str, state: dict, depth: int = 0) -> str:
    """Static HTML of the widget ``model_id`` in the stored widget ``state``: images, text, controls' values."""
    model = state.get(model_id)
    if model is None or depth > 20:
        return ""
    name, s = model.get("model_name", ""), model.get("state", {})
    desc = html.escape(str(s.get("description", "") or ""))
    if name == "ImageModel":
        data = _buffers(model).get("value") or (s.get("value") if isinstance(s.get("value"), str) else None)
        if not data:
            return ""
        fmt = s.get("format", "png")
        return f'<img class="widget-snapshot-image" alt="widget figure" src="data:image/{fmt};base64,{data}">'
    if name in ("HTMLModel", "HTMLMathModel"):
        return f"<div>{s.get('value', '')}</div>"
    if name == "LabelModel":
        return f"<span>{html.escape(str(s.get('value', '')))}</span>"
    if name == "OutputModel":
        return "".join(_static_output(o) for o in s.get("outputs", []))
    if "children" in s:
        kids = [widget_snapshot(str(c).removeprefix("IPY_MODEL_"), state, depth + 1) for c in s["children"]]
        direction = "row" if name == "HBoxModel" else "column"
        return (f'<div style="display:flex;flex-direction:{direction};flex-wrap:wrap;gap:4px">'
                + "".join(k for k in kids if k) + "</div>")
    if name == "ButtonModel":
        return ""
    if ("value" in s or "index" in s) and model.get("model_module") == "@jupyter-widgets/controls":
        value = s.get("value")
        if s.get("index") is not None and "_options_labels" in s:   # a dropdown or toggle: show the label
            value = s["_options_labels"][s["index"]]
        return (f'<span class="widget-snapshot-control"><b>{desc or "value"}</b> '
                f"{html.escape(str(value))}</span>")
    return ""


def freeze_widgets(nb) -> int:
    """Replace each widget output of ``nb`` by a static snapshot (``text/html``); return how many were frozen."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    n = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data:
                snap = widget_snapshot(data[WIDGET_VIEW].get("model_id", ""), state)
                note = ('<p class="widget-snapshot-note"><em>A widget, shown as the run left it: move its '
                        "controls in Jupyter or Colab.</em></p>")
                data.pop(WIDGET_VIEW)
                data.pop("text/plain", None)
                data["text/html"] = f'<div class="widget-snapshot">{note}{snap}</div>'
                n += 1
    nb.metadata.pop("widgets", None)   # no widget manager from a CDN: the snapshots need none
    return n


def to_html(nb) -> str:
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", embed_images=True)
    body, _ = exporter.from_notebook_node(nb)
    # require.js is loaded from a CDN by the template; nothing on these pages needs it (plotly.js >= 3 has no AMD
    # loader), and without it the pages have one less thing to download.
    body = re.sub(r'<script src="[^"]*require(\.min)?\.js"></script>\s*', "", body)
    return body


def notebook_links_to_pages(body: str, stems: set[str]) -> str:
    """Point the links between notebooks (``href="05_deqreg.ipynb"``, with an optional ``#anchor``), which work in
    JupyterLab, at the site's pages (``05_deqreg.html``); links to anything else are left as they are."""
    def page(m: re.Match) -> str:
        return f'href="{m.group(1)}.html{m.group(2) or ""}"' if m.group(1) in stems else m.group(0)
    return re.sub(r'href="([^"/#:]+)\.ipynb(#[^"]*)?"', page, body)


NAV_CSS = """
<style>
.site-nav { font-family: sans-serif; font-size: 14px; padding: 8px 16px; background: #f3f5f7;
            border-bottom: 1px solid #d0d7de; display: flex; gap: 16px; flex-wrap: wrap; }
.site-nav.bottom { border-top: 1px solid #d0d7de; border-bottom: none; margin-top: 24px; }
.site-nav a { text-decoration: none; }
.widget-snapshot { border-left: 3px solid #d0d7de; padding-left: 8px; }
.widget-snapshot img { max-width: 100%; height: auto; }
.widget-snapshot-control { font-family: sans-serif; font-size: 13px; margin-right: 12px; }
</style>
"""


def nav_bar(prev: tuple[str, str] | None, nxt: tuple[str, str] | None, where: str = "top") -> str:
    parts = []
    parts.append(f'<a href="{prev[0]}" rel="prev">&larr; {html.escape(prev[1])}</a>' if prev else "<span></span>")
    parts.append('<a href="index.html">Index of the series</a>')
    parts.append(f'<a href="{nxt[0]}" rel="next">{html.escape(nxt[1])} &rarr;</a>' if nxt else "<span></span>")
    parts.append(f'<a href="{LICENSE_PAGE}">Licences of the shipped data</a>')
    return f'<nav class="site-nav {where}">' + "".join(parts) + "</nav>"


def add_nav(page: str, prev, nxt) -> str:
    page = page.replace("</head>", NAV_CSS + "</head>", 1)
    page = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav_bar(prev, nxt, "top"), page, count=1)
    return page.replace("</body>", nav_bar(prev, nxt, "bottom") + "</body>", 1)


MATHJAX = ('<script>window.MathJax = {tex: {inlineMath: [["$", "$"], ["\\\\(", "\\\\)"]]}};</script>\n'
           '<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"></script>')


def _markdown(text: str) -> str:
    from nbconvert.filters import markdown2html

    return markdown2html(text)


def index_page(entries: list[dict], mode: str) -> str:
    rows = []
    for e in entries:
        rows.append(f'<tr><td><a href="{e["page"]}">{html.escape(e["title"])}</a></td>'
                    f'<td>{_markdown(e["goal"])}</td><td>{e["seconds"] or "not run"}</td></tr>')
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{SITE_TITLE}</title>
{MATHJAX}
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 24px auto; padding: 0 16px; line-height: 1.45; }}
table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border-bottom: 1px solid #d0d7de; padding: 6px 8px; vertical-align: top; text-align: left; }}
td p {{ margin: 0; }}
</style></head>
<body>
<h1 id="top">{SITE_TITLE}</h1>
<p>The notebooks of deqreg_lite, executed (mode <code>{mode}</code>, {stamp}) with their outputs. Read them in
order. The 3D viewers of 07 and 08 are Plotly figures that draw in the page, offline; the widgets are shown as the
run left them (a static snapshot): to move them, open the notebook in Jupyter or Colab.</p>
<table id="series">
<thead><tr><th>Notebook</th><th>Goal</th><th>Run time (s)</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<p>The shipped sample data and its sources: <a href="{LICENSE_PAGE}">licences of the shipped data</a>
(<a href="LICENSES.md">LICENSES.md</a>).</p>
</body></html>
"""


def licence_page() -> str:
    text = LICENSES.read_text(encoding="utf-8")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Licences of the shipped data</title>
<style>body {{ font-family: sans-serif; max-width: 1000px; margin: 24px auto; padding: 0 16px; }}</style></head>
<body><nav class="site-nav"><a href="index.html">Index of the series</a></nav>
{_markdown(text)}
</body></html>
"""


def build(out: Path, mode: str = "default", timeout: int = 1800, notebooks: list[Path] | None = None,
          executed: Path | None = None, execute_only=None, log=print) -> list[dict]:
    """Execute the notebooks, write the site to ``out``; return the index entries (``seconds`` is ``None`` for a
    notebook not executed). ``executed``: a folder where the executed ``.ipynb`` are also saved. ``execute_only``:
    the names (stems) of the notebooks to execute, the others are converted as stored, without outputs (the tests'
    cheap build; the site itself executes every notebook)."""
    import nbformat

    paths = sorted(notebooks) if notebooks else sorted(NOTEBOOKS.glob("*.ipynb"))
    if not paths:
        raise SystemExit("no notebooks found")
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    nbs = []
    for p in paths:
        nb = nbformat.read(p, as_version=4)
        seconds = None
        if execute_only is None or p.stem in execute_only:
            t0 = time.perf_counter()
            log(f"executing {p.name} (mode {mode}) ...", flush=True)
            execute(nb, p, mode, timeout)
            seconds = time.perf_counter() - t0
            log(f"  {p.name}: {seconds:.0f} s", flush=True)
        if executed is not None and seconds is not None:
            executed.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, executed / p.name)
        title, goal = title_and_goal(nb)
        entries.append({"name": p.stem, "page": p.stem + ".html", "title": title or p.stem, "goal": goal,
                        "seconds": None if seconds is None else f"{seconds:.0f}"})
        nbs.append(nb)
    for i, (nb, e) in enumerate(zip(nbs, entries)):
        freeze_widgets(nb)
        prev = (entries[i - 1]["page"], entries[i - 1]["title"]) if i > 0 else None
        nxt = (entries[i + 1]["page"], entries[i + 1]["title"]) if i + 1 < len(entries) else None
        page = add_nav(notebook_links_to_pages(to_html(nb), {x["name"] for x in entries}), prev, nxt)
        (out / e["page"]).write_text(page, encoding="utf-8")
    (out / "index.html").write_text(index_page(entries, mode), encoding="utf-8")
    (out / LICENSE_PAGE).write_text(licence_page(), encoding="utf-8")
    shutil.copyfile(LICENSES, out / "LICENSES.md")
    return entries


# ----------------------------------------------------------------------------------------------------------------
# the link check


class _Links(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []   # (attribute, value)
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("id",) or (k == "name" and tag == "a"):
                if v is not None:
                    self.ids.add(v)
            if k in ("href", "src") and v is not None and tag not in ("base",):
                self.links.append((k, v))


def _parse(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(encoding="utf-8", errors="replace"))
    return p


def _external_ok(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.netloc) and not re.search(r"\s", url) and "." in parts.netloc.split(":")[0]


def check_links(site: Path) -> list[str]:
    """Every broken link of the site's HTML pages, as ``"page: attribute=value (why)"`` (empty when all resolve)."""
    site = site.resolve()
    pages = sorted(site.rglob("*.html"))
    parsed = {p: _parse(p) for p in pages}
    broken = []
    for page, info in parsed.items():
        rel = page.relative_to(site)
        for attr, url in info.links:
            url = url.strip()
            parts = urlsplit(url)
            why = None
            if parts.scheme in ("data", "javascript", "mailto"):
                continue
            if parts.scheme in ("http", "https"):
                if not _external_ok(url):
                    why = "malformed external URL"
            elif parts.scheme or url.startswith("//"):
                if url.startswith("//") and _external_ok("https:" + url):
                    continue
                why = f"unexpected scheme {parts.scheme!r}"
            elif not url:
                why = "empty link"
            else:
                target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
                if site != target and site not in target.parents:
                    why = "points outside the site"
                elif not target.is_file():
                    why = "no such file in the site"
                elif parts.fragment and target.suffix == ".html":
                    ids = parsed[target].ids if target in parsed else _parse(target).ids
                    # as a browser does: the fragment as written, then percent-decoded (nbconvert writes ids
                    # percent-encoded, e.g. "Exercise-1-(%E2%98%85)")
                    if parts.fragment not in ids and unquote(parts.fragment) not in ids:
                        why = f"no id {unquote(parts.fragment)!r} on {target.relative_to(site)}"
            if why:
                broken.append(f"{rel}: {attr}={url[:200]} ({why})")
    return broken


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="default", choices=["quick", "default"], help="DEQREG_MODE for the run")
    ap.add_argument("--out", type=Path, default=ROOT / "site", help="the site's folder (default: site/)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds one cell may run (default 1800)")
    ap.add_argument("--executed", type=Path, default=None, help="also save the executed .ipynb in this folder")
    ap.add_argument("--check", type=Path, default=None, metavar="SITE", help="only check the links of SITE")
    ap.add_argument("notebooks", nargs="*", type=Path, help="only these notebooks (default: notebooks/*.ipynb)")
    args = ap.parse_args(argv)
    site = args.check
    if site is None:
        t0 = time.perf_counter()
        entries = build(args.out, args.mode, args.timeout, args.notebooks or None, args.executed)
        print(f"built {len(entries)} pages in {time.perf_counter() - t0:.0f} s: {args.out / 'index.html'}")
        site = args.out
    broken = check_links(site)
    if broken:
        print(f"{len(broken)} broken link(s):", file=sys.stderr)
        for b in broken:
            print("  " + b, file=sys.stderr)
        return 1
    print(f"link check: every link of {len(list(Path(site).rglob('*.html')))} pages resolves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
