"""Filters page: what each filter is looking for, grown from noise; first-layer kernels; class images."""

from dataclasses import asdict

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from audit import charts, filters, models, render
from pages import activations_jobs, common, filters_jobs, jobs, links, markup
from pages.selection import current, stop, user_errors, what_these_mean

selection = current()
loaded = selection.model
st.title("Filters")
what_these_mean("Filters")
st.caption("Each tile is an input grown from noise by gradient ascent on the mean activation of one filter "
           "(border excluded), in pixels or in a decorrelated Fourier basis (Olah et al. 2017). Under each tile: "
           "the filter's final activation on its own image." + common.precision_note(selection))

FLAT_SCORE = 1e-6  # class scores all below this after the ascent: nothing was grown
PICKS = {"First N": "first", "By index": "index", "Top N by mean activation on the image set": "top"}
BASES = {"pixel": "Pixels", "fourier": "Fourier, decorrelated colour"}
conv = models.conv_layers(loaded.model)
layer = links.selectbox(st, "Layer", conv, param="layer", key=f"filters_layer_{loaded.fingerprint}")
channels = models.output_channels(loaded.model, layer)

left, right = st.columns([1, 1])
how = links.selectbox(left, "Filters", PICKS, param="pick", key="filters_how", radio=True, horizontal=True,
                     show=PICKS.get, format_func=str)
if how == "By index":
    typed = links.text(left, "Indices (comma-separated)", "0, 1, 2, 3", param="filters", key="filters_indices")
    try:
        indices = sorted({int(part) for part in typed.replace(" ", "").split(",") if part})
    except ValueError:
        st.error("Indices must be whole numbers separated by commas.")
        stop()
    bad = [i for i in indices if not 0 <= i < channels]
    if bad or not indices:
        st.error(f"{markup.escape(layer)} has filters 0 to {channels - 1}; {bad or 'none given'} cannot be drawn.")
        stop()
else:
    count = links.number(left, "N", 1, channels, min(8, channels), slider=True, param="n", key="filters_n",
                        help="All of a layer's filters give its no-response count; on a CPU a deep layer "
                             "takes about 4 s per filter, so start small.")
    if how == "First N":
        indices = list(range(count))
    else:
        if not jobs.started(selection, f"Rank the filters on {len(selection.image_set):,} images",
                            activations_jobs.stats_key(selection, (layer,), 0.0, "used"),
                            len(selection.image_set), "filters_rank", where=left):
            stop()
        with user_errors():
            stats = activations_jobs.filter_stats(selection, (layer,), 0.0)
        indices = list(stats.sort_values("mean", ascending=False)["filter"].head(count).astype(int))

