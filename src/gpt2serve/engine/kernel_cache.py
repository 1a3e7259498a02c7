"""Where the compiled C kernels are cached, and which cached files may be loaded.

`build()` returns `kernels-<hash>.so` (the hash of the sources and the compile command) from
`$GPT2SERVE_CACHE_DIR` (default `~/.cache/gpt2serve`), compiling it there first if needed. Loading a
shared library runs its code, so a cached file is loaded only where nobody else could have written it:
the file and its directory must belong to this user (or root) and be writable by neither group nor others,
and the directory's ancestors must not be changeable by others (sticky directories such as /tmp excepted).
A file that fails this is rebuilt in place; a directory that fails it (or cannot be written) is passed
over for a private temporary directory (`mkdtemp`: mode 0700, an unpredictable name, removed at exit).
There is no shared, predictable path in the temporary directory.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def _cache_dirs() -> list[Path]:
    configured = os.environ.get("GPT2SERVE_CACHE_DIR")
    return [Path(configured)] if configured else [Path.home() / ".cache" / "gpt2serve"]


TRUSTED_OWNERS = (os.getuid(), 0)  # this process's user, and root


def _unsafe(path: Path, directory: bool) -> str | None:
    """Why `path` cannot be trusted to hold code this process loads, or None: it must be a real directory
    (or regular file, not a link) owned by this user or root, that neither group nor others can write; a
    directory's ancestors too, except sticky ones (/tmp) for the ancestors."""
    try:
        st = path.lstat()
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        return f"{path} is not a {'directory' if directory else 'regular file'}"
    if st.st_uid not in TRUSTED_OWNERS:
        return f"{path} belongs to another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):o})"
    if directory:
        for parent in path.parents:
            st = parent.stat()
            writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if st.st_uid not in TRUSTED_OWNERS or (writable and not st.st_mode & stat.S_ISVTX):
                return f"{parent}, above {path}, may be changed by another user"
    return None


@functools.cache
def _private_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="gpt2serve-kernels-"))  # mode 0700, an unpredictable name
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _key(compiler: str, flags: tuple[str, ...], sources: tuple[Path, ...]) -> str:
    source = b"".join(path.read_bytes() for path in sources)
    return hashlib.sha256(source + " ".join((compiler, *flags)).encode()).hexdigest()[:16]


def build(compiler: str, flags: tuple[str, ...], sources: tuple[Path, ...]) -> Path:
    """The compiled library: a trusted cached copy, or compiled now (written to a temporary name, then
    renamed, so concurrent builds never load a partial file) into the first cache directory that is safe,
    else into a private temporary directory."""
    name = f"kernels-{_key(compiler, flags, sources)}.so"
    errors = []
    for folder in [*_cache_dirs(), None]:
        try:
            if folder is None:
                folder = _private_dir()
            else:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if why := _unsafe(folder, directory=True):
                raise OSError(f"not used for the kernel cache: {why}")
            target = folder / name
            if target.exists() and (why := _unsafe(target, directory=False)):
                log.warning("rebuilding the kernels: the cached %s is not trusted (%s)", target, why)
            elif target.exists():
                return target
            _compile(compiler, flags, sources, target)
            return target
        except (OSError, subprocess.SubprocessError) as exc:
            stderr = getattr(exc, "stderr", b"") or b""
            errors.append(f"{folder}: {exc} {stderr.decode(errors='replace')[-500:]}")
    raise OSError("; ".join(errors))


def _compile(compiler: str, flags: tuple[str, ...], sources: tuple[Path, ...], target: Path) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, "-o", tmp, *(str(p) for p in sources if p.suffix == ".c")],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
