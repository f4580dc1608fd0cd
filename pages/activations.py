"""Activations page: what one layer sees in the current image, and which filters never fire."""

import numpy as np
import plotly.express as px
import streamlit as st

from audit import activations, models, render
from pages import common, jobs, links

selection = common.current()
loaded = selection.model
st.title("Activations")
common.what_these_mean("Activations")

table = common.layer_table(loaded.fingerprint, loaded.source)
map_layers = [row.path for row in table.itertuples() if row.output_shape is not None
              and len(row.output_shape) == 4 and not row.is_container and row.type != "InputLayer"]
conv = [row.path for row in table.itertuples() if row.is_conv]
default_layer = conv[0] if conv else map_layers[0]
layer = links.selectbox(st, "Layer", map_layers, index=map_layers.index(default_layer), param="layer",
                        key=f"act_layer_{loaded.fingerprint}")
fused = models.has_fused_activation(models.get_layer(loaded.model, layer))
before = links.toggle(st, "Before the activation", param="before", key="act_before", disabled=not fused,
                   help="For layers with a fused activation such as Conv2D(activation='relu'): "
                        "the map before it, as MATLAB shows conv5 against relu5.")

with common.user_errors():
    maps = common.layer_maps(loaded.fingerprint, loaded.source, layer, selection.image_key,
                             selection.image.pixels, selection.preprocessing, selection.fit,
                             before and fused, selection.device)
channels = maps.shape[-1]
rows, cols = activations.grid_shape(channels)
st.subheader(f"All {channels} channels of {layer}" + (" (before the activation)" if before and fused else ""))
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
shown = common.fitted_image(selection)
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
           "the threshold, so APoZ = 1; near-dead: the others with APoZ above the bound.")
with st.form("stats_form"):
    chosen = links.multiselect(st, "Layers", map_layers, default=conv or map_layers[:1], param="stats_layers",
                               key=f"stats_layers_{loaded.fingerprint}")
    c1, c2 = st.columns(2)
    threshold = links.number(c1, "Dead threshold", None, None, 0.0, step=0.01, format="%.3f", param="threshold",
                             key="stats_threshold")
    near = links.number(c2, "Near-dead APoZ above", 0.5, 1.0, 0.99, step=0.005, slider=True, param="apoz",
                        key="stats_apoz")
    run = st.form_submit_button("Compute statistics", type="primary")
key_layers = tuple(chosen)
stats_key = common.stats_key(selection, key_layers, threshold)
if chosen and jobs.job_shown(selection, "stats", run, stats_key, jobs.has_result(stats_key),
                               len(selection.image_set)):
    with common.user_errors():
        stats = common.filter_stats(selection, key_layers, float(threshold))
    counts = activations.dead_counts(stats, near)
    figure = px.bar(counts, x="layer", y=["dead", "near_dead", "alive"],
                    color_discrete_map={"dead": "#d62728", "near_dead": "#ff7f0e", "alive": "#2ca02c"},
                    labels={"value": "filters", "variable": ""})
    figure.update_layout(barmode="stack", height=380, margin=dict(t=10), xaxis_tickangle=-45)
    st.plotly_chart(figure, width="stretch")
    st.dataframe(counts, hide_index=True, width="stretch")
    with st.expander("Dead filters per layer"):
        for name, group in stats[stats.dead].groupby("layer", sort=False):
            st.markdown(f"**{name}** ({len(group)}): {', '.join(map(str, group['filter']))}")
    st.dataframe(stats, hide_index=True, width="stretch", height=300)
    st.download_button("Download statistics (CSV)", stats.to_csv(index=False), "filter_stats.csv", "text/csv")
elif not chosen:
    st.info("Choose at least one layer.")
