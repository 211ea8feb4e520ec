"""Download helpers against a local HTTP server on 127.0.0.1 serving small archives made here (no internet)."""

import hashlib
import http.server
import io
import pickle
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from dalg.data.datamodules import RevisitedDataModule
from dalg.data.download import (
    DownloadError,
    download,
    download_gldv2,
    download_revisited,
    download_revisitop1m,
    extract_tar,
    parse_parts,
)
from dalg.data.gldv2 import GLDv2Dataset


class _Server:
    """Serves ``files`` (url path -> bytes) with HTTP Range support; can cut a response short or ignore Range."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None  # next response stops after this many body bytes (once)
        self.ignore_range = False
        self.sent = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    body, server.cut_after = body[: server.cut_after], None
                    self.close_connection = True
                self.wfile.write(body)
                server.sent += len(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with _Server() as s:
        yield s


def _jpeg(seed: int, size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _no_partials(folder) -> None:
    leftovers = [p for p in folder.rglob("*") if p.name.endswith(".part") or p.name.startswith(".extract-")]
    assert not leftovers, leftovers


def test_resumes_after_a_dropped_connection(server, tmp_path):
    payload = np.random.default_rng(1).bytes(300_000)
    server.files["/big.bin"] = payload
    server.cut_after = 100_000
    out = download(
        f"{server.url}/big.bin",
        tmp_path / "big.bin",
        md5=hashlib.md5(payload).hexdigest(),
        backoff_s=0,
        progress=False,
    )
    assert out.read_bytes() == payload
    assert server.requests[-1] == ("/big.bin", "bytes=100000-")  # continued, not restarted
    assert server.sent == len(payload)  # no byte sent twice
    _no_partials(tmp_path)


def test_interrupted_download_keeps_its_part_and_continues_next_run(server, tmp_path):
    payload = np.random.default_rng(2).bytes(50_000)
    server.files["/f.bin"] = payload
    server.cut_after = 20_000
    with pytest.raises(DownloadError, match="run again to resume"):
        download(f"{server.url}/f.bin", tmp_path / "f.bin", retries=1, progress=False)
    assert not (tmp_path / "f.bin").exists() and (tmp_path / "f.bin.part").stat().st_size == 20_000
    download(f"{server.url}/f.bin", tmp_path / "f.bin", size=len(payload), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == payload and server.requests[-1][1] == "bytes=20000-"


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    payload = np.random.default_rng(3).bytes(40_000)
    server.files["/f.bin"] = payload
    (tmp_path / "f.bin.part").write_bytes(payload[:5_000])
    server.ignore_range = True
    assert download(f"{server.url}/f.bin", tmp_path / "f.bin", progress=False).read_bytes() == payload


@pytest.mark.parametrize("check", [{"md5": "0" * 32}, {"size": 123}])
def test_failed_check_leaves_nothing_under_the_final_name(server, tmp_path, check):
    server.files["/f.bin"] = b"x" * 1000
    with pytest.raises(DownloadError, match="expected"):
        download(f"{server.url}/f.bin", tmp_path / "f.bin", progress=False, **check)
    assert list(tmp_path.iterdir()) == []


def test_http_error_names_the_url(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(f"{server.url}/nothere.tgz", tmp_path / "x", progress=False)


def test_revisited_download_gives_the_loader_layout(server, tmp_path):
    images = {f"oxbuild/im{i}.jpg": _jpeg(i) for i in range(4)}
    server.files["/oxbuild_images-v1.tgz"] = _tar({**images, "oxbuild/README": b"not an image"})
    gnd = {
        "imlist": ["im1", "im2", "im3"],
        "qimlist": ["im0"],
        "gnd": [{"bbx": [1.0, 1.0, 20.0, 20.0], "easy": [0], "hard": [1], "junk": [2]}],
    }
    server.files["/gnd_roxford5k.pkl"] = pickle.dumps(gnd)
    kwargs = dict(
        archives=[f"{server.url}/oxbuild_images-v1.tgz"],
        gnd_url=f"{server.url}/gnd_roxford5k.pkl",
        progress=False,
    )
    folder = download_revisited("roxford5k", tmp_path / "data", **kwargs)
    assert sorted(p.name for p in (folder / "jpg").iterdir()) == ["im0.jpg", "im1.jpg", "im2.jpg", "im3.jpg"]
    assert not (folder / "archives" / "oxbuild_images-v1.tgz").exists()  # removed once extracted
    _no_partials(tmp_path)
    dm = RevisitedDataModule(root=str(tmp_path / "data"), name="roxford5k", num_workers=0, test_size=64)
    dm.setup("validate")
    assert dm.eval_sets[0].gt.n_database == 3
    n = len(server.requests)
    download_revisited("roxford5k", tmp_path / "data", **kwargs)
    assert len(server.requests) == n  # everything in place: nothing fetched again


def test_gldv2_download_checks_published_md5_and_loads(server, tmp_path):
    ids = ["0123456789abcdef", "fedcba9876543210"]
    tar = _tar({f"{i[0]}/{i[1]}/{i[2]}/{i}.jpg": _jpeg(k) for k, i in enumerate(ids)}, mode="w")
    server.files["/metadata/train_clean.csv"] = f"landmark_id,images\n7,{ids[0]} {ids[1]}\n".encode()
    server.files["/md5sum/train/md5.images_000.txt"] = (
        f"{hashlib.md5(tar).hexdigest()}  images_000.tar\n".encode()
    )
    server.files["/train/images_000.tar"] = tar
    folder = download_gldv2(tmp_path, [0], base_url=server.url, progress=False)
    ds = GLDv2Dataset(folder, verify="header")
    assert ds.label_map == {"7": 0} and len(ds) == 2 and not ds.failures
    _no_partials(tmp_path)

    server.files["/md5sum/train/md5.images_001.txt"] = b"0" * 32 + b"  images_001.tar\n"
    server.files["/train/images_001.tar"] = tar
    with pytest.raises(DownloadError, match="md5"):
        download_gldv2(tmp_path, [0, 1], base_url=server.url, progress=False)
    assert not (folder / "archives" / "images_001.tar").exists()


def test_extraction_refuses_paths_outside_the_target(tmp_path):
    archive = tmp_path / "evil.tar"
    archive.write_bytes(_tar({"../escaped.jpg": b"x"}, mode="w"))
    with pytest.raises(DownloadError, match="cannot extract"):
        extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.jpg").exists()
    _no_partials(tmp_path)


def test_parse_parts():
    assert parse_parts("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="outside"):
        parse_parts("498-500")


# ------------------------------------------------------------------------------------ revisitop 1M distractors
def _revisitop1m_server(server, parts: dict[int, dict[str, bytes]], listed: list[str]) -> None:
    server.files["/revisitop1m.txt"] = "".join(f"{n}\n" for n in listed).encode()
    for k, members in parts.items():
        server.files[f"/jpg/revisitop1m.{k}.tar.gz"] = _tar(members)


def test_revisitop1m_download_resumes_verifies_and_lists(server, tmp_path):
    parts = {1: {"a/0/im0.jpg": _jpeg(0), "a/0/im1.jpg": _jpeg(1)}, 2: {"b/7/im2.jpg": _jpeg(2)}}
    listed = ["a/0/im0.jpg", "a/0/im1.jpg", "b/7/im2.jpg"]
    _revisitop1m_server(server, parts, listed)
    (tmp_path / "revisitop1m").mkdir()  # the list from an earlier run is kept, so the first request is part 1
    (tmp_path / "revisitop1m" / "revisitop1m.txt").write_bytes(server.files["/revisitop1m.txt"])
    server.cut_after = 200  # the first archive's connection drops: resumed with a Range request
    folder = download_revisitop1m(tmp_path, [1, 2], base_url=server.url, n_parts=2, progress=False)
    assert sorted(p.relative_to(folder / "jpg").as_posix() for p in (folder / "jpg").rglob("*.jpg")) == listed
    assert (folder / "revisitop1m.txt").read_text().split() == listed
    assert ("/jpg/revisitop1m.1.tar.gz", "bytes=200-") in server.requests
    assert not list((folder / "archives").glob("*.tar.gz"))  # removed once extracted
    _no_partials(tmp_path)
    n = len(server.requests)
    download_revisitop1m(tmp_path, [1, 2], base_url=server.url, n_parts=2, progress=False)
    assert len(server.requests) == n  # list in place, both parts marked done: nothing fetched again


def test_revisitop1m_corrupt_archive_is_removed_not_extracted(server, tmp_path):
    good = _tar({"x/im0.jpg": _jpeg(0)})
    bad = bytearray(good)
    bad[-6] ^= 0xFF  # in the gzip trailer's CRC-32: tarfile alone extracts it without noticing
    server.files["/revisitop1m.txt"] = b"x/im0.jpg\n"
    server.files["/jpg/revisitop1m.1.tar.gz"] = bytes(bad)
    with pytest.raises(DownloadError, match="corrupt gzip"):
        download_revisitop1m(tmp_path, [1], base_url=server.url, n_parts=1, progress=False)
    folder = tmp_path / "revisitop1m"
    assert not (folder / "archives" / "revisitop1m.1.tar.gz").exists() and not (folder / "jpg").exists()
    server.files["/jpg/revisitop1m.1.tar.gz"] = good  # the next run downloads it again and succeeds
    download_revisitop1m(tmp_path, [1], base_url=server.url, n_parts=1, progress=False)
    assert (folder / "jpg" / "x" / "im0.jpg").is_file()


def test_revisitop1m_complete_set_must_hold_every_listed_image(server, tmp_path):
    _revisitop1m_server(server, {1: {"x/im0.jpg": _jpeg(0)}}, ["x/im0", "x/gone.jpg"])  # no suffix: .jpg
    download_revisitop1m(tmp_path, [1], base_url=server.url, n_parts=2, progress=False)  # partial: fine
    with pytest.raises(DownloadError, match="1 of the 2 images listed.*x/gone.jpg"):
        download_revisitop1m(tmp_path, [1], base_url=server.url, n_parts=1, progress=False)


def test_revisitop1m_list_with_unsafe_paths_is_refused(server, tmp_path):
    server.files["/revisitop1m.txt"] = b"ok/im0.jpg\n../../etc/passwd\n"
    with pytest.raises(DownloadError, match="outside jpg/"):
        download_revisitop1m(tmp_path, [1], base_url=server.url, n_parts=1, progress=False)


def test_parse_parts_from_one():
    assert parse_parts("1-3,100", 100, first=1) == [1, 2, 3, 100]
    with pytest.raises(ValueError, match="outside 1-100"):
        parse_parts("0-2", 100, first=1)
