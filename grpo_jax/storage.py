"""Run locations: one path layer for local folders and object stores (``gs://bucket/run``).

Everything a run reads or writes (config copy, metrics, TensorBoard events, checkpoints, warm start, the final HF
export, ablation reports, the model ``grpo-jax eval`` reads) goes through :func:`location`, an ``etils.epath.Path``:
the local filesystem for a plain path, gcsfs (through fsspec) for ``gs://``; Orbax writes its checkpoints through
the same paths. ``pathlib.Path("gs://b/x")`` is the local path ``gs:/b/x``, so no run location may pass through
``pathlib``.

Libraries that only write local files (safetensors, tokenizers' ``save_pretrained``, tensorboardX) write into a
local staging folder that :func:`upload` copies up; libraries that only read local files read a downloaded copy
(:func:`local_copy`).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager

from etils import epath

Location = epath.Path


def is_remote(where: str | os.PathLike) -> bool:
    """True for a URL-style location (``gs://``, ``s3://``, ...), False for a local path."""
    return "://" in os.fspath(where)


def location(where: str | os.PathLike) -> Location:
    """``where`` as an ``epath.Path``: a URL as given, a local path made absolute."""
    text = os.fspath(where)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the files under ``src`` to ``dst`` (either may be local or remote), replacing files of the same name."""
    src, dst = location(src), location(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            copy_tree(child, dst / child.name)
        else:  # streamed: the two sides may be different filesystems
            with child.open("rb") as r, (dst / child.name).open("wb") as w:
                shutil.copyfileobj(r, w, 16 << 20)


def upload(local_dir: str, folder: str | os.PathLike) -> None:
    """Copy a local folder's files to ``folder``; nothing to do when ``folder`` is that local folder."""
    if not is_remote(folder) and os.path.abspath(local_dir) == os.path.abspath(os.fspath(folder)):
        return
    copy_tree(local_dir, folder)


_CACHE = os.path.join(tempfile.gettempdir(), f"grpo_jax_remote_{os.getuid()}")


def local_copy(folder: str | os.PathLike) -> str:
    """A local folder with ``folder``'s files: ``folder`` itself when local, else a fresh download (the same local
    path for the same URL, so a process never sees two copies; re-downloaded on every call, never stale)."""
    if not is_remote(folder):
        return os.fspath(folder)
    src = location(folder)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    dst = os.path.join(_CACHE, hashlib.sha1(os.fspath(src).encode()).hexdigest()[:16])
    shutil.rmtree(dst, ignore_errors=True)
    copy_tree(src, dst)
    return dst


@contextmanager
def staged(folder: str | os.PathLike):
    """A local folder to write ``folder``'s files into; for a remote ``folder``, a temporary one that is uploaded
    when the block ends without an error."""
    if not is_remote(folder):
        os.makedirs(os.fspath(folder), exist_ok=True)
        yield os.fspath(folder)
        return
    with tempfile.TemporaryDirectory(prefix="grpo_jax_stage_") as local:
        yield local
        upload(local, folder)
