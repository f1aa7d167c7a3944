"""Download and verify the public MovieLens archives published by GroupLens.

Usage::

    python -m dynamic_ctr.data.download ml-100k [ml-1m ml-latest-small]
        [--root DIR] [--base-url URL] [--force] [--timeout SECONDS] [--quiet]

Known archives (``MANIFESTS``): ``ml-100k``, ``ml-1m`` and ``ml-latest-small``,
fetched from ``https://files.grouplens.org/datasets/movielens/<name>.zip``.
Each zip holds a top folder of the same name, which ends up as ``ROOT/<name>``.

``--root`` defaults to the environment variable ``DYNAMIC_CTR_DATA_ROOT`` and,
if that is unset or empty, to ``data/external`` (relative to the working
directory).

What :func:`download` guarantees:

* Atomic: the archive is streamed to a temporary file inside ``ROOT``, checked
  (CRC of every member via ``ZipFile.testzip``, expected files present, no
  absolute or ``..`` member paths), extracted member by member into a temporary
  directory inside ``ROOT``, checked again (row counts, counted on bytes, no
  decoding) and only then renamed to ``ROOT/<name>``. On any failure every
  temporary file and directory is removed; nothing half-written is left.
* An existing ``ROOT/<name>`` is kept as is (after a quick check that the
  expected files exist) unless ``force=True`` / ``--force``; a forced download
  replaces it only after the new copy is complete and verified.
* Network trouble (offline, DNS, refused connection, timeout, HTTP status other
  than 200, truncated body) raises :class:`DownloadError` naming the URL, the
  reason and the manual alternative (download the zip yourself and unzip it into
  ``ROOT``). Failed checks raise :class:`VerificationError` (a subclass).
* Progress goes to stderr (tqdm when importable, else a plain line), never to
  stdout; nothing is ever prompted or unpickled.

The CLI prints the extracted folder of each archive to stdout and returns 0, or
prints one error line to stderr and returns 1; unknown names return 2 and list
the known ones.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens/"
ROOT_ENV_VAR = "DYNAMIC_CTR_DATA_ROOT"
DEFAULT_ROOT = Path("data/external")
CHUNK_SIZE = 1 << 20


class DownloadError(RuntimeError):
    """An archive could not be fetched, or (subclasses) failed verification."""


class VerificationError(DownloadError):
    """An archive or an extracted folder does not match its manifest."""


@dataclass(frozen=True)
class ExpectedFile:
    """A file expected inside an archive's top folder.

    Args:
        path: path relative to the top folder, with ``/`` separators.
        rows: expected number of data rows (non-blank lines, header excluded);
            ``None`` to only check that the file exists.
        header: whether the file starts with a header line.
    """

    path: str
    rows: int | None = None
    header: bool = False


@dataclass(frozen=True)
class ArchiveManifest:
    """What one archive is and what it must contain.

    Args:
        name: archive name; also the top folder inside the zip and the folder
            created under the data root.
        url_path: path of the zip relative to the base URL.
        files: expected member files.
        sha256: optional hex digest of the zip, checked when given.
    """

    name: str
    url_path: str
    files: tuple[ExpectedFile, ...]
    sha256: str | None = None

    def member(self, f: ExpectedFile) -> str:
        """Name of ``f`` inside the zip."""
        return f"{self.name}/{f.path}"


MANIFESTS: dict[str, ArchiveManifest] = {
    "ml-100k": ArchiveManifest(
        name="ml-100k",
        url_path="ml-100k.zip",
        files=(
            ExpectedFile("u.data", rows=100_000),
            ExpectedFile("u.item", rows=1_682),
            ExpectedFile("u.user", rows=943),
            ExpectedFile("u.genre"),
            ExpectedFile("u.occupation"),
        ),
    ),
    "ml-1m": ArchiveManifest(
        name="ml-1m",
        url_path="ml-1m.zip",
        files=(
            ExpectedFile("ratings.dat", rows=1_000_209),
            ExpectedFile("movies.dat", rows=3_883),
            ExpectedFile("users.dat", rows=6_040),
        ),
    ),
    "ml-latest-small": ArchiveManifest(
        name="ml-latest-small",
        url_path="ml-latest-small.zip",
        files=(
            ExpectedFile("ratings.csv", rows=100_836, header=True),
            ExpectedFile("movies.csv", rows=9_742, header=True),
            ExpectedFile("tags.csv", rows=3_683, header=True),
            ExpectedFile("links.csv", rows=9_742, header=True),
        ),
    ),
}


# --------------------------------------------------------------------------- progress


class _Progress(Protocol):
    def update(self, n: int) -> object: ...

    def close(self) -> object: ...


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _LineProgress:
    """A plain ``label: done / total MB`` line rewritten in place on stderr."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label, self.total, self.done = label, total, 0

    def update(self, n: int) -> None:
        self.done += n
        mb = self.done / 1e6
        if self.total:
            text = f"{mb:.1f} / {self.total / 1e6:.1f} MB ({100 * self.done // self.total}%)"
        else:
            text = f"{mb:.1f} MB"
        sys.stderr.write(f"\r{self.label}: {text}")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def _make_progress(label: str, total: int | None, enabled: bool) -> _Progress:
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _LineProgress(label, total)
    return tqdm(total=total, desc=label, unit="B", unit_scale=True, file=sys.stderr)


