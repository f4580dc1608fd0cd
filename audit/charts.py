"""Per-layer figures that stay readable from 5 to 500 layers, for the pages and the report alike.

The networks people audit have 50-300 conv layers (ResNet152: 155, EfficientNetB7: about 270), so a figure
never gives a layer its own legend entry or its own tick label past a handful: layers run along the x axis
in network order, one column each, the axis names the stages (from the nesting and the layer names:
ResNet's conv4, EfficientNet's block3, VGG's block5) with light bands between them, and the layer's full
name is on hover. Where several measures meet several layers, a heat map; the top layers in words
(`top_layers`), since no one reads 300 bars.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go

NAMED_LAYERS = 30
"""Up to this many layers every tick is the layer's name; past it, the stages name the axis."""

MAX_TICKS = 24
"""At most this many stage labels on an axis (every other stage past that): they must not overlap."""

MAX_LEGEND = 12
"""No figure has more legend entries than this (tests/test_app.py checks every page and the report)."""

DEAD_COLOURS = {"dead": "#d62728", "near_dead": "#ff7f0e", "alive": "#2ca02c", "no_zero_floor": "#c7c7c7"}
"""The dead-filter counts' columns (activations.dead_counts) and their colours, the same on every page."""

_DIGITS = re.compile(r"\d")


def stage_of(path: str) -> str:
    """The stage a layer belongs to, from its path and name: the nested model's name, then the first part of
    the layer's name that carries a number ("conv4_block2_1_conv" -> "conv4", "block3a_expand" -> "block3",
    "block_13_expand" -> "block_13", "block5_conv3" -> "block5"); a name without a number is its own stage
    ("stem_conv" -> "stem")."""
    *outer, name = path.split("/")
    parts = name.split("_")
    stage = parts[0]
    for number, part in enumerate(parts):
        if _DIGITS.search(part):
            stage = "_".join(parts[:number + 1])
            break
    stage = re.sub(r"(\d)[a-z]$", r"\1", stage)  # EfficientNet's sub-blocks 3a, 3b belong to stage 3
    return "/".join([*outer[:1], stage])


def stage_runs(layers: list[str]) -> list[tuple[str, int, int]]:
    """(stage, first position, last position) of each run of consecutive layers in one stage."""
    runs: list[tuple[str, int, int]] = []
    for position, layer in enumerate(layers):
        stage = stage_of(layer)
        if runs and runs[-1][0] == stage:
            runs[-1] = (stage, runs[-1][1], position)
        else:
            runs.append((stage, position, position))
    return runs


def layer_axis(figure: go.Figure, layers: list[str], axis: str = "x", title: str = "layer, in network order",
               bands: bool = True) -> go.Figure:
    """Positions 0..n-1 of `layers` on `axis` named by the layers (few) or their stages (many), with light
    bands over every other stage; the traces must be placed at those positions."""
    count = len(layers)
    if count <= NAMED_LAYERS:
        values, text = list(range(count)), list(layers)
    else:
        runs = stage_runs(layers)
        values, text = [], []
        for stage, first, _ in runs:  # a stage's name where it starts, if the last name is far enough behind
            if not values or first - values[-1] >= count / MAX_TICKS:  # short stages (ResNet's conv1-2) share one
                values.append(first)
                text.append(stage)
        title = f"{count} layers in network order, by stage (hover for names)"
        if bands:
            for stage, first, last in runs[1::2]:
                band = dict(type="rect", layer="below", line_width=0, fillcolor="rgba(128,128,128,0.08)")
                if axis == "x":
                    figure.add_shape(**band, xref="x", yref="paper", x0=first - 0.5, x1=last + 0.5, y0=0, y1=1)
                else:
                    figure.add_shape(**band, yref="y", xref="paper", y0=first - 0.5, y1=last + 0.5, x0=0, x1=1)
    update = figure.update_xaxes if axis == "x" else figure.update_yaxes
    update(tickmode="array", tickvals=values, ticktext=text, title_text=title, range=[-0.5, count - 0.5],
           tickangle=-45 if axis == "x" else 0, showgrid=False)
    return figure


def layer_bars(frame: pd.DataFrame, values: list[str], colours: dict[str, str] | None = None, layer: str = "layer",
               barmode: str = "stack", names: dict[str, str] | None = None, value_title: str = "filters",
               hover: list[str] = (), log: bool = False, height: int = 360) -> go.Figure:
    """One column per row of `frame` (a layer, in network order), one trace per value column (a legend of
    the measures, never of the layers); `hover` adds columns to each bar's hover text."""
    layers = list(frame[layer].astype(str))
    positions = np.arange(len(layers))
    extra = "".join(f"<br>{column}: %{{customdata[{number + 1}]}}" for number, column in enumerate(hover))
    custom = np.column_stack([layers, *(frame[column].astype(str) for column in hover)]) if len(layers) else None
    figure = go.Figure()
    for column in values:
        label = (names or {}).get(column, column.replace("_", " "))
        figure.add_bar(x=positions, y=frame[column], name=label, customdata=custom,
                       marker_color=(colours or {}).get(column), marker_line_width=0,
                       hovertemplate=f"%{{customdata[0]}}<br>{label}: %{{y:,}}{extra}<extra></extra>")
    figure.update_layout(showlegend=len(values) > 1)
    return _bars_layout(figure, layers, barmode, value_title, log, height)


