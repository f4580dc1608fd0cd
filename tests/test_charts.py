"""Per-layer figures of deep networks: stage names on the axis never closer than a 24th of the axis."""

import plotly.graph_objects as go

from audit import charts


def test_short_stages_share_a_tick_so_their_names_never_crowd():
    # ResNet152's stages by block (its shortcut convs left out): conv1 1 layer, conv2 9, conv3 24, conv4 108, conv5 9
    layers = (["conv1_conv"] + [f"conv2_block{b}_{k}_conv" for b in range(1, 4) for k in (1, 2, 3)]
              + [f"conv3_block{b}_{k}_conv" for b in range(1, 9) for k in (1, 2, 3)]
              + [f"conv4_block{b}_{k}_conv" for b in range(1, 37) for k in (1, 2, 3)]
              + [f"conv5_block{b}_{k}_conv" for b in range(1, 4) for k in (1, 2, 3)])
    figure = charts.layer_axis(go.Figure(), layers)
    values, text = list(figure.layout.xaxis.tickvals), list(figure.layout.xaxis.ticktext)
    assert text == ["conv1", "conv3", "conv4", "conv5"]  # conv2 starts 1 layer after conv1: it shares its tick
    assert values == [0, 10, 34, 142]  # 151 layers: names at least 151 / 24 = 6.3 layers apart
    assert min(b - a for a, b in zip(values, values[1:])) >= len(layers) / charts.MAX_TICKS
    assert figure.layout.xaxis.tickangle == -45 and figure.layout.xaxis.range == (-0.5, len(layers) - 0.5)
