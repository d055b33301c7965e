"""Load models (local folder or zoo name) and save pruned ones atomically, with prunekit's metadata.

The input is only ever read. A save writes into a temporary sibling folder and renames it into place, so an
interrupted run leaves no half-written output; an existing output is replaced only when asked.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import importlib
import json
import math
import os
import pickle
import re
import shutil
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from prunekit import jsonl, zoo
from prunekit.errors import InputError, apply_umask, check_output_name, check_writable, follow_link, hidden_name

__all__ = ["resolve_model", "load_model", "check_finite_weights", "check_output", "write_atomically", "save_pruned",
           "parse_dtype", "stored_dtype"]

_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
# what a saved tokenizer's vocabulary lives in (tokenizer_config.json alone is not a tokenizer)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "*.model", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken")


@contextlib.contextmanager
def quiet_progress_bars():
    """transformers' and the Hugging Face hub's progress bars off inside; afterwards each is back as the caller
    had it, the hub's per-group settings included (transformers' switch turns the hub's on or off globally)."""
    from transformers.utils import logging as hf_logging

    hub = importlib.import_module("huggingface_hub.utils.tqdm")  # the module (`utils.tqdm` is also its class)
    ours, hub_off = hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    states = getattr(hub, "progress_bar_states", None)
    saved = dict(states) if isinstance(states, dict) else None
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if ours:
            hf_logging.enable_progress_bar()
        if saved is not None:
            states.clear()
            states.update(saved)
        else:
            (hub.disable_progress_bars if hub_off else hub.enable_progress_bars)()


LOG_BAR_SECONDS = 10.0  # how often a progress bar redraws when stderr is not a terminal (a log file, CI)
# the tqdm patch's state, across threads: the active changes to a new bar's arguments, and tqdm's own __init__
_BARS = {"lock": threading.Lock(), "changes": [], "original": None}


@contextlib.contextmanager
def _bars_changed(change):
    """Every tqdm made inside (prunekit's, transformers', the hub's) gets ``change(args, kwargs)`` applied to its
    arguments first; tqdm is patched on the first entry and restored on the last exit (commands in several threads
    may overlap), and a bar another thread makes meanwhile is changed too."""
    from tqdm import std

    with _BARS["lock"]:
        if not _BARS["changes"]:
            original = _BARS["original"] = vars(std.tqdm)["__init__"]  # a partialmethod (TQDM_* defaults)

            def init(self, *args, **kwargs):
                for each in list(_BARS["changes"]):
                    each(args, kwargs)
                return original.__get__(self, type(self))(*args, **kwargs)

            std.tqdm.__init__ = init
        _BARS["changes"].append(change)
    try:
        yield
    finally:
        with _BARS["lock"]:
            _BARS["changes"].remove(change)
            if not _BARS["changes"]:
                std.tqdm.__init__ = _BARS["original"]
                _BARS["original"] = None


def sparse_progress_bars(seconds: float = LOG_BAR_SECONDS):
    """Progress bars (every tqdm) redraw at most every `seconds` inside, unless a call sets its own interval (the
    CLI does not enter this when ``TQDM_MININTERVAL`` is set). For a stderr that is not a terminal: at tqdm's
    0.1 s a log got up to ten carriage-return updates a second."""

    def slower(args, kwargs):
        if len(args) <= 6:  # mininterval is the seventh positional parameter
            kwargs.setdefault("mininterval", seconds)

    return _bars_changed(slower)


def silent_progress_bars():
    """Every tqdm this thread makes inside is disabled, whatever its call asked (``--quiet``: a bar whose caller
    was not handed the CLI's progress switch, such as the FID classifier's first training, printed anyway); other
    threads' bars are theirs to switch."""
    owner = threading.get_ident()

    def off(args, kwargs):
        if len(args) <= 10 and threading.get_ident() == owner:  # disable is the eleventh positional parameter
            kwargs["disable"] = True

    return _bars_changed(off)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A zoo name (``smollm2-135m``) or a local Hugging Face folder (returned absolute), checked to look like a
    model. A bare name that is a zoo name means the zoo model; write ``./NAME`` for a folder of that name."""
    text = str(name_or_path)
    if text in zoo.MODELS:
        return zoo.model_path(text)
    path = Path(text).expanduser()
    try:
        found = path.exists()
    except OSError:  # "File name too long": no such folder either
        found = False
    if not found:
        shown = text if len(text) <= 200 else text[:200] + "..."
        raise InputError(
            f"model {shown!r} is neither a zoo name ({', '.join(zoo.MODELS)}) nor an existing folder; "
            "give a local Hugging Face model folder"
        )
    if not path.is_dir():
        raise InputError(f"model {text!r} is a file; give the Hugging Face model folder that holds config.json")
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json, so it is not a Hugging Face model folder")
    try:  # named first: a broken config.json in a folder without weights was reported as "has no weights"
        _config_json(path)
    except OSError:  # unreadable: the load names it
        pass
    if not any(next(path.glob(p), None) for p in _WEIGHT_FILES):
        raise InputError(f"{path} has no weights (*.safetensors or pytorch_model*.bin); save the model with save_pretrained")
    odd = [f for p in _WEIGHT_FILES for f in path.glob(p) if not f.is_file()]
    if odd:  # a pipe named model.safetensors blocked the open, and Ctrl-C could not stop it
        raise InputError(f"{odd[0]} is not a regular file (a folder, pipe or device); a model's weights are files")
    # absolute: Path("./smollm2-135m") prints as "smollm2-135m", which a second resolve took for the zoo name
    return path.absolute()


_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def parse_dtype(dtype, *, what: str = "dtype"):
    """A torch floating dtype from a torch dtype or a name (``float32``/``fp32``, ``float16``/``fp16``/``half``,
    ``bfloat16``/``bf16``); None and ``"auto"`` pass through. Anything else is an InputError."""
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, MixedDtypes):
        return dtype
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in _DTYPES:
        return getattr(torch, _DTYPES[dtype.strip().lower().removeprefix("torch.")])
    raise InputError(f"{what} must be float32, float16 or bfloat16 (or auto), got {dtype!r}")


DEVICE_HELP = ("where the model is loaded and run: cpu (default), cuda, cuda:N or mps; checked before anything "
               "loads")


def add_device_argument(parser, *, where: str = "the model is loaded and run") -> None:
    """The ``--device`` option (`parse_device` checks it); `where` says what happens on the device."""
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP.replace("the model is loaded and run", where))


def parse_device(device, *, what: str = "device"):
    """A ``torch.device`` this process can run on, from a device or a name (``cpu``, ``cuda``, ``cuda:1``,
    ``mps``); None passes through. A name torch does not know, a CUDA device torch cannot see (a CPU build, no GPU,
    an index past the last GPU) or an unavailable MPS is an InputError that says what there is."""
    import torch

    if device is None:
        return None
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{what} must be a device such as cpu, cuda or cuda:1, got {device!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise InputError(f"{what} {device}: this torch ({torch.__version__}, {build}) sees no CUDA device; use "
                             "cpu, or a torch with CUDA on a machine with a GPU")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(f"{what} {device}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"{what} {device}: MPS is not available here; use cpu")
        return dev
    raise InputError(f"{what} {device}: prunekit runs on cpu, cuda or mps, not {dev.type}")


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class MixedDtypes(dict):
    """``{tensor name: dtype}`` of a folder that stores its floating-point tensors in more than one dtype (say
    bf16 Linears and fp32 norms), so a saved copy keeps each; `main` (the config's dtype) goes to the others."""

    def __init__(self, per_tensor: dict, main):
        super().__init__(per_tensor)
        self.main = main

    def renumbered(self, kept: list[int]) -> "MixedDtypes":
        """The map after depth pruning kept the blocks `kept` (old indices, in order): block ``kept[i]``'s
        tensors are named with index ``i`` now, and dropped blocks' entries go (they gave a moved block the dtypes
        of the block that had its new index)."""
        new = {old: i for i, old in enumerate(kept)}
        out = {}
        for name, dtype in self.items():
            renamed = block_renamed(name, new)
            if renamed is not None:
                out[renamed] = dtype
        return MixedDtypes(out, self.main)

    def __str__(self) -> str:
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        others = sorted({name(d) for d in self.values()} - {name(self.main)})
        return f"{name(self.main)} with {' and '.join(others)} tensors"


def _tensor_dtypes(folder: Path) -> dict:
    """``{name: dtype}`` of the floating-point tensors in `folder`'s safetensors headers, or, for a folder of
    ``pytorch_model*.bin`` files only, of their tensors (memory-mapped, ``weights_only``: nothing runs)."""
    import torch
    from safetensors import SafetensorError, safe_open

    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:  # reads the header only
                for k in f.keys():
                    name = _SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype())
                    if name:
                        found[k] = getattr(torch, name)
        except (OSError, SafetensorError):
            continue
    if found or any(folder.glob("*.safetensors")):
        return found
    for file in sorted(folder.glob("pytorch_model*.bin")):  # an fp16 .bin folder was saved as float32
        try:
            state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
        except Exception:  # not a plain tensor file: load_model refuses it with the reason
            continue
        if isinstance(state, dict):
            found.update({k: v.dtype for k, v in state.items()
                          if isinstance(v, torch.Tensor) and v.dtype in (torch.float32, torch.float16, torch.bfloat16)})
    return found


