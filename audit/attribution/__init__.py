"""Attribution: which pixels made the model say what it said.

Vanilla gradients (Simonyan et al. 2014), SmoothGrad (Smilkov et al. 2017), Integrated Gradients
(Sundararajan et al. 2017), Grad-CAM (Selvaraju et al. 2017), Grad-CAM++ (Chattopadhay et al.
2018), Layer-CAM (Jiang et al. 2021), Score-CAM (Wang et al. 2020, with Faster Score-CAM's channel
cap), Guided Backpropagation (Springenberg et al. 2015) and Guided Grad-CAM, and occlusion (Zeiler &
Fergus 2014).

Gradients are taken on the class score before the softmax (a rebuilt linear head; the loaded model
is never changed), or on the mean activation of one filter, which is also the target for models
without a class output. Every public method takes one preprocessed image (H, W, C) and returns a
float map (H, W) in [0, 1]; the maths of the CAMs lives in small functions over arrays.

A package in Captum's way, one family per module over one shared module for targets and scores, re-exported
flat here: `targets` (what is explained and how it is scored), `gradients`, `cams`, `perturbation`, `trust`
(deletion, insertion, the sanity check) and `methods` (every method by its page name, and the one path from
pixels to a map).
"""

from audit.attribution.targets import (  # noqa: F401
    Progress,
    report_progress,
    FilterTarget,
    Target,
    has_class_output,
    resolve_target,
    graph_with_score,
    Scorer,
    score_model,
    normalise,
    resize,
)
from audit.attribution.gradients import (  # noqa: F401
    saliency,
    smoothgrad,
    blurred,
    integrated_gradients,
    GuidedReLU,
    guided_replacement,
    guided_gradient,
    guided_backprop,
)
from audit.attribution.cams import (  # noqa: F401
    grad_cam_weights,
    grad_cam_plus_plus_weights,
    weighted_maps,
    layer_cam_map,
    shared_passes,
    grad_cam,
    grad_cam_plus_plus,
    layer_cam,
    guided_grad_cam,
)
from audit.attribution.perturbation import (  # noqa: F401
    score_cam,
    score_cam_channels,
    patch_starts,
    occlusion_defaults,
    occlusion,
)
from audit.attribution.trust import (  # noqa: F401
    mass_inside,
    peak_inside,
    DELETED_BY,
    RANDOM_ORDERS,
    deletion_measure,
    deletion_curve,
    insertion_curve,
    random_curves,
    beats_random,
    saturated,
    randomised_copies,
    sanity_check,
)
from audit.attribution.methods import (  # noqa: F401
    METHODS,
    FLOAT32_METHODS,
    BATCHED,
    black_options,
    map_of,
    explain,
)
