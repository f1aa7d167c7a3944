"""Tests of ``dynamic_ctr.data.download`` against archives served from loopback."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from dynamic_ctr.data import download as dl
except ImportError:  # package not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from dynamic_ctr.data import download as dl

TIMEOUT = 5.0

TOY = dl.ArchiveManifest(
    name="toy",
    url_path="toy.zip",
    files=(
        dl.ExpectedFile("ratings.dat", rows=3),
        dl.ExpectedFile("movies.csv", rows=2, header=True),
        dl.ExpectedFile("README"),
    ),
)

CONTENT = {
    "ratings.dat": b"1::10::5::978300760\n1::11::3::978300761\n2::10::4::978300762\n",
    "movies.csv": b"movieId,title\n10,Caf\xe9 (1995)\n11,Heat (1995)\n",
    "README": b"toy data\n",
}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server:
    def __init__(self, directory: Path, handler: type[http.server.BaseHTTPRequestHandler]):
        self.directory = directory
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.timeout = TIMEOUT
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(TIMEOUT)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    directory = tmp_path / "srv"
    directory.mkdir()
    srv = _Server(directory, functools.partial(_QuietHandler, directory=str(directory)))
    yield srv
    srv.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


def build_zip(
    path: Path, files: dict[str, bytes], *, top: str = "toy", raw_names: tuple[str, ...] = ()
) -> Path:
    """A ZIP_STORED archive with ``files`` under ``top/`` plus members named ``raw_names``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{top}/", b"")
        for name, data in files.items():
            zf.writestr(f"{top}/{name}", data)
        for name in raw_names:
            zf.writestr(zipfile.ZipInfo(name), b"evil\n")
    return path


def serve_toy(server: _Server, files: dict[str, bytes] | None = None, **kw: object) -> Path:
    return build_zip(server.directory / "toy.zip", CONTENT if files is None else files, **kw)


def fetch(root: Path, base_url: str, **kw: object) -> Path:
    kw = {"manifest": TOY, "timeout": TIMEOUT, "progress": False, **kw}
    return dl.download("toy", root, base_url=base_url, **kw)  # type: ignore[arg-type]


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# --------------------------------------------------------------------------- success


def test_download_extracts_expected_files(server: _Server, root: Path) -> None:
    serve_toy(server)
    out = fetch(root, server.url)
    assert out == root / "toy"
    for name, data in CONTENT.items():
        assert (out / name).read_bytes() == data
    assert entries(root) == ["toy"]  # no temp files or dirs left behind


def test_base_url_without_trailing_slash(server: _Server, root: Path) -> None:
    serve_toy(server)
    assert (fetch(root, server.url.rstrip("/")) / "README").is_file()


def test_sha256_checked(server: _Server, root: Path) -> None:
    path = serve_toy(server)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = dl.ArchiveManifest(TOY.name, TOY.url_path, TOY.files, sha256=good)
    assert fetch(root, server.url, manifest=manifest).is_dir()

    bad = dl.ArchiveManifest(TOY.name, TOY.url_path, TOY.files, sha256="0" * 64)
    with pytest.raises(dl.VerificationError, match="sha256"):
        fetch(root, server.url, manifest=bad, force=True)
    assert entries(root) == ["toy"]