with right.expander("Ascent options", expanded=False):
    basis = links.selectbox(st, "Image parameterisation", BASES, param="basis", key=f"filters_basis_{layer}",
                            index=list(BASES).index(filters.default_parameterization(loaded.model, layer)), radio=True,
                            horizontal=True, format_func=BASES.get,
                            help="Fourier: the image's spectrum scaled by 1/frequency and its colours in a "
                                 "decorrelated basis, moved by Adam (Lucid's fft=True, decorrelate=True); it needs "
                                 "no octaves, blur or decay and shows less high-frequency noise.")
    fourier = basis == "fourier"
    defaults = filters.default_options(loaded.model, layer, selection.preprocessing, basis)
    pixels_only = "Not used by the Fourier image: its basis already favours low frequencies." if fourier else None
    size = links.number(st, "Image size", 32, 224, defaults.size, step=16, slider=True, param="size",
                        key="filters_size")
    steps = links.number(st, "Steps", 1, 200, defaults.steps, slider=True, param="steps", key=f"filters_steps_{layer}")
    learning_rate = links.number(st, "Learning rate", 0.001, 1.0, defaults.learning_rate, format="%.3f", param="lr",
                                 key=f"filters_lr_{basis}")
    octaves = links.number(st, "Octaves (multi-scale growth)", 1, 4, defaults.octaves, slider=True, param="octaves",
                           key=f"filters_octaves_{layer}_{basis}", disabled=fourier, help=pixels_only)
    jitter = links.number(st, "Jitter (pixels)", 0, 16, defaults.jitter, slider=True, param="jitter",
                          key="filters_jitter")
    scale = links.number(st, "Random scale (±)", 0.0, 0.2, defaults.scale, step=0.01, slider=True, param="scale",
                         key="filters_scale")
    blur_every = links.number(st, "Blur every k steps (0: off)", 0, 20, defaults.blur_every, slider=True,
                              param="blur", key=f"filters_blur_{layer}_{basis}", disabled=fourier, help=pixels_only)
    l2_decay = links.number(st, "L2 decay", 0.0, 0.1, defaults.l2_decay, format="%.4f", param="l2",
                            key=f"filters_l2_{layer}_{basis}", disabled=fourier, help=pixels_only)
    total_variation = links.number(st, "Total variation weight", 0.0, 1.0, defaults.total_variation, format="%.3f",
                                   param="tv", key=f"filters_tv_{layer}_{basis}")
    copies = links.number(st, "Images per filter", 1, filters.MAX_COPIES, 1, slider=True, param="copies",
                          key="filters_copies", help="Several images per filter, each from its own noise; with a "
                          "diversity weight they are pushed to differ (Lucid's diversity objective).")
    diversity = links.number(st, "Diversity weight", 0.0, 10.0, 1.0 if copies > 1 else 0.0, format="%.2f",
                             param="diversity", key=f"filters_diversity_{copies > 1}", disabled=copies == 1,
                             help="How much a unit of Gram-matrix similarity between the copies costs, in units of "
                                  "the filter's own activation." if copies > 1 else "Needs two images per filter.")
    negative = links.toggle(st, "Negative images (what pushes the filter down)", param="negative",
                            key="filters_negative", help="Descends instead of ascending, on the filter's value "
                            "before its activation (below a ReLU's zero nothing pushes further).")
    warmup = links.number(st, "Warm-up steps on the pre-activation", 0, 50, defaults.warmup, slider=True,
                          param="warmup", key=f"filters_warmup_{layer}",
                          help="A filter whose ReLU never opens from noise gets no gradient; ascending the "
                               "pre-activation first lets it start (Lucid's redirected ReLU, Xplique's warm-up).")
    seed = links.number(st, "Seed", 0, 2**31 - 1, 0, param="ascent_seed", key="filters_seed")
options = filters.Options(**{**asdict(defaults), "size": size, "steps": steps, "learning_rate": learning_rate,
                             "octaves": 1 if fourier else octaves, "jitter": jitter, "scale": scale,
                             "blur_every": 0 if fourier else blur_every, "l2_decay": 0.0 if fourier else l2_decay,
                             "total_variation": total_variation, "warmup": warmup, "copies": copies,
                             "diversity": diversity if copies > 1 else 0.0, "negative": negative})
