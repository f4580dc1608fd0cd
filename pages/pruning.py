"""Pruning page: which filters the model can lose, the evidence, what cutting them costs, a smaller model."""

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from audit import activations, charts, filters, images, models, pruning, render
from pages import candidates as candidates_choice
from pages import common, filters_jobs, jobs, links, markup, pruning_jobs, smaller_model
from pages.selection import current, fitted_image, folder_labels, labels_of, stop, user_errors, what_these_mean

# ways to compare the pruned model's outputs with the unpruned ones, by their column in pruning.quality
# (a bare string here would be drawn on the page by Streamlit's magic)
MEASURES = {"top-1 agreement": "agreement", "KL divergence": "kl"}
MEASURES_WITH_LABELS = {"accuracy": "accuracy", **MEASURES}

selection = current()
loaded = selection.model
st.title("Pruning")
what_these_mean("Pruning")
st.caption(f"Scores over the current image set ({len(selection.image_set)} images). Candidates are filters "
           "to remove; everything above Recovery is measured before any fine-tuning." + common.precision_note(selection))

common.warn_if_at_chance(selection)
image_count = len(selection.image_set)
if not jobs.started(selection, f"Score every filter on {image_count:,} images", pruning_jobs.scores_key(selection),
                    3 * image_count, "prune_scores"):  # a forward and a backward pass (Taylor) per image
    stop()
with user_errors("Scoring the filters"):
    scores = pruning_jobs.filter_scores(selection)

criterion, target = candidates_choice.choose(st, scores)
with user_errors():
    selection_map, params_kept, macs_kept = pruning_jobs.chosen_filters(selection, scores, criterion, target)
    candidates = pruning.proposed(scores, selection_map, criterion)
unfloored = scores[scores.apoz.isna()].groupby("layer", sort=False).size()
if len(unfloored) and criterion in ("dead", "apoz"):
    st.caption(f"{markup.count(len(unfloored), 'layer')} have no APoZ and no dead filters and are left out: their filters are "
               "used after an activation without a zero floor (ELU, swish, linear; see the Activations page).")
measured_on = "apoz" if criterion == "dead" else criterion
if measured_on in pruning.SAMPLING_ERRORS:
    trust = pruning.reliability(scores, measured_on)
    blurred = trust[~trust.distinct]
    if len(blurred):
        st.warning(
            f"On these {len(selection.image_set):,} images, {pruning.CRITERIA[criterion]} cannot tell the filters "
            f"apart in {markup.count(len(blurred), 'layer')} of {len(trust):,}: most of the spread between their "
            f"filters is sampling noise (under {pruning.RELIABLE:.0%} of it is not): "
            + markup.escape(", ".join(blurred.layer[:8]) + (" ..." if len(blurred) > 8 else "")) + ". "
            + ("After a BatchNorm, a filter's share of zeros and its mean are set by the BatchNorm's shift and scale, "
               "not by how much the filter matters: rank by BN scale, or add images." if scores.bn_scale.notna().any()
               else "More images would tell them apart, or a weight criterion (L1, FPGM)."),
            icon=":material/blur_on:")

counts = scores.groupby("layer", sort=False).size().rename("total").to_frame()
counts["candidates"] = candidates.groupby("layer", sort=False).size()
counts = counts.fillna(0).astype(int).reset_index()
figure = charts.layer_bars(counts, ["total", "candidates"], {"candidates": "#d62728", "total": "#c7c7c7"},
                           barmode="overlay", height=320)
st.subheader(f"{markup.count(len(candidates), 'candidate')} of {markup.count(len(scores), 'filter')}")
kept_columns = st.columns(3)
kept_columns[0].metric("Channels of the scored layers removed", f"{len(candidates) / len(scores):.1%}")
kept_columns[1].metric("Parameters kept", f"{params_kept:.1%}")
kept_columns[2].metric("Multiply-adds kept", f"{macs_kept:.1%}")
st.caption("Whole dependency groups, least important first (each layer's scores over its mean, averaged over the "
           "group): the share asked is the share of channels really removed, coupled ones included"
           + ("." if criterion != "dead" else "; here every dead or near-dead filter with its group."))