def _config_dtype(folder: Path):
    config = read_config(folder)
    name = config.get("dtype") or config.get("torch_dtype")
    try:
        return parse_dtype(name) if isinstance(name, str) and name != "auto" else None
    except InputError:
        return None


def stored_dtypes(path: str | os.PathLike):
    """The dtype model folder `path` stores its floating-point weights in (from the safetensors headers, or the
    ``.bin`` tensors; else its config's ``dtype``, else float32), or a `MixedDtypes` when it stores several."""
    import torch

    folder = resolve_model(path)
    per_tensor = _tensor_dtypes(folder)
    kinds = set(per_tensor.values())
    if len(kinds) == 1:
        return kinds.pop()
    config = _config_dtype(folder)
    if not kinds:
        return config or torch.float32
    counts = {d: sum(1 for x in per_tensor.values() if x == d) for d in kinds}
    main = config if config in kinds else max(kinds, key=lambda d: (counts[d], str(d)))
    return MixedDtypes(per_tensor, main)


def stored_dtype(path: str | os.PathLike):
    """The one dtype model folder `path` stores its weights in (`stored_dtypes`; a mixed folder's main dtype)."""
    found = stored_dtypes(path)
    return found.main if isinstance(found, MixedDtypes) else found


def output_dtype(choice, model_path) -> tuple:
    """``(dtype, words)``: the dtype a pruned copy of `model_path` is saved in for ``--dtype`` `choice` (``auto``
    or None: the dtype the input folder stores) and how to say it."""
    if choice in (None, "auto"):
        dtype = stored_dtypes(model_path)
        return dtype, f"{str(dtype).removeprefix('torch.')}, as the input"
    dtype = parse_dtype(choice, what="--dtype")
    return dtype, str(dtype).removeprefix("torch.")


def load_model(name_or_path: str | os.PathLike, *, dtype=None, check_finite: bool = True, device=None):
    """``(model, tokenizer)`` from a zoo name or a local folder, in fp32 unless `dtype` says otherwise (a torch
    dtype, a name such as ``"bfloat16"``/``"bf16"``, or ``"auto"``: as the folder stores it), on the CPU unless
    `device` says otherwise (``"cuda"``, ``"cuda:1"``, a ``torch.device``; checked before the load,
    `parse_device`).

    Never runs a folder's own code (``trust_remote_code=False``, so transformers never stops to ask): a folder
    whose model exists only as its code is refused, and must be loaded by the user. A folder from structured
    pruning with per-layer widths is built with those widths (`prunekit.structured.export.load_widths_model`).
    Weights with NaN or Inf are an InputError (every prunekit job would fail on them later, or quietly
    produce nothing); ``check_finite=False`` loads them anyway, e.g. to inspect a broken model.
    A folder without a tokenizer is an InputError; `prunekit.load` loads it with ``None`` for the tokenizer.
    """
    return load_checked(name_or_path, dtype=dtype, check_finite=check_finite, tokenizer=True, device=device)


def load_checked(name_or_path: str | os.PathLike, *, dtype=None, check_finite: bool = True,
                 tokenizer: bool | None = True, device=None):
    """`load_model`, with ``tokenizer=None``: the folder's tokenizer when it has a ``tokenizer_config.json``,
    else None (`prunekit.load`)."""
    device = parse_device(device)
    model, tok = _load_checked(name_or_path, dtype=dtype, check_finite=check_finite, tokenizer=tokenizer)
    return (model if device is None or device.type == "cpu" else model.to(device)), tok


