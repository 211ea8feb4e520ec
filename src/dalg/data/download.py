"""Download the public datasets into the layout the loaders read (protocol.md), resumably and verifiably.

    python -m dalg.data.download roxford5k --root data       # data/roxford5k/{gnd_roxford5k.pkl,jpg/}
    python -m dalg.data.download rparis6k  --root data
    python -m dalg.data.download gldv2     --root data --parts 0-499   # data/gldv2/{train_clean.csv,train/a/b/c/}
    python -m dalg.data.download revisitop1m --root data --parts 1-100 # data/revisitop1m/{revisitop1m.txt,jpg/}

Official sources: the Oxford/Paris buildings archives (VGG, Oxford) and the revisited ground truth
(revisitop, CMP Prague), the GLDv2 release (CVDF's S3 bucket, which publishes one md5 per image tar), and the
revisitop 1M distractors (100 ``revisitop1m.<k>.tar.gz`` + the image list ``revisitop1m.txt``, CMP Prague; no
checksums are published, so each archive's gzip CRC-32 and length are checked before it is extracted).

Every file is fetched into ``<name>.part`` beside its final name, continued with an HTTP Range request after an
interruption, checked (length announced by the server, plus the published md5 where there is one), and only
then renamed; archives are extracted into a hidden folder and moved into place, so an interrupted run never
leaves a half-written file under a final name and simply resumes when run again.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import logging
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REVISITOP_GND = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/gnd_{name}.pkl"
REVISITED_ARCHIVES = {
    "roxford5k": ["https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz"],
    "rparis6k": [
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz",
    ],
}
GLDV2_BASE = "https://s3.amazonaws.com/google-landmark"
GLDV2_PARTS = 500  # train/images_000.tar .. images_499.tar
# the revisitop 1M distractors as revisitop's own download scripts fetch them (github.com/filipradenovic/revisitop)
REVISITOP1M_BASE = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
REVISITOP1M_PARTS = 100  # jpg/revisitop1m.1.tar.gz .. revisitop1m.100.tar.gz
USER_AGENT = "dalg-dataset-download/0.1 (+python urllib)"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file that could not be fetched or failed its check; the message names the URL/file and the reason."""


@dataclass
class Progress:
    """Prints a line every few seconds; quiet when ``enabled`` is false (tests)."""

    label: str
    total: int | None
    enabled: bool = True
    every_s: float = 5.0

    def __post_init__(self) -> None:
        self._last = 0.0

    def __call__(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self._last < self.every_s):
            return
        self._last = now
        of = f" of {self.total / 1e6:,.1f} MB ({100 * done / self.total:.0f}%)" if self.total else ""
        print(f"  {self.label}: {done / 1e6:,.1f} MB{of}", file=sys.stderr, flush=True)


def md5_of(path: str | os.PathLike, chunk: int = _CHUNK) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _total_from(response, offset: int) -> int | None:
    content_range = response.headers.get("Content-Range")  # "bytes 100-999/1000"
    if content_range:
        match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
        if match and match.group(3) != "*":
            return int(match.group(3))
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None else None