def _bars_layout(figure: go.Figure, layers: list[str], barmode: str, value_title: str, log: bool,
                 height: int) -> go.Figure:
    """What every per-layer bar figure shares: bars touching past 60 layers, the legend above, the value axis
    with separators, the layer axis (layer_axis)."""
    figure.update_layout(barmode=barmode, bargap=0.1 if len(layers) < 60 else 0, height=height,
                         margin=dict(t=30, b=10), legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0))
    figure.update_yaxes(title_text=value_title, type="log" if log else "linear", separatethousands=True)
    return layer_axis(figure, layers)


def layer_groups(frame: pd.DataFrame, value: str, group: str, layer: str = "layer", colours: dict | None = None,
                 value_title: str | None = None, log: bool = False, height: int = 360) -> go.Figure:
    """Bars of one value per layer coloured by a column with a few values (a layer's type, why a filter goes):
    one trace per group value, so the legend lists the groups (at most MAX_LEGEND; the rest are "other")."""
    frame = frame.reset_index(drop=True)
    counts = frame[group].value_counts()
    kinds = (frame[group] if len(counts) <= MAX_LEGEND
             else frame[group].where(frame[group].isin(counts.index[:MAX_LEGEND - 1]), "other"))
    layers = list(frame[layer].astype(str))
    figure = go.Figure()
    for kind in dict.fromkeys(kinds):
        rows = kinds == kind
        figure.add_bar(x=np.flatnonzero(rows), y=frame.loc[rows, value], name=str(kind),
                       customdata=np.column_stack([frame.loc[rows, layer].astype(str), frame.loc[rows, group].astype(str)]),
                       marker_color=(colours or {}).get(kind), marker_line_width=0,
                       hovertemplate=f"%{{customdata[0]}} (%{{customdata[1]}})<br>{value_title or value}: %{{y:,}}"
                                     "<extra></extra>")
    return _bars_layout(figure, layers, "stack", value_title or value, log, height)


def layer_heatmap(matrix: pd.DataFrame, colour_title: str, scale: str = "Viridis", zmin: float | None = None,
                  zmax: float | None = None, text_format: str | None = None, row_title: str = "",
                  height: int | None = None) -> go.Figure:
    """A heat map with one column per layer (the matrix's columns, in network order) and one row per measure
    or setting (its index): sensitivity per share pruned, a criterion's correlation per layer. Values are
    written in the cells while they fit (`text_format`, up to NAMED_LAYERS layers)."""
    layers = [str(column) for column in matrix.columns]
    rows = [str(index) for index in matrix.index]
    written = text_format is not None and len(layers) <= NAMED_LAYERS
    figure = go.Figure(go.Heatmap(
        z=matrix.to_numpy(dtype=float), x=np.arange(len(layers)), y=rows, colorscale=scale, zmin=zmin, zmax=zmax,
        customdata=np.tile(np.array(layers, dtype=object), (len(rows), 1)),
        texttemplate=f"%{{z:{text_format}}}" if written else None, colorbar=dict(title=colour_title),
        hovertemplate=f"%{{customdata}}<br>{row_title or 'row'}: %{{y}}<br>{colour_title}: %{{z:.3g}}<extra></extra>"))
    figure.update_layout(height=height or 120 + 28 * len(rows), margin=dict(t=10, b=10))
    figure.update_yaxes(title_text=row_title, type="category")
    return layer_axis(figure, layers, bands=False)


def top_layers(frame: pd.DataFrame, value: str, count: int = 3, layer: str = "layer", largest: bool = True,
               format_value=lambda v: f"{v:,.0f}") -> str:
    """The `count` layers with the largest (or smallest) `value`, in words: "fc1 (102,764,544), ...";
    rows without a value are skipped."""
    known = frame.dropna(subset=[value])
    chosen = known.nlargest(count, value) if largest else known.nsmallest(count, value)
    return ", ".join(f"{row[layer]} ({format_value(row[value])})" for _, row in chosen.iterrows())


def dead_bars(counts: pd.DataFrame) -> go.Figure:
    """The dead, near-dead and alive filters of each layer (activations.dead_counts), for the page and the report."""
    return layer_bars(counts, list(DEAD_COLOURS), DEAD_COLOURS, names={"no_zero_floor": "no zero floor"})


def most_idle(counts: pd.DataFrame) -> str:
    """The three layers with the most dead or near-dead filters, in words ("" when there are none)."""
    idle = counts.assign(idle=counts.dead + counts.near_dead)
    return top_layers(idle[idle.idle > 0], "idle") if idle.idle.any() else ""