def _load_checked(name_or_path: str | os.PathLike, *, dtype, check_finite: bool, tokenizer: bool | None):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = parse_dtype(dtype)
    path = resolve_model(name_or_path)
    config = read_config(path)
    refuse_remote_code(path, config)
    if dtype == "auto":
        dtype = stored_dtype(path)
    from prunekit.structured.export import WIDTHS_KEY

    _check_sizes(path, config)
    if WIDTHS_KEY not in config:  # AutoTokenizer validates config.json too, and its errors blamed the tokenizer
        _check_config(path)
    _check_generation_config(path)
    if tokenizer is None:
        tokenizer = (path / "tokenizer_config.json").is_file()
    tokenizer = _load_tokenizer(path) if tokenizer else None  # before the slow model load

    if WIDTHS_KEY in config:  # a structurally pruned model whose widths differ per layer
        from prunekit.structured.export import load_widths_model

        model = load_widths_model(path, config, dtype=dtype)
        return (_finite_as_loaded(model, path, dtype) if check_finite else model), tokenizer
    from safetensors import SafetensorError

    _check_layer_count(path, config)
    _check_shard_index(path)
    try:
        with _held_load_report() as held:
            # use_kernels=False: transformers >= 5.25 swaps in Hub kernels by default (and fails without the
            # `kernels` package); prunekit hooks, measures and rewrites the model's own PyTorch modules
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32,
                                                               trust_remote_code=False, output_loading_info=True,
                                                               use_kernels=False)
    except SafetensorError as e:  # a corrupt or truncated weight file
        raise InputError(f"could not load {path}: its safetensors weights are corrupt or truncated ({e}); "
                         "save the model again with save_pretrained") from None
    except pickle.UnpicklingError:  # a .bin checkpoint that torch's weights-only loader refuses
        raise InputError(f"could not load {path}: its pytorch_model.bin holds more than plain tensors (torch's "
                         "weights-only loader refused it; prunekit never unpickles anything else); convert the "
                         "weights to safetensors") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        mismatch = _shape_mismatch(path) if "mismatched_sizes" in str(e) or "size mismatch" in str(e) else None
        if mismatch:  # transformers printed a report table and named an option the user never set
            key, stored, described = mismatch
            raise InputError(f"{path}'s weights do not match its config.json: {key} is stored as {stored} but the "
                             f"config makes it {described}; fix config.json (its sizes) or save the model again with "
                             "save_pretrained") from None
        held.release()  # transformers' own message points to its report ("look at the above report")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"could not load {path} as a causal LM: {first}") from None
    missing, unused = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing or unused:  # transformers would run the model with those weights freshly initialised
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights its config describes are not in the files (e.g. {missing[0]})")
        if unused:
            parts.append(f"{len(unused)} weights in the files are not in the model (e.g. {unused[0]})")
        raise InputError(f"{path}'s weights do not match its config.json: {'; '.join(parts)}, so transformers would "
                         "fill them with random values. Fix config.json (layer count and layout) or save the model "
                         "again with save_pretrained")
    held.release()  # a report of a load that worked is transformers' to show
    from prunekit.weights.methods import armor

    armor.install_factors(model, path)  # ARMOR's factorized layers, when the folder holds them
    model.eval()
    return (_finite_as_loaded(model, path, dtype) if check_finite else model), tokenizer


def _finite_as_loaded(model, path, dtype):
    """`check_finite_weights`, saying so when the Inf came from loading a wider dtype into float16 (a weight past
    65504 became inf: the folder itself is fine, and "repair or re-export the model" sent users the wrong way)."""
    import torch
    from safetensors import safe_open

    bad = non_finite(model)
    stored = stored_dtypes(path) if bad and dtype == torch.float16 else None
    if stored is not None and stored != torch.float16:
        index = _safetensors_index(path)

        def finite_there(name: str) -> bool:  # NaN or Inf in the folder itself: "repair or re-export" is right
            if name not in index:
                return False
            with safe_open(str(index[name]), framework="pt") as f:
                return bool(torch.isfinite(f.get_tensor(name)).all())

        if all(finite_there(name) for name in bad):
            more = f" and {len(bad) - 1} other tensor{'s' if len(bad) > 2 else ''}" if len(bad) > 1 else ""
            raise InputError(f"{path} stores {str(stored).removeprefix('torch.')} weights that do not fit float16 "
                             f"(at most 65504): {bad[0]}{more} became NaN or Inf when loaded in float16; load it in "
                             "float32 or bfloat16 (prune --compute-dtype, eval and generate --dtype)")
    return check_finite_weights(model, path) if bad else model


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def block_renamed(name: str, index: dict[int, int]) -> str | None:
    """`name` with its block index ``i`` (``model.layers.i.``...) replaced by ``index[i]``; None when the block is
    not in `index`; a name outside the blocks as it is."""
    m = _LAYER_INDEX.search(name)
    if m is None:
        return name
    i = int(m.group(1))
    return name[:m.start(1)] + str(index[i]) + name[m.end(1):] if i in index else None


def config_depth(config: dict) -> int | None:
    """The layer count a config.json states, under any of the names architectures use (GPT-2: n_layer, GPT-Neo:
    num_layers), or None."""
    return next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                 if isinstance(config.get(k), int) and not isinstance(config.get(k), bool)), None)


def refuse_composite(config, what: str) -> None:
    """A multimodal model (its language model's config under ``text_config``: Gemma3ForConditionalGeneration) is
    refused before any work: its layers and sizes are not where a causal LM's are. `config`: a config or the dict
    of a config.json."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    if get("text_config") is not None or get("vision_config") is not None:
        raise InputError(f"{get('model_type', 'this')!r} is a multimodal model (its language model's "
                         f"settings sit under text_config); {what} handles text-only causal LMs; prune a text-only "
                         "checkpoint of it")


def _check_layer_count(path: Path, config: dict) -> None:
    """A config naming more layers than the safetensors hold is refused before the load: transformers builds
    every missing layer first (a typo of 320 for 32 layers allocated ten models before the missing-key check)."""
    depth = config_depth(config)
    if depth is None:
        return
    names = list(_tensor_dtypes(path))  # floating-point tensors' names, from the headers
    indices = {int(m.group(1)) for n in names for m in [_LAYER_INDEX.search(n)] if m}
    if indices and depth > max(indices) + 1:
        raise InputError(f"{path}/config.json describes {depth} layers but the weights hold {max(indices) + 1}; fix "
                         "num_hidden_layers (or save the model again with save_pretrained)")


def _check_shard_index(path: Path) -> None:
    """A sharded folder's index maps each tensor name to a shard file of the folder (a null or a number in it was
    a TypeError traceback from transformers)."""
    safetensors = (path / "model.safetensors.index.json").is_file() or (path / "model.safetensors").is_file()
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        file = path / name
        if not file.is_file() or (name.startswith("pytorch") and safetensors):
            continue  # transformers loads the safetensors; a .bin index beside them (Hub repos keep both) is unused
        try:
            index = json.loads(file.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise InputError(f"{file} is not valid JSON ({type(e).__name__}: {str(e)[:120]}); save the model again "
                             "with save_pretrained") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{file} has no weight_map of tensor names to shard files; save the model again with "
                             "save_pretrained")
        for tensor, shard in weight_map.items():
            if not (isinstance(shard, str) and shard and Path(shard).name == shard and (path / shard).is_file()):
                raise InputError(f"{file} maps {tensor} to {json.dumps(shard)[:80]}, which is not a shard file of "
                                 f"{path}; fix the index or save the model again with save_pretrained")


def _config_json(path: Path):
    """The value in folder `path`'s config.json, or an InputError when it is not JSON."""
    try:
        return json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{path}/config.json is not valid JSON ({type(e).__name__}: {str(e)[:120]}); "
                         "re-export the model") from None


