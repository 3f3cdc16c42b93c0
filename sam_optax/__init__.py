"""sam_optax: sharpness-aware minimization methods as optax transformations."""

from sam_optax._src.engine import SharpnessAwareState
from sam_optax._src.engine import sharpness_aware
from sam_optax._src.layerwise import layer_paths
from sam_optax._src.layerwise import layerwise_sam
from sam_optax._src.layerwise import rank_layers
from sam_optax._src.lightsam import lightsam
from sam_optax._src.lightsam import scale_by_adagrad_norm
from sam_optax._src.presets import asam
from sam_optax._src.presets import gnp
from sam_optax._src.presets import sam
from sam_optax._src.reuse import looksam
from sam_optax._src.reuse import vsam
from sam_optax._src.sparse import ssam
from sam_optax._src.sparse import ssam_dynamic
from sam_optax._src.sparse import ssam_fisher
from sam_optax._src.stats import stats
from sam_optax import parts

__version__ = "0.1.0"

__all__ = [
    "SharpnessAwareState",
    "asam",
    "gnp",
    "layer_paths",
    "layerwise_sam",
    "lightsam",
    "looksam",
    "parts",
    "rank_layers",
    "sam",
    "scale_by_adagrad_norm",
    "sharpness_aware",
    "ssam",
    "ssam_dynamic",
    "ssam_fisher",
    "stats",
    "vsam",
]
