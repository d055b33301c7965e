"""Compressing convolutional networks: UDFC (data-free pruning + quantization) and TRP (trained rank pruning).

- `resnet`: the Fashion-MNIST ResNet-20-style testbed, its cached training, and model I/O (safetensors + JSON).
- `udfc`: prune conv1 channels / quantize weights and compensate conv2 in closed form from BN statistics.
- `trp`: the TRP training callback, low-rank decomposition into two thin convs (kept only where
  it runs faster, on request), the SVD-after-training baseline.
- `flops`: multiply-accumulates, parameters and CPU time per batch.
"""

from typing import TYPE_CHECKING

from prunekit._lazy import attach

__all__ = [
    "ResNet", "fashion_tensors", "load_model", "save_model", "testbed", "TRP", "decompose", "energy_for_flops",
    "split_where_faster",
    "CompressResult", "compress", "quantize_weight", "count_flops", "count_params", "ms_per_batch",
]

attach(__name__, {
    "prunekit.cnn.flops": ("count_flops", "count_params", "ms_per_batch"),
    "prunekit.cnn.resnet": ("ResNet", "fashion_tensors", "load_model", "save_model", "testbed"),
    "prunekit.cnn.trp": ("TRP", "decompose", "energy_for_flops", "split_where_faster"),
    "prunekit.cnn.udfc": ("CompressResult", "compress", "quantize_weight"),
})

if TYPE_CHECKING:  # the same names for type checkers and editors
    from prunekit.cnn.flops import count_flops, count_params, ms_per_batch
    from prunekit.cnn.resnet import ResNet, fashion_tensors, load_model, save_model, testbed
    from prunekit.cnn.trp import TRP, decompose, energy_for_flops, split_where_faster
    from prunekit.cnn.udfc import CompressResult, compress, quantize_weight