def read_config(path: Path) -> dict:
    """The transformers ``config.json`` of model folder `path` (already resolved), or an InputError that says
    what is wrong with it."""
    config = _config_json(path)
    if not isinstance(config, dict) or "model_type" not in config:
        raise InputError(f"{path}/config.json has no model_type; it is not a transformers config")
    return config


def refuse_remote_code(path: Path, config: dict) -> None:
    """An InputError when the model of folder `path` exists only as the folder's own Python code (an ``auto_map``
    to a model type transformers does not know): prunekit never runs it (``trust_remote_code``), and without it
    transformers would stop to ask on the terminal. A known model type with an ``auto_map`` loads the built-in
    class."""
    from transformers import CONFIG_MAPPING

    mtype = config.get("model_type")
    if "auto_map" in config and mtype not in CONFIG_MAPPING:
        raise InputError(f"{path} holds a {mtype!r} model that only its own Python code defines (config.json "
                         "auto_map); prunekit never runs a model folder's code (trust_remote_code). Load it yourself "
                         "if you trust it and pass the model to the Python API")


def non_finite(model, *, buffers: bool = False) -> list[str]:
    """Names of `model`'s floating-point parameters (and, with `buffers`, buffers) holding a NaN or Inf."""
    import torch

    tensors = model.state_dict(keep_vars=True).items() if buffers else model.named_parameters()
    return [n for n, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_weights(model, where, *, buffers: bool = False) -> object:
    """`model` itself when every floating-point parameter (and, with `buffers`, buffer) is finite; otherwise an
    InputError naming the first bad tensor of `where` (a path or a name) and how many others are bad. Buffers
    are off by default: some transformer architectures keep -inf masks in them."""
    bad = non_finite(model, buffers=buffers)
    if bad:
        more = f" and {len(bad) - 1} other tensor{'s' if len(bad) > 2 else ''}" if len(bad) > 1 else ""
        raise InputError(f"{where} has NaN or Inf weights in {bad[0]}{more}; repair or re-export the model")
    return model


# config.json sizes that must be whole numbers >= 1 where given (0 divided by zero in transformers' modules,
# made empty layers that warned and then failed, or turned a length check off)
_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_hidden_layers", "vocab_size", "max_position_embeddings", "n_embd", "n_head", "n_layer", "n_inner",
              "n_positions")
# generation_config.json fields whose type transformers does not check (a wrong one failed inside generate)
_GEN_FLAGS = ("do_sample", "use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
              "return_dict_in_generate")
_GEN_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_GEN_COUNTS = ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "top_k", "num_beams",
               "num_return_sequences")
_GEN_NUMBERS = ("temperature", "top_p", "typical_p", "repetition_penalty", "length_penalty")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sizes(path: Path, config: dict) -> None:
    """config.json's sizes (and its ``text_config``'s) are whole numbers >= 1 where given."""
    for where, cfg in (("", config), ("text_config.", config.get("text_config"))):
        for key in _SIZE_KEYS if isinstance(cfg, dict) else ():
            value = cfg.get(key)
            if value is not None and not isinstance(value, (list, dict)) and not (_whole(value) and value >= 1):
                raise InputError(f'{path}/config.json gives "{where}{key}": {json.dumps(value)[:60]}; it must be a '
                                 "whole number >= 1. Fix config.json (or save the model again with save_pretrained)")


def _check_generation_config(path: Path) -> None:
    """The folder's generation_config.json, when it has one, is a JSON object whose common fields have the types
    transformers expects. transformers drops a file it cannot parse without a word (the model then generated
    without its stop tokens, and prune wrote a different file), and passes wrong types on to generate."""
    file = path / "generation_config.json"
    if not file.is_file():
        return
    where = str(file)
    try:
        gen = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{where} is not valid JSON ({type(e).__name__}: {str(e)[:120]}); fix it or delete it "
                         "(transformers would ignore it, and with it the model's stop tokens)") from None
    if not isinstance(gen, dict):
        raise InputError(f"{where} holds a JSON {type(gen).__name__}, not an object; fix it or delete it")

    def bad(key, value, want):
        return InputError(f'{where} gives "{key}": {json.dumps(value)[:60]}; it must be {want}. Fix it or delete '
                          "the file")

    for key in _GEN_FLAGS:
        if gen.get(key) is not None and not isinstance(gen[key], bool):
            raise bad(key, gen[key], "true or false")
    # token ids past the vocabulary, or negative, transformers only warns about (tiny GPT-2s keep 50256, early
    # LLaMA conversions pad with -1): so they load here too
    for key in _GEN_TOKENS:
        value = gen.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(_whole(i) and -2**31 <= i < 2**31 for i in ids):
            raise bad(key, value, "a token id (a whole number) or a list of them")
    for key in _GEN_COUNTS:
        if gen.get(key) is not None and not (_whole(gen[key]) and gen[key] >= 0):
            raise bad(key, gen[key], "a whole number >= 0")
    for key in _GEN_NUMBERS:  # a negative length_penalty favours short beams
        value = gen.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and (value >= 0 or key == "length_penalty")):
            raise bad(key, value, "a finite number" + (" >= 0" if key != "length_penalty" else ""))


