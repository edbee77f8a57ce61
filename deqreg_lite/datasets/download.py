"""Download, verify and safely unpack the public datasets (neurite-oasis 2D/3D, Learn2Reg NLST).

Only the standard library (:mod:`urllib`) and :mod:`tqdm` are used::

    from deqreg_lite.datasets import download
    root = download("oasis2d")                       # -> data_dir() / "neurite-oasis"
    root = download("nlst", "/data/nlst", sha256="<hex digest you trust>")

What :func:`download` does, in order:

1. If ``dest`` holds the marker file :data:`MARKER` recording an earlier successful call *for this dataset*
   (the marker records every dataset extracted into the folder, by name, with its archive's size and SHA-256),
   it returns at once (no network) unless ``force=True``, or unless ``sha256=`` pins a digest other than the
   recorded one. Another dataset downloaded into the same folder (``oasis2d`` then ``oasis3d``) is fetched.
2. Fetches the archive into ``dest/<filename>.part`` with a tqdm bar. A broken transfer is resumed with an
   HTTP ``Range`` request; if the server ignores it (``200`` instead of ``206``) the part file is truncated and
   the transfer restarts cleanly. Connection errors, time-outs, short reads and HTTP 408/429/5xx are retried
   ``retries`` times in all, with exponential back-off. Other HTTP errors (404, 403, ...) raise
   :class:`DownloadError` at once. The ``.part`` file is kept on failure, so a later call resumes it.
3. Verifies the size (when known) and the SHA-256 (when known: from the registry or from ``sha256=``). On a
   mismatch the file is **deleted** (a corrupt file cannot be resumed into a good one, and keeping it would
   make every later call fail the same way) and :class:`ChecksumError` is raised. The SHA-256 of what was
   downloaded is always computed and written to the marker (and logged), so you can pin it with ``sha256=``.
4. Extracts tar / tar.gz / tar.bz2 / tar.xz / zip into ``dest`` after checking *every* member first: absolute
   paths, drive letters, ``..`` components, links that are absolute or contain ``..`` (links may only point
   downwards), and device / FIFO members are refused with :class:`UnsafeArchiveError`, before anything is
   written. The (verified) archive is then kept, so the error is reproducible without a new download.
   A member that would replace an existing file with *different* content (a file you edited, or another
   dataset's file of the same name) is a conflict: :class:`ExtractConflictError` lists them and nothing is
   written, unless ``force=True`` (then they are replaced, and a warning lists them). Existing files identical
   to the archive's are left as they are.
5. Writes :data:`MARKER` into ``dest`` (JSON: ``name``, ``url``, ``filename``, ``size``, ``sha256``, ``time``
   of the latest call, and ``datasets``: the same record per dataset name, with ``files``, the extracted
   members' sizes) and, unless
   ``keep_archive=True``, removes the archive (the 3D tarball is 6.6 GB).

The checksums of the official files could not be looked up when this module was written, so the registry
holds ``None`` there: pass ``sha256=`` to pin a digest you trust. The dataset licences (OASIS Data Use
Agreement; NLST / TCIA terms) apply to the downloaded data: cite OASIS and HyperMorph, never redistribute it.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import socket
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm.auto import tqdm

from ..config import data_dir

__all__ = ["SOURCES", "Source", "download", "DownloadError", "ChecksumError", "UnsafeArchiveError",
           "ExtractConflictError", "MARKER", "sha256sum", "safe_extract"]

log = logging.getLogger(__name__)

MARKER = ".deqreg_download.json"
CHUNK = 1 << 16
# The neurite-oasis host answers GET requests from curl's (and urllib's) default user-agent with a small 403
# HTML page, so send a browser-like one.
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120 Safari/537.36"
_RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Source:
    """One downloadable dataset. ``size`` (bytes) and ``sha256`` are ``None`` where unknown."""

    url: str
    filename: str
    size: int | None = None
    sha256: str | None = None
    description: str = ""
    url_verified: bool = True   # False: an address believed right but not checked by us; override with url=


#: Default folder under ``data_dir()`` per source: the folder that the loaders read by default
#: (``OASIS(layout="neurite")`` reads ``neurite-oasis``, ``NLST`` reads ``NLST``; an archive's single top folder
#: inside it is found by the loaders).
DEFAULT_FOLDERS = {"oasis2d": "neurite-oasis", "oasis3d": "neurite-oasis", "nlst": "NLST"}

SOURCES: dict[str, Source] = {
    # neurite-oasis v1.0 (HyperMorph / VoxelMorph tutorials), hosted by the Martinos Center (MGH / MIT).
    # About 24 MB. A third-party README reports md5 c9ae5864f250c7e4b8d83a104e51ae8e (not verified by us).
    "oasis2d": Source(
        url="https://surfer.nmr.mgh.harvard.edu/ftp/data/neurite/data/neurite-oasis.2d.v1.0.tar",
        filename="neurite-oasis.2d.v1.0.tar",
        description="neurite-oasis v1.0, 2D coronal slices (414 subjects, 160x192), about 24 MB",
    ),
    # About 6.6 GB. A third-party README reports md5 081392a8150ff99ab7a64a9ded377835 (not verified by us).
    "oasis3d": Source(
        url="https://surfer.nmr.mgh.harvard.edu/ftp/data/neurite/data/neurite-oasis.v1.0.tar",
        filename="neurite-oasis.v1.0.tar",
        description="neurite-oasis v1.0, 3D volumes (414 subjects, 160x192x224), about 6.6 GB",
    ),
    # Learn2Reg 2023 NLST (zip with a top-level NLST/ folder). This Lübeck Nextcloud share is the address the
    # challenge and several public code bases use; shares can move, so it is marked unverified: pass url=
    # (e.g. the Zenodo record of Learn2Reg) if it fails.
    "nlst": Source(
        url="https://cloud.imi.uni-luebeck.de/s/pERQBNyEFNLY8gR/download/NLST2023.zip",
        filename="NLST2023.zip",
        description="Learn2Reg NLST lung CT pairs (imagesTr, masksTr, keypointsTr)",
        url_verified=False,
    ),
}


class DownloadError(RuntimeError):
    """A dataset could not be fetched (HTTP error, too many failed retries, not an archive)."""


class ChecksumError(DownloadError):
    """The downloaded file does not have the expected size or SHA-256 (the file has been deleted)."""


class UnsafeArchiveError(DownloadError):
    """An archive member would be written outside the destination (or is a device / FIFO)."""


class ExtractConflictError(DownloadError):
    """Extracting would replace existing files whose content differs from the archive's (nothing was written).

    Attributes:
        paths: the conflicting paths under the destination.
    """

    def __init__(self, message: str, paths: list[Path]) -> None:
        super().__init__(message)
        self.paths = paths


# --------------------------------------------------------------------------------------------------- helpers
def sha256sum(path: str | os.PathLike, *, progress: bool = False) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"sha256 {path.name}", disable=not progress, leave=False) as bar:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _filename_from_url(url: str) -> str:
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    return name or "download"


class _Retry(Exception):
    """A transient failure inside one attempt (the caller backs off and tries again)."""


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None)."""
    m = re.match(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)", value or "")
    if not m:
        return None
    return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))


