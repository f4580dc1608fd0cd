"""Every figure the app shows, defined once: its formula, its reference and the test that checks it.

`docs/definitions.md` is written from this table (`python -m audit.definitions > docs/definitions.md`;
a test keeps them equal and checks that every named test exists), and each page of the dashboard shows
its own rows in a "What these numbers mean" expander, so the page, the report and the docs say the same.
"""

from __future__ import annotations

import html

from dataclasses import dataclass


PRUNING_CRITERIA = {
    "dead": "dead or near-dead (APoZ)",
    "l1": "lowest L1 norm (Li et al. 2017)",
    "mean": "lowest mean activation",
    "taylor": "lowest Taylor score (Molchanov et al. 2017)",
    "fpgm": "smallest summed distance to the layer's other filters (FPGM, He et al. 2019)",
    "apoz": "highest APoZ (Hu et al. 2016)",
    "bn_scale": "smallest BatchNorm scale |gamma| (Network Slimming, Liu et al. 2017)",
}
"""Ways to choose pruning candidates, by the code a link, the report and the command line carry ("dead" takes no
share); audit.pruning.CRITERIA. Here, without TensorFlow, so that the command line's help answers at once."""


@dataclass(frozen=True)
class Definition:
    figure: str
    pages: tuple[str, ...]
    formula: str
    reference: str
    test: str  # tests/<file>.py::<test function>


A = "tests/test_attribution.py::"
P = "tests/test_pruning.py::"
S = "tests/test_activations.py::"
R = "tests/test_recovery.py::"

