"""The engine's parts, for building combinations no paper has.

Every method is :func:`sam_optax.sharpness_aware` with four parts, grouped
here by role: a geometry (how the step uphill is built), a region (where it
applies), a gate (when the second gradient is computed) and a combination
(how the output is formed). The protocols (``Geometry``, ``Region``,
``Gate``, ``Combine``) say what a part written by a user must implement.

Example: a Fisher mask with vSAM's sampling and reuse::

    tx = sam_optax.sharpness_aware(
        loss_fn, rho=0.05,
        geometry=parts.global_norm(),
        region=parts.fisher_mask(0.5, num_samples=16, update_every=390),
        gate=parts.variation_sampling(warmup_steps=1170),
        combine=parts.decayed_reuse(),
    )
"""

# Protocols and the engine's step context.
from sam_optax._src.protocols import Combine
from sam_optax._src.protocols import Gate
from sam_optax._src.protocols import Geometry
from sam_optax._src.protocols import Region
from sam_optax._src.protocols import Step
from sam_optax._src.protocols import Trainable
from sam_optax._src.protocols import Where
from sam_optax._src.protocols import apply_mask

# Geometries.
from sam_optax._src.geometry import Friendly
from sam_optax._src.geometry import FriendlyState
from sam_optax._src.geometry import NormBall
from sam_optax._src.geometry import adaptive
from sam_optax._src.geometry import friendly
from sam_optax._src.geometry import global_norm
from sam_optax._src.lightsam import AdaptivePerturbation
from sam_optax._src.lightsam import AdaptivePerturbationState
from sam_optax._src.lightsam import adaptive_perturbation

# Regions.
from sam_optax._src.region import DynamicMask
from sam_optax._src.region import DynamicMaskState
from sam_optax._src.region import Everywhere
from sam_optax._src.region import FisherMask
from sam_optax._src.region import FixedLayers
from sam_optax._src.region import FixedMask
from sam_optax._src.region import LayerSelection
from sam_optax._src.region import MaskState
from sam_optax._src.region import OutputLayers
from sam_optax._src.region import RefreshedMask
from sam_optax._src.region import SharpLayers
from sam_optax._src.region import TopLayers
from sam_optax._src.region import cosine_drop_rate
from sam_optax._src.region import dynamic_mask
from sam_optax._src.region import everywhere
from sam_optax._src.region import fisher_mask
from sam_optax._src.region import fixed_layers
from sam_optax._src.region import fixed_mask
from sam_optax._src.region import mask_density
from sam_optax._src.region import output_layers
from sam_optax._src.region import top_layers

# Gates.
from sam_optax._src.gate import EveryK
from sam_optax._src.gate import EveryStep
from sam_optax._src.gate import Never
from sam_optax._src.gate import VariationSampling
from sam_optax._src.gate import every_k
from sam_optax._src.gate import every_step
from sam_optax._src.gate import never
from sam_optax._src.gate import variation_sampling

# Combinations.
from sam_optax._src.combine import DecayedReuse
from sam_optax._src.combine import Mix
from sam_optax._src.combine import OrthogonalReuse
from sam_optax._src.combine import Replace
from sam_optax._src.combine import SurrogateGap
from sam_optax._src.combine import decayed_reuse
from sam_optax._src.combine import mix
from sam_optax._src.combine import orthogonal_reuse
from sam_optax._src.combine import replace
from sam_optax._src.combine import surrogate_gap

# The building blocks of the masks.
from sam_optax._src.fisher import fisher_scores
from sam_optax._src.topk import num_kept
from sam_optax._src.topk import top_k_mask
