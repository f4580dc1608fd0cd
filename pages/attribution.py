"""Attribution page: which pixels made the model say what it said, by several methods side by side."""

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from audit import attribution, images, models, render
from pages import attribution_jobs, common, jobs, links, markup
from pages.selection import current, fitted_image, section, stop, user_errors, what_these_mean

selection = current()
loaded = selection.model
st.title("Attribution")
what_these_mean("Attribution")
st.caption("Gradients are taken on the class score before the softmax or sigmoid, or on the mean activation of "
           "one filter (the target for models without a class output)." + common.precision_note(selection)
           + (" Integrated Gradients runs in float32, to keep its completeness." if selection.precision == "bfloat16"
              else ""))

x = loaded.preprocess(selection.image.pixels, selection.preprocessing, selection.fit)[0]
shown = fitted_image(selection)
convs = models.conv_layers(loaded.model)
with user_errors("The prediction"):
    output = selection.predict()
    cam_default, cam_why = common.cam_layer(loaded.fingerprint, loaded.source)

LISTED_CLASSES = 1000  # classes a target picker lists (ImageNet's 1,000 all); a bigger head offers its most likely

left, right = st.columns([2, 1])
if selection.head.is_classifier:
    names = selection.class_names()
    top = np.argsort(output)[::-1][:5]
    right.dataframe(pd.DataFrame({"class": [names[i] for i in top], "probability": output[top]}), hide_index=True,
                    column_config={"probability": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0,
                                                                                   format="%.3f")})
    # a million-class head listed every class in the browser's picker (a RangeError there, 3.5 GB here)
    listed = range(len(names)) if len(names) <= LISTED_CLASSES else np.argsort(output)[::-1][:LISTED_CLASSES]
    if len(names) > LISTED_CLASSES:
        left.caption(f"The {LISTED_CLASSES:,} most likely of {len(names):,} classes are offered.")
    chosen = links.selectbox(left, "Target class", [int(i) for i in listed], index=0 if len(names) > LISTED_CLASSES
                             else int(top[0]),
                             format_func=lambda i: f"{names[i]}" + (" (top-1)" if i == top[0] else ""),
                             show=names.__getitem__, param="target",
                             key=f"attr_class_{loaded.fingerprint}_{selection.image_key}")  # a new image: its top-1
    target = ("class", int(chosen))
    label = names[chosen]
else:
    target_layer = links.selectbox(left, "Target: a filter of layer", convs, index=len(convs) - 1,
                                   param="target_layer", key=f"attr_target_layer_{loaded.fingerprint}")
    with user_errors():
        maps = common.layer_maps(loaded.fingerprint, loaded.source, target_layer, selection.image_key,
                                 selection.image.pixels, selection.preprocessing, selection.fit, False,
                                 selection.device)
    strongest = int(np.argmax(maps.mean(axis=(0, 1))))
    index = links.number(left, "Filter", 0, maps.shape[-1] - 1, strongest, param="filter",
                         key=f"attr_filter_{target_layer}",
                              help=f"Default: the filter with the largest mean activation here ({strongest}).")
    target = ("filter", target_layer, int(index))
    label = f"filter {index} of {target_layer}"
    right.info("This model has no class output: the target is one filter's mean activation.")

cam_options = common.map_layers(loaded.fingerprint, loaded.source)
cam_layer = links.selectbox(left, "CAM layer", cam_options, index=cam_options.index(cam_default), param="cam_layer",
                            key=f"attr_cam_layer_{loaded.fingerprint}",
                            help=f"Default: {markup.escape(cam_default)}, {markup.escape(cam_why)}.")
if cam_layer == cam_default:
    left.caption(f"CAM layer {markup.escape(cam_default)}: {markup.escape(cam_why)}.")
methods = links.multiselect(st, "Methods", list(attribution.METHODS), param="methods", key="attr_methods",
                            default=["Saliency", "SmoothGrad", "Integrated Gradients", "Grad-CAM", "Grad-CAM++"])
size = min(x.shape[:2])
black = loaded.preprocess(np.zeros_like(selection.image.pixels), selection.preprocessing, selection.fit)[0]
# the cache key of maps and curves: the model's exact input and baseline (image, preprocessing and fit all in it)
input_key = images.image_hash([x, black])
with st.expander("Method options"):
    c1, c2, c3 = st.columns(3)
    samples = links.number(c1, "SmoothGrad samples", 5, 100, 25, slider=True, param="samples", key="attr_samples")
    noise = links.number(c1, "SmoothGrad noise (share of range)", 0.0, 0.5, 0.15, step=0.01, slider=True,
                         param="noise", key="attr_noise")
    steps = links.number(c2, "Integrated Gradients steps", 8, 128, 32, slider=True, param="ig_steps",
                         key="attr_steps")
    baseline = links.selectbox(c2, "Baseline", ("black", "blurred"), radio=True, horizontal=True, param="baseline",
                               key="attr_baseline")
    channels = links.number(c3, "Score-CAM channels (cap)", 4, 128, 32, slider=True, param="channels",
                            key="attr_channels", help="Only the channels of largest spatial variance mask the "
                                                      "image (Faster Score-CAM): a flat channel masks nothing.")
    default_patch, default_stride = attribution.occlusion_defaults(size)
    patch = links.number(c3, "Occlusion patch", 2, size // 2, default_patch, slider=True, param="patch",
                         key="attr_patch")
    stride = links.number(c3, "Occlusion stride", 1, size // 2, default_stride, slider=True, param="stride",
                          key="attr_stride")
