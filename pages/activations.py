"""Activations page: what one layer sees in the current image, and which filters never fire."""

import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from audit import activations, charts, models, render, runs, sampling
from pages import activations_jobs, common, jobs, links, markup
from pages.selection import current, fitted_image, user_errors, what_these_mean

selection = current()
loaded = selection.model
st.title("Activations")
what_these_mean("Activations")

table = common.layer_table(loaded.fingerprint, loaded.source)
map_layers = common.map_layers(loaded.fingerprint, loaded.source)
conv = [row.path for row in table.itertuples() if row.is_conv]
default_layer = conv[0] if conv else map_layers[0]
layer = links.selectbox(st, "Layer", map_layers, index=map_layers.index(default_layer), param="layer",
                        key=f"act_layer_{loaded.fingerprint}")
fused = models.has_fused_activation(models.get_layer(loaded.model, layer))
before = links.toggle(st, "Before the activation", param="before", key="act_before", disabled=not fused,
                   help="For layers with a fused activation such as Conv2D(activation='relu'): "
                        "the map before it, as MATLAB shows conv5 against relu5.")
if not fused:
    st.caption(f"{markup.escape(layer)} has no fused activation, so there is no map before it: its activation, if "
               "any, is a layer of its own in the list.")

with user_errors():
    maps = common.layer_maps(loaded.fingerprint, loaded.source, layer, selection.image_key,
                             selection.image.pixels, selection.preprocessing, selection.fit,
                             before and fused, selection.device)
channels = maps.shape[-1]
rows, cols = activations.grid_shape(channels)
st.subheader(f"All {channels} channels of {markup.escape(layer)}" + (" (before the activation)" if before and fused else ""))
st.caption(f"{maps.shape[0]}×{maps.shape[1]} maps in a {rows}×{cols} grid, each scaled to [0, 1] on its own "
           "(black: its minimum, white: its maximum).")
grid = activations.montage(maps)
st.image(grid, clamp=True, width="stretch")
st.download_button("Montage (PNG)", render.png(grid), f"{layer}_channels.png", "image/png", key="act_montage_png")

st.subheader("One channel over the image")
strongest = activations.strongest_channel(maps)
left, right = st.columns([1, 3])
channel = links.number(left, "Channel", 0, channels - 1, strongest, param="channel", key=f"act_channel_{layer}")
left.caption(f"Strongest channel: **{strongest}** (max {maps[..., strongest].max():.3g}).")
opacity = links.number(left, "Opacity", 0.0, 1.0, 0.5, slider=True, param="opacity", key="act_opacity")
colour_map = links.selectbox(left, "Colour map", render.COLOUR_MAPS, param="cmap", key="act_cmap")
shown = fitted_image(selection)
upsampled = activations.upsample(maps[..., channel], shown.shape[:2])
columns = right.columns(3)
columns[0].image(shown, caption="input (as the model sees it)", width="stretch")
columns[1].image(render.colourise(upsampled, colour_map), caption=f"channel {channel}, resized",
                 width="stretch")
picture = render.overlay(shown, render.scale01(upsampled), opacity, colour_map)
columns[2].image(picture, caption="overlay", width="stretch")
columns[2].download_button("Overlay (PNG)", render.png(picture), f"{layer}_channel{channel}.png", "image/png",
                           key="act_overlay_png")
values = maps[..., channel]
st.caption(f"Channel {channel}: mean {values.mean():.3g}, max {values.max():.3g}, "
           f"zeros {np.mean(values <= 0):.0%} of positions.")

st.divider()
st.subheader("Filter statistics over the image set")
st.caption(f"{len(selection.image_set)} images. APoZ: the share of a filter's values (all images, all positions) "
           "at or below the threshold (at 0, the average percentage of zeros of Hu et al. 2016). Dead: never above "
           "the threshold, so APoZ = 1; near-dead: the others with APoZ above the bound. A conv's filters are "
           "measured where their channel is used: after its BatchNorm and activation (the `measured_at` column)."
           + common.precision_note(selection))


