"""The "python-docs" domain corpus: read from a Debian python3.11-doc package, split disjointly by page."""

import io
import subprocess
import tarfile

import pytest

from prunekit import zoo
from prunekit.errors import InputError
from prunekit.text import BUNDLED, load_text

SOURCES = "./usr/share/doc/python3.11/html/_sources/"


def fake_deb(pages: dict[str, str]) -> bytes:
    """An ar archive like python3.11-doc's: the pages under html/_sources, plus files that must be ignored."""
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:xz") as tar:
        files = {SOURCES + name: text for name, text in pages.items()}
        files["./usr/share/doc/python3.11/html/library/os.html"] = "<html>not a source</html>"
        files[SOURCES + "empty.rst.txt"] = "  \n"  # an empty page is dropped
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ar = b"!<arch>\n"
    for name, body in [("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"), ("data.tar.xz", payload.getvalue())]:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        ar += header + body + b"\n" * (len(body) & 1)
    return ar


@pytest.fixture
def planted_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    pages = {f"{folder}/page{i:02d}.rst.txt": f"Page {folder} {i}.\n.. function:: {folder}_{i}()\n"
             for folder in ("library", "c-api") for i in range(12)}
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "python3.11-doc_3.11.2-6_all.deb").write_bytes(fake_deb(pages))
    return pages


def test_pages_are_read_sorted_and_cached(planted_cache, tmp_path):
    docs = zoo.python_docs()
    assert [d["name"] for d in docs] == sorted(planted_cache)
    assert all(d["text"] == planted_cache[d["name"]].strip() for d in docs)
    assert (tmp_path / "text" / "python_docs.jsonl").exists()
    (tmp_path / "downloads" / "python3.11-doc_3.11.2-6_all.deb").unlink()
    assert zoo.python_docs() == docs  # the cache alone suffices


def test_split_is_disjoint_every_tenth_page(planted_cache):
    assert "python-docs" in BUNDLED
    cal = load_text("python-docs", purpose="calibration")
    ev = load_text("python-docs", purpose="evaluation")
    cal_docs, ev_docs = set(cal.text.split("\n\n")), set(ev.text.split("\n\n"))  # a planted page has no blank line
    names = sorted(planted_cache)
    assert ev_docs == {planted_cache[n].strip() for n in names[::10]}
    assert "3 of 24" in ev.documents and "21 of 24" in cal.documents
    assert cal.text and ev.text and not cal_docs & ev_docs


def test_missing_package_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    runs = []

    def apt(cmd, **kw):  # the package is not found
        runs.append((cmd, kw.get("stdout")))
        return subprocess.CompletedProcess(cmd, 100)

    monkeypatch.setattr(zoo.subprocess, "run", apt)
    with pytest.raises(InputError, match="apt-get download python3.11-doc"):
        zoo.python_docs()
    # apt's output went into --json stdout, and a command's download ran `apt-get update` on the system
    assert runs == [(["apt-get", "download", "python3.11-doc"], 2)]


def test_a_cache_file_that_cannot_be_written_leaves_no_temporary_file_and_says_it_is_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zoo.os, "replace", full)
    with pytest.raises(OSError, match=r"No space left on device, writing the asset cache file .*x\.jsonl"):
        zoo._atomic_write(tmp_path / "text" / "x.jsonl", b"data")
    assert list((tmp_path / "text").iterdir()) == []


@pytest.mark.integration
def test_real_corpus_split():
    docs = zoo.python_docs()
    assert len(docs) > 400 and [d["name"] for d in docs] == sorted(d["name"] for d in docs)
    cal = load_text("python-docs", purpose="calibration")
    ev = load_text("python-docs", purpose="evaluation")
    held_out = {d["name"] for i, d in enumerate(docs) if i % 10 == 0}
    assert len(held_out) == len(docs) // 10 + (len(docs) % 10 > 0)
    assert len(ev.text) > 500_000 and len(cal.text) > 5 * len(ev.text)
    assert docs[0]["text"] in ev.text and docs[1]["text"] in cal.text and docs[0]["text"] not in cal.text