st.plotly_chart(figure, width="stretch")
if len(candidates):
    st.caption("Most candidates: " + markup.escape(charts.top_layers(counts[counts.candidates > 0], "candidates")) + ".")

responses = common.ascent_responses(loaded.fingerprint)
scores = scores.assign(ascent=[responses.get((layer, int(index)), np.nan) for layer, index in
                               zip(scores["layer"], scores["filter"])])
candidates = scores.loc[candidates.index]
layer_pick = links.selectbox(st, "Filters of layer", list(counts["layer"]), param="scatter_layer",
                             key="prune_scatter_layer")
shown = scores[scores.layer == layer_pick].assign(candidate=lambda f: f["filter"].isin(selection_map.get(layer_pick, [])))
floored = shown.apoz.notna().all()  # APoZ on the y axis where defined, else the mean activation
scatter = px.scatter(shown.assign(status=np.where(shown.candidate, "candidate", "kept")), x="l1",
                     y="apoz" if floored else "mean",
                     color="redundancy", symbol="status", symbol_map={"candidate": "x", "kept": "circle"},
                     custom_data=["filter"], hover_data={"filter": True, "mean": ":.3g", "nearest": True,
                                                         "fpgm": ":.3g", "taylor": ":.3g", "ascent": ":.3g"},
                     labels={"l1": "L1 norm", "apoz": "APoZ", "mean": "mean activation", "ascent": "gallery response",
                             "status": "", "redundancy": "redundancy (cosine)"},
                     color_continuous_scale="Viridis")
scatter.update_layout(height=380, margin=dict(t=10), showlegend=False)  # the symbols are told below, in words
st.caption("Each point a filter of the layer, coloured by its redundancy (cosine similarity to its nearest "
           "filter); ✕ marks a candidate, ● a kept filter. Click a filter to see its evidence below. The gallery "
           "response is known for filters whose gallery was drawn (Filters page, or the button below).")
event = st.plotly_chart(scatter, width="stretch", on_select="rerun", selection_mode="points",
                        key=f"prune_scatter_{layer_pick}")
evidence_key = f"evidence_{loaded.fingerprint}_{layer_pick}"
points = event.selection.points if event is not None else []
custom = points[0].get("customdata") if points else None  # the filter index (a list, or a dict by position)
clicked = None if custom is None else int(custom[0] if isinstance(custom, list) else custom["0"])
if clicked is not None and clicked != st.session_state.get("_last_click"):
    st.session_state[evidence_key] = clicked  # a new click chooses the filter; typing still works after
st.session_state["_last_click"] = clicked
layer_filters = int(shown["filter"].max()) + 1
first_candidate = selection_map.get(layer_pick, [0])[0]
index = links.number(st, "Evidence for filter", 0, layer_filters - 1, int(first_candidate), param="evidence",
                     key=evidence_key)
row = shown[shown["filter"] == index].iloc[0]
apoz_said = f"APoZ {row.apoz:.1%}" if np.isfinite(row.apoz) else f"no APoZ (no zero floor at {markup.escape(row.measured_at)})"
st.caption(f"Filter {index} of {markup.escape(layer_pick)}: L1 {row.l1:.3g}, {apoz_said}, mean {row['mean']:.3g} at {markup.escape(row.measured_at)}, "
           f"most similar to filter {int(row.nearest)} (cosine {row.redundancy:.2f})"
           + (", a candidate" if row.candidate else "") + ".")