def _fetch(url: str, path: Path, *, size: int | None, timeout: float, retries: int, backoff: float,
           progress: bool) -> None:
    """Download ``url`` to ``path`` through ``path.part``, resuming with Range requests."""
    part = path.with_name(path.name + ".part")
    failures = 0
    bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name, disable=not progress)
    try:
        while True:
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have > size:            # longer than the file can be: start over
                part.unlink()
                have = 0
            if size is not None and have == size:
                break
            bar.reset(total=size)
            bar.update(have)
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
            if have:
                headers["Range"] = f"bytes={have}-"
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                    ctype = resp.headers.get("Content-Type", "")
                    if ctype.startswith("text/html"):
                        raise DownloadError(
                            f"{url} returned an HTML page instead of the archive (access denied, a login page or a "
                            f"moved file?). Check the address in a browser and pass url= if it changed.")
                    length = resp.headers.get("Content-Length")
                    length = int(length) if length is not None and length.isdigit() else None
                    if have and resp.status == 206:
                        cr = _parse_content_range(resp.headers.get("Content-Range"))
                        if cr is None or cr[0] != have:          # not the range we asked for: restart cleanly
                            log.info("server sent an unexpected Content-Range; restarting %s", path.name)
                            part.unlink()
                            raise _Retry("bad Content-Range")
                        total = cr[1] if cr[1] is not None else (have + length if length is not None else size)
                        mode = "ab"
                    else:
                        if have:
                            log.info("server ignored the Range request; restarting %s from zero", path.name)
                            have = 0
                            bar.reset(total=size)
                        total = length if length is not None else size
                        mode = "wb"
                    if size is None and total is not None and bar.total != total:
                        bar.reset(total=total)
                        bar.update(have)
                    expected = total - have if total is not None else None
                    got = 0
                    with open(part, mode) as f:
                        while True:
                            chunk = resp.read(CHUNK)
                            if not chunk:
                                break
                            f.write(chunk)
                            got += len(chunk)
                            bar.update(len(chunk))
                    # http.client returns b"" rather than raising when the peer closes early: check ourselves.
                    if expected is not None and got < expected:
                        raise _Retry(f"connection closed after {have + got} of {total} bytes")
                break
            except urllib.error.HTTPError as e:
                e.close()                                      # release the connection (no ResourceWarning)
                if e.code == 416 and have:                     # range not satisfiable: complete, or start over
                    cr = re.match(r"\s*bytes\s+\*/(\d+)", e.headers.get("Content-Range", "") or "")
                    if cr and int(cr.group(1)) == have:
                        break
                    part.unlink()
                    err: BaseException = e
                elif e.code in _RETRY_HTTP:
                    err = e
                else:
                    raise DownloadError(f"HTTP {e.code} {e.reason} for {url}"
                                        + (" (the file is not there: check the address or pass url=)"
                                           if e.code == 404 else "")) from None
            except (_Retry, urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout,
                    http.client.HTTPException, OSError) as e:
                if isinstance(e, urllib.error.URLError) and isinstance(e.reason, str) \
                        and "unknown url type" in e.reason:
                    raise DownloadError(f"cannot fetch {url}: {e.reason}") from None
                err = e
            failures += 1
            if failures > retries:
                raise DownloadError(f"giving up on {url} after {failures} failed attempts (last error: {err!r}); "
                                    f"the partial file {part} is kept, so calling again resumes it") from err
            delay = min(backoff * 2 ** (failures - 1), 60.0)
            log.warning("download of %s failed (%r); retry %d/%d in %.1f s", path.name, err, failures, retries,
                        delay)
            time.sleep(delay)
    finally:
        bar.close()
    part.replace(path)