# --------------------------------------------------------------------------- fetching


def _offline_hint(url: str, reason: object, root: Path) -> str:
    return (
        f"could not download {url}: {reason}. Are you offline? "
        f"Alternatively, download {url} yourself and unzip it into {root}."
    )


def _stream_to(url: str, out: BinaryIO, *, root: Path, timeout: float, progress: bool) -> str:
    """Stream ``url`` into ``out``; return the sha256 hex digest of the body."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status = getattr(resp, "status", 200)
            if status != 200:
                raise DownloadError(_offline_hint(url, f"HTTP status {status}", root))
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = _make_progress(url.rsplit("/", 1)[-1], total, progress)
            received = 0
            try:
                while chunk := resp.read(CHUNK_SIZE):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            finally:
                bar.close()
    except urllib.error.HTTPError as exc:
        raise DownloadError(_offline_hint(url, f"HTTP {exc.code} {exc.reason}", root)) from exc
    except urllib.error.URLError as exc:
        raise DownloadError(_offline_hint(url, exc.reason, root)) from exc
    except (socket.timeout, http.client.HTTPException, ConnectionError) as exc:
        raise DownloadError(_offline_hint(url, repr(exc), root)) from exc
    if total is not None and received != total:
        raise DownloadError(
            _offline_hint(url, f"truncated body: got {received} of {total} bytes", root)
        )
    return digest.hexdigest()


# --------------------------------------------------------------------------- verification


def _unsafe_reason(member: str) -> str | None:
    """Why ``member`` must not be extracted (zip-slip), or ``None`` if it is safe."""
    name = member.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "'..' in path"
    return None


def verify_archive(zip_path: Path, manifest: ArchiveManifest) -> None:
    """Check CRCs, member paths and the presence of the expected files."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            names = zf.namelist()
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise VerificationError(f"{manifest.name}: not a valid zip archive ({exc})") from exc
    if bad is not None:
        raise VerificationError(
            f"{manifest.name}: corrupted archive, member {bad!r} fails its CRC check"
        )
    for name in names:
        reason = _unsafe_reason(name)
        if reason:
            raise VerificationError(f"{manifest.name}: refusing unsafe member {name!r} ({reason})")
    present = set(names)
    missing = [manifest.member(f) for f in manifest.files if manifest.member(f) not in present]
    if missing:
        raise VerificationError(f"{manifest.name}: archive lacks expected files {missing}")


def count_rows(path: Path) -> int:
    """Number of non-blank lines of ``path``, counted on bytes (no decoding)."""
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def verify_folder(folder: Path, manifest: ArchiveManifest, *, rows: bool = True) -> None:
    """Check that ``folder`` holds the expected files (and, if ``rows``, their row counts)."""
    missing = [f.path for f in manifest.files if not (folder / f.path).is_file()]
    if missing:
        raise VerificationError(f"{folder}: missing expected files {missing}")
    if not rows:
        return
    wrong = []
    for f in manifest.files:
        if f.rows is None:
            continue
        found = count_rows(folder / f.path) - int(f.header)
        if found != f.rows:
            header = " (plus a header line)" if f.header else ""
            wrong.append(f"{f.path}: expected {f.rows} data rows{header}, found {found}")
    if wrong:
        raise VerificationError(f"{manifest.name}: wrong row counts: " + "; ".join(wrong))


# --------------------------------------------------------------------------- extraction


def _extract(zip_path: Path, dest: Path) -> None:
    """Extract every member into ``dest``, re-checking each path (no ``extractall``)."""
    dest_resolved = dest.resolve()
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            reason = _unsafe_reason(info.filename)
            target = (dest / info.filename.replace("\\", "/")).resolve()
            if reason or not target.is_relative_to(dest_resolved):
                raise VerificationError(f"refusing unsafe member {info.filename!r}")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK_SIZE)