weights_col, map_col, tile_col = st.columns(3)
# the filter as a plain conv would hold it (depthwise and separable filters composed: pruning.filter_kernels)
kernel_size = getattr(models.get_layer(loaded.model, layer_pick), "kernel_size", (1, 1))
kernel = pruning.filter_kernels(loaded.model, layer_pick)[:, index].reshape(*kernel_size, -1)
if kernel.shape[-1] == 3:
    picture, what = render.scale01(kernel), "its kernel as an RGB tile"
else:
    picture, what = activations.montage(kernel), f"its kernel, one {kernel.shape[0]}×{kernel.shape[1]} slice per input channel"
weights_col.image(np.kron(picture, np.ones((8, 8) + (1,) * (picture.ndim - 2))), clamp=True, width="stretch",
                  caption=f"Weights: {what}")
with user_errors():
    maps = common.layer_maps(loaded.fingerprint, loaded.source, layer_pick, selection.image_key,
                             selection.image.pixels, selection.preprocessing, selection.fit, False, selection.device)
fitted = fitted_image(selection)
values = activations.upsample(maps[..., index], fitted.shape[:2])
map_col.image(render.overlay(fitted, render.scale01(values), 0.5, "Inferno"), width="stretch",
              caption=f"On {markup.escape(selection.image.name)}: max {maps[..., index].max():.3g}")
tile_options = filters.default_options(loaded.model, layer_pick, selection.preprocessing,
                                       filters.default_parameterization(loaded.model, layer_pick))
if filters_jobs.has_gallery(selection, layer_pick, (index,), tile_options, 0) or \
        tile_col.button("Grow its gallery tile", key="evidence_tile"):
    with user_errors():
        tile = filters_jobs.gallery(selection, layer_pick, (index,), tile_options, 0)
    tile_col.image(tile.images[0], width="stretch")
    tile_col.caption(f"Gallery tile: response {tile.activations[0]:.3g}" + (
        "" if tile.responded[0] else " (no response)" if tile.started[0] else " (never started)"))
else:
    tile_col.caption("The input that maximises this filter (gradient ascent, the Filters page's defaults).")
examples_key = filters_jobs.examples_key(selection, layer_pick, (index,))
if jobs.has_result(examples_key) or jobs.within_link_budget(selection, len(selection.image_set), len(selection.image_set)):
    with user_errors("Finding the dataset examples"):
        found, cut = filters_jobs.examples(selection, layer_pick, (index,))
    tile_col.image(render.patch_grid(cut, filters_jobs.EXAMPLES_SHOWN), width="stretch", caption=markup.escape(
        "What it fires on in your images: " + ", ".join(selection.image_set[int(i)].name for i in found["image"])))

st.dataframe(candidates, hide_index=True, width="stretch", height=260, column_config=common.number_columns(candidates))
st.download_button("Download all scores (CSV)", scores.to_csv(index=False), "filter_scores.csv", "text/csv")

st.subheader("Dependency groups")
graph = loaded.dependency_graph()
can_go = set(graph.removable_layers())  # layers with a filter whose group is not locked
group_criterion = criterion if criterion not in ("dead", "apoz") else "l1"
coupled = pruning.group_table(graph, scores, group_criterion)
st.caption("Channels that must go together (Fang et al. 2023, DepGraph): the two sides of a residual add, a "
           "concatenation's slices, a depthwise layer's channel and the filter that makes it, a "
           "squeeze-and-excitation gate. Removing any filter removes its whole group, in the masks and in the "
           f"smaller model alike; a group's score is the sum of its filters' {group_criterion}. Groups reaching the "
           "model's output or a layer the rule does not follow are locked. Groups of a single filter in a plain "
           f"chain are not listed ({markup.count(len(graph.groups()), 'group')} in all).")
if coupled.empty:
    st.info("Every filter of this model is its own group: a plain chain of layers.")
else:
    st.dataframe(coupled, hide_index=True, width="stretch", height=260)

st.subheader("What if they were cut?")
st.caption("The candidates' outputs are zeroed on a copy of the model (the loaded one is untouched) and "
           "compared with the unpruned model on the image set. Quality before fine-tuning.")
