"""Atomic writes: a file or a directory appears at its final path only once complete.

    write_jsonl(path, rows)                 # also write_text / write_json
    with atomic_path(path) as tmp:          # for writers that take a path (np.save, savefig, safetensors)
        np.save(tmp, array)
    with staging_dir(out, overwrite=True) as tmp:   # a directory of files (an adapter, a merged model)
        write_files_into(tmp)

Each writes a temporary sibling (same directory, so the rename is atomic), flushes it to disk and renames
it onto the final name; on an error the temporary is removed and the old file, if any, is untouched. A
killed process leaves at most a `.name.*.tmp` sibling, never a half-written file under the final name.

Modes follow the umask as `open()` would give them (0644 / 0755 under the usual 022), not the 0600 / 0700
of `tempfile`: exports and data are read by servers running as other users.

Reading: `read_json(path)` — JSON whose objects may not repeat a key (json alone keeps the last, silently).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from jaxft.errors import JaxftError


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # elsewhere: the classic read (set and restore)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block ends without an error.
    `suffix`: the end the writer insists on (np.save appends .npy to a name without it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Rows as JSON Lines (UTF-8, non-ASCII kept as is)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_executable(path: str | os.PathLike) -> None:
    """Mode 0777 less the umask (0755 under 022): a script written into an export, run as `./serve_vllm.sh`."""
    os.chmod(path, 0o777 & ~umask())


def publish_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory onto `out` (an existing `out` is replaced only now)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def _umask_modes(top: Path) -> None:
    """Every folder and file under top (top included) to the umask's mode: mkdtemp makes folders 0700 and some
    writers (the safetensors library) make files 0600; scripts written executable stay executable."""
    mask = umask()
    for d, _, files in os.walk(top):
        os.chmod(d, 0o777 & ~mask)
        for f in files:
            path = os.path.join(d, f)
            if not os.path.islink(path):
                os.chmod(path, (0o777 if os.stat(path).st_mode & 0o111 else 0o666) & ~mask)


@contextlib.contextmanager
def staging_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside `out` to fill; it replaces `out` when the block ends without an error.
    An existing `out` is an error unless overwrite (checked before anything is written)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise JaxftError(f"{out}: already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        _umask_modes(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook refusing a key given twice (ValueError), where json keeps the last silently."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} given twice in one object")
        out[k] = v
    return out


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's value; JaxftError '<path>: not valid JSON (cause)' for an unreadable file, bad UTF-8,
    bad JSON, nesting too deep or a key given twice."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes(), object_pairs_hook=unique_keys)
    except OSError as e:
        raise JaxftError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        cause = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise JaxftError(f"{path}: not valid JSON ({cause})") from None
