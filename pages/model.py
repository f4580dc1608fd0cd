"""Model page: what the model is, its layer table, where its parameters are, what it says of the image."""

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from pages import common, links

selection = common.current()
loaded = selection.model
model = loaded.model

st.title(f"Model: {loaded.title}")
common.what_these_mean("Model")
st.caption(loaded.description)

table = common.layer_table(loaded.fingerprint, loaded.source)
leaves = table[~table.is_container]
columns = st.columns(5)
columns[0].metric("Layers", len(leaves))
columns[1].metric("Conv layers", int(leaves.is_conv.sum()))
columns[2].metric("Parameters", f"{int(leaves.params.sum()):,}")
columns[3].metric("Input", "×".join(str(s) for s in model.inputs[0].shape[1:]))
columns[4].metric("Preprocessing", selection.preprocessing)

st.subheader("Layers")
show_conv_only = links.toggle(st, "Convolutional layers only", param="conv_only", key="model_conv_only")
shown = table[table.is_conv] if show_conv_only else table
st.dataframe(
    common.displayable(shown), hide_index=True, width="stretch",
    column_config={
        "params": st.column_config.NumberColumn("params", format="localized"),
        "is_conv": st.column_config.CheckboxColumn("conv"),
        "is_container": st.column_config.CheckboxColumn("nested model"),
    },
)
st.download_button("Download the layer table (CSV)", common.displayable(table).to_csv(index=False),
                   file_name=f"{loaded.source.replace(':', '_')}_layers.csv", mime="text/csv")

st.subheader("Parameters per layer")
with_params = leaves[leaves.params > 0]
figure = px.bar(with_params, x="path", y="params", color="type", log_y=links.toggle(st, "Log scale", param="log", key="model_log"),
                labels={"path": "layer", "params": "parameters"}, hover_data=["output_shape", "filters"])
figure.update_layout(xaxis_tickangle=-45, height=420, margin=dict(t=10))
st.plotly_chart(figure, width="stretch")

st.subheader("On the current image")
left, right = st.columns([1, 2])
left.image(selection.image.pixels, caption=selection.image.name + (f" ({selection.image.label})"
                                                                    if selection.image.label else ""))
with common.user_errors("The prediction"):
    output = selection.predict()
head = selection.head
if head.is_classifier:
    names = selection.class_names()
    top = np.argsort(output)[::-1][:5]
    right.dataframe(pd.DataFrame({"class": [names[i] for i in top], "probability": output[top]}), hide_index=True,
                    column_config={"probability": st.column_config.ProgressColumn(
                        "probability", min_value=0.0, max_value=1.0, format="%.3f")})
    right.caption(head.description[0].upper() + head.description[1:] + ".")
    if loaded.untrained:
        right.caption("Random weights: these probabilities mean nothing.")
else:
    right.write(f"Output shape {tuple(output.shape)}: the model has no class output "
                f"(mean {output.mean():.3g}, max {output.max():.3g}). {head.description[0].upper()}"
                f"{head.description[1:]}.")