def show_stats(stats, near: float, name: str) -> None:
    """Dead, near-dead and alive filters per layer (chart and table), the dead ones by name, every row, CSV;
    and which layers have no zero floor, so no dead or near-dead count."""
    counts = activations.dead_counts(stats, near)
    unfloored = activations.unfloored_layers(stats)
    if len(unfloored):
        named = ", ".join(markup.escape(row.layer) + (f" (at {markup.escape(row.measured_at)})" if row.measured_at != row.layer else "")
                          for row in unfloored.head(6).itertuples())
        more = f" and {len(unfloored) - 6} more" if len(unfloored) > 6 else ""
        st.info(f"{len(unfloored)} of {len(counts)} layers are measured where the output has no zero floor: "
                f"{named}{more}. There a value at or below 0 is not \"off\" (an ELU, swish or linear output, a "
                "BatchNorm before a residual Add), so their APoZ, fires and dead are not given (grey in the chart) "
                "and the APoZ-based pruning criteria leave them out.", icon=":material/info:")
    st.plotly_chart(charts.dead_bars(counts), width="stretch", key=f"{name}_chart")
    most = charts.most_idle(counts)
    if most:
        st.caption("Most dead or near-dead filters: " + markup.escape(most)
                   + f"; {int(counts.dead.sum()):,} dead and {int(counts.near_dead.sum()):,} near-dead in all.")
    st.dataframe(counts, hide_index=True, width="stretch", key=f"{name}_counts")
    with st.expander("Dead filters per layer"):
        for layer_name, group in stats[stats.dead].groupby("layer", sort=False):
            st.markdown(f"**{markup.escape(layer_name)}** ({len(group)}): {', '.join(map(str, group['filter']))}")
    st.dataframe(stats, hide_index=True, width="stretch", height=300, key=f"{name}_rows")
    st.download_button("Download statistics (CSV)", stats.to_csv(index=False), f"{name}.csv", "text/csv",
                       key=f"{name}_csv")


with st.form("stats_form"):
    chosen = links.multiselect(st, "Layers", map_layers, default=conv or map_layers[:1], param="stats_layers",
                               key=f"stats_layers_{loaded.fingerprint}")
    c1, c2 = st.columns(2)
    threshold = links.number(c1, "Dead threshold", None, None, 0.0, step=0.01, format="%.3f", param="threshold",
                             key="stats_threshold")
    near = links.number(c2, "Near-dead APoZ above", 0.5, 1.0, 0.99, step=0.005, slider=True, param="apoz",
                        key="stats_apoz")
    measure_at = links.selectbox(st, "Measure each filter at", list(activations.MEASURE_AT), param="measure_at",
                                 key="stats_measure_at", format_func=activations.MEASURE_AT.get, radio=True,
                                 horizontal=True,
                                 help="Where the decision to cut lives: a filter is used after its BatchNorm and "
                                      "activation. The raw output is there for comparison.")
    run = st.form_submit_button("Compute statistics", type="primary")
key_layers = tuple(chosen)
stats_key = activations_jobs.stats_key(selection, key_layers, threshold, measure_at)
if chosen and jobs.job_shown(selection, "stats", run, stats_key, jobs.has_result(stats_key),
                               len(selection.image_set), images=len(selection.image_set)):
    with user_errors():
        stats = activations_jobs.filter_stats(selection, key_layers, float(threshold), measure_at)
    show_stats(stats, near, "filter_stats")
elif not chosen:
    st.info("Choose at least one layer.")