DEFINITIONS = (
    Definition("Output shape, parameters, kernel, stride", ("Model",),
               "Per layer, from Keras: the output shape (N for the batch), the count of weights, the kernel size "
               "and strides of conv and pooling layers; layers of nested models are listed with their path "
               "(base/block1_conv1).", "Keras layer API",
               "tests/test_models.py::test_vgg16_layer_table_matches_known_shapes_and_parameters"),
    Definition("Multiply-adds per image", ("Model", "Pruning", "Report"),
               "Sum over conv layers of output positions x the kernel's size (height x width x its input "
               "channels x output channels; a separable layer adds its pointwise step) and over dense layers of "
               "inputs x units.", "Molchanov et al. 2017 (FLOPs)",
               P + "test_flops_fall_when_filters_go"),
    Definition("Probability", ("Model", "Attribution", "Report"),
               "The explained output's class probabilities: its softmax (or sigmoid per class; a single unit "
               "gives [1 - p, p]); logits are passed through the squash the head implies.", "audit.heads",
               "tests/test_models_users_bring.py::test_a_single_unit_head_is_binary_and_both_classes_have_maps"),
    Definition("Activation maps and the strongest channel", ("Activations",),
               "One layer's output for the image; each channel of the montage scaled to [0, 1] on its own; the "
               "strongest channel is the one with the largest value anywhere.", "Zeiler & Fergus 2014",
               S + "test_montage_grid_normalisation_and_strongest_channel"),
    Definition("Measured at", ("Activations", "Pruning", "Report"),
               "Where a filter's statistics, APoZ and Taylor score are taken: after the per-channel layers that "
               "follow its conv (BatchNormalization, its activation, dropout) up to the first layer that mixes "
               "channels, merges or changes resolution: the tensor the next layer reads (Conv -> BN -> ReLU: the "
               "ReLU). A ReLU followed only by affine layers (Conv -> ReLU -> BN) is measured at the ReLU. The "
               "layer's own output is available as 'output'.", "Hu et al. 2016 (APoZ after the ReLU)",
               S + "test_a_filter_is_measured_after_its_batchnorm_and_relu_with_the_numbers_on_paper"),
    Definition("Mean, std, max", ("Activations", "Pruning", "Report"),
               "Over every image and every position of the filter's map where it is measured: mean, population "
               "standard deviation and maximum (streamed as sums, so any image set fits).", "numpy",
               S + "test_every_statistic_equals_a_numpy_computation_on_the_full_tensor"),
    Definition("APoZ", ("Activations", "Pruning", "Report"),
               "Share of the filter's values (all images, all positions) at or below the dead threshold; at "
               "threshold 0, the average percentage of zeros of a ReLU. Given only where the measured output comes "
               "out of a ReLU-family activation (relu, relu6, a ReLU without slope or threshold; through pooling, "
               "flattening, padding or dropout); elsewhere (ELU, swish, GELU, tanh, linear) NaN.",
               "Hu et al. 2016, Network Trimming",
               S + "test_apoz_and_dead_are_not_given_where_the_output_has_no_zero_floor"),
    Definition("Fires", ("Activations",),
               "Share of images on which the filter goes above the dead threshold somewhere (NaN where APoZ is).",
               "numpy", S + "test_every_statistic_equals_a_numpy_computation_on_the_full_tensor"),
    Definition("Dead / near-dead", ("Activations", "Pruning", "Report"),
               "Dead: never above the threshold on any image or position, so APoZ = 1. Near-dead: not dead, "
               "APoZ above the bound (0.99 by default). Neither where APoZ is not given (counted as 'no zero "
               "floor').", "Hu et al. 2016",
               S + "test_dead_and_apoz_follow_the_users_threshold"),
    Definition("Accuracy and chance", ("Model", "Attribution", "Pruning", "Report"),
               "Top-1 accuracy of the explained output on the labelled images, with its Wilson 95% interval; "
               "chance is the share of the most common label. The model is at chance when the interval reaches "
               "it; without labels, when the outputs' mean entropy over log(classes) is above 0.98. Pages that "
               "explain or prune then warn before their results.", "Wilson 1927",
               "tests/test_advice.py::test_a_random_weight_classifier_is_at_chance_and_the_trained_demo_is_not"),
    Definition("Sweep sample", ("Pruning",),
               "The images a sweep measures on: a seeded draw that goes round the classes (each in a seeded "
               "order), so every class is within one image of the others as far as the set allows.",
               "stratified sampling",
               "tests/test_advice.py::test_stratified_samples_are_balanced_seeded_and_grow_by_prefix"),
    Definition("Candidates", ("Pruning", "Report"),
               "dead: every dead or near-dead filter; any other criterion: the lowest share of each layer by it "
               "(APoZ: the highest). The Pruning page, the report and the command line take the criterion and "
               "share from the same link or arguments and list the same filters.", "Li et al. 2017; Hu et al. 2016",
               "tests/test_advice.py::test_the_report_lists_the_candidates_the_pruning_page_lists_for_the_same_link"),
    Definition("Gallery response", ("Filters", "Pruning", "Report"),
               "The filter's mean activation (a 10% border excluded) on the image grown for it by gradient "
               "ascent from noise.", "Olah et al. 2017, Feature Visualization",
               "tests/test_filters.py::test_the_result_activates_its_filter_far_more_than_noise_and_real_images"),
    Definition("No response / never started", ("Filters", "Pruning", "Report"),
               "No response: the final image does not drive the filter above 0. Never started: the ascent never "
               "moved it above 0 at any step after the warm-up (no gradient through its ReLU).",
               "Olah et al. 2017", "tests/test_filters.py::"
               "test_the_response_flag_follows_the_final_image_and_started_follows_the_ascent"),
    Definition("Class-model image", ("Filters",),
               "The input grown by gradient ascent on one class's score before the softmax (or sigmoid).",
               "Simonyan et al. 2014",
               "tests/test_filters.py::test_class_images_use_the_score_before_the_softmax_and_leave_the_model_alone"),
    Definition("Attribution target", ("Attribution", "Report"),
               "A class: its score before the softmax or sigmoid. A model without classes: one filter's mean "
               "activation. Default: the top-1 class, or the strongest channel of the CAM layer.",
               "Simonyan et al. 2014", A + "test_a_filter_target_works_for_models_without_a_class_output"),
    Definition("Saliency", ("Attribution", "Report"),
               "max over colour channels of |d target / d pixel|, scaled to [0, 1] by its maximum.",
               "Simonyan et al. 2014", A + "test_saliency_and_smoothgrad_equal_a_tape_on_the_demo_model"),
    Definition("SmoothGrad", ("Attribution", "Report"),
               "The mean of |gradient| over `samples` noisy copies (Gaussian noise, std = noise x the input's "
               "range, seeded), max over channels, scaled to [0, 1].", "Smilkov et al. 2017",
               A + "test_saliency_and_smoothgrad_equal_a_tape_on_the_demo_model"),
    Definition("Integrated Gradients", ("Attribution", "Report"),
               "(x - x') x the mean gradient along the straight path from the baseline x' (trapezoid rule, `steps` "
               "intervals); summed |.| over channels. Baseline: black pixels or a blurred copy, after the model's "
               "preprocessing; the signed values sum to target(x) - target(x').", "Sundararajan et al. 2017",
               A + "test_integrated_gradients_sum_to_the_score_difference"),
    Definition("Grad-CAM", ("Attribution", "Report"),
               "ReLU(sum over channels k of w_k A_k), w_k = the spatial mean of d target / d A_k, on the CAM layer, "
               "resized to the image. Default CAM layer: the map the head reads, the last conv layer with a map "
               "larger than 1 x 1 followed forward through BatchNorm, activations, Add, Multiply and Concatenate "
               "at the same size, up to the pooling (ResNet50: conv5_block3_out; MobileNetV2: out_relu).",
               "Selvaraju et al. 2017; Keras's Grad-CAM example",
               A + "test_grad_cam_on_a_hand_weighted_model_equals_the_paper"),
    Definition("Grad-CAM++", ("Attribution", "Report"),
               "As Grad-CAM with w_k = sum over positions of alpha ReLU(g), alpha = g^2 / (2 g^2 + sum(A_k) g^3) "
               "(the paper's eq. 19, exponential score).", "Chattopadhay et al. 2018",
               A + "test_cam_maths_on_two_by_two_arrays"),
    Definition("Layer-CAM", ("Attribution", "Report"),
               "ReLU(sum over channels of ReLU(g) x A), position by position.", "Jiang et al. 2021",
               A + "test_cam_maths_on_two_by_two_arrays"),
    Definition("Score-CAM", ("Attribution", "Report"),
               "Each channel upsampled and scaled to [0, 1] masks the image (the rest filled with black pixels); "
               "softmax over channels of the target on the masked images weighs the channels. Only the channels "
               "of largest spatial variance, up to the cap, are used.", "Wang et al. 2020 (Score-CAM, Faster)",
               A + "test_score_cam_keeps_the_channels_of_largest_variance_not_of_largest_mean"),
    Definition("Guided Backprop / Guided Grad-CAM", ("Attribution", "Report"),
               "Gradients passed back through a ReLU only where both its input and the gradient are positive; "
               "Guided Grad-CAM multiplies that map by Grad-CAM.", "Springenberg et al. 2015; Selvaraju et al. 2017",
               A + "test_guided_grad_cam_is_the_product_of_its_parts"),
    Definition("Occlusion", ("Attribution", "Report"),
               "The target's drop when a patch is covered with black pixels, averaged over the patches covering "
               "each pixel; patches every `stride` pixels plus one flush with each far edge, so every pixel is "
               "covered.", "Zeiler & Fergus 2014", A + "test_occlusion_covers_the_edges_when_the_stride_does_not_land_there"),
    Definition("Mass / peak on the object", ("Attribution",),
               "Share of the map's total inside the object's mask; whether the map's maximum falls inside it.",
               "Ground-truth masks of the generated shapes", A + "test_grad_cam_concentrates_its_mass_on_the_object"),
    Definition("Deletion AUC", ("Attribution",),
               "Pixels turned black, the most attributed first, 5% a step; the curve is the target class's "
               "probability (a filter's mean activation clipped at 0, relative to the intact image; not available "
               "when the filter does not fire on it); its area (trapezoid) is lower when the map found what the "
               "target depends on.", "Petsiuk et al. 2018 (RISE)",
               A + "test_deletion_measures_the_class_probability_with_its_random_order_chance_level"),
    Definition("Insertion AUC", ("Attribution",),
               "The black image with the image's pixels put back, the most attributed first, 5% a step; the same "
               "measure as deletion; its area is higher when the map found what the target depends on.",
               "Petsiuk et al. 2018 (RISE)",
               A + "test_deletion_measures_the_class_probability_with_its_random_order_chance_level"),
    Definition("Beats random", ("Attribution",),
               "The same curves with pixels taken in 5 seeded random orders, each with its own area: a map beats "
               "random only when its deletion area is below the lowest of them by more than their spread (max - "
               "min, the measure's noise; insertion: above the highest by more than it); a tie is no win, so on "
               "a model at chance nothing passes.", "Petsiuk et al. 2018",
               A + "test_the_trust_numbers_can_say_yes_and_no"),
    Definition("Sanity check", ("Attribution",),
               "Spearman rank correlation between the map and the map of copies with more and more top layers "
               "re-initialised; a map that stays the same explains the image, not the model.",
               "Adebayo et al. 2018", A + "test_sanity_check_maps_change_when_the_model_is_randomised"),
    Definition("L1 norm", ("Pruning", "Report"),
               "Sum of |weights| of the filter's kernel (depthwise and separable layers: per output channel).",
               "Li et al. 2017", P + "test_scores_equal_numpy_recomputations"),
    Definition("Taylor", ("Pruning",),
               "|mean over images and positions of a x d log p(label) / d a| per filter, a where the filter is "
               "measured (the model's top-1 when there are no labels).", "Molchanov et al. 2017",
               P + "test_taylor_scores_match_a_tape_on_a_softmax_model"),
    Definition("Redundancy and nearest", ("Pruning",),
               "The largest cosine similarity between the filter's kernel and another filter's of its layer, and "
               "which filter that is.", "cosine similarity", P + "test_scores_equal_numpy_recomputations"),
    Definition("FPGM distance", ("Pruning",),
               "The filter's summed Euclidean distance to every other filter of its layer (small: near the "
               "geometric median, replaceable).", "He et al. 2019",
               P + "test_fpgm_ranks_like_the_summed_distance_of_the_paper_on_the_demo_model"),
    Definition("Top-1 agreement, KL, accuracy", ("Pruning",),
               "On the image set: share of images whose top-1 class is unchanged; mean KL(before || after) of the "
               "class distributions (several sigmoid classes: the mean Bernoulli KL); top-1 accuracy against the "
               "labels. Without classes: the relative error ||after - before|| / ||before|| of the outputs.",
               "Kullback & Leibler 1951", P + "test_quality_measures_equal_the_formulas_by_hand"),
    Definition("Sensitivity", ("Pruning",),
               "Each conv layer pruned alone by the criterion from 10% to 90% of its filters (masked), the measures "
               "above at each step, on the sweep sample; layers the criterion cannot rank are left out.",
               "Li et al. 2017",
               P + "test_on_the_demo_model_the_l1_ranking_beats_chance_and_its_inverse_loses"),
    Definition("Ranking against chance", ("Pruning",),
               "One layer pruned by the ranking, by its inverse and by 20 random rankings; the verdict counts the "
               "random rankings beaten (ties do not count).", "Blalock et al. 2020",
               P + "test_the_verdict_counts_wins_not_ties_and_knows_which_way_is_better"),
    Definition("Leave-one-out cost", ("Pruning",),
               "The loss increase when the filter alone is zeroed: cross-entropy against the labels (else the "
               "unpruned top-1); without classes, the relative output error.", "Molchanov et al. 2019",
               P + "test_leave_one_out_equals_zeroing_each_filter_by_hand"),
    Definition("Criterion vs true cost", ("Pruning",),
               "Spearman's rho between each criterion as an importance (APoZ flipped) and the leave-one-out cost.",
               "Spearman 1904", P + "test_importance_correlation_is_spearmans_rho_with_apoz_flipped"),
    Definition("Dependency groups and the smaller model", ("Pruning",),
               "Channels tied by adds, concatenations, depthwise layers and batch norms go together; the smaller "
               "model's outputs equal the masked model's.", "Fang et al. 2023 (DepGraph)",
               P + "test_the_smaller_model_equals_the_masked_one_and_loses_exactly_those_parameters"),
    Definition("bfloat16 results (marked \"Computed in bfloat16\")", ("Activations", "Filters", "Attribution",
                                                                     "Pruning", "Report"),
               "Heavy passes run on a copy computing in bfloat16 (float32 weights; sums, maxima, softmax and "
               "gradients handed on in float32) where the hardware has bfloat16 units and the model measures 1.2x "
               "faster; else, and with \"Exact (float32)\", float32. Tolerances measured against float32 "
               "(bench/precision.py): dead flags agree on at least 99.9% of filters, APoZ within 0.08, filter means "
               "within 1%, pruning scores' Spearman rho at least 0.998, saliency and CAM maps correlate at least 0.99 "
               "on trained VGG16 (0.96 on untrained nets); Integrated Gradients always runs in float32 (its "
               "completeness would drift to 1.4%).", "Kalamkar et al. 2019 (bfloat16)",
               "tests/test_precision.py::test_statistics_of_the_bfloat16_copy_stay_within_the_stated_tolerance"),
    Definition("BN scale", ("Pruning", "Report"),
               "|gamma| of the BatchNormalization that first normalises the filter's channel on its way forward "
               "(right after it, or after the residual add or concatenation it feeds, at its place there); empty "
               "where the channel meets none.", "Liu et al. 2017 (Network Slimming)",
               R + "test_bn_scale_follows_a_group_through_a_residual_add"),
    Definition("Standard error and reliability", ("Activations", "Pruning"),
               "A data criterion's standard error over the images: the standard deviation of each image's value "
               "(share of zeros, mean, mean a x g) over sqrt(images). Per layer, reliability = 1 - mean(se²) / "
               "variance of the scores between its filters: the share of their spread that is not sampling noise; "
               "under 0.5 the criterion cannot tell the layer's filters apart on these images.",
               "classical test theory (reliability)",
               R + "test_reliability_says_when_a_criterion_cannot_tell_a_layers_filters_apart"),
    Definition("BN recalibration", ("Pruning",),
               "After a cut, each BatchNorm's moving mean and variance re-estimated on the fine-tuning images: the "
               "mean and population variance of its input as the cut model computes it (batch moments merged "
               "exactly; a second pass in inference mode when the images take several batches).",
               "Li et al. 2020 (EagleEye)",
               R + "test_recalibrated_batchnorms_hold_the_mean_and_variance_of_their_inputs"),
    Definition("Recovery", ("Pruning",),
               "Accuracy (with its Wilson interval) and cross-entropy on a held-out quarter drawn class by class, "
               "before pruning, and for the chosen cut and a random cut of whole groups to the same number of "
               "parameters (within 1% where the groups allow): right after the cut, after BN recalibration, and "
               "after fine-tuning until the validation loss (a fifth of the other images) has not improved for the "
               "patience, the best epoch kept.", "Blalock et al. 2020; Mittal et al. 2018",
               R + "test_recovery_sets_the_cut_beside_a_random_cut_of_the_same_size_at_every_stage"),
    Definition("Distillation", ("Pruning",),
               "Fine-tuning loss (1 - w) CE(labels) + w T² KL(softmax(teacher / T) || softmax(student / T)), the "
               "unpruned model the teacher, T = 4, w = 0.7 (sigmoid heads: per class Bernoulli).",
               "Hinton et al. 2015", R + "test_distillation_loss_equals_the_formula"),
    Definition("What the cut forgets", ("Pruning", "Report"),
               "Per class, accuracy before and after on the same images (Wilson intervals), and a flag where the "
               "class lost more answers (net of those it won) than a random draw of as many images from the set "
               "would, by an exact one-sided permutation test (the multivariate hypergeometric law of lost and won "
               "answers; p < 0.05 / classes, at least 5 images); the changed images are those whose top-1 class "
               "changed.",
               "Hooker et al. 2019", R + "test_per_class_forgetting_equals_numpy_and_flips_are_the_changed_answers"),
    Definition("Latency and throughput", ("Pruning", "Report"),
               "The median time of a warm compiled prediction of zeros here: milliseconds per image at batch 1, "
               "and images per second at batch 64 (cut to the server's activation budget).", "measured",
               "tests/test_pruning_targets.py::test_latency_is_the_median_time_of_a_compiled_prediction_per_image"),
)