def _check_config(path: Path) -> None:
    """config.json as transformers validates it (sizes that do not divide, fields of the wrong type)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - huggingface_hub's strict-dataclass errors are no ValueError
        text = str(e).strip()
        reason = text.splitlines()[-1].strip() if text else type(e).__name__
        raise InputError(f"{path}/config.json is not a valid config: {reason}; fix config.json") from None


class _held_load_report:
    """Holds transformers' multi-line LOAD REPORT while a model loads: prunekit names what went wrong in one line
    (missing or unexpected weights, sizes that differ); `release` shows it when the load worked, or when
    transformers' own message points to it. It is the handlers' filter while the load runs."""

    def __init__(self):
        self.held: list = []  # logging.LogRecord

    def filter(self, record) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True

    def _handlers(self):
        from transformers.utils import logging as hf_logging

        return hf_logging.get_logger().handlers

    def __enter__(self):
        for h in self._handlers():
            h.addFilter(self)
        return self

    def __exit__(self, *exc):
        for h in self._handlers():
            h.removeFilter(self)
        return False

    def release(self) -> None:
        for record in self.held:
            for h in self._handlers():
                h.handle(record)
        self.held = []


def _shape_mismatch(path: Path) -> tuple[str, list, list] | None:
    """The first weight whose stored shape differs from what config.json describes (safetensors headers only)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, trust_remote_code=False))
    except Exception:  # noqa: BLE001 - only a better message is at stake
        return None
    want = {k: list(v.shape) for k, v in model.state_dict().items()}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            for key in g.keys():
                if key in want and list(g.get_slice(key).get_shape()) != want[key]:
                    return key, list(g.get_slice(key).get_shape()), want[key]
    return None


def _load_tokenizer(path: Path):
    """The tokenizer saved in model folder `path`; a folder without a usable one is an InputError that says so."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never asks, never runs its code
    except Exception as e:  # transformers and tokenizers raise ValueError, OSError, KeyError, their own errors...
        fix = f"save the tokenizer into the folder with tokenizer.save_pretrained('{path}')"
        tok_config = _json(path / "tokenizer_config.json") or {}
        if tok_config.get("auto_map"):  # the message said to save a tokenizer, not why this one was refused
            raise InputError(f"{path}'s tokenizer is custom code (auto_map in tokenizer_config.json), which prunekit "
                             "never runs; load it yourself if you trust it and use the Python API") from None
        if not any(next(path.glob(p), None) for p in _TOKENIZER_FILES):
            raise InputError(f"{path} has no usable tokenizer: it holds no tokenizer files (tokenizer.json, "
                             f"tokenizer.model or vocab files); {fix}") from None
        detail = " ".join(str(e).split())[:200]
        raise InputError(f"{path} has no usable tokenizer: its tokenizer files do not load ({type(e).__name__}"
                         f"{': ' + detail if detail else ''}); {fix}") from None


def _others(folder: Path) -> bool:
    """Whether `folder` holds files and is no earlier prunekit output."""
    return any(folder.iterdir()) and not _is_prunekit_output(folder)


def check_replaceable(out: Path) -> None:
    """Refuse to replace (``--overwrite``) a non-empty folder that is no earlier output: it would be deleted
    whole, files of the user's own included. An earlier output holds a ``prunekit.json``, Q-Tuning's
    ``summary.json`` or a prunekit CNN/DiT ``config.json``, recognised by their content (any folder holding a
    config.json or summary.json passed, and was deleted)."""
    if out.is_dir() and _others(out):
        names = sorted(p.name for p in out.iterdir())
        what = "a Hugging Face model folder (no prunekit.json)" if _hf_config(out) else "a folder of other files"
        raise InputError(f"--overwrite replaces an earlier prunekit output, but {out} is {what} "
                         f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) that no prunekit command "
                         "wrote; choose another output folder (--out), or empty it first")


def _json(path: Path):
    """The JSON object in `path`, or None (missing, unreadable, not JSON, nested past Python's recursion limit)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _is_prunekit_output(folder: Path) -> bool:
    if (folder / "prunekit.json").is_file():  # weights, structured and depth outputs
        return True
    summary = _json(folder / "summary.json")
    if summary is not None and {"kept_samples", "sample_ratio"} <= set(summary):  # data qtune
        return True
    config = _json(folder / "config.json")
    if config is None:
        return False
    if str(config.get("format", "")).startswith("prunekit-"):  # cnn
        return True
    return isinstance(config.get("model"), dict) and "depth" in config["model"] and "info" in config  # DiT


def _hf_config(folder: Path) -> bool:
    """Whether `folder`'s config.json is a transformers model config (prunekit's CNN and DiT configs are not)."""
    config = _json(folder / "config.json")
    return config is not None and bool({"model_type", "architectures"} & set(config))


def check_output(out: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse an existing output folder unless `overwrite`; call this before doing any work (then
    `check_replaceable`, after the check that the output is no input)."""
    check_output_name(out)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():  # --overwrite never replaces a file: it was offered, then refused
        raise InputError(f"output {out} exists and is not a folder; choose another output (--out)")
    if out.exists() and not overwrite:
        try:
            others = _others(out)
        except OSError:  # unreadable: not known to be the user's
            others = False
        if others:  # nor a folder of the user's own files
            what = "a Hugging Face model folder" if _hf_config(out) else "a folder of other files"
            raise InputError(f"output {out} already exists and is {what} that no prunekit command wrote; choose "
                             "another output (--out)")
        raise InputError(f"output {out} already exists; choose another output (--out) or pass --overwrite to "
                         "replace it (in Python: overwrite=True)")
    check_writable(out)
    _note_leftovers(out)
    return out


_NOTED: set[str] = set()  # outputs whose leftovers were said (the CLI checks an output twice: first and at the save)


def _note_leftovers(out: Path) -> None:
    """Say on stderr what a killed run (SIGKILL, the OOM killer, a power cut) left beside `out`: its half-built
    ``.OUT.tmp-*`` folder (the size of a model, hidden, never reclaimed) or the previous output it had moved aside
    (``.OUT.old-*``), which is all a user has when `out` itself is gone. Nothing is deleted: a ``tmp`` folder
    may belong to another run writing `out` right now."""
    out = follow_link(out)  # a link's leftovers lie beside where it points
    if str(out.absolute()) in _NOTED or not out.parent.is_dir():
        return
    _NOTED.add(str(out.absolute()))
    found = {tag: sorted(out.parent.glob(glob.escape(hidden_name(out.name, tag)) + "*")) for tag in ("old", "tmp")}
    for tag, paths in found.items():
        for path in paths:
            if not path.is_dir() or path.is_symlink():
                continue
            try:  # another run writing this --out may finish (and delete it) while it is measured
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
            except OSError:
                continue
            if tag == "old" and not out.exists():
                what = (f"holds the output {out.name} had before a run was killed while replacing it; move it back if "
                        "you need it")
            elif tag == "old":
                what = "is a replaced output a killed run did not finish deleting; delete it"
            else:
                what = "is a half-written output of a killed run; delete it unless another run is writing this --out"
            print(f"prunekit: note: {path} ({size / 2**20:.1f} MiB) {what}", file=sys.stderr)


def write_atomically(out: str | os.PathLike, build: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Run ``build(tmp_folder)`` then move the folder to `out`; on any failure or Ctrl-C nothing is left.

    An `out` that is a symbolic link is written where the link points (the link stays and now shows the new
    output; replacing the link itself left the old output in place behind a hidden link)."""
    out = check_output(follow_link(Path(out).expanduser()), overwrite=overwrite)
    check_replaceable(out)
    made = [p for p in out.absolute().parents if not p.exists()]  # parents created here, nearest first
    old = tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=hidden_name(out.name, "tmp"), dir=out.parent))
        build(tmp)
        apply_umask(tmp)
        if out.exists() and not overwrite:  # made by someone else while this ran: theirs stays
            raise InputError(f"output {out} appeared while this ran (another process writing it?); it was left as "
                             "it is and this result was not saved; choose another output (--out) or pass "
                             "--overwrite (in Python: overwrite=True)")
        if out.exists():  # moved aside into a fresh empty folder (unique: a stale one of this pid blocked later runs)
            old = Path(tempfile.mkdtemp(prefix=hidden_name(out.name, "old"), dir=out.parent))
            try:
                os.replace(out, old)
            except FileNotFoundError:  # another --overwrite run moved it aside first: nothing of ours to keep
                old.rmdir()
                old = None
        try:
            os.replace(tmp, out)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another process put its output there just now
                raise InputError(f"output {out} was written by another process while this one saved it; theirs "
                                 "stays and this result was not saved") from None
            raise
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, out)
        for folder in made:  # leave no empty parent folders behind either
            try:
                folder.rmdir()
            except OSError:
                break
        if tmp is None and isinstance(e, OSError):
            raise InputError(f"cannot create output {out} ({e.strerror}); choose another output folder "
                             "(--out)") from None
        raise
    if old is not None:
        try:
            shutil.rmtree(old)
        except BaseException:  # a Ctrl-C here left the old output behind, hidden: finish, then stop
            shutil.rmtree(old, ignore_errors=True)
            raise
    return out


