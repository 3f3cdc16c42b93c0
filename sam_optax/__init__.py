"""sam_optax: sharpness-aware minimization methods as optax transformations."""

from sam_optax._src.alias import asam
from sam_optax._src.alias import fsam
from sam_optax._src.alias import gnp
from sam_optax._src.alias import gsam
from sam_optax._src.alias import layerwise_sam
from sam_optax._src.alias import looksam
from sam_optax._src.alias import sam
from sam_optax._src.alias import ssam
from sam_optax._src.alias import ssam_dynamic
from sam_optax._src.alias import ssam_fisher
from sam_optax._src.alias import vsam
from sam_optax._src.alias import wsam
from sam_optax._src.alias import WSAMState
from sam_optax._src.protocols import Plan
from sam_optax._src.engine import SharpnessAwareState
from sam_optax._src.engine import sharpness_aware
from sam_optax._src.layers import layer_paths
from sam_optax._src.layers import rank_layers
from sam_optax._src.lightsam import lightsam
from sam_optax._src.lightsam import scale_by_adagrad_norm
from sam_optax._src.planner import Planner
from sam_optax._src.planner import planner
from sam_optax._src.schedules import late_phase
from sam_optax._src.schedules import rho_from_lr
from sam_optax._src.stats import stats
from sam_optax import parts

__version__ = "0.1.0"

__all__ = [
    "Plan",
    "Planner",
    "SharpnessAwareState",
    "WSAMState",
    "asam",
    "fsam",
    "gnp",
    "gsam",
    "late_phase",
    "layer_paths",
    "layerwise_sam",
    "lightsam",
    "looksam",
    "parts",
    "planner",
    "rank_layers",
    "rho_from_lr",
    "sam",
    "scale_by_adagrad_norm",
    "sharpness_aware",
    "ssam",
    "ssam_dynamic",
    "ssam_fisher",
    "stats",
    "vsam",
    "wsam",
]