def for_page(page: str) -> list[Definition]:
    return [row for row in DEFINITIONS if page in row.pages]


def markdown(rows=DEFINITIONS, tests_on_hover: bool = False) -> str:
    """The table as Markdown: docs/definitions.md, and each page's expander, where the test that checks a figure
    is a mark whose hover names it (`tests_on_hover`, HTML), so the three reading columns keep their width."""
    if tests_on_hover:
        lines = ["| Figure | Definition | Reference |", "| --- | --- | --- |"]
        for row in rows:
            checked = html.escape(f"Checked by {row.test}", quote=True)
            lines.append(f'| {row.figure} <span title="{checked}">✓</span> | {row.formula} | {row.reference} |')
        return "\n".join(lines) + "\n"
    lines = ["| Figure | Definition | Reference | Checked by |", "| --- | --- | --- | --- |"]
    for row in rows:
        test = row.test.replace("::", " :: ")
        lines.append(f"| {row.figure} | {row.formula} | {row.reference} | `{test}` |")
    return "\n".join(lines) + "\n"


def document() -> str:
    return ("# Definitions\n\nEvery figure CNN Audit shows, the same in the dashboard, the report and the API: its "
            "formula, its reference, and the test that checks it against an independent computation (by hand, "
            "numpy, or the paper's formula). Written by `python -m audit.definitions > docs/definitions.md` "
            "from `audit/definitions.py`, which the pages also read.\n\n" + markdown())


if __name__ == "__main__":
    print(document(), end="")