@pytest.mark.parametrize("tqdm_available", [True, False])
def test_progress_goes_to_stderr(
    server: _Server,
    root: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tqdm_available: bool,
) -> None:
    if not tqdm_available:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import raises ImportError
    serve_toy(server)
    fetch(root, server.url, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "toy.zip" in captured.err


# --------------------------------------------------------------------------- verification


def test_wrong_row_count(server: _Server, root: Path) -> None:
    serve_toy(server, {**CONTENT, "ratings.dat": b"1::10::5::1\n1::11::3::2\n"})
    with pytest.raises(dl.VerificationError) as err:
        fetch(root, server.url)
    msg = str(err.value)
    assert "ratings.dat" in msg and "expected 3" in msg and "found 2" in msg
    assert entries(root) == []


def test_header_not_counted_and_blank_lines_ignored(server: _Server, root: Path) -> None:
    serve_toy(server, {**CONTENT, "movies.csv": b"movieId,title\n10,A\n11,B\n12,C\n\n"})
    with pytest.raises(dl.VerificationError, match=r"movies\.csv.*expected 2.*found 3"):
        fetch(root, server.url)
    assert entries(root) == []


def test_missing_expected_file(server: _Server, root: Path) -> None:
    serve_toy(server, {k: v for k, v in CONTENT.items() if k != "movies.csv"})
    with pytest.raises(dl.VerificationError, match=r"toy/movies\.csv"):
        fetch(root, server.url)
    assert entries(root) == []


def test_files_outside_top_folder_are_missing(server: _Server, root: Path) -> None:
    serve_toy(server, top="other")
    with pytest.raises(dl.VerificationError, match="toy/ratings.dat"):
        fetch(root, server.url)
    assert entries(root) == []


def test_corrupted_member_fails_crc(server: _Server, root: Path) -> None:
    path = serve_toy(server)
    raw = bytearray(path.read_bytes())
    at = raw.find(CONTENT["ratings.dat"])
    assert at > 0
    raw[at + 3] ^= 0xFF  # inside the stored data of toy/ratings.dat: CRC mismatch
    path.write_bytes(bytes(raw))
    with pytest.raises(dl.VerificationError, match=r"toy/ratings\.dat"):
        fetch(root, server.url)
    assert entries(root) == []


def test_not_a_zip(server: _Server, root: Path) -> None:
    (server.directory / "toy.zip").write_bytes(b"<html>captive portal</html>")
    with pytest.raises(dl.VerificationError, match="not a valid zip"):
        fetch(root, server.url)
    assert entries(root) == []


@pytest.mark.parametrize("evil", ["../evil.txt", "toy/../../evil.txt", "/tmp/evil.txt"])
def test_zip_slip_refused(server: _Server, root: Path, tmp_path: Path, evil: str) -> None:
    serve_toy(server, raw_names=(evil,))
    with pytest.raises(dl.VerificationError, match="unsafe member") as err:
        fetch(root, server.url)
    assert evil in str(err.value)
    assert entries(root) == []
    assert not (tmp_path / "evil.txt").exists()


# --------------------------------------------------------------------------- network errors


def test_http_404(server: _Server, root: Path) -> None:
    with pytest.raises(dl.DownloadError) as err:
        fetch(root, server.url)
    msg = str(err.value)
    assert f"{server.url}toy.zip" in msg and "404" in msg
    assert "download" in msg and str(root) in msg  # manual alternative
    assert not isinstance(err.value, dl.VerificationError)
    assert entries(root) == []


def test_unreachable_server(root: Path) -> None:
    with pytest.raises(dl.DownloadError, match="offline") as err:
        fetch(root, closed_port_url())
    assert "toy.zip" in str(err.value) and "unzip it into" in str(err.value)
    assert entries(root) == []


def test_silent_server_times_out(root: Path) -> None:
    with socket.socket() as listener:  # accepts connections (backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        with pytest.raises(dl.DownloadError, match="offline"):
            fetch(root, url, timeout=0.5)
    assert entries(root) == []


class _TruncatingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"PK\x03\x04 only part of it")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_truncated_body(tmp_path: Path, root: Path) -> None:
    srv = _Server(tmp_path, _TruncatingHandler)
    try:
        with pytest.raises(dl.DownloadError, match="truncated"):
            fetch(root, srv.url)
    finally:
        srv.close()
    assert entries(root) == []


# --------------------------------------------------------------------------- existing target


def test_existing_target_kept_without_force_replaced_with_force(
    server: _Server, root: Path
) -> None:
    serve_toy(server)
    fetch(root, server.url)
    new_readme = b"version 2\n"
    serve_toy(server, {**CONTENT, "README": new_readme})

    out = fetch(root, server.url)
    assert (out / "README").read_bytes() == CONTENT["README"]

    out = fetch(root, server.url, force=True)
    assert (out / "README").read_bytes() == new_readme
    assert entries(root) == ["toy"]


def test_existing_target_without_download(root: Path) -> None:
    # no server at all: an existing complete folder is returned without network access
    target = root / "toy"
    target.mkdir(parents=True)
    for name, data in CONTENT.items():
        (target / name).write_bytes(data)
    assert fetch(root, closed_port_url()) == target