_LICENCE_NAMES = ("license", "licence", "notice", "copying")


def carry_licence(source, folder: Path) -> list[str]:
    """Copy the licence files of model folder `source` (LICENSE*, LICENCE*, NOTICE*, COPYING*) into `folder`, a
    derived model's output; returns their names. (The model card, README.md, describes the original: not carried.)

    Only regular files inside the folder are copied (or, in a Hugging Face cache snapshot, in its ``blobs``): a
    LICENSE linked to ~/.ssh/id_rsa or /proc/self/environ put that file into the output a user shares."""
    src = resolve_model(source)
    inside = [src.resolve()]
    if src.parent.name == "snapshots":  # hub cache: snapshots/<rev>/LICENSE -> ../../blobs/<sha256>
        inside.append((src.parent.parent / "blobs").resolve())
    names = []
    for f in sorted(src.iterdir()):
        if not f.name.lower().startswith(_LICENCE_NAMES):
            continue
        real = f.resolve()
        if (real.is_file() and any(real.is_relative_to(d) for d in inside)
                and stat.S_ISREG(real.stat().st_mode) and real.stat().st_size <= 4 * 2**20):
            shutil.copyfile(real, folder / f.name)
            names.append(f.name)
    return names


def _save_dtypes(state: dict, dtype) -> dict | None:
    """The dtype each floating-point tensor of `state` is saved in for `dtype` (None: saved as they are)."""
    per_tensor, main = (dtype, dtype.main) if isinstance(dtype, MixedDtypes) else ({}, dtype)
    if main in (None, "auto") or all(t.dtype == per_tensor.get(k, main) for k, t in state.items()
                                     if t.is_floating_point()):
        return None
    # a tied lm_head is not in the files: it takes the dtype of the tensor whose storage it shares (it was cast to
    # the main dtype apart, and written twice)
    shared = {(v.data_ptr(), tuple(v.shape)): per_tensor[k] for k, v in state.items() if k in per_tensor}
    return {k: per_tensor.get(k) or shared.get((v.data_ptr(), tuple(v.shape)), main) for k, v in state.items()
            if v.is_floating_point()}


def _storage(v) -> tuple:
    """What identifies a tensor's values: tied weights (embeddings and lm_head) share one."""
    return v.data_ptr(), tuple(v.shape), tuple(v.stride())


def _rounds(to, dtype) -> bool:
    """Whether casting `dtype` values to `to` can change them: a coarser step, or a narrower range (float16 holds
    bfloat16's steps but neither its large nor its tiny values: a bfloat16 weight of 2.4e-7 became 2.38e-7)."""
    import torch

    a, b = torch.finfo(to), torch.finfo(dtype)
    return a.eps > b.eps or a.max < b.max or a.smallest_normal > b.smallest_normal


def _overflowed(k: str, v, cast):
    """An InputError when casting finite `v` (tensor `k`) gave infinities, else None."""
    import torch

    if bool(torch.isfinite(cast).all()) or not bool(torch.isfinite(v).all()):
        return None
    name = str(cast.dtype).removeprefix("torch.")
    return InputError(f"{k} holds values up to {float(v.detach().abs().max()):.4g}, past {name}'s largest "
                      f"({torch.finfo(cast.dtype).max:.4g}): saved in {name} they would be infinite; save in "
                      "bfloat16 or float32 (--dtype)")


def round_to_saved(model, dtype, *, unchanged_from: Path | None = None, kept_blocks: list[int] | None = None,
                   pruned_zeros: bool = True) -> None:
    """Round `model`'s floating-point weights in place to the values `save_weights` writes for `dtype` (a
    bfloat16 save of a float32 model: each weight to its nearest bfloat16), each keeping its own dtype, so what is
    measured afterwards is the saved model (ARMOR's factors are not rounded: they are saved as they are). With
    `unchanged_from` (and `kept_blocks`, `pruned_zeros`: as `save_weights` gets them), a value the work did not
    change is rounded from the input's stored value, as the save writes it (it was rounded from the model's own
    rounded copy: a float32 input run in bfloat16 and saved as float16 scored other weights than it saved)."""
    import torch

    dtype = parse_dtype(dtype)
    check_fits_dtype(model, dtype)  # before any weight is rounded: an overflow became inf, then "NaN or Inf weights"
    state = model.state_dict()
    targets = _save_dtypes(state, dtype) or {}
    source = state
    # saved in float32, a stored value rounds to the model's dtype as the model holds it already: nothing to read
    if unchanged_from is not None and any(_rounds(to, torch.float32) for to in targets.values()):
        source = unchanged_from_input(model, state, Path(unchanged_from), kept_blocks=kept_blocks,
                                      pruned_zeros=pruned_zeros)
    done = set()
    with torch.no_grad():
        for k, to in targets.items():
            v = state[k]
            if (v.dtype != to or source[k] is not v) and _storage(v) not in done:  # a tied weight once
                v.copy_(source[k].to(to))
                done.add(_storage(v))


