"""The CNN testbed: a ResNet-20-style network with BatchNorm for Fashion-MNIST, its training, caching and I/O.

Architecture (He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385, the CIFAR ResNet-20:
a stem, three stages of three basic blocks, global average pooling, one Linear), with one change for the CPU:
the stem convolution has stride 2, so the stages see 14x14, 7x7 and 4x4 maps instead of 28x28, 14x14, 7x7.
That makes one training epoch on 60k images about 4x cheaper (~80 s instead of ~5 min on one thread of the
project's CPU) at the cost of a little accuracy. A stage change of width uses a 1x1 convolution + BatchNorm
shortcut (ResNet "option B").

    stem:    conv3x3(1 -> w0, stride 2) -> BN -> ReLU                       [B, w0, 14, 14]
    block:   conv1 3x3 (stride s) -> bn1 -> ReLU -> conv2 3x3 -> bn2, + shortcut, ReLU
    stages:  3 blocks of width w0, w1 (first stride 2), w2 (first stride 2)  [B, w2, 4, 4]
    head:    global average pool -> Linear(w2 -> 10)

Every block's ``conv1`` output channels feed only ``conv2`` (through ``bn1`` and a ReLU), so its inner width
(``mids``) can change without touching the residual stream: this is where channel pruning (UDFC) acts. A saved
model is a folder with ``model.safetensors`` and ``config.json`` (the architecture, inner widths and any
low-rank decomposed layers), so pruned and decomposed models load back with their own shapes.

>>> model = ResNet(widths=(8, 16, 32))
>>> model(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import InputError, check_output_name, check_writable, int_at_least

__all__ = [
    "BasicBlock", "ResNet", "fashion_tensors", "save_model", "load_model", "testbed", "testbed_folder", "TESTBED",
    "check_output_dir",
]

# The testbed recipe (see `testbed`): widths of ResNet-20, 3 epochs of SGD with cosine decay, batch 128.
TESTBED = dict(widths=(16, 32, 64), blocks=3, epochs=3, lr=0.1, batch_size=128, weight_decay=5e-4)
FORMAT = "prunekit-cnn/1"


class BasicBlock(nn.Module):
    """conv1 (stride) -> bn1 -> ReLU -> conv2 -> bn2, plus an identity or 1x1-conv shortcut, then ReLU."""

    def __init__(self, in_ch: int, mid: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, in_ch, H, W]
        h = F.relu(self.bn1(self.conv1(x)))  # [B, mid, H/s, W/s]
        h = self.bn2(self.conv2(h))  # [B, out_ch, H/s, W/s]
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """A CIFAR-style ResNet for ``[B, in_channels, H, W]`` images: ``stages`` of ``blocks`` basic blocks.

    ``mids`` (one inner width per block, default the stage width) is what channel pruning changes.
    """

    def __init__(self, *, widths=(16, 32, 64), blocks: int = 3, mids=None, in_channels: int = 1,
                 num_classes: int = 10, stem_stride: int = 2):
        super().__init__()
        blocks = int_at_least(blocks, "blocks (basic blocks per stage)", 1)
        in_channels = int_at_least(in_channels, "in_channels", 1)
        num_classes = int_at_least(num_classes, "num_classes", 1)
        stem_stride = int_at_least(stem_stride, "stem_stride", 1)
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise InputError(f"widths must be positive channel counts, got {widths}")
        n = len(widths) * blocks
        mids = [widths[i // blocks] for i in range(n)] if mids is None else [int(m) for m in mids]
        if len(mids) != n or min(mids) < 1:
            raise InputError(f"mids must give {n} positive inner widths (one per block), got {mids}")
        self.config = dict(widths=list(widths), blocks=blocks, mids=mids, in_channels=in_channels,
                           num_classes=num_classes, stem_stride=stem_stride)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i in range(n):
            stage, b = divmod(i, blocks)
            stride = 2 if (stage > 0 and b == 0) else 1
            layers.append(BasicBlock(cin, mids[i], widths[stage], stride))
            cin = widths[stage]
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for b in self.blocks:  # zero-init the last BN of each residual branch: each block starts as identity
            nn.init.zeros_(b.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W]
        h = F.relu(self.bn(self.stem(x)))  # [B, w0, H/2, W/2]
        h = self.blocks(h)  # [B, w2, H/8, W/8]
        return self.fc(h.mean(dim=(2, 3)))  # [B, num_classes]


_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530  # pixel mean and std of the Fashion-MNIST training images


def fashion_tensors():
    """Fashion-MNIST from `prunekit.zoo` as normalized float tensors.

    Returns ``(x_train [60000, 1, 28, 28], y_train [60000], x_test [10000, 1, 28, 28], y_test [10000])``.
    """
    from prunekit import zoo

    xtr, ytr, xte, yte = zoo.fashion_mnist()

    def prep(x):
        return ((torch.from_numpy(x).float() / 255.0 - _FMNIST_MEAN) / _FMNIST_STD)[:, None]  # [N, 1, 28, 28]

    return prep(xtr), torch.from_numpy(ytr), prep(xte), torch.from_numpy(yte)


def check_output_dir(out, *, overwrite: bool) -> Path:
    """Refuse an existing output folder unless `overwrite`; nothing is created here."""
    check_output_name(out)
    out = Path(out)
    if out.exists() and not out.is_dir():  # checked first: --overwrite, offered, was then refused
        raise InputError(f"{out} exists and is not a folder; choose another output folder (--out)")
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; choose another output (--out) or pass --overwrite (in Python: "
                         "overwrite=True)")
    check_writable(out)  # not under a file, and writable
    return out


def save_model(model: ResNet, out, *, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into folder `out`, atomically (`weights.io.write_atomically`:
    a temp folder, then a rename; on failure or Ctrl-C nothing is left, parents made for it included)."""
    from safetensors.torch import save_file

    from prunekit.jsonl import check_metadata
    from prunekit.weights.io import write_atomically

    out = check_output_dir(out, overwrite=overwrite)
    if not isinstance(model, ResNet):
        raise InputError(f"save_model saves prunekit.cnn.ResNet models, got {type(model).__name__}")
    metadata = check_metadata(metadata)

    def build(tmp: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        config = {"format": FORMAT, "arch": "resnet", **model.config,
                  "lowrank": getattr(model, "lowrank", {}), "metadata": metadata}
        (tmp / "config.json").write_text(json.dumps(config, indent=1))

    return write_atomically(out, build, overwrite=overwrite)


_ARCH = ("widths", "blocks", "mids", "in_channels", "num_classes", "stem_stride")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _read_config(cfg_file: Path) -> dict:
    """``config.json`` of a model folder, checked: a JSON object in `FORMAT` with a buildable architecture."""
    from prunekit.cnn.trp import SCHEMES

    def bad(what: str) -> InputError:
        return InputError(f"{cfg_file} {what}; re-export the model")

    try:
        cfg = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("is not UTF-8 JSON text (binary or another encoding)") from None
    except json.JSONDecodeError as e:
        raise bad(f"is not valid JSON ({e})") from None
    except RecursionError:
        raise bad("nests its JSON deeper than it can be read") from None
    except OSError as e:
        raise InputError(f"{cfg_file} cannot be read ({e.strerror})") from None
    if not isinstance(cfg, dict):
        raise bad(f"must hold a JSON object, got a {type(cfg).__name__}")
    if cfg.get("format") != FORMAT:
        what = "no \"format\"" if "format" not in cfg else f"format {cfg['format']!r}"
        hf = ("" if "model_type" not in cfg else
              " (a Hugging Face model's config; prunekit's CNN commands take a CNN folder)")
        raise InputError(f"{cfg_file} has {what}, expected {FORMAT!r}{hf}: give a folder written by "
                         "`prunekit cnn train`, `cnn trp` or `cnn udfc`")
    missing = [k for k in _ARCH if k not in cfg and k != "mids"]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    for key in ("blocks", "in_channels", "num_classes", "stem_stride"):
        if not _is_count(cfg[key]):
            raise bad(f"has {key}={cfg[key]!r}; it must be an integer >= 1")
    widths, mids = cfg["widths"], cfg.get("mids")
    if not isinstance(widths, list) or not widths or not all(map(_is_count, widths)):
        raise bad(f"has widths={widths!r}; it must be a list of channel counts >= 1")
    n = len(widths) * cfg["blocks"]
    if mids is not None and (not isinstance(mids, list) or len(mids) != n or not all(map(_is_count, mids))):
        raise bad(f"has mids={mids!r}; it must be a list of {n} inner widths >= 1 (one per block)")
    lowrank = cfg.get("lowrank") or {}
    if not isinstance(lowrank, dict):
        raise bad(f"has lowrank={lowrank!r}; it must map layer names to {{rank, scheme}}")
    for name, spec in lowrank.items():
        if not isinstance(spec, dict) or not _is_count(spec.get("rank")) or spec.get("scheme") not in SCHEMES:
            raise bad(f"has lowrank entry {name!r}: {spec!r}; it needs an integer rank >= 1 and a scheme in "
                      f"{', '.join(SCHEMES)}")
    cfg["lowrank"] = lowrank
    return cfg


def _build(cfg: dict, cfg_file: Path) -> ResNet:
    """The (untrained) model a checked config describes, low-rank layers installed."""
    from prunekit.cnn.trp import install_lowrank

    model = ResNet(**{k: cfg.get(k) for k in _ARCH})
    for name, spec in cfg["lowrank"].items():
        try:
            install_lowrank(model, name, rank=spec["rank"], scheme=spec["scheme"])
        except (AttributeError, InputError):
            raise InputError(f"{cfg_file} lists low-rank layer {name!r}, which is not a conv of this model; "
                             "re-export the model") from None
    return model


def load_model(path) -> ResNet:
    """Load a folder written by `save_model` (pruned and low-rank models included), in eval mode.

    Anything a user must fix (a config that is not the architecture's, weights of other shapes, a truncated or
    foreign weights file, NaN or Inf weights) is an `InputError` naming the folder.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from prunekit.weights.io import check_finite_weights

    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise InputError(f"{path} is not a prunekit CNN folder (needs config.json and model.safetensors); "
                         "make one with `prunekit cnn train --out FOLDER`")
    cfg = _read_config(cfg_file)
    try:
        with torch.device("meta"):  # shapes only: a config of absurd widths allocates nothing
            expected = dict(_build(cfg, cfg_file).state_dict())
    except (RuntimeError, OverflowError, MemoryError) as e:  # "Storage size calculation overflowed"
        raise InputError(f"{cfg_file} describes a network too large to build ({str(e).splitlines()[0][:80]}); "
                         "re-export the model") from None
    unreadable = f"{weights} is not a readable safetensors file ({{}}); re-export the model"
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise InputError(unreadable.format(e)) from None
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise InputError(f"{weights} does not match {cfg_file}: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                         "re-export the model")
    for name, t in expected.items():
        if found[name] != tuple(t.shape):
            raise InputError(f"{weights} does not match {cfg_file}: {name} has shape {list(found[name])} in the "
                             f"weights, {list(t.shape)} by the config; re-export the model")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise InputError(unreadable.format(e)) from None
    for name, t in state.items():
        if expected[name].is_floating_point() and not t.is_floating_point():
            raise InputError(f"{weights} stores {name} as {t.dtype}, not floating point; re-export the model")
    for name, t in state.items():  # a negative variance makes every output NaN; evaluation then scored 10%
        if name.endswith("running_var") and bool((t < 0).any()):
            raise InputError(f"{weights}: {name} holds a negative variance; the BatchNorm statistics are broken, "
                             "re-export the model")
    model = _build(cfg, cfg_file)
    model.load_state_dict(state)  # names and shapes checked above
    return check_finite_weights(model, path, buffers=True).eval()


def testbed_folder(*, seed: int = 0, epochs: int | None = None) -> Path:
    """Where `testbed` caches the model of `seed` (a CLI refuses to write its output there)."""
    from prunekit import zoo

    epochs = TESTBED["epochs"] if epochs is None else int(epochs)
    widths = "-".join(map(str, TESTBED["widths"]))
    return zoo.cache_dir() / "models" / f"cnn-resnet20s2-{widths}-fmnist-e{epochs}-s{seed}"


def testbed(*, seed: int = 0, epochs: int | None = None, progress: bool = True, log=None) -> ResNet:
    """The trained Fashion-MNIST testbed for `seed`, trained once and cached under ``$PRUNEKIT_CACHE/models``.

    Trained by `prunekit.train.train` (SGD, Nesterov momentum 0.9, weight decay 5e-4, cosine decay from lr 0.1,
    batch 128, ``TESTBED["epochs"]`` epochs, channels-last on one CPU thread when the caller set one).
    """
    from prunekit import train as tr

    epochs = TESTBED["epochs"] if epochs is None else int(epochs)
    w = TESTBED["widths"]
    folder = testbed_folder(seed=seed, epochs=epochs)
    if (folder / "config.json").is_file():
        return load_model(folder)
    xtr, ytr, xte, yte = fashion_tensors()
    model = tr.seeded_model(lambda: ResNet(widths=w, blocks=TESTBED["blocks"]), seed)
    t0 = time.perf_counter()
    fit(model, xtr, ytr, epochs=epochs, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0
    acc = tr.accuracy(model, xte, yte)
    if log is not None:
        log(f"trained testbed seed {seed}: {epochs} epochs in {seconds:.0f} s, test accuracy {acc:.4f}")
    save_model(model, folder, metadata={"trained": "fashion-mnist train 60k", "epochs": epochs, "seed": seed,
                                        "test_accuracy": acc, "train_seconds": seconds, **TESTBED}, overwrite=True)
    return model


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int, callbacks=(),
        progress: bool = True) -> nn.Module:
    """`prunekit.train.train` with the testbed recipe, in channels-last memory layout (faster convs on CPU)."""
    from prunekit import train as tr

    model.to(memory_format=torch.channels_last)
    try:
        tr.train(model, x, y, epochs=epochs, lr=TESTBED["lr"], batch_size=TESTBED["batch_size"], seed=seed,
                 weight_decay=TESTBED["weight_decay"], callbacks=callbacks, progress=progress)
    finally:
        model.to(memory_format=torch.contiguous_format)
    return model.eval()

