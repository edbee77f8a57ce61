"""deqreg_lite.datasets.download against a local http.server on 127.0.0.1 (no internet).

Each test starts its own ThreadingHTTPServer on a random free port, serving small generated archives from
tmp_path, and shuts it down at the end. Every client call has a short socket time-out and few retries, the
server refuses to answer more than MAX_REQUESTS requests, and an alarm bounds each test's wall time.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import random
import signal
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deqreg_lite.datasets.download import (
    MARKER, SOURCES, ChecksumError, DownloadError, Source, UnsafeArchiveError, download, safe_extract,
)

dl_mod = importlib.import_module("deqreg_lite.datasets.download")
MAX_REQUESTS = 20
FAST = dict(progress=False, timeout=3.0, retries=2, backoff=0.01)


# ------------------------------------------------------------------------------------------------ time bound
@pytest.fixture(autouse=True)
def _time_bound():
    """Fail any test that runs longer than 20 s (POSIX; the client time-outs bound it elsewhere)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _boom(signum, frame):
        raise TimeoutError("test exceeded its 20 s bound")

    old = signal.signal(signal.SIGALRM, _boom)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------------ archives
def _payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


FILES = {"subjects.txt": b"OASIS_OAS1_0001_MR1\nOASIS_OAS1_0002_MR1\n",
         "OASIS_OAS1_0001_MR1/slice_norm.bin": _payload(1, 150_000),
         "OASIS_OAS1_0002_MR1/slice_norm.bin": _payload(2, 150_000)}


def _make_tar(path: Path, mode: str = "w") -> bytes:
    with tarfile.open(path, mode) as tf:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def _make_zip(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in FILES.items():
            zf.writestr("NLST/" + name, data)
    return path.read_bytes()


def _tar_with(path: Path, *members: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        for m in members:
            tf.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
    return path


def _member(name, kind=tarfile.REGTYPE, linkname="", size=1):
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = linkname
    m.size = size if kind == tarfile.REGTYPE else 0
    return m


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _assert_extracted(dest: Path, prefix: str = "") -> None:
    for name, data in FILES.items():
        assert (dest / prefix / name).read_bytes() == data
    assert json.loads((dest / MARKER).read_text())["sha256"]


# ------------------------------------------------------------------------------------------------ server
class _Handler(BaseHTTPRequestHandler):
    timeout = 5                       # a stuck client connection is dropped

    def log_message(self, *args):     # keep the test output quiet
        pass

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.log.append((self.path, self.headers.get("Range"), self.headers.get("User-Agent")))
            n_req = len(srv.log)
        if n_req > MAX_REQUESTS:
            self.send_error(500, "too many requests")
            return
        if srv.status is not None:
            code = srv.status if not isinstance(srv.status, list) else srv.status.pop(0)
            if code != 200:
                self.send_error(code)
                return
        if srv.stall is not None:
            srv.stall.wait(10)        # released at teardown
        data = srv.files.get(self.path.split("?")[0])
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", srv.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes" if srv.ranges else "none")
        self.end_headers()
        with srv.lock:
            cut, srv.cut_after = srv.cut_after, None      # cut only once
        if cut is not None and cut < len(body):
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True                  # the client sees a short body, then EOF
            return
        self.wfile.write(body)


class Server:
    def __init__(self, root: Path):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        h = self.httpd
        h.daemon_threads = True
        h.lock = threading.Lock()
        h.log, h.files = [], {}
        h.ranges, h.cut_after, h.status, h.stall = True, None, None, None
        h.content_type = "application/octet-stream"
        self.root = root
        self.thread = threading.Thread(target=h.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def add(self, name: str, data: bytes) -> str:
        self.httpd.files["/" + name] = data
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    @property
    def log(self):
        return self.httpd.log

    def close(self):
        if self.httpd.stall is not None:
            self.httpd.stall.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def tarball(tmp_path):
    data = _make_tar(tmp_path / "small.tar")
    assert 200_000 < len(data) < 1_000_000
    return data


# ------------------------------------------------------------------------------------------------ tests
def test_registry_has_the_three_datasets():
    assert set(SOURCES) == {"oasis2d", "oasis3d", "nlst"}
    for src in SOURCES.values():
        assert src.url.startswith("https://") and src.filename
        assert src.sha256 is None or len(src.sha256) == 64
    assert SOURCES["oasis2d"].url.endswith("/neurite-oasis.2d.v1.0.tar")
    assert SOURCES["oasis3d"].url.endswith("/neurite-oasis.v1.0.tar")


def test_download_verifies_extracts_and_shows_progress(server, tarball, tmp_path, capsys):
    url = server.add("data.tar", tarball)
    dest = download("custom", tmp_path / "out", url=url, sha256=_sha(tarball), size=len(tarball),
                    progress=True, timeout=3.0, retries=1, backoff=0.01)
    assert dest == tmp_path / "out"
    _assert_extracted(dest)
    assert not (dest / "data.tar").exists() and not (dest / "data.tar.part").exists()
    info = json.loads((dest / MARKER).read_text())
    assert info["sha256"] == _sha(tarball) and info["size"] == len(tarball) and info["url"] == url
    assert len(server.log) == 1 and "Mozilla" in server.log[0][2]
    assert "data.tar" in capsys.readouterr().err          # the tqdm bar


def test_broken_transfer_resumes_with_range(server, tarball, tmp_path):
    url = server.add("data.tar", tarball)
    server.httpd.cut_after = 100_000
    dest = download("custom", tmp_path / "out", url=url, sha256=_sha(tarball), keep_archive=True, **FAST)
    _assert_extracted(dest)
    assert (dest / "data.tar").read_bytes() == tarball
    assert [r for _, r, _ in server.log] == [None, "bytes=100000-"]


def test_resume_across_calls_from_a_kept_part_file(server, tarball, tmp_path):
    url = server.add("data.tar", tarball)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "data.tar.part").write_bytes(tarball[:12345])   # left by an earlier, interrupted call
    download("custom", dest, url=url, sha256=_sha(tarball), **FAST)
    _assert_extracted(dest)
    assert [r for _, r, _ in server.log] == ["bytes=12345-"]


def test_server_ignoring_range_restarts_cleanly(server, tarball, tmp_path):
    url = server.add("data.tar", tarball)
    server.httpd.ranges = False
    server.httpd.cut_after = 50_000
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "data.tar.part").write_bytes(b"garbage" * 1000)   # appending to this would break the checksum
    download("custom", dest, url=url, sha256=_sha(tarball), **FAST)
    _assert_extracted(dest)
    # 1: Range ignored (200) and cut; 2: Range for the 50 000 bytes ignored again, full body, restart from zero
    assert [r for _, r, _ in server.log] == ["bytes=7000-", "bytes=50000-"]