if not selection_map:
    st.info("No candidates with this criterion.")
    stop()
head = selection.head
labels = labels_of(selection)
if jobs.started(selection, f"Run both models on the {image_count:,} images",
                pruning_jobs.what_if_key(selection, selection_map), 2 * image_count, "prune_what_if"):
    with user_errors("What-if pruning"):
        before, after = pruning_jobs.what_if(selection, selection_map)
    metrics = st.columns(3)
    measured = pruning.quality(before, after, labels, head.distribution == "sigmoid" and not head.binary,
                               classes=head.is_classifier)
    if head.is_classifier:
        metrics[0].metric("Top-1 agreement", f"{measured['agreement']:.1%}")
        kl = measured["kl"] if abs(measured["kl"]) >= 5e-5 else 0.0  # float round-off around 0 is not "-0.0000"
        metrics[1].metric("Mean KL(before ‖ after)", f"{kl:.4f}")
        if labels is not None:
            unpruned = np.mean(before.argmax(1) == labels)
            metrics[2].metric("Accuracy", f"{measured['accuracy']:.1%}",
                              delta=f"{measured['accuracy'] - unpruned:+.1%}")
    else:
        metrics[0].metric("Relative feature error", f"{measured['feature_error']:.3f}")

st.subheader("Which layers can lose how much?")
ranking_criteria = {name: code for name, code in (("L1 norm", "l1"), ("mean activation", "mean"), ("APoZ", "apoz"),
                                                  ("FPGM distance", "fpgm"), ("Taylor score", "taylor"),
                                                  ("BN scale", "bn_scale"))
                    if scores[code].notna().any()}
rank_by = links.selectbox(st, "Rank filters by", list(ranking_criteria), param="rank_by", key="prune_rank_by",
                          show=ranking_criteria.get, format_func=str)
ranked = pruning.ranked_layers(scores, ranking_criteria[rank_by])
if len(ranked) < len(counts):
    st.caption(f"{len(counts) - len(ranked):,} of {markup.count(len(counts), 'layer')} have no {rank_by} scores and are left out of "
               f"the sweeps: {pruning.unavailable(ranking_criteria[rank_by])}")
measures = (MEASURES_WITH_LABELS if labels is not None else MEASURES if head.is_classifier
            else {"relative feature error": "feature_error"})
if len(measures) > 1:
    measure_name = links.selectbox(st, "Measure", list(measures), param="measure",
                                   key=f"prune_measure_{len(measures)}", radio=True, horizontal=True)
    st.caption(("Accuracy stops at 100% on a robust model; the KL divergence" if "accuracy" in measures else
                "Top-1 agreement stops at 100% on a robust model; the KL divergence")
               + " from the unpruned outputs still tells rankings apart there.")
else:
    measure_name = next(iter(measures))
    st.caption(f"Measured by the {measure_name} of the model's output: it has no class output, so there is no "
               "accuracy or agreement to measure.")
measure = measures[measure_name]
images_count = len(selection.image_set)
sensitivity_cuts = [layer for layer in ranked for _ in range(9)]  # each layer at 9 shares
sweep_images = links.number(st, "Images used by the sweeps", 1, images_count,
                            images.balanced_count(jobs.images_within(selection, sensitivity_cuts, images_count),
                                                  folder_labels(selection)),
                            param="sweep_images", key=f"prune_sweep_images_{images_count}",
                            help="A seeded sample with every class within one image of the others. The default "
                                 "gives a first answer in seconds; more images give steadier curves (the estimate is "
                                 "on each button).")