def check_fits_dtype(model, dtype) -> None:
    """Refuse (InputError) weights of `model` that the saved `dtype` (as `save_weights` casts) cannot hold: a
    float32 weight past 65504 saved in float16 became inf, a model every prunekit command then refuses."""
    dtype = parse_dtype(dtype)
    state = model.state_dict()
    targets = _save_dtypes(state, dtype) or {}
    for k, to in targets.items():
        v = state[k]
        if v.dtype != to:
            err = _overflowed(k, v, v.detach().to(to))
            if err is not None:
                raise err


class UpdateRounding:
    """How far a save in `dtype` leaves fine-tuned weights from their trained values, as a share of the update:
    |saved - trained| / |trained - original| over the tensors training changed; `result()` is None when nothing
    changed or the save rounds nothing (float32). Near 1: the saved model kept little of the update (steps below
    the dtype's resolution at each weight).

    Make it before training. ``full=True`` (every weight trains) keeps a copy of each floating-point weight to
    compare with afterwards (in the save dtype where that holds it exactly, as for a bfloat16 input saved as
    bfloat16; a tied weight once), then `measure(model)`; LoRA needs no copy: `measure_adapters(model)` before
    merging reads each adapter's update."""

    def __init__(self, model, dtype, *, full: bool):
        import torch

        state = model.state_dict()
        self.targets = _save_dtypes(state, parse_dtype(dtype)) or {}
        self.rounds = any(_rounds(to, state[k].dtype) for k, to in self.targets.items())
        self.before: dict = {}
        self.err = self.size = 0.0
        if not (full and self.rounds):
            return
        seen = set()
        for k, v in state.items():
            if not v.is_floating_point() or _storage(v) in seen:
                continue
            seen.add(_storage(v))
            small = v.detach().to(self.targets[k], copy=True)  # a copy even in the same dtype (it returned v)
            self.before[k] = small if torch.equal(small.to(v.dtype), v) else v.detach().clone()

    def _add(self, name: str, old, new) -> None:
        import torch

        new = new.detach()
        if torch.equal(new, old.to(new.dtype)):
            return
        self.size += float((new - old.to(new.dtype)).square().sum(dtype=torch.float64))
        to = self.targets.get(name)
        if to is not None and _rounds(to, new.dtype):
            self.err += float((new.to(to).to(new.dtype) - new).square().sum(dtype=torch.float64))

    def measure(self, model) -> None:
        """After full fine-tuning: compare every weight with its copy."""
        state = model.state_dict()
        for k, old in self.before.items():
            self._add(k, old, state[k])
        self.before = {}

    def measure_adapters(self, model) -> None:
        """Before `merge_lora`: each adapted Linear's weight as merged (base + update) against its base."""
        import torch

        from prunekit.lora import LoRALinear

        if not self.rounds:
            return
        with torch.no_grad():
            for n, m in model.named_modules():
                if isinstance(m, LoRALinear):
                    w = m.base.weight
                    self._add(f"{n}.weight", w, w + m.delta().to(w.dtype))

    def result(self) -> float | None:
        return (self.err / self.size) ** 0.5 if self.rounds and self.size > 0 else None


def _safetensors_index(folder: Path) -> dict:
    """``{tensor name: file}`` over `folder`'s safetensors files (headers only)."""
    from safetensors import SafetensorError, safe_open

    index = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                index.update(dict.fromkeys(f.keys(), file))
        except (OSError, SafetensorError):
            continue
    return index


def _matchable(model, folder: Path, kept_blocks) -> tuple[dict, tuple]:
    """`folder`'s `_safetensors_index` (under `model`'s names: a block that depth pruning moved from index
    ``kept_blocks[i]`` to ``i`` finds its stored tensors), and the name prefixes of `model`'s factorized (ARMOR)
    layers, whose weight is a product of factors and is never matched to a stored tensor."""
    from prunekit.weights.engine import factorized_names

    new = {old: i for i, old in enumerate(kept_blocks)} if kept_blocks is not None else None
    index = {}  # {the model's name: (file, the stored name)}
    for name, file in _safetensors_index(folder).items():
        renamed = block_renamed(name, new) if new is not None else name
        if renamed is not None:
            index[renamed] = (file, name)
    return index, tuple(f"{n}." for n in factorized_names(model))


def unchanged_from_input(model, state: dict, folder: Path, *, kept_blocks: list[int] | None = None,
                         pruned_zeros: bool = True, saved: dict | None = None) -> dict:
    """`state` (``model.state_dict()``) with every value that the work did not change given back as `folder`
    stores it.

    A model loaded in a narrower dtype than its folder's (``prune --compute-dtype bfloat16`` on a float32 or
    float16 folder) holds rounded copies of every weight: the embeddings, norms and head, the layers left dense by
    ``--skip``, the weights a mask-only method (magnitude, Wanda) kept, and every weight of a block that depth
    pruning kept (`kept_blocks`: the stored index of each block the model has now). An element whose value still
    equals its stored value rounded to the model's dtype, and is not zero (a pruned weight stays pruned), takes
    the stored value again; what the method changed (pruned zeros, SparseGPT's updates) stays as computed. With
    `pruned_zeros` False (depth and structured pruning, which zero nothing) a zero takes the stored value too, so a
    weight too small for the model's dtype (1e-8 in float16) is not saved as 0. `saved` (name -> the dtype it is
    saved in): a value that equals its stored value cast to that dtype and then to the model's matches too (what
    `round_to_saved` left for ``--eval``: a float16 run saved as bfloat16 kept the run's values there). ARMOR's
    factorized layers (their weight is the product of factors) are left as they are. Tensors are matched by name
    in the safetensors files; a ``.bin`` folder, or a name the loader rewrote, matches nothing
    (`names_not_stored`). A Linear or norm that structured pruning shrank (`prunekit.structured.units.kept_of`) is
    matched to the rows and columns of its stored tensor that it kept."""
    import torch
    from safetensors import safe_open

    from prunekit.structured.units import kept_of

    index, factorized = _matchable(model, folder, kept_blocks)
    modules = dict(model.named_modules())
    by_storage: dict = {}
    for file in dict.fromkeys(file for file, _ in index.values()):
        with safe_open(str(file), framework="pt") as f:
            for name, v in state.items():
                if index.get(name, (None,))[0] != file or not v.is_floating_point() or name.startswith(factorized):
                    continue
                key = _storage(v)
                if key in by_storage:
                    continue
                stored = f.get_tensor(index[name][1]).to(v.device)  # a model on a GPU: compared there
                owner, _, leaf = name.rpartition(".")
                kept = kept_of(modules[owner]) if stored.shape != v.shape and owner in modules else None
                if kept is not None and leaf in ("weight", "bias"):  # a head or neuron subset, in the input's order
                    rows, cols = kept
                    stored = stored[rows] if rows is not None else stored
                    if cols is not None and leaf == "weight":
                        stored = stored[:, cols]
                if (stored.shape != v.shape or not stored.is_floating_point()
                        or not _rounds(v.dtype, stored.dtype)):  # only a narrower copy lost anything
                    by_storage[key] = None
                    continue
                same = stored.to(v.dtype) == v
                to = (saved or {}).get(name)
                if to is not None and to not in (v.dtype, stored.dtype):
                    same |= stored.to(to).to(v.dtype) == v
                if pruned_zeros:
                    same &= v != 0
                by_storage[key] = torch.where(same, stored, v.to(stored.dtype))
    out = dict(state)
    for name, v in state.items():  # a tied lm_head (not in the files) is given back with its embedding
        restored = by_storage.get(_storage(v)) if v.is_floating_point() else None
        if restored is not None:
            out[name] = restored
    return out


