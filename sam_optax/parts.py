"""The engine's parts, for building combinations no paper has.

Example: a fixed element-wise mask with LookSAM-style reuse::

    tx = sam_optax.sharpness_aware(
        loss_fn, rho=0.05,
        geometry=parts.global_norm(),
        region=parts.fixed_mask(my_mask),
        gate=parts.every_k(5),
        combine=parts.mix(0.5),
    )
"""

from sam_optax._src.combine import Mix
from sam_optax._src.combine import Replace
from sam_optax._src.combine import mix
from sam_optax._src.combine import replace
from sam_optax._src.engine import Combine
from sam_optax._src.engine import Gate
from sam_optax._src.engine import Geometry
from sam_optax._src.engine import Region
from sam_optax._src.engine import Step
from sam_optax._src.engine import apply_mask
from sam_optax._src.gate import EveryK
from sam_optax._src.gate import EveryStep
from sam_optax._src.gate import Never
from sam_optax._src.gate import every_k
from sam_optax._src.gate import every_step
from sam_optax._src.gate import never
from sam_optax._src.geometry import NormBall
from sam_optax._src.geometry import adaptive
from sam_optax._src.geometry import global_norm
from sam_optax._src.layerwise import FixedLayers
from sam_optax._src.layerwise import LayerSelection
from sam_optax._src.layerwise import TopLayers
from sam_optax._src.layerwise import fixed_layers
from sam_optax._src.layerwise import top_layers
from sam_optax._src.lightsam import AdaptivePerturbation
from sam_optax._src.lightsam import AdaptivePerturbationState
from sam_optax._src.lightsam import adaptive_perturbation
from sam_optax._src.region import Everywhere
from sam_optax._src.region import FixedMask
from sam_optax._src.region import MaskState
from sam_optax._src.region import everywhere
from sam_optax._src.region import fixed_mask
from sam_optax._src.region import mask_density
from sam_optax._src.reuse import DecayedReuse
from sam_optax._src.reuse import OrthogonalReuse
from sam_optax._src.reuse import VariationSampling
from sam_optax._src.reuse import decayed_reuse
from sam_optax._src.reuse import orthogonal_reuse
from sam_optax._src.reuse import variation_sampling
from sam_optax._src.sparse import DynamicMask
from sam_optax._src.sparse import DynamicMaskState
from sam_optax._src.sparse import FisherMask
from sam_optax._src.sparse import cosine_drop_rate
from sam_optax._src.sparse import dynamic_mask
from sam_optax._src.sparse import fisher_mask
from sam_optax._src.sparse import fisher_scores
from sam_optax._src.sparse import num_kept
from sam_optax._src.sparse import top_k_mask