def _fetch_once(url: str, part: Path, timeout: float, progress: bool) -> int | None:
    """One request, appended to ``part`` (continued with Range when it has bytes). Returns the full size if the
    server said it. Network errors propagate; the bytes received so far stay in ``part`` for the next attempt."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - fixed http(s) URLs
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # range not satisfiable: the part already holds the whole file
            return offset
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the Range header: start again from the beginning
        elif offset:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise DownloadError(
                    f"{url}: asked for bytes from {offset}, server sent "
                    f"{response.headers.get('Content-Range')!r}"
                )
        total = _total_from(response, offset)
        show = Progress(part.name[: -len(".part")], total, progress)
        done = offset
        with open(part, "ab" if offset else "wb") as f:
            while block := response.read(_CHUNK):
                f.write(block)
                done += len(block)
                show(done)
            f.flush()
            os.fsync(f.fileno())
        show(done, final=True)
    return total


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    md5: str | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    backoff_s: float = 2.0,
    progress: bool = True,
) -> Path:
    """Fetch ``url`` to ``dest`` (resumable, verified, atomic); a ``dest`` that already exists is only checked.

    ``size`` (bytes) and ``md5`` are checked when given; otherwise the length the server announced is.
    A file failing its check is removed (its ``.part`` too) and :class:`DownloadError` names both values.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        _verify(dest, url, size, md5, remove=False)
        return dest
    part = _part_path(dest)
    announced: int | None = None
    for attempt in range(1, retries + 1):
        try:
            announced = _fetch_once(url, part, timeout, progress)
        except DownloadError:
            raise
        except (
            urllib.error.URLError,
            http.client.HTTPException,
            ConnectionError,
            TimeoutError,
            OSError,
        ) as e:
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise DownloadError(
                    f"{url}: {type(e).__name__}: {e} after {retries} attempts "
                    f"({have:,} bytes kept in {part}; run again to resume)"
                ) from e
            log.warning("%s: %s (attempt %d/%d, %d bytes so far); resuming", url, e, attempt, retries, have)
            time.sleep(backoff_s * attempt)
            continue
        have = part.stat().st_size
        if announced is not None and have < announced:
            if attempt == retries:
                raise DownloadError(
                    f"{url}: connection ended at {have:,} of {announced:,} bytes after {retries} "
                    f"attempts (kept in {part}; run again to resume)"
                )
            log.warning("%s: connection ended at %d of %d bytes; resuming", url, have, announced)
            continue
        break
    expected = size if size is not None else announced
    _verify(part, url, expected, md5, remove=True)
    os.replace(part, dest)
    return dest


def _verify(path: Path, url: str, size: int | None, md5: str | None, remove: bool) -> None:
    actual = path.stat().st_size
    problem = None
    if size is not None and actual != size:
        problem = f"size {actual:,} bytes, expected {size:,}"
    elif md5 is not None and md5_of(path) != md5.lower():
        problem = f"md5 {md5_of(path)}, expected {md5.lower()}"
    if problem:
        if remove:
            path.unlink()
        raise DownloadError(
            f"{path} (from {url}): {problem}"
            + ("; removed, run again to re-download" if remove else "; delete it and run again")
        )


def read_md5_file(path: str | os.PathLike, member: str) -> str:
    """The md5 listed for ``member`` in an ``md5sum``-style file (``<md5>  <name>`` lines)."""
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if (
            len(parts) >= 2
            and parts[-1].lstrip("*").endswith(member)
            and re.fullmatch(r"[0-9a-fA-F]{32}", parts[0])
        ):
            return parts[0].lower()
        if len(parts) == 1 and re.fullmatch(r"[0-9a-fA-F]{32}", parts[0]):
            return parts[0].lower()
    raise DownloadError(f"{path}: no md5 listed for {member}")