st.caption(f"The sweeps measure on {common.sample_sentence(selection, sweep_images)}.")
sensitivity_passes = jobs.sweep_passes(selection, sensitivity_cuts, sweep_images)
cost = jobs.estimate(selection, sensitivity_passes)
pressed = st.button(f"Run the sensitivity analysis ({cost} here)", key="prune_sensitivity")
sensitivity_key = pruning_jobs.sensitivity_key(selection, ranking_criteria[rank_by], sweep_images)
if jobs.job_shown(selection, "sensitivity", pressed, sensitivity_key, jobs.has_result(sensitivity_key),
                  sensitivity_passes):
    sensitivity = pruning_jobs.sensitivity(selection, scores, ranking_criteria[rank_by], sweep_images)
    grid = sensitivity.pivot_table(index="fraction", columns="layer", values=measure, sort=False)
    grid = grid[[layer for layer in ranked if layer in grid.columns]]
    grid.index = [f"{fraction:.0%}" for fraction in grid.index]
    lower_is_better = measure in ("kl", "feature_error")
    st.plotly_chart(charts.layer_heatmap(grid, measure_name, "Viridis_r" if lower_is_better else "Viridis",
                                         text_format=".2f", row_title="share pruned"), width="stretch")
    half = sensitivity[np.isclose(sensitivity.fraction, 0.5)]
    st.caption(f"Each layer pruned alone, the others intact (Li et al. 2017), on "
               f"{common.sample_sentence(selection, sweep_images)}: a column that keeps its colour down the rows "
               f"marks a robust layer. Most sensitive at 50% pruned: "
               + markup.escape(charts.top_layers(half, measure, largest=lower_is_better, format_value=lambda v: f"{v:.3g}"))
               + ".")

removable = [layer for layer in ranked if layer in can_go] or ranked
chance_layer = links.selectbox(st, "Does the ranking beat chance? Layer", ranked,
                               index=ranked.index(removable[-1]), param="chance_layer", key="prune_chance_layer",
                               help="Default: the deepest layer with filters that can go (a layer whose channels "
                                    "reach the output, such as an all-convolutional head's class conv, cannot).")
chance_passes = jobs.sweep_passes(selection, [chance_layer] * 22 * 9, sweep_images)
cost = jobs.estimate(selection, chance_passes)
pressed = st.button(f"Compare with the inverted and 20 random rankings ({cost} here)", key="prune_chance")
chance_key = pruning_jobs.chance_key(selection, chance_layer, ranking_criteria[rank_by], sweep_images)
if jobs.job_shown(selection, "chance", pressed, chance_key, jobs.has_result(chance_key),
                  chance_passes):
    runs = pruning_jobs.ranking_against_chance(selection, scores, chance_layer, ranking_criteria[rank_by], sweep_images)
    random = runs[runs.ranking.str.startswith("random")].groupby("fraction")[measure]
    band = pd.DataFrame({"low": random.min(), "high": random.max()}).reset_index()
    chart = px.line(runs[~runs.ranking.str.startswith("random")], x="fraction", y=measure, color="ranking",
                    markers=True,
                    labels={"fraction": f"share of {chance_layer}'s filters pruned", measure: measure_name})
    chart.add_scatter(x=band.fraction, y=band.high, mode="lines", line=dict(width=0), showlegend=False)
    chart.add_scatter(x=band.fraction, y=band.low, mode="lines", line=dict(width=0), fill="tonexty",
                      fillcolor="rgba(128,128,128,0.3)", name="20 random rankings")
    chart.update_layout(height=360, margin=dict(t=10))
    st.plotly_chart(chart, width="stretch")
    verdict = pruning.verdict_against_chance(runs, measure, 0.5)
    st.caption(f"At 50% of {markup.escape(chance_layer)} pruned, by {measure_name}: the chosen ranking beats "
               f"{verdict['beaten']} of {verdict['random']} random rankings (a tie is not a win); the inverted "
               f"ranking is {'worse than every' if verdict['inverted_worst'] else 'not worse than every'} random "
               "one. Quality before fine-tuning.")