def test_bad_checksum_raises_and_deletes_the_file(server, tarball, tmp_path):
    url = server.add("data.tar", tarball)
    dest = tmp_path / "out"
    with pytest.raises(ChecksumError, match="sha256"):
        download("custom", dest, url=url, sha256="0" * 64, **FAST)
    assert not (dest / MARKER).exists()
    assert not (dest / "data.tar").exists() and not (dest / "data.tar.part").exists()
    assert not (dest / "subjects.txt").exists()


def test_wrong_size_raises(server, tarball, tmp_path):
    url = server.add("data.tar", tarball)
    with pytest.raises(ChecksumError, match="size"):
        download("custom", tmp_path / "out", url=url, size=len(tarball) + 1, **FAST)


def test_404_is_a_clear_error_and_not_retried(server, tmp_path):
    url = server.add("data.tar", b"x")
    with pytest.raises(DownloadError, match="HTTP 404"):
        download("custom", tmp_path / "out", url=url.replace("data.tar", "missing.tar"), **FAST)
    assert len(server.log) == 1


def test_transient_errors_are_retried_then_bounded(server, tarball, tmp_path):
    url = server.add("data.tar", tarball)
    server.httpd.status = [503, 200]
    download("custom", tmp_path / "a", url=url, sha256=_sha(tarball), **FAST)
    assert len(server.log) == 2
    server.httpd.status = 503
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="3 failed attempts"):
        download("custom", tmp_path / "b", url=url, **FAST)
    assert len(server.log) == 2 + 3 and time.monotonic() - t0 < 5


def test_stalled_server_times_out(server, tarball, tmp_path):
    url = server.add("data.tar", tarball)
    server.httpd.stall = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="failed attempts"):
        download("custom", tmp_path / "out", url=url, progress=False, timeout=0.3, retries=1, backoff=0.01)
    assert time.monotonic() - t0 < 5


def test_html_page_is_refused(server, tmp_path):
    url = server.add("data.tar", b"<html>403 Forbidden</html>")
    server.httpd.content_type = "text/html; charset=utf-8"
    with pytest.raises(DownloadError, match="HTML"):
        download("custom", tmp_path / "out", url=url, **FAST)