# --------------------------------------------------------------------------------------------- extraction
def extract_tar(
    archive: str | os.PathLike,
    dest_dir: str | os.PathLike,
    *,
    flatten: bool = False,
    suffixes: Sequence[str] | None = None,
) -> int:
    """Extract ``archive`` into ``dest_dir`` without ever exposing a half-written file there.

    Members go to a hidden folder beside ``dest_dir`` first (unsafe paths refused by tarfile's ``data`` filter),
    then each file is moved into place with ``os.replace`` (same file system: atomic). ``flatten`` drops the
    archive's folders (the Oxford/Paris archives nest their jpgs); ``suffixes`` keeps only those file types.
    Returns the number of files placed.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    staging = dest_dir.parent / f".extract-{dest_dir.name}-{archive.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        placed = 0
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            if suffixes and path.suffix.lower() not in suffixes:
                continue
            target = dest_dir / (path.name if flatten else path.relative_to(staging))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            placed += 1
    except (tarfile.TarError, OSError) as e:
        raise DownloadError(
            f"{archive}: cannot extract ({type(e).__name__}: {e}); delete it and run again"
        ) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return placed


def _done_marker(folder: Path, key: str) -> Path:
    return folder / ".done" / key


def _mark_done(folder: Path, key: str) -> None:
    marker = _done_marker(folder, key)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("ok\n")


# --------------------------------------------------------------------------------------------- datasets
def download_revisited(
    name: str,
    root: str | os.PathLike,
    *,
    archives: Iterable[str] | None = None,
    gnd_url: str | None = None,
    keep_archives: bool = False,
    progress: bool = True,
) -> Path:
    """``<root>/<name>/gnd_<name>.pkl`` + ``<root>/<name>/jpg/*.jpg`` for roxford5k / rparis6k (or any URLs)."""
    if archives is None:
        if name not in REVISITED_ARCHIVES:
            raise ValueError(f"unknown Revisited dataset {name!r}; known: {sorted(REVISITED_ARCHIVES)}")
        archives = REVISITED_ARCHIVES[name]
    folder = Path(root) / name
    jpg = folder / "jpg"
    for url in archives:
        archive_name = url.rstrip("/").rsplit("/", 1)[-1]
        if _done_marker(folder, archive_name).exists():
            continue
        archive = download(url, folder / "archives" / archive_name, progress=progress)
        n = extract_tar(archive, jpg, flatten=True, suffixes=(".jpg", ".jpeg"))
        log.info("%s: %d images from %s", name, n, archive_name)
        _mark_done(folder, archive_name)
        if not keep_archives:
            archive.unlink()
    download(gnd_url or REVISITOP_GND.format(name=name), folder / f"gnd_{name}.pkl", progress=progress)
    _check_revisited(folder, name)
    return folder


def _check_revisited(folder: Path, name: str) -> None:
    from dalg.data.revisited import load_ground_truth  # the loader's own checks on what was downloaded

    gt = load_ground_truth(folder, name)
    missing = [n for n in gt.imlist + gt.qimlist if not (folder / "jpg" / f"{n}.jpg").is_file()]
    if missing:
        raise DownloadError(
            f"{folder}: {len(missing)} images listed in gnd_{name}.pkl are not in jpg/ (e.g. {missing[:3]})"
        )
    print(f"{name}: {gt.n_queries} queries, {gt.n_database} database images in {folder}", file=sys.stderr)


def parse_parts(spec: str, n: int = GLDV2_PARTS, first: int = 0) -> list[int]:
    """``"0-499"``, ``"0,3,7-9"`` -> part numbers, which run ``first`` .. ``first + n - 1``."""
    parts: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        lo, _, hi = item.partition("-")
        a, b = int(lo), int(hi or lo)
        if not first <= a <= b < first + n:
            raise ValueError(f"part range {item!r} outside {first}-{first + n - 1}")
        parts.update(range(a, b + 1))
    return sorted(parts)


def download_gldv2(
    root: str | os.PathLike,
    parts: Sequence[int] = range(GLDV2_PARTS),
    *,
    csv_names: Sequence[str] = ("train_clean.csv",),
    base_url: str = GLDV2_BASE,
    keep_archives: bool = False,
    progress: bool = True,
) -> Path:
    """``<root>/gldv2/{train_clean.csv, train/a/b/c/<id>.jpg}``; every tar checked against its published md5."""
    folder = Path(root) / "gldv2"
    for csv_name in csv_names:
        download(f"{base_url}/metadata/{csv_name}", folder / csv_name, progress=progress)
    for k in parts:
        tar_name = f"images_{k:03d}.tar"
        if _done_marker(folder, tar_name).exists():
            continue
        md5_file = download(
            f"{base_url}/md5sum/train/md5.{tar_name[:-4]}.txt",
            folder / "archives" / f"md5.{tar_name[:-4]}.txt",
            progress=False,
        )
        archive = download(
            f"{base_url}/train/{tar_name}",
            folder / "archives" / tar_name,
            md5=read_md5_file(md5_file, tar_name),
            progress=progress,
        )
        n = extract_tar(archive, folder / "train")
        log.info("gldv2: %d files from %s", n, tar_name)
        _mark_done(folder, tar_name)
        if not keep_archives:
            archive.unlink()
    print(f"gldv2: {len(parts)} image part(s) in {folder / 'train'}", file=sys.stderr)
    return folder


def check_gzip(path: str | os.PathLike) -> None:
    """Decompress ``path`` to its end: gzip checks its CRC-32 and length trailer there. A corrupt or cut archive
    (no published checksum says otherwise) is removed and raises :class:`DownloadError`."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(_CHUNK * 8):
                pass
    except (OSError, EOFError, zlib.error) as e:
        Path(path).unlink(missing_ok=True)
        raise DownloadError(
            f"{path}: corrupt gzip archive ({type(e).__name__}: {e}); removed, run again to re-download"
        ) from e


def read_image_list(path: str | os.PathLike) -> list[str]:
    """The image paths of a list file (one per line, relative to ``jpg/``); an unsafe path is an error."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    unsafe = [n for n in names if n.startswith(("/", "\\")) or ".." in Path(n).parts]
    if unsafe:
        raise DownloadError(f"{path}: {len(unsafe)} image path(s) outside jpg/, e.g. {unsafe[:3]}")
    if not names:
        raise DownloadError(f"{path}: lists no image")
    return names


def download_revisitop1m(
    root: str | os.PathLike,
    parts: Sequence[int] = range(1, REVISITOP1M_PARTS + 1),
    *,
    base_url: str = REVISITOP1M_BASE,
    n_parts: int = REVISITOP1M_PARTS,
    keep_archives: bool = False,
    progress: bool = True,
) -> Path:
    """``<root>/revisitop1m/{revisitop1m.txt, jpg/<listed paths>}``: the 1M distractors of the revisited protocol.

    Each archive is fetched resumably (size checked against the server's), its gzip CRC checked, extracted without
    exposing half-written files, marked done and deleted; a rerun skips finished parts. Once all ``n_parts`` are
    in, every image of ``revisitop1m.txt`` must be in ``jpg/`` (else :class:`DownloadError` names the missing).
    Extract their descriptors with ``src/extract.py images=<root>/revisitop1m/jpg`` (every image below it).
    """
    folder = Path(root) / "revisitop1m"
    listing = download(f"{base_url}/revisitop1m.txt", folder / "revisitop1m.txt", progress=False)
    names = read_image_list(listing)
    for k in parts:
        tar_name = f"revisitop1m.{k}.tar.gz"
        if _done_marker(folder, tar_name).exists():
            continue
        archive = download(f"{base_url}/jpg/{tar_name}", folder / "archives" / tar_name, progress=progress)
        check_gzip(archive)
        n = extract_tar(archive, folder / "jpg")
        log.info("revisitop1m: %d files from %s", n, tar_name)
        _mark_done(folder, tar_name)
        if not keep_archives:
            archive.unlink()
    jpg = folder / "jpg"
    # a listed name without an extension means <name>.jpg (revisitop's own MATLAB reader does the same)
    missing = [n for n in names if not (jpg / (n if Path(n).suffix else f"{n}.jpg")).is_file()]
    complete = all(_done_marker(folder, f"revisitop1m.{k}.tar.gz").exists() for k in range(1, n_parts + 1))
    if complete and missing:
        raise DownloadError(
            f"{folder}: all {n_parts} archives are in, but {len(missing):,} of the {len(names):,} "
            f"images listed in revisitop1m.txt are not in jpg/ (e.g. {missing[:3]})"
        )
    print(
        f"revisitop1m: {len(names) - len(missing):,} of {len(names):,} listed images in {jpg}"
        + ("" if complete else f" (parts {len(parts)} of {n_parts} asked for)"),
        file=sys.stderr,
    )
    return folder


def main(argv: Sequence[str] | None = None, print_fn: Callable[[str], object] = print) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["roxford5k", "rparis6k", "gldv2", "revisitop1m"])
    parser.add_argument(
        "--root", default="data", help="parent folder (default: data, the repo's paths.data_dir)"
    )
    parser.add_argument(
        "--parts",
        default=None,
        help=f"gldv2 image tars (default 0-{GLDV2_PARTS - 1}), e.g. 0-9 "
        f"or 0,5,7-9; revisitop1m archives (default 1-{REVISITOP1M_PARTS})",
    )
    parser.add_argument(
        "--csv",
        default="train_clean.csv",
        help="gldv2 lists to fetch, comma-separated (train_clean.csv, train.csv)",
    )
    parser.add_argument("--keep-archives", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dataset == "gldv2":
        out = download_gldv2(
            args.root,
            parse_parts(args.parts or f"0-{GLDV2_PARTS - 1}"),
            csv_names=args.csv.split(","),
            keep_archives=args.keep_archives,
        )
    elif args.dataset == "revisitop1m":
        parts = parse_parts(args.parts or f"1-{REVISITOP1M_PARTS}", REVISITOP1M_PARTS, first=1)
        out = download_revisitop1m(args.root, parts, keep_archives=args.keep_archives)
    else:
        out = download_revisited(args.dataset, args.root, keep_archives=args.keep_archives)
    print_fn(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