opacity = links.number(st, "Opacity", 0.0, 1.0, 0.5, slider=True, param="opacity", key="attr_opacity")
colour_map = links.selectbox(st, "Colour map", render.COLOUR_MAPS, index=2, param="cmap", key="attr_cmap")


def options_for(method: str) -> tuple:
    cam = {"layer": cam_layer}
    chosen_output = {} if selection.output is None else {"output": selection.output}
    return tuple(sorted({**chosen_output, **{
        "SmoothGrad": {"samples": samples, "noise": noise},
        "Integrated Gradients": {"steps": steps, "baseline": baseline},
        "Grad-CAM": cam, "Grad-CAM++": cam, "Layer-CAM": cam, "Guided Grad-CAM": cam,
        "Score-CAM": {**cam, "max_channels": channels},
        "Occlusion": {"patch": patch, "stride": stride},
    }.get(method, {})}.items()))


if not methods:
    st.info("Choose at least one method.")
    stop()


def passes(method: str) -> float:
    """Image passes of a method (a backward pass counts as two forward ones); its trust curves are their own job."""
    steps_of = {"SmoothGrad": 3 * samples, "Integrated Gradients": 3 * (steps + 1), "Score-CAM": channels + 2,
                "Guided Grad-CAM": 6,
                "Occlusion": ((size - patch) // stride + 2) ** 2}
    return steps_of.get(method, 3)


# a method whose maps would take long starts on a click, never by itself (a link cannot start hours of work)
approved = st.session_state.setdefault("_approved_maps", set())
waiting = [m for m in methods if (m, options_for(m)) not in approved
           and not jobs.within_link_budget(selection, passes(m))]
for method in waiting:
    cost = jobs.estimate(selection, passes(method))
    if st.button(f"Compute {method} ({cost} here)", key=f"attr_go_{method}"):
        approved.add((method, options_for(method)))
waiting = [m for m in waiting if (m, options_for(m)) not in approved]
ready = [m for m in methods if m not in waiting]

common.warn_if_at_chance(selection)
st.subheader(f"Why {markup.escape(label)}?")
# the grid is laid out first and each map fills its place as soon as it is ready, the cheapest first
per_row = min(4, len(ready) + 1)
places = {}
for position, method in enumerate([None, *ready]):
    if position % per_row == 0:  # a new row of columns, so every row starts level
        columns = st.columns(per_row)
    if method is None:
        columns[0].image(shown, caption="image", width="stretch")
    else:
        places[method] = columns[position % per_row].empty()
        places[method].caption(f"{method}: waiting…")
results = {}
with jobs.progress_bar("Attribution maps", on_cancel=approved.clear) as progress, attribution.shared_passes():
    for done, method in enumerate(sorted(ready, key=passes)):  # the CAM methods share one pass
        progress(done, len(ready), f"{done} of {len(ready)} maps ready; computing {method}")
        with section(method):
            values = attribution_jobs.attribution_map(
                selection, input_key, x, black, target, method, options_for(method),
                on_cancel=lambda method=method: approved.discard((method, options_for(method))))
            picture = render.overlay(shown, values, opacity, colour_map)
            with places[method].container():
                st.image(picture, caption=method, width="stretch")
                st.download_button("PNG", render.png(picture), f"{method.replace(' ', '_').lower()}.png", "image/png",
                                   key=f"png_{method}")
            results[method] = values
        if method not in results:
            places[method].caption(f"{method}: failed (the message is below).")
results = {method: results[method] for method in ready if method in results}  # the table in the chosen order

st.subheader("Can the maps be trusted?")
maps = {method: (values, options_for(method)) for method, values in results.items()}
trust_passes = attribution_jobs.TRUST_PASSES * len(maps) + attribution_jobs.RANDOM_TRUST_PASSES
cheap = jobs.within_link_budget(selection, trust_passes)
pressed = cheap or st.button(f"Measure deletion and insertion ({jobs.estimate(selection, trust_passes)} here)",
                             key="attr_trust")
key = attribution_jobs.trust_key(selection, input_key, target, maps)
if maps and jobs.job_shown(selection, "trust", pressed, key, cheap or jobs.has_result(key), trust_passes):
    with user_errors("Deletion and insertion"):
        curves = attribution_jobs.trust_curves(selection, input_key, x, black, target, maps)
    chance = curves["random orders"]
    rows = []
    for method, values in results.items():
        row = {"method": method}
        if selection.masks is not None:  # the shape's mask, fitted to the model's input as its image was
            mask = images.fit_mask(selection.masks[[item.name for item in selection.image_set].index(
                selection.image.name)], loaded.input_size, selection.fit)
            row["mass on the object"] = attribution.mass_inside(values, mask)
            row["peak on the object"] = attribution.peak_inside(values, mask)
        row["deletion AUC (lower is better)"] = curves[method]["deletion"][2]
        row["insertion AUC (higher is better)"] = curves[method]["insertion"][2]
        for kind in ("deletion", "insertion"):
            row[f"beats random ({kind})"] = attribution.beats_random(kind, curves[method][kind][2], chance[kind][2])
        rows.append(row)
    trust = pd.DataFrame(rows)
    st.dataframe(trust, hide_index=True, width="stretch", column_config=common.number_columns(trust))
    measure = attribution.deletion_measure(attribution_jobs.target_of(target))
    deletion_areas, insertion_areas = chance["deletion"][2], chance["insertion"][2]
    if not np.all(np.isfinite(deletion_areas)):
        st.warning(f"Deletion and insertion are not available for {markup.escape(label)}: the filter does not fire on the intact "
                   "image, so there is no share of its activation to follow.", icon=":material/block:")
    else:
        spread = {kind: chance[kind][2].max() - chance[kind][2].min() for kind in ("deletion", "insertion")}
        st.caption(f"Deletion (Petsiuk et al. 2018): {attribution.DELETED_BY} replace the image; insertion puts the "
                   f"image's pixels back on the black image in the same order. The curve is {measure}. A map "
                   f"**beats random** only when its area is better than each of {len(deletion_areas)} seeded random "
                   "orders by more than they differ among themselves: deletion below "
                   f"{deletion_areas.min() - spread['deletion']:.4f} (the random areas span "
                   f"{deletion_areas.min():.4f}–{deletion_areas.max():.4f}), insertion above "
                   f"{insertion_areas.max() + spread['insertion']:.4f}. It fails when a random order does about as "
                   "well: on a model at chance, whose outputs do not move, no map can pass.")
        if attribution.saturated(chance["deletion"]):
            first = chance["deletion"][1]
            st.warning(f"Deletion saturates on this image: the first 5% of pixels removed in random order already "
                       f"take the score from {first[0]:.3g} to {first[1]:.3g}, so the deletion areas differ only in "
                       "that first step and say little about the maps; insertion tells them apart better here.",
                       icon=":material/compress:")
    if selection.masks is not None:
        st.caption(f"The object covers {mask.mean():.0%} of the image: a map spread evenly would put that share of "
                   "its mass on it.")
    kind = st.radio("Curves", ("deletion", "insertion"), horizontal=True, key="attr_curve_kind")
    lines = [pd.DataFrame({"share": curves[m][kind][0], "score": curves[m][kind][1], "method": m}) for m in results]
    lines.append(pd.DataFrame({"share": chance[kind][0], "score": chance[kind][1],
                               "method": f"random orders (mean of {len(deletion_areas)})"}))
    figure = px.line(pd.concat(lines), x="share", y="score", color="method",
                     labels={"share": f"share of pixels {'removed' if kind == 'deletion' else 'inserted'} (most "
                                      "attributed first)", "score": measure})
    figure.update_layout(height=320, margin=dict(t=10))
    st.plotly_chart(figure, width="stretch")

st.subheader("Sanity check: randomise the model from the top")
st.caption("Adebayo et al. 2018: each step re-initialises one more weighted layer, from the output down, and "
           "computes the map again.")
left, right = st.columns(2)
method = left.selectbox("Method", methods, key="attr_sanity_method")
weighted = len(models.weighted_layers(loaded.model))
limit = right.number_input("Layers to randomise, from the top", 1, max(weighted, 1), min(weighted, 8),
                           key="attr_sanity_limit")
pressed = st.button("Run the sanity check", key="attr_sanity_go")
sanity_key = ("sanity", loaded.fingerprint, input_key, target, method, options_for(method), int(limit),
              selection.precision)
if jobs.job_shown(selection, "sanity", pressed, sanity_key, jobs.has_result(sanity_key), int(limit) * passes(method)):
    def randomise_layer_after_layer():
        options = {**dict(options_for(method)), **attribution.black_options(method, black)}
        with jobs.model_job(selection, "Randomising layer after layer", "sanity") as progress:
            checks = attribution.sanity_check(attribution_jobs.compute_for(selection, method), x,
                                              attribution.METHODS[method], attribution_jobs.target_of(target),
                                              limit=int(limit), progress=progress, **options)
        return pd.DataFrame(checks, columns=["randomised down to", "rank correlation"])

    with user_errors("The sanity check"):
        frame = jobs.shared_result(sanity_key, randomise_layer_after_layer)
    chart = px.line(frame, x="randomised down to", y="rank correlation", markers=True, range_y=[-1, 1])
    chart.update_layout(height=300, margin=dict(t=10))
    st.plotly_chart(chart, width="stretch")
    st.caption("A map that stays the same while the weights become random explains the image, not the model.")