def test_second_call_is_a_no_op_unless_forced(server, tarball, tmp_path):
    url = server.add("data.tar", tarball)
    dest = tmp_path / "out"
    download("custom", dest, url=url, **FAST)
    (dest / "subjects.txt").write_text("edited")
    assert download("custom", dest, url=url, **FAST) == dest
    assert len(server.log) == 1 and (dest / "subjects.txt").read_text() == "edited"
    download("custom", dest, url=url, force=True, **FAST)
    assert len(server.log) == 2
    _assert_extracted(dest)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_other_archive_formats(server, tmp_path, kind):
    data = _make_tar(tmp_path / "a.tar.gz", "w:gz") if kind == "tar.gz" else _make_zip(tmp_path / "a.zip")
    url = server.add(f"data.{kind}", data)
    dest = download("custom", tmp_path / "out", url=url, sha256=_sha(data), **FAST)
    _assert_extracted(dest, "NLST" if kind == "zip" else "")


def test_registry_entry_with_url_and_sha256_overrides(server, tarball, tmp_path, monkeypatch):
    good = server.add("neurite-oasis.2d.v1.0.tar", tarball)
    monkeypatch.setenv("DEQREG_DATA_DIR", str(tmp_path / "data"))
    # the registry's own address and digest are used by default...
    monkeypatch.setitem(SOURCES, "oasis2d", Source(url=good, filename="neurite-oasis.2d.v1.0.tar",
                                                   size=len(tarball), sha256="f" * 64))
    with pytest.raises(ChecksumError):
        download("oasis2d", **FAST)
    # ...sha256= overrides the registry's digest, and the default dest is data_dir() / name
    dest = download("oasis2d", sha256=_sha(tarball), **FAST)
    assert dest == tmp_path / "data" / "neurite-oasis"  # the loaders' default root
    _assert_extracted(dest)
    # url= overrides the address (the registry's size and digest do not apply to another file)
    mirror = server.add("mirror/copy.tar", tarball)
    monkeypatch.setitem(SOURCES, "oasis2d", Source(url=good.replace(".tar", ".missing"),
                                                   filename="neurite-oasis.2d.v1.0.tar", size=1, sha256="f" * 64))
    dest2 = download("oasis2d", tmp_path / "mirror", url=mirror, **FAST)
    _assert_extracted(dest2)
    assert json.loads((dest2 / MARKER).read_text())["url"] == mirror
    assert server.log[-1][0] == "/mirror/copy.tar"


def test_unknown_name_without_url():
    with pytest.raises(KeyError, match="oasis2d"):
        download("nope", progress=False)


UNSAFE = {
    "dotdot": lambda: [_member("../evil.txt")],
    "nested_dotdot": lambda: [_member("a/../../evil.txt")],
    "absolute": lambda: [_member("/tmp/deqreg_evil.txt")],
    "symlink_out": lambda: [_member("link", tarfile.SYMTYPE, "../../outside")],
    "symlink_abs": lambda: [_member("link", tarfile.SYMTYPE, "/etc/passwd")],
    "hardlink_out": lambda: [_member("hard", tarfile.LNKTYPE, "../outside.txt")],
    "fifo": lambda: [_member("fifo", tarfile.FIFOTYPE)],
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_tar_members_are_rejected(tmp_path, case):
    archive = _tar_with(tmp_path / "bad.tar", *UNSAFE[case]())
    dest = tmp_path / "deep" / "out"
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        safe_extract(archive, dest)
    assert not (dest / "ok.txt").exists()          # nothing is written when one member is bad
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_unsafe_zip_member_is_rejected(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("ok.txt", "ok")
        zf.writestr("../evil.txt", "evil")
    with pytest.raises(UnsafeArchiveError, match="'..'"):
        safe_extract(tmp_path / "bad.zip", tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "ok.txt").exists()


def test_downward_symlink_is_allowed(tmp_path):
    archive = _tar_with(tmp_path / "ok.tar", _member("sub/target.txt", size=3),
                        _member("sub/link.txt", tarfile.SYMTYPE, "target.txt"))
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "sub" / "link.txt").is_symlink() and (out / "sub" / "link.txt").read_bytes() == b"xxx"


def test_unsafe_archive_via_download_keeps_archive_and_writes_no_marker(server, tmp_path):
    data = _tar_with(tmp_path / "bad.tar", _member("../evil.txt")).read_bytes()
    url = server.add("bad.tar", data)
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError):
        download("custom", dest, url=url, **FAST)
    assert not (dest / MARKER).exists() and (dest / "bad.tar").exists() and not (tmp_path / "evil.txt").exists()


def test_not_an_archive(server, tmp_path):
    url = server.add("data.tar", b"plain bytes, not an archive" * 10)
    with pytest.raises(DownloadError, match="neither a tar nor a zip"):
        download("custom", tmp_path / "out", url=url, **FAST)