st.subheader("Do the scores predict the real cost?")
st.caption("Leave-one-filter-out: each filter alone is zeroed and the loss on the images measured (cross-entropy "
           "against the labels, else the model's own top-1; relative feature error without a class output). "
           "The heat map gives, per layer, the Spearman rank correlation of each criterion (as an importance: "
           "APoZ counts zeros, so its sign is flipped) with that true cost. Positive: the criterion ranks "
           "filters the way cutting them really hurts. Each filter costs a pass of the layers after it.")
all_layers = list(counts["layer"])
filters_of = counts.set_index("layer")["total"]
# the deepest of the layers with the fewest filters that can go: the quickest answer worth having
smallest = filters_of[[layer for layer in filters_of.index if layer in can_go] or filters_of.index][::-1].idxmin()
loo_layers = links.multiselect(st, "Layers", all_layers, default=[smallest], param="loo_layers",
                               key=f"loo_layers_{loaded.fingerprint}",
                               help="Default: the deepest of the smallest layers, for a first answer in seconds; "
                                    "a pass of the layers after it per filter and image.")
loo_count = links.number(st, "Images used", 1, images_count,
                         images.balanced_count(jobs.images_within(selection, [smallest] * int(filters_of[smallest]),
                                                                  min(100, images_count)), folder_labels(selection)),
                         param="loo_images", key=f"loo_images_{images_count}",
                         help="A seeded sample with every class within one image of the others.")
st.caption(f"Measured on {common.sample_sentence(selection, int(loo_count))}.")
loo_passes = jobs.sweep_passes(selection, [layer for layer in loo_layers for _ in range(int(filters_of[layer]))],
                              int(loo_count))
cost = jobs.estimate(selection, loo_passes)
pressed = st.button(f"Measure leave-one-filter-out ({cost} here)", key="prune_loo")
loo_key = pruning_jobs.leave_one_out_key(selection, tuple(loo_layers), int(loo_count))
if loo_layers and jobs.job_shown(selection, "loo", pressed, loo_key, jobs.has_result(loo_key),
                                   loo_passes):
    with user_errors():
        costs = pruning_jobs.leave_one_out(selection, tuple(loo_layers), int(loo_count))
    changes = {layer: group.sort_values("filter")["cost"].to_numpy() for layer, group in costs.groupby("layer", sort=False)}
    correlation = pruning.importance_correlation(scores, changes)
    if not costs.cost.abs().gt(0).any():
        st.info(f"Removing any one of these {len(costs):,} filters alone changes nothing on these images (every cost "
                "is 0): no criterion can be ranked against the cost here. Try other layers or more images.",
                icon=":material/info:")
    else:
        st.plotly_chart(charts.layer_heatmap(correlation.set_index("layer").T, "Spearman", "RdBu", -1, 1,
                                             text_format=".2f", row_title="criterion"), width="stretch")
    pick = links.selectbox(st, "Cost against", [c for c in correlation.columns[1:]], param="loo_criterion",
                           key="loo_criterion")
    merged = costs.merge(scores[["layer", "filter", pick]], on=["layer", "filter"])
    by_layer = merged.layer.nunique() <= charts.MAX_LEGEND  # past that, the colour is the depth, not a legend
    chart = px.scatter(merged.assign(depth=merged.layer.map({layer: n for n, layer in enumerate(all_layers)})),
                       x=pick, y="cost", color="layer" if by_layer else "depth", hover_data=["layer", "filter"],
                       labels={"cost": "loss increase when removed alone", "depth": "layer position"})
    chart.update_layout(height=360, margin=dict(t=10))
    chart.update_xaxes(exponentformat="e")  # 1e-13, not plotly's SI "100f"
    chart.update_yaxes(exponentformat="e")
    st.plotly_chart(chart, width="stretch")
    st.download_button("Download the costs (CSV)", costs.to_csv(index=False), "leave_one_out.csv", "text/csv")

reason = smaller_model.export(selection, selection_map, target)
smaller_model.recovery(selection, selection_map, target, reason)
smaller_model.steps(selection, criterion, target)