key = tuple(int(i) for i in indices)
grow = st.button("Grow the gallery", type="primary", key="filters_go")
cached = filters_jobs.has_gallery(selection, layer, key, options, int(seed))
if jobs.job_shown(selection, "gallery", grow, (layer, key, options, int(seed)), cached,
                    jobs.ascent_passes(selection, len(key), options)) or cached:
    with user_errors():
        result = filters_jobs.gallery(selection, layer, key, options, int(seed))
    never, silent = int((~result.started).sum()), int((~result.responded).sum())
    images_shown = len(key) * options.copies
    if negative:
        st.subheader(f"{markup.escape(layer)}: what pushes {len(key)} filters down, {silent} of {images_shown} "
                     "images not below 0")
        st.caption("Each tile descends the filter's mean value before its activation: the pattern it is pushed "
                   "down by. Under each tile: that value on the final image (negative when it worked).")
    else:
        st.subheader(f"{markup.escape(layer)}: {len(key)} filters, {silent} with no response")
        st.caption(f"No response: the final image does not drive the filter's mean activation above "
                   f"{filters.RESPONSE_THRESHOLD:g} ({silent} of {images_shown}). Never started: the ascent never "
                   f"moved it above 0 at any step, so no gradient flowed through its ReLU ({never} of {images_shown}); "
                   "a warm-up on the pre-activation (below) tells a dead filter from one that only failed to start.")
    examples_key = filters_jobs.examples_key(selection, layer, key)
    pressed = st.button(f"What they fire on in your {len(selection.image_set)} images", key="filters_examples",
                        help="The images of the set where each filter's peak activation is highest, cut at its "
                             "receptive field around the peak.")
    found = None
    if jobs.job_shown(selection, "examples", pressed, examples_key, jobs.has_result(examples_key),
                      len(selection.image_set)):
        with user_errors("Finding the dataset examples"):
            found, cut = filters_jobs.examples(selection, layer, key)
        st.caption(f"Under each tile, what the filter fires on in your images: the {filters_jobs.EXAMPLES_SHOWN} "
                   f"images of the set ({len(selection.image_set)}) where its peak activation is highest, each cut "
                   f"at the filter's receptive field around the peak (measured at "
                   f"{markup.escape(found.attrs['measured_at'])}, where the filter is used); a field under "
                   f"{filters.CONTEXT_SIDE} px is framed in yellow inside a window of that side.")
    columns = st.columns(min(8, len(key)))
    for position, index in enumerate(key):
        column = columns[position % len(columns)]
        for copy in range(options.copies):
            n = position * options.copies + copy
            flag = ("" if result.responded[n] else
                    " · not below 0" if negative else
                    " · never started" if not result.started[n] else " · no response")
            column.image(result.images[n], caption=f"#{index} · {result.activations[n]:.3g}{flag}", width="stretch")
        if found is not None:
            rows = [n for n, f in enumerate(found["filter"]) if f == index]
            names = [selection.image_set[int(found["image"].iloc[n])].name for n in rows]
            column.image(render.patch_grid([cut[n] for n in rows], filters_jobs.EXAMPLES_SHOWN), width="stretch",
                         caption=markup.escape(f"fires on {', '.join(names)} (peak {found['activation'].iloc[rows[0]]:.3g})")
                         if rows else "no examples")
    downloads = st.columns(2)
    downloads[0].download_button("Gallery (PNG)", render.png(render.tiles(list(result.images))), f"{layer}_gallery.png",
                                 "image/png", key="filters_png")
    responses = pd.DataFrame({"filter": np.repeat(key, options.copies),
                              "copy": np.tile(np.arange(options.copies), len(key)),
                              "activation": result.activations, "responded": result.responded,
                              "started": result.started})
    downloads[1].download_button("Responses (CSV)", responses.to_csv(index=False), f"{layer}_gallery.csv", "text/csv",
                                 key="filters_csv")
    names = [f"#{i}" + (f" ({copy + 1})" if options.copies > 1 else "") for i in key for copy in range(options.copies)]
    curves = pd.DataFrame(result.curves.T, columns=names).rename_axis("step").reset_index()
    figure = px.line(curves, x="step", y=curves.columns[1:],
                     labels={"value": "mean value before the activation" if negative else "mean activation",
                             "variable": "filter"})
    figure.update_layout(height=300, margin=dict(t=10), showlegend=len(names) <= charts.MAX_LEGEND)
    st.plotly_chart(figure, width="stretch")
    if len(names) > charts.MAX_LEGEND:
        st.caption(f"One line per image ({len(names)}): hover a line for its filter.")

    st.markdown("**Dead, or only failed to start?** A zero loss is not proof of a dead filter: from noise the "
                "ReLU may never open, so no gradient flows.")
    other = filters.Options(**{**asdict(options), "warmup": 0 if warmup else 5})
    comparable = options.copies == 1 and not negative
    compare = st.button("Compare with and without warm-up", key="filters_compare", disabled=not comparable,
                        help=None if comparable else "Compares one positive image per filter: set one image per "
                                                     "filter and turn negative images off.")
    if comparable and jobs.job_shown(selection, "compare", compare, (layer, key, other, int(seed)),
                      filters_jobs.has_gallery(selection, layer, key, other, int(seed)),
                      jobs.ascent_passes(selection, len(key), other)):
        with user_errors():
            second = filters_jobs.gallery(selection, layer, key, other, int(seed))
        cold, warm = (result, second) if not warmup else (second, result)
        counts = st.columns(4)
        counts[0].metric("Never started, no warm-up", int((~cold.started).sum()))
        counts[1].metric("No response, no warm-up", int((~cold.responded).sum()))
        counts[2].metric("No response, with warm-up", int((~warm.responded).sum()))
        dead = common.dead_filters(selection, layer)
        if dead is not None:
            counts[3].metric("Dead on the image set", f"{dead} of {channels}",
                             help="Filters never above 0 on any image of the set (Activations page statistics).")
        st.dataframe(pd.DataFrame({
            "filter": key,
            "never started without warm-up": ~cold.started,
            "no response without warm-up": ~cold.responded,
            "no response with warm-up": ~warm.responded,
        }), hide_index=True)
        if dead is None:
            st.caption(f"How many of {markup.escape(layer)}'s filters are dead on the image set (never above 0) is known once its "
                       "statistics are computed (Activations page, **Compute statistics**).")