def _verify(path: Path, *, size: int | None, sha256: str | None, progress: bool) -> str:
    """Check size and SHA-256 (each when known); delete the file and raise :class:`ChecksumError` on mismatch."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        path.unlink()
        raise ChecksumError(f"{path.name}: size {actual_size} bytes, expected {size}; the file was deleted")
    digest = sha256sum(path, progress=progress)
    if sha256 is not None and digest != sha256.strip().lower():
        path.unlink()
        raise ChecksumError(f"{path.name}: sha256 {digest}, expected {sha256.strip().lower()}; the file was "
                            f"deleted. If the file was updated upstream and you trust it, pass sha256=.")
    return digest


def _unsafe_name(name: str) -> str | None:
    """Why an archive member name is unsafe, or None."""
    if not name or "\x00" in name:
        return "empty name"
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "'..' component"
    return None


def _check_tar(tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tf.getmembers()
    for m in members:
        why = _unsafe_name(m.name)
        if why is None and (m.issym() or m.islnk()):
            lwhy = _unsafe_name(m.linkname)
            why = None if lwhy is None else f"link to {m.linkname!r} ({lwhy}: links may only point downwards)"
        if why is None and (m.ischr() or m.isblk() or m.isfifo() or m.isdev()):
            why = "device or FIFO"
        if why:
            raise UnsafeArchiveError(f"refusing to extract member {m.name!r}: {why}")
    return members


def _same_content(path: Path, size: int, open_member) -> bool:
    """Whether the regular file ``path`` holds exactly the ``size`` bytes that ``open_member()`` yields."""
    if path.is_symlink() or not path.is_file() or path.stat().st_size != size:
        return False
    with open(path, "rb") as a, open_member() as b:
        while True:
            x, y = a.read(CHUNK), b.read(CHUNK)
            if x != y:
                return False
            if not x:
                return True


def _conflicts(dest: Path, entries) -> list[Path]:
    """The paths under ``dest`` that extracting ``entries`` would replace with different content.

    ``entries``: ``(name, kind, size, open_member)`` with kind ``"file"``, ``"dir"`` or ``"link"``.
    """
    out = []
    for name, kind, size, open_member in entries:
        target = dest / name
        if not (target.exists() or target.is_symlink()):
            continue
        if kind == "dir":
            if not target.is_dir():
                out.append(target)
        elif kind == "file":
            if not _same_content(target, size, open_member):
                out.append(target)
        elif not target.is_symlink():            # a link member over a real file or folder
            out.append(target)
    return out


def _refuse_conflicts(archive: Path, dest: Path, entries, overwrite: bool) -> list[Path]:
    conflicts = _conflicts(dest, entries)
    if conflicts and not overwrite:
        shown = "\n  ".join(str(p) for p in conflicts[:20]) + (
            f"\n  ... and {len(conflicts) - 20} more" if len(conflicts) > 20 else "")
        raise ExtractConflictError(
            f"extracting {archive.name} into {dest} would replace {len(conflicts)} existing file(s) whose content "
            f"differs from the archive's (edited by you, or another dataset's files); nothing was extracted:\n  "
            f"{shown}\nMove them away, extract into another folder, or pass force=True to replace them.",
            conflicts)
    if conflicts:
        log.warning("replacing %d existing file(s) that differ from %s: %s", len(conflicts), archive.name,
                    ", ".join(str(p) for p in conflicts[:20]))
    return conflicts


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Extract a tar (any compression) or zip archive into ``dest`` after checking every member.

    Every member is checked before anything is written: its name (see :func:`download`), and whether it would
    replace an existing file under ``dest`` whose content differs from the member's (compared byte for byte
    when the sizes agree). Existing identical files are harmless and simply rewritten.

    Args:
        archive: the tar or zip file.
        dest: the folder to extract into (created).
        overwrite: replace differing existing files (with a logged warning) instead of refusing.
    Raises:
        UnsafeArchiveError: a member would land outside ``dest`` (nothing is written then).
        ExtractConflictError: members would replace differing existing files and ``overwrite`` is False
            (nothing is written then; the error's ``paths`` lists them).
        DownloadError: the file is neither a tar nor a zip archive.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                why = _unsafe_name(info.filename)
                if why:
                    raise UnsafeArchiveError(f"refusing to extract member {info.filename!r}: {why}")
            _refuse_conflicts(archive, dest, [
                (i.filename, "dir" if i.is_dir() else "file", i.file_size, lambda i=i: zf.open(i))
                for i in zf.infolist()], overwrite)
            zf.extractall(dest)
        return dest
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            members = _check_tar(tf)
            _refuse_conflicts(archive, dest, [
                (m.name, "dir" if m.isdir() else "file" if m.isfile() else "link", m.size,
                 lambda m=m: tf.extractfile(m)) for m in members], overwrite)
            if hasattr(tarfile, "data_filter"):          # Python >= 3.12 and the 3.8-3.11 security backports
                tf.extractall(dest, members=members, filter="data")
            else:                                        # pragma: no cover - old interpreters
                tf.extractall(dest, members=members)
        return dest
    raise DownloadError(f"{archive} is neither a tar nor a zip archive (an error page saved as the archive?)")


# --------------------------------------------------------------------------------------------------- public
def download(name: str, dest: str | os.PathLike | None = None, *, url: str | None = None,
             sha256: str | None = None, size: int | None = None, force: bool = False, progress: bool = True,
             timeout: float = 60.0, retries: int = 5, backoff: float = 1.0, keep_archive: bool = False) -> Path:
    """Fetch dataset ``name`` (a key of :data:`SOURCES`), verify it, and extract it into ``dest``.

    Args:
        name: ``"oasis2d"``, ``"oasis3d"`` or ``"nlst"``; any other name works when ``url`` is given.
        dest: destination folder; defaults to ``data_dir() / DEFAULT_FOLDERS[name]`` (``DEQREG_DATA_DIR``), the
            loaders' default root (``data_dir() / name`` for other names).
        url: override the registry's address (a mirror, or a moved file).
        sha256: expected hex SHA-256, overriding the registry (which holds ``None`` where unknown).
        size: expected size in bytes, overriding the registry. When given (or known) it is always checked.
        force: download and extract again even when ``dest`` holds the marker of an earlier call for ``name``,
            and replace existing files whose content differs from the archive's (a warning lists them).
        progress: show tqdm progress bars.
        timeout: socket time-out in seconds for each network operation.
        retries: how many failed attempts (connection errors, time-outs, short reads, HTTP 408/429/5xx) are
            retried in all, with exponential back-off ``backoff * 2**k`` seconds (at most 60 s).
        keep_archive: keep ``dest/<filename>`` after extraction (removed by default).

    Returns:
        ``dest`` (a :class:`~pathlib.Path`) holding the extracted files and the marker :data:`MARKER`.

    Raises:
        KeyError: unknown ``name`` and no ``url``.
        DownloadError: HTTP error such as 404, too many failed attempts, or not an archive.
        ChecksumError: size or SHA-256 mismatch (the bad file is deleted).
        UnsafeArchiveError: a member would escape ``dest`` (nothing is extracted; the archive is kept).
        ExtractConflictError: extracting would replace existing files that differ from the archive's (files you
            edited, or another dataset's); nothing is extracted, the archive is kept; pass ``force=True`` to
            replace them.
    """
    if name in SOURCES:
        src = SOURCES[name]
    elif url is not None:
        src = Source(url=url, filename=_filename_from_url(url))
    else:
        raise KeyError(f"unknown dataset {name!r}: choose one of {sorted(SOURCES)} or pass url=")
    the_url = url or src.url
    filename = src.filename
    if url is not None and _filename_from_url(url) != "download":   # Nextcloud ".../download" keeps the default
        filename = _filename_from_url(url)
    # The registry's size and digest describe the registry's file: they do not follow an overriding url=.
    same_file = url is None or url == src.url
    want_sha = sha256 if sha256 is not None else (src.sha256 if same_file else None)
    want_size = size if size is not None else (src.size if same_file else None)
    dest = Path(dest).expanduser() if dest is not None else data_dir() / DEFAULT_FOLDERS.get(name, name)
    marker = dest / MARKER
    records = _read_marker(marker)
    done = records.get(name)
    if done is not None and not force:
        pinned = want_sha.strip().lower() if want_sha is not None else None
        if pinned is None or pinned == done.get("sha256"):
            log.info("%s already downloaded into %s (pass force=True to redo)", name, dest)
            return dest
        log.warning("%s in %s was extracted from an archive with sha256 %s, not the pinned %s: downloading again",
                    name, dest, done.get("sha256"), pinned)

    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / filename
    if force:
        for p in (archive, archive.with_name(archive.name + ".part")):
            if p.exists():
                p.unlink()
    if archive.exists():                                 # a kept archive from an earlier call: re-verify it
        try:
            digest = _verify(archive, size=want_size, sha256=want_sha, progress=progress)
        except ChecksumError:
            log.warning("existing %s failed verification; downloading it again", archive)
            digest = None
    else:
        digest = None
    if digest is None:
        if not src.url_verified and url is None:
            log.warning("the address of %r is not verified (%s); pass url= if it fails", name, the_url)
        _fetch(the_url, archive, size=want_size, timeout=timeout, retries=retries, backoff=backoff,
               progress=progress)
        digest = _verify(archive, size=want_size, sha256=want_sha, progress=progress)
    if want_sha is None:
        log.info("sha256 of %s is %s (pass sha256= to pin it)", filename, digest)

    safe_extract(archive, dest, overwrite=force)
    info = {"name": name, "url": the_url, "filename": filename, "size": archive.stat().st_size, "sha256": digest,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": _member_sizes(archive)}
    if not keep_archive:
        archive.unlink()
    records = {k: v for k, v in _read_marker(marker).items() if k != name}
    records[name] = info
    latest = {k: v for k, v in info.items() if k != "files"}
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({**latest, "datasets": records}, indent=2) + "\n")
    tmp.replace(marker)
    return dest


def _read_marker(marker: Path) -> dict[str, dict]:
    """The per-dataset records of a marker file (``{}`` when absent or unreadable).

    A marker written before markers held several datasets (one flat record) counts for its ``name`` only.
    """
    if not marker.is_file():
        return {}
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        log.warning("unreadable marker %s: ignored", marker)
        return {}
    if not isinstance(data, dict):
        return {}
    if isinstance(data.get("datasets"), dict):
        return {str(k): v for k, v in data["datasets"].items() if isinstance(v, dict)}
    return {str(data["name"]): data} if "name" in data else {}


def _member_sizes(archive: Path) -> dict[str, int]:
    """``{member name: size in bytes}`` of the regular files in a tar or zip archive."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return {i.filename: i.file_size for i in zf.infolist() if not i.is_dir()}
    with tarfile.open(archive, "r:*") as tf:
        return {m.name: m.size for m in tf.getmembers() if m.isfile()}
