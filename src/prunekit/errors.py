"""The one exception prunekit raises for input a user must fix.

`InputError` is a `ValueError`, so ordinary ``except ValueError`` code keeps working; the CLI maps it to a
one-line message and exit code 2. Every message says what is wrong and what to do about it.
"""

import functools
import math
import os
import tempfile
from numbers import Integral, Real
from pathlib import Path

__all__ = ["InputError", "int_at_least", "check_seed", "SEED_LIMIT", "is_real", "check_model", "hidden_name",
           "check_output_name", "check_writable", "check_not_input", "apply_umask", "with_autograd", "module_modes",
           "restore_modes", "apply_chat_template"]


class InputError(ValueError):
    """Bad input: a missing model folder, a ratio outside [0, 1), a malformed pattern, too little text, ..."""


def int_at_least(value, name: str, low: int, *, hint: str = "") -> int:
    """`value` as an int if it is an integer (not a bool) of at least `low`; else `InputError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise InputError(f"{name} must be an integer >= {low}{hint}, got {value!r}")
    return int(value)


SEED_LIMIT = 2**63  # torch's generators take seeds below 2**64; runs, folds and groups add small offsets


def check_seed(value, name: str = "seed") -> int:
    """`value` as an int if it is an integer in [0, 2**63) (a seed of 2**64 or more was a traceback from torch)."""
    seed = int_at_least(value, name, 0)
    if seed >= SEED_LIMIT:
        raise InputError(f"{name} must be below 2**63 = {SEED_LIMIT}, got {value!r}")
    return seed


def is_real(value) -> bool:
    """A finite real number: a Python or numpy int or float, not a bool (numpy's bool is no `Real`)."""
    return (isinstance(value, Real) and not isinstance(value, bool)
            and (isinstance(value, Integral) or math.isfinite(value)))


def hidden_name(name: str, tag: str) -> str:
    """``.NAME.TAG-`` for a temporary sibling of `name`, cut to fit a 255-byte file name with mkdtemp's suffix
    (a long but valid --out failed only at the save, after all the work)."""
    stem = name.encode("utf-8")[:180].decode("utf-8", "ignore")
    return f".{stem}.{tag}-"


def check_model(model, what: str) -> None:
    """A model name or path where a loaded model goes was an AttributeError deep inside `what`."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise InputError(f"{what} needs a loaded torch model (model, tokenizer = prunekit.load_model(name_or_folder)), "
                         f"got {type(model).__name__}")


def with_autograd(fn):
    """Run training function `fn` with autograd on, whatever the caller set: inside a caller's
    ``torch.no_grad()`` or ``torch.inference_mode()`` a training loop failed with autograd's bare "element 0 of
    tensors does not require grad" (and `sft` had already put LoRA into the model). A model (an argument, or an
    argument's ``.model``) whose weights were made inside inference mode cannot be trained: refused up front."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        for arg in (*args, *kwargs.values()):
            model = arg if isinstance(arg, torch.nn.Module) else getattr(arg, "model", None)
            if isinstance(model, torch.nn.Module) and any(p.is_inference() for p in model.parameters()):
                raise InputError(f"{fn.__name__}: the model's weights were made inside torch.inference_mode() "
                                 "(inference tensors), which autograd cannot train; load or build the model outside it")
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return wrapper


def module_modes(model) -> tuple:
    """Every submodule's train/eval flag, by module (weakly) and by name, for `restore_modes`:
    ``model.train(was)`` set all of them to the top module's, so a caller's frozen part (an ``eval()`` BatchNorm
    or encoder inside a model in train mode) came back in train mode."""
    import weakref

    by_module = weakref.WeakKeyDictionary()  # weak: a replaced Linear (ARMOR) is freed as before, not held to the end
    by_name = {}
    for name, m in model.named_modules():
        by_module[m] = m.training
        by_name[name] = (weakref.ref(m), m.training)
    return model, by_module, by_name


def restore_modes(modes: tuple) -> None:
    """Put back the flags `module_modes` recorded: each module its own (wherever it sits now: a deleted layer
    renumbers the ones after it); a module put in since takes the flag of the one it replaced, when that one
    was under its name and has left the model, else its parent's."""
    model, by_module, by_name = modes
    present = {id(m) for m in model.modules()}
    for name, module in model.named_modules():  # parents first
        recorded = by_name.get(name)
        if module in by_module:
            module.training = by_module[module]
        elif recorded is not None and (recorded[0]() is None or id(recorded[0]()) not in present):
            module.training = recorded[1]
        else:
            module.training = model.get_submodule(name.rpartition(".")[0]).training


def check_output_name(out, *, flag: str = "--out") -> None:
    """An empty output name (read as "." and reported as an existing output), or one longer than a file name may
    be (refused only at the save, after all the work)."""
    if not str(out).strip():
        raise InputError(f"{flag} is empty; give a path (e.g. {flag} runs/out)")
    name = Path(out).expanduser().name
    if len(name.encode("utf-8")) > 255:
        raise InputError(f"{flag} {name[:40]}...: its last part is {len(name.encode('utf-8'))} bytes, longer than a "
                         "file name may be (255); choose a shorter name")


def resolved(path: str | os.PathLike, *, flag: str = "--out") -> Path:
    """``Path(path).expanduser().resolve()``, with a symbolic-link loop an InputError (a RuntimeError traceback)."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:
        raise InputError(f"{flag} {path}: cannot follow its symbolic links ({e}); remove the loop or choose "
                         f"another {flag}") from None


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (``~`` expanded), read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def follow_link(path: Path) -> Path:
    """Where a symbolic link `path` points (an output file is written there, as an output folder is), else
    `path`: replacing the link itself left the old result in place behind it."""
    return resolved(path) if path.is_symlink() else path


def check_writable(out: str | os.PathLike, *, flag: str = "--out") -> None:
    """Refuse an output that cannot be created: under a file, or where nothing can be written. Creates nothing.

    Called with the other checks, before the slow work, so a bad location fails in a second and not at the save.
    The working folder, or one holding it, is refused too: replacing it (``--out . --overwrite``) deleted it.
    """
    check_output_name(out, flag=flag)
    target, here = resolved(out, flag=flag), Path.cwd().resolve()
    if target == here or target in here.parents:
        raise InputError(f"{flag} {str(out)!r} is the working folder or holds it; writing there would replace it; "
                         f"give a new name (e.g. {flag} runs/out)")
    folder = Path(out).expanduser().absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{flag} {out} lies under {folder}, which is a file, not a folder; choose another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".prunekit-probe-", dir=folder))
    except OSError as e:
        raise InputError(f"{flag} {out}: cannot write in {folder} ({e.strerror}); choose another {flag}") from None


def check_not_input(out: str | os.PathLike, *inputs, flag: str = "--out") -> None:
    """Refuse an output that is one of the `inputs`, a folder holding one (writing it would replace the input),
    or a path inside an input folder (writing it would change what that folder holds)."""
    target = resolved(out, flag=flag)
    parts = []
    for src in inputs:  # a text mixture "wiki+notes/c.txt" names each of its sources (`prunekit.load_text`)
        if isinstance(src, str) and "+" in src and not Path(src).expanduser().exists():
            parts += [p.strip() for p in src.split("+")]
        else:
            parts.append(src)
    for src in parts:
        if not src or not Path(src).expanduser().exists():  # a builtin text name (wiki), or nothing
            continue
        source = Path(src).expanduser().resolve()
        if target == source or target in source.parents:
            raise InputError(f"{flag} {out} would replace the input {src}; choose another {flag}")
        if source.is_dir() and source in target.parents:
            raise InputError(f"{flag} {out} is inside the input folder {src}; choose a {flag} outside it")
        if source.is_dir():  # files linked into the output: replacing it changed the input behind the user's back
            for f in source.iterdir():
                real = f.resolve() if f.is_symlink() else None
                if real is not None and (real == target or target in real.parents):
                    raise InputError(f"{flag} {out} holds the file {f.name} of the input {src} (it links there); "
                                     f"choose another {flag}")


def place_file(tmp: str | os.PathLike, path: Path, *, overwrite: bool) -> None:
    """Rename the finished temporary file `tmp` to `path`. Without `overwrite` only while `path` does not exist,
    checked by the rename itself (a hard link fails on an existing name): a check made earlier let two runs into
    one file both report success, the later one's rows silently in place of the earlier's."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
        os.unlink(tmp)
        return
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: the check and the rename apart, as before
        if not os.path.lexists(path):
            os.replace(tmp, path)
            return
    raise InputError(f"{path} appeared while this ran (another process writing it?); it was left as it is and this "
                     "result was not saved; choose another output file or pass --overwrite (in Python: overwrite=True)")


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a folder and all it holds) the permissions a plain ``open``/``mkdir`` would: the
    temporary files and folders outputs are built in (``mkstemp``/``mkdtemp``) are private (0600/0700), and
    keep that after the rename into place, so other users and containers could not read the results."""
    mask = _umask()
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it to read it, the portable
    way, would briefly affect files other threads create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_chat_template(tokenizer, messages: list[dict], **kwargs):
    """``tokenizer.apply_chat_template(messages, **kwargs)``, with a template that fails (a Jinja syntax error,
    an exception the template raises itself, a field it reads that is not there, a template that is not text)
    turned into an InputError that names the template: it is the model folder's to fix."""
    try:
        from jinja2.exceptions import TemplateError
    except ImportError:  # transformers cannot render a template without jinja2 either
        TemplateError = TypeError
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except (TemplateError, TypeError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"the tokenizer's chat_template fails on a {len(messages)}-message conversation "
                         f"({type(e).__name__}: {text[:200]}); fix chat_template in the model's tokenizer_config.json "
                         "(or chat_template.jinja)") from None
