"""clipax: gradient clipping for JAX and Optax.

Float32-safe norms, explicit non-finite policies, adaptive thresholds, distributed norms and
diagnostics, every clipper an ``optax.GradientTransformation``.
"""

from importlib.metadata import PackageNotFoundError, version

from clipax._adagc import AdaGCState as AdaGCState
from clipax._adagc import adagc as adagc
from clipax._adaptive import ZClipState as ZClipState
from clipax._adaptive import zclip as zclip
from clipax._agc import adaptive_grad_clip as adaptive_grad_clip
from clipax._autoclip import AutoClipState as AutoClipState
from clipax._autoclip import autoclip as autoclip
from clipax._clipping import clip_by_global_norm as clip_by_global_norm
from clipax._clipping import clip_with_norm as clip_with_norm
from clipax._clippy import clippy as clippy
from clipax._groups import GroupClipState as GroupClipState
from clipax._groups import clip_by_group_norm as clip_by_group_norm
from clipax._groups import clip_by_subset_norm as clip_by_subset_norm
from clipax._guards import skip_nonfinite as skip_nonfinite
from clipax._health import Verdict as Verdict
from clipax._health import diagnose as diagnose
from clipax._leaf_clipping import clip_by_block_rms as clip_by_block_rms
from clipax._leaf_clipping import clip_by_leaf_norm as clip_by_leaf_norm
from clipax._metrics import metrics as metrics
from clipax._monitor import monitor as monitor
from clipax._norms import global_norm as global_norm
from clipax._norms import leaf_norms as leaf_norms
from clipax._per_example import PerExampleInfo as PerExampleInfo
from clipax._per_example import per_example_clip as per_example_clip
from clipax._per_example import per_example_clipped_grad as per_example_clipped_grad
from clipax._per_example_tx import PerExampleState as PerExampleState
from clipax._per_example_tx import clip_per_example as clip_per_example
from clipax._spam import SpamState as SpamState
from clipax._spam import spam as spam
from clipax._spikes import SkipState as SkipState
from clipax._spikes import skip_spikes as skip_spikes
from clipax._state import ClipState as ClipState
from clipax._suggest import suggest_max_norm as suggest_max_norm
from clipax._unitwise import unitwise_norms as unitwise_norms
from clipax._update_clip import UpdateClipState as UpdateClipState
from clipax._update_clip import clip_update_rms as clip_update_rms
from clipax._update_clip import stable_adamw as stable_adamw
from clipax._value import clip_by_value as clip_by_value

try:
  __version__ = version("clipax")
except PackageNotFoundError:  # running from a source tree that is not installed
  __version__ = "0.0.0"

__all__ = [
    "AdaGCState",
    "AutoClipState",
    "ClipState",
    "GroupClipState",
    "PerExampleInfo",
    "PerExampleState",
    "SkipState",
    "SpamState",
    "UpdateClipState",
    "Verdict",
    "ZClipState",
    "adagc",
    "adaptive_grad_clip",
    "autoclip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_group_norm",
    "clip_by_leaf_norm",
    "clip_by_subset_norm",
    "clip_by_value",
    "clip_per_example",
    "clip_update_rms",
    "clip_with_norm",
    "clippy",
    "diagnose",
    "global_norm",
    "leaf_norms",
    "metrics",
    "monitor",
    "per_example_clip",
    "per_example_clipped_grad",
    "skip_nonfinite",
    "skip_spikes",
    "spam",
    "stable_adamw",
    "suggest_max_norm",
    "unitwise_norms",
    "zclip",
]