else:
    st.info("Choose the filters and press **Grow the gallery**: on a CPU a deep layer takes a minute.")

st.divider()
st.subheader("First-layer weights")
with user_errors():
    first, tiles = filters.first_layer_weights(loaded.model)
st.caption(f"The kernels of {markup.escape(first)} drawn as RGB tiles (each scaled to [0, 1]): they act on pixels directly.")
grid = st.columns(16)
for index, tile in enumerate(tiles[:64]):
    grid[index % 16].image(np.kron(tile, np.ones((8, 8, 1))), clamp=True, caption=str(index), width="stretch")

st.divider()
st.subheader("Class-model images")
if not selection.head.is_classifier:
    st.info(f"The model has no class output, so there are no class-model images ({markup.escape(selection.head.description)}).")
else:
    common.warn_if_at_chance(selection)
    names = selection.class_names()
    # the first 1,000 classes: a million options broke the browser's picker
    picked = links.multiselect(st, "Classes", range(min(len(names), 1000)), default=list(range(min(6, len(names)))),
                               format_func=names.__getitem__, show=names.__getitem__, param="classes",
                               key="filters_classes")
    st.caption("The input that maximises the class score before the softmax or sigmoid (Simonyan et al. "
               "2014), read from the model's own graph; the model is not changed."
               + (" Random weights: these images show the architecture, not anything learnt." if loaded.untrained
                  else ""))
    class_options = filters.Options(**{**asdict(options), "warmup": 0})
    class_key = tuple(int(i) for i in picked)
    grow_classes = st.button("Grow class images", key="filters_classes_go")
    cached = filters_jobs.has_gallery(selection, "", class_key, class_options, int(seed), classes=True)
    if picked and (jobs.job_shown(selection, "class_images", grow_classes, (class_key, class_options, int(seed)),
                                    cached, jobs.ascent_passes(selection, len(class_key), class_options))
                   or cached):
        with user_errors():
            result = filters_jobs.gallery(selection, "", class_key, class_options, int(seed), classes=True)
        largest = float(np.max(np.abs(result.activations)))
        if largest < FLAT_SCORE:
            st.warning(f"The class scores stay near 0 (largest {largest:.2g}): their gradients are too small to grow "
                       "an image, as with random or untrained weights, so these images are still close to their "
                       "starting noise.", icon=":material/blur_on:")
        columns = st.columns(min(6, len(class_key)))
        for position, index in enumerate(class_key):
            columns[position % len(columns)].image(result.images[position], width="stretch",
                                                   caption=f"{markup.escape(names[index])} · score {result.activations[position]:.3g}")
