"""Per-example data scores, one file per method.

Every score is a plain function over arrays or tensors that returns a float64 numpy array of shape ``[N]`` of
*difficulty*: higher = harder / more informative (``+inf`` = never learned, where a method has that notion).
`prunekit.select.select_examples` turns a difficulty into a keep-mask (keep the hard, the easy, a random or a
coverage-centric subset).

- `el2n`: ``‖softmax(f(x)) - onehot(y)‖₂`` averaged over runs (Paul et al. 2021).
- `grand`: per-example loss-gradient norm, exact over all parameters or the last-layer approximation.
- `forgetting`: how often an example goes from correct to incorrect during training (Toneva et al. 2019).
- `prototypes`: cosine distance to the nearest k-means centroid of an embedding (Sorscher et al. 2022).
- `confident`: Confident Learning label issues from out-of-sample probabilities (Northcutt et al. 2021): a bool
  mask of likely label errors, not a difficulty.
- `qtuning`: Q-Tuning's joint sample and token selection of SFT pairs on the Error-Uncertainty plane (Wang et al.
  2025): a `prunekit.data.sft.Selection` (kept samples and their kept loss tokens), not a difficulty; the SFT loop
  it plugs into is `prunekit.data.sft`.

Training the runs these scores need (and out-of-fold probabilities for `confident`) is `prunekit.train`.
"""

from prunekit._lazy import attach

attach(__name__, {})  # a submodule read as an attribute loads, as the eager imports once made it