def names_not_stored(model, folder: Path, *, kept_blocks: list[int] | None = None) -> list[str]:
    """The floating-point tensors of `model` (ARMOR's factorized layers aside) that `unchanged_from_input` cannot
    find in `folder`'s safetensors files by name (a tied lm_head counts with its embedding)."""
    index, factorized = _matchable(model, folder, kept_blocks)
    state = model.state_dict()
    found = {_storage(v) for k, v in state.items() if k in index}
    return [k for k, v in state.items() if v.is_floating_point() and not k.startswith(factorized)
            and _storage(v) not in found]


def save_weights(model, folder: Path, dtype=None, *, unchanged_from: Path | None = None,
                 kept_blocks: list[int] | None = None, pruned_zeros: bool = True) -> None:
    """``model.save_pretrained(folder)``, with the floating-point weights (and the config's ``dtype``) in `dtype`
    when given (a `MixedDtypes`: each tensor in its own); the model itself is not changed. A weight that the dtype
    cannot hold (it would be saved as inf) is an InputError. `unchanged_from` (the input folder of a model loaded
    in a narrower dtype): what the work did not change is saved as that folder stores it (`unchanged_from_input`;
    `kept_blocks`: after depth pruning, the stored index of each block the model has now; `pruned_zeros`: whether
    the work zeroed weights)."""
    dtype = parse_dtype(dtype)
    main = dtype.main if isinstance(dtype, MixedDtypes) else dtype
    state = model.state_dict()
    targets = _save_dtypes(state, dtype)
    if targets is None:  # saved in the model's own dtype: the stored values would be rounded to it again
        model.save_pretrained(folder)
        return
    if unchanged_from is not None:
        state = unchanged_from_input(model, state, Path(unchanged_from), kept_blocks=kept_blocks,
                                     pruned_zeros=pruned_zeros, saved=targets)
    cast: dict = {}  # one cast per storage, so tied weights (embeddings and lm_head) stay one tensor
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            to = targets[k]
            out[k] = cast.setdefault((*_storage(v), to), v.detach().to(to))
            err = _overflowed(k, v, out[k])
            if err is not None:
                raise err
        else:
            out[k] = v
    model.save_pretrained(folder, state_dict=out)
    config = json.loads((folder / "config.json").read_text())  # transformers writes the model's own dtype there
    config.pop("torch_dtype", None)
    config["dtype"] = str(main).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main_of(dtype):
    """The dtype most tensors are saved in for `dtype` (a `MixedDtypes`' main one)."""
    return dtype.main if isinstance(dtype, MixedDtypes) else dtype


def save_pruned(model, tokenizer, out: str | os.PathLike, *, metadata: dict | None = None, overwrite: bool = False,
                extra: Callable[[Path], None] | None = None, dtype=None,
                unchanged_from: str | os.PathLike | None = None, kept_blocks: list[int] | None = None,
                pruned_zeros: bool = True) -> Path:
    """Save `model` (safetensors) and `tokenizer` plus ``prunekit.json`` (`metadata`, with ``saved_dtype``: the
    dtype the weights were written in; a `PruneResult` is written as its ``to_dict()``); `extra(folder)` may add
    files.

    `dtype` (a torch dtype or a name such as ``"bfloat16"``) saves the weights in that dtype without changing
    `model`; None saves them as they are. ARMOR's factorized layers save their dense equivalent in the model's
    weights (any transformers install loads it) and their factors in ``armor.safetensors``, which `load_model`
    installs again (in float32 when the weights are saved in float32, else in their own dtype).
    `unchanged_from`: the folder a model was loaded from in a narrower dtype (``load_model(..., dtype="bfloat16")``
    of a float32 folder); every value the work did not change is saved as that folder stores it, not rounded
    (`unchanged_from_input`; `kept_blocks`: after depth pruning, the stored index of each block the model has
    now; `pruned_zeros`: False where the work zeroed no weight, as depth pruning).
    """
    from prunekit.weights.methods import armor
    from prunekit.weights.prune import PruneResult

    dtype = parse_dtype(dtype, what="the saved dtype")
    # a NaN model was saved, and every command then refused the folder (from a new user's walk-through)
    check_finite_weights(model, "the model to save (every prunekit command would refuse the folder)")
    if isinstance(metadata, PruneResult):  # refused as "metadata must be a dict"
        metadata = metadata.to_dict()
    metadata = dict(jsonl.check_metadata(metadata))
    import torch

    saved = dtype if dtype not in (None, "auto") else next(
        (t.dtype for t in model.state_dict().values() if t.is_floating_point()), None)
    if saved is not None:
        metadata.setdefault("saved_dtype", str(saved).removeprefix("torch."))

    def build(tmp: Path) -> None:
        save_weights(model, tmp, dtype, unchanged_from=resolve_model(unchanged_from) if unchanged_from else None,
                     kept_blocks=kept_blocks, pruned_zeros=pruned_zeros)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "prunekit.json").write_text(jsonl.dumps(metadata, indent=2) + "\n")
        # a no-op unless ARMOR factorized some layers; bf16 factors of a model saved in float32 were written in
        # bf16 beside a record saying float32
        armor.save_factors(model, tmp, widen_to=torch.float32 if main_of(saved) == torch.float32 else None)
        if extra is not None:
            extra(tmp)

    return write_atomically(out, build, overwrite=overwrite)