def _remove(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _install(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is set aside first and
    deleted only once ``new`` is in place (restored if the rename fails)."""
    if not target.exists():
        os.replace(new, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old = backup / target.name
    try:
        os.replace(target, old)
    except BaseException:
        backup.rmdir()
        raise
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)  # if this fails too, the old copy stays in `backup`
        backup.rmdir()
        raise
    _remove(backup)


# --------------------------------------------------------------------------- public API


def resolve_manifest(name: str, manifest: ArchiveManifest | None = None) -> ArchiveManifest:
    """The manifest for ``name``: ``manifest`` if given (names must agree), else ``MANIFESTS``."""
    if manifest is not None:
        if manifest.name != name:
            raise ValueError(f"manifest is for {manifest.name!r}, not {name!r}")
        return manifest
    try:
        return MANIFESTS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(MANIFESTS))}") from None


def download(
    name: str,
    root: Path,
    *,
    base_url: str = DEFAULT_BASE_URL,
    manifest: ArchiveManifest | None = None,
    timeout: float = 60,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Fetch, verify and extract archive ``name`` into ``root``; return ``root/name``.

    See the module docstring for the guarantees. Raises :class:`DownloadError`
    (network) or :class:`VerificationError` (content), ``KeyError`` for an
    unknown name.
    """
    manifest = resolve_manifest(name, manifest)
    root = Path(root)
    target = root / manifest.name
    if target.exists() and not force:
        try:
            verify_folder(target, manifest, rows=False)
        except VerificationError as exc:
            hint = "rerun with force=True (--force) to replace it"
            raise VerificationError(f"{exc}; {hint}") from exc
        return target

    root.mkdir(parents=True, exist_ok=True)
    url = base_url.rstrip("/") + "/" + manifest.url_path.lstrip("/")
    zip_path: Path | None = None
    work: Path | None = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=root, prefix=f".{manifest.name}.", suffix=".zip.part", delete=False
        ) as tmp:
            zip_path = Path(tmp.name)
            sha256 = _stream_to(url, tmp, root=root, timeout=timeout, progress=progress)
        if manifest.sha256 and sha256 != manifest.sha256.lower():
            raise VerificationError(
                f"{manifest.name}: sha256 of {url} is {sha256}, expected {manifest.sha256}"
            )
        verify_archive(zip_path, manifest)
        work = Path(tempfile.mkdtemp(prefix=f".{manifest.name}.", suffix=".tmp", dir=root))
        _extract(zip_path, work)
        verify_folder(work / manifest.name, manifest)
        _install(work / manifest.name, target)
    finally:
        _remove(zip_path)
        _remove(work)
    return target


# --------------------------------------------------------------------------- CLI


def default_root() -> Path:
    """``$DYNAMIC_CTR_DATA_ROOT`` if set and non-empty, else ``data/external``."""
    return Path(os.environ.get(ROOT_ENV_VAR) or DEFAULT_ROOT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dynamic_ctr.data.download",
        description="Download, verify and extract GroupLens MovieLens archives into ROOT/NAME.",
        epilog=(
            f"Known names: {', '.join(MANIFESTS)}. ROOT defaults to ${ROOT_ENV_VAR}, "
            f"else {DEFAULT_ROOT}. Offline? Download BASE_URL/NAME.zip yourself and "
            "unzip it into ROOT."
        ),
    )
    parser.add_argument("names", nargs="+", metavar="NAME", help="archive(s) to fetch")
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"data root (default: ${ROOT_ENV_VAR}, else {DEFAULT_ROOT})",
    )
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="default: %(default)s")
    parser.add_argument("--force", action="store_true", help="replace an existing ROOT/NAME")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default: 60)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 on success, 1 on a failed download, 2 on bad usage."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    unknown = [n for n in args.names if n not in MANIFESTS]
    if unknown:
        print(
            f"error: unknown dataset(s) {', '.join(unknown)}; known: {', '.join(MANIFESTS)}",
            file=sys.stderr,
        )
        return 2
    root = args.root if args.root is not None else default_root()
    for name in args.names:
        try:
            path = download(
                name,
                root,
                base_url=args.base_url,
                timeout=args.timeout,
                force=args.force,
                progress=not args.quiet,
            )
        except (DownloadError, OSError) as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 1
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