if selection.stream is not None:
    stream = selection.stream
    st.markdown(f"#### The whole folder: {len(stream):,} images")
    st.caption("The statistics above use the images decoded for the pages. Here the chosen layers are measured "
               "on a seeded sample of the whole folder that doubles from the first size to the last; each "
               "doubling reads only the images it adds. The dead and near-dead counts have settled when they "
               "stay the same over the last two doublings.")
    with st.form("grow_form"):
        c1, c2 = st.columns(2)
        start = links.number(c1, "Start with (images)", 1, len(stream), min(250, len(stream)), param="grow_from",
                             key=f"grow_from_{stream.key()}")
        largest = links.number(c2, "Grow up to (images)", 1, len(stream), min(len(stream), 8 * int(start)),
                               param="grow_to", key=f"grow_to_{stream.key()}")
        grow = st.form_submit_button("Compute on a growing sample", type="primary")
    start, largest = int(start), max(int(start), int(largest))
    grow_key = activations_jobs.growing_key(selection, key_layers, threshold, start, largest, measure_at) if chosen else None
    if chosen and jobs.job_shown(selection, "grow", grow, grow_key, jobs.has_result(grow_key), largest):
        with user_errors():
            steps = activations_jobs.growing_stats(selection, key_layers, float(threshold), start, largest, measure_at)
        history = pd.concat([sampling.history_row(count, part, near) for count, part in steps.groupby("images")],
                            ignore_index=True)
        totals = history.groupby("images", as_index=False)[["dead", "near_dead"]].sum()
        sizes = sorted(int(n) for n in history.images.unique())
        figure = px.line(totals.rename(columns={"near_dead": "near-dead"}), x="images", y=["dead", "near-dead"],
                         markers=True, log_x=True, labels={"value": "filters, all chosen layers", "variable": ""})
        figure.update_layout(height=320, margin=dict(t=10))
        figure.update_xaxes(tickvals=sizes, ticktext=[f"{n:,}" for n in sizes], title="images in the sample")
        st.plotly_chart(figure, width="stretch", key="growth_chart")
        moving = sampling.moving_layers(history)
        if len(moving):
            st.caption(f"Counts that changed at the last doubling ({len(moving)} of {history.layer.nunique()} layers): "
                       + markup.escape(", ".join(moving[:8])) + (" and more" if len(moving) > 8 else "") + ".")
        whole = sizes[-1] >= len(stream)
        if sampling.settled(history):
            st.success(f"Settled: every layer's dead and near-dead counts are the same at "
                       f"{', '.join(f'{n:,}' for n in sizes[-3:])} images"
                       + (" (the whole folder is in)." if whole else "."), icon=":material/check_circle:")
        elif whole:
            st.warning(f"The whole folder is in ({len(stream):,} images) and the counts have not settled over the "
                       "last doublings: with this folder they are known only to within the last doubling's changes; more "
                       "images of the same kind would settle them.", icon=":material/trending_up:")
        elif len(sizes) < 3:
            st.warning(f"Only {len(sizes)} sample size{'s' if len(sizes) > 1 else ''} measured: grow up to at least "
                       f"four times the start to see whether the counts settle.", icon=":material/trending_up:")
        else:
            st.warning(f"Still moving at {sizes[-1]:,} images: the counts changed over the last two doublings. "
                       f"Grow the sample further (the folder has {len(stream):,}).", icon=":material/trending_up:")
        show_stats(steps[steps.images == sizes[-1]].drop(columns="images"), near, "folder_stats")

finished = runs.finished(loaded.fingerprint, ("stats", "scores"))
if finished:
    st.markdown("#### Runs from the command line")
    st.caption("Finished `cnn-audit stats` and `scores` runs of this model on this server (see the README): "
               "a big set is audited once and reviewed here.")
    run = st.selectbox("Run", finished, key="finished_run", format_func=lambda r: (
        f"{runs.WHATS[r['what']]} of {r['images']:,} images in {Path(r['root']).name}, threshold {r['threshold']:g}, "
        f"finished {time.strftime('%Y-%m-%d %H:%M', time.localtime(r['finished']))}"))
    with user_errors():
        show_stats(activations_jobs.finished_run(run["folder"], run["finished"]), near, "run_" + Path(run["folder"]).name)