def test_incomplete_existing_target_reported(root: Path) -> None:
    (root / "toy").mkdir(parents=True)
    (root / "toy" / "README").write_bytes(b"x\n")
    with pytest.raises(dl.VerificationError, match=r"ratings\.dat.*force"):
        fetch(root, closed_port_url())
    assert (root / "toy" / "README").read_bytes() == b"x\n"


@pytest.mark.parametrize("failure", ["rows", "offline"])
def test_failed_forced_download_keeps_old_copy(server: _Server, root: Path, failure: str) -> None:
    serve_toy(server)
    fetch(root, server.url)
    serve_toy(server, {**CONTENT, "ratings.dat": b"only one\n"})
    url = server.url if failure == "rows" else closed_port_url()
    with pytest.raises(dl.DownloadError):
        fetch(root, url, force=True)
    for name, data in CONTENT.items():
        assert (root / "toy" / name).read_bytes() == data
    assert entries(root) == ["toy"]


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(dl.MANIFESTS, "toy", TOY)


def test_cli_success(
    server: _Server, root: Path, toy_registered: None, capsys: pytest.CaptureFixture[str]
) -> None:
    serve_toy(server)
    argv = ["toy", "--root", str(root), "--base-url", server.url, "--quiet", "--timeout", "5"]
    assert dl.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(root / "toy")
    assert captured.err == ""
    assert (root / "toy" / "ratings.dat").read_bytes() == CONTENT["ratings.dat"]


def test_cli_root_from_environment(
    server: _Server, tmp_path: Path, toy_registered: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve_toy(server)
    env_root = tmp_path / "env-root"
    monkeypatch.setenv(dl.ROOT_ENV_VAR, str(env_root))
    assert dl.main(["toy", "--base-url", server.url, "-q", "--timeout", "5"]) == 0
    assert (env_root / "toy" / "README").is_file()


def test_cli_default_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dl.ROOT_ENV_VAR, raising=False)
    assert dl.default_root() == Path("data/external")


def test_cli_failure(
    root: Path, toy_registered: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["toy", "--root", str(root), "--base-url", closed_port_url(), "-q", "--timeout", "5"]
    assert dl.main(argv) == 1
    err = capsys.readouterr().err
    assert "offline" in err and "toy.zip" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_verification_failure(
    server: _Server, root: Path, toy_registered: None, capsys: pytest.CaptureFixture[str]
) -> None:
    serve_toy(server, {**CONTENT, "ratings.dat": b"x\n"})
    assert dl.main(["toy", "--root", str(root), "--base-url", server.url, "-q"]) == 1
    assert "ratings.dat" in capsys.readouterr().err
    assert entries(root) == []


def test_cli_unknown_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert dl.main(["ml-2m", "--root", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "ml-2m" in err and "ml-100k" in err and "ml-latest-small" in err
    assert not (tmp_path / "r").exists()


def test_cli_help_documents_root(capsys: pytest.CaptureFixture[str]) -> None:
    assert dl.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "DYNAMIC_CTR_DATA_ROOT" in out and "data/external" in out


# --------------------------------------------------------------------------- manifests


def test_builtin_manifests() -> None:
    def counts(name: str) -> dict[str, tuple[int | None, bool]]:
        m = dl.MANIFESTS[name]
        assert m.name == name and m.url_path == f"{name}.zip"
        return {f.path: (f.rows, f.header) for f in m.files}

    assert counts("ml-100k") == {
        "u.data": (100_000, False),
        "u.item": (1_682, False),
        "u.user": (943, False),
        "u.genre": (None, False),
        "u.occupation": (None, False),
    }
    assert counts("ml-1m") == {
        "ratings.dat": (1_000_209, False),
        "movies.dat": (3_883, False),
        "users.dat": (6_040, False),
    }
    assert counts("ml-latest-small") == {
        "ratings.csv": (100_836, True),
        "movies.csv": (9_742, True),
        "tags.csv": (3_683, True),
        "links.csv": (9_742, True),
    }
    assert dl.MANIFESTS["ml-100k"].member(dl.MANIFESTS["ml-100k"].files[0]) == "ml-100k/u.data"
