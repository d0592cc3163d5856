"""Checksum-verified downloads that never leave a half-written file (temp file, verify, rename)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from ..errors import DataError

CACHE_ENV = "CCAR_CACHE"


def cache_dir() -> Path:
    """``$CCAR_CACHE``, else ``$XDG_CACHE_HOME/ccar``, else ``~/.cache/ccar``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ccar"


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, checksum: str) -> None:
    """``checksum`` is ``"sha256:<hex>"`` or ``"md5:<hex>"`` (MD5 where the dataset host publishes only MD5)."""
    algorithm, _, expected = checksum.partition(":")
    got = file_digest(path, algorithm)
    if got != expected:
        raise DataError(f"checksum mismatch for {path}: {algorithm} {got}, expected {expected}")


def download(
    url: str,
    dest: Path,
    checksum: str,
    timeout: float = 30.0,
    opener: Optional[Callable] = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``: stream into a temp file beside it, verify ``checksum``, then rename.

    An interrupted or failed download, or a checksum mismatch, leaves ``dest`` untouched and no temp file.
    ``opener`` replaces ``urllib.request.urlopen`` (tests use it to serve bytes without a network).
    """
    dest = Path(dest)
    if dest.exists():
        verify(dest, checksum)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = (opener or urllib.request.urlopen)(url, timeout=timeout)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise DataError(f"cannot download {url} ({exc}); offline? place the file at {dest} yourself") from exc
            with response:
                total = int(getattr(response, "headers", {}).get("Content-Length") or 0) or None
                bar = _progress(total, dest.name) if progress else None
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                if bar is not None:
                    bar.close()
        verify(Path(tmp), checksum)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _progress(total, name):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", leave=False)


def safe_extract_tar(archive: Path, dest: Path) -> None:
    """Extract a tar archive, refusing members that are links, devices or paths escaping ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                target = (dest / member.name).resolve()
                if not target.is_relative_to(dest.resolve()) or not (member.isfile() or member.isdir()):
                    raise DataError(f"{archive}: unsafe member {member.name!r} refused")
            tmp = Path(tempfile.mkdtemp(prefix=".extract.", dir=dest))
            try:
                tar.extractall(tmp)
                for item in tmp.iterdir():
                    final = dest / item.name
                    if final.exists():
                        shutil.rmtree(final) if final.is_dir() else final.unlink()
                    os.replace(item, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except tarfile.TarError as exc:
        raise DataError(f"{archive} is not a valid tar archive ({exc})") from exc


# Published checksums. The CIFAR and MNIST hosts publish MD5 only; Fashion-MNIST's SHA-256 values are of the
# decompressed IDX payloads (so Debian's recompressed copies verify too) and were computed from those files.
CIFAR_ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "md5:eb9058c3a382ffc7106e4002c42a8d85"),
}
IDX_FILES = {
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
}
FASHION_MNIST_PAYLOAD_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def download_idx(name: str, root: Optional[Path] = None, opener=None) -> Path:
    """Download the four IDX files of ``mnist`` or ``fashion-mnist`` into ``root`` (default: the cache)."""
    base, files = IDX_FILES[name]
    root = Path(root) if root else cache_dir() / name
    for filename, checksum in files.items():
        download(base + filename, root / filename, checksum, opener=opener)
    return root


def download_cifar(name: str, root: Optional[Path] = None, opener=None) -> Path:
    """Download and extract the official CIFAR-10/100 python archive into ``root`` (default: the cache)."""
    url, checksum = CIFAR_ARCHIVES[name]
    root = Path(root) if root else cache_dir() / name
    archive = download(url, root / url.rsplit("/", 1)[1], checksum, opener=opener)
    safe_extract_tar(archive, root)
    return root