def test_module_uses_only_stdlib_and_tqdm():
    import ast
    tree = ast.parse(Path(dl_mod.__file__).read_text())
    roots = {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert roots - {"__future__", "tqdm"} <= set(__import__("sys").stdlib_module_names)


def test_complete_part_file_and_416_is_accepted(server, tarball, tmp_path):
    url = server.add("data.tar", tarball)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "data.tar.part").write_bytes(tarball)          # the whole file, but the rename never happened
    download("custom", dest, url=url, sha256=_sha(tarball), **FAST)
    _assert_extracted(dest)
    assert [r for _, r, _ in server.log] == [f"bytes={len(tarball)}-"]   # answered 416 bytes */N


# ------------------------------------------------------------------------------------ several datasets, edits
def _tar_of(path: Path, files: dict) -> bytes:
    with tarfile.open(path, "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_second_dataset_into_the_same_folder_is_fetched(server, tarball, tmp_path, monkeypatch):
    # oasis3d after oasis2d into one folder: the marker names the dataset, so the second one is not skipped
    files3d = {"subjects.txt": FILES["subjects.txt"], "OASIS_OAS1_0001_MR1/aligned_norm.bin": _payload(3, 5000)}
    data3d = _tar_of(tmp_path / "3d.tar", files3d)
    monkeypatch.setitem(SOURCES, "oasis2d", Source(url=server.add("2d.tar", tarball), filename="2d.tar"))
    monkeypatch.setitem(SOURCES, "oasis3d", Source(url=server.add("3d.tar", data3d), filename="3d.tar"))
    dest = tmp_path / "neurite-oasis"
    download("oasis2d", dest, **FAST)
    download("oasis3d", dest, **FAST)
    assert [p for p, _, _ in server.log] == ["/2d.tar", "/3d.tar"]
    assert (dest / "OASIS_OAS1_0001_MR1" / "aligned_norm.bin").read_bytes() == files3d[
        "OASIS_OAS1_0001_MR1/aligned_norm.bin"]
    _assert_extracted(dest)                                       # the 2D files are still there
    marker = json.loads((dest / MARKER).read_text())
    assert set(marker["datasets"]) == {"oasis2d", "oasis3d"} and marker["name"] == "oasis3d"
    assert marker["datasets"]["oasis2d"]["sha256"] == _sha(tarball)
    assert marker["datasets"]["oasis3d"]["files"] == {k: len(v) for k, v in files3d.items()}
    # both are now recorded: neither is fetched again
    download("oasis2d", dest, **FAST)
    download("oasis3d", dest, **FAST)
    assert len(server.log) == 2


def test_old_single_dataset_marker_counts_for_its_name_only(server, tarball, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / MARKER).write_text(json.dumps({"name": "oasis2d", "url": "x", "filename": "2d.tar", "size": 1,
                                           "sha256": "0" * 64}))
    monkeypatch.setitem(SOURCES, "oasis3d", Source(url=server.add("3d.tar", tarball), filename="3d.tar"))
    download("oasis3d", dest, **FAST)
    assert len(server.log) == 1
    assert set(json.loads((dest / MARKER).read_text())["datasets"]) == {"oasis2d", "oasis3d"}


def test_extraction_never_silently_replaces_edited_files(server, tarball, tmp_path):
    url = server.add("data.tar", tarball)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "subjects.txt").write_text("my own subject list")                 # an edited / foreign file
    (dest / "OASIS_OAS1_0001_MR1").mkdir()
    (dest / "OASIS_OAS1_0001_MR1" / "slice_norm.bin").write_bytes(FILES["OASIS_OAS1_0001_MR1/slice_norm.bin"])
    with pytest.raises(dl_mod.ExtractConflictError, match="subjects.txt") as e:
        download("custom", dest, url=url, **FAST)
    assert [p.name for p in e.value.paths] == ["subjects.txt"]                # the identical file is no conflict
    assert "force=True" in str(e.value)
    assert (dest / "subjects.txt").read_text() == "my own subject list"      # nothing was written ...
    assert not (dest / "OASIS_OAS1_0002_MR1").exists() and not (dest / MARKER).exists()
    assert (dest / "data.tar").is_file()                                      # ... and the archive is kept
    download("custom", dest, url=url, force=True, **FAST)                      # explicit: replace them
    _assert_extracted(dest)


def test_safe_extract_refuses_differing_files_unless_overwrite(tmp_path):
    archive = tmp_path / "a.zip"
    _make_zip(archive)
    dest = tmp_path / "out"
    safe_extract(archive, dest)
    safe_extract(archive, dest)                                               # identical files: fine
    (dest / "NLST" / "subjects.txt").write_text("edited")
    with pytest.raises(dl_mod.ExtractConflictError):
        safe_extract(archive, dest)
    assert (dest / "NLST" / "subjects.txt").read_text() == "edited"
    safe_extract(archive, dest, overwrite=True)
    assert (dest / "NLST" / "subjects.txt").read_bytes() == FILES["subjects.txt"]
