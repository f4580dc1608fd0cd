"""Model page: what the model is, its layer table, where its parameters are, what it says of the image."""

import numpy as np
import pandas as pd
import streamlit as st

from audit import charts
from pages import common, links, markup
from pages.selection import current, labels_of, section, user_errors, what_these_mean

selection = current()
loaded = selection.model
model = loaded.model

st.title(f"Model: {markup.escape(loaded.title)}")
what_these_mean("Model")
st.caption(markup.escape(loaded.description))

table = common.layer_table(loaded.fingerprint, loaded.source)
leaves = table[~table.is_container]
columns = st.columns(5)
columns[0].metric("Layers", int((~leaves.is_operation).sum()),
                  help="Layers of the model, nested models entered. The table also lists the keras.ops calls of its "
                       "graph (is_operation: `inputs + x`, a padding): they make maps you can look at too.")
columns[1].metric("Conv layers", int(leaves.is_conv.sum()))
columns[2].metric("Parameters", f"{int(leaves.params.sum()):,}")
columns[3].metric("Input", "×".join(str(s) for s in model.inputs[0].shape[1:]))
columns[4].metric("Preprocessing", selection.preprocessing)

if selection.head.is_classifier:
    with section("Accuracy on the images"):
        found = common.knowledge(selection, ask=True)  # None until its button is pressed, when it is costly
        if found is not None and labels_of(selection) is not None:
            st.metric("Accuracy on the images", f"{found['accuracy']:.1%}",
                      help="Top-1 accuracy of the explained output on the image set, with its Wilson 95% interval.")
            st.caption(common.knowledge_sentence(selection, found)[0].upper() + common.knowledge_sentence(
                selection, found)[1:] + ".")
        elif found is not None:
            st.caption("Accuracy needs labelled images (demo shapes, or a zip with one folder per class); "
                       + common.knowledge_sentence(selection, found) + ".")
        if found is not None and found["at_chance"]:
            common.warn_if_at_chance(selection)

if selection.head.is_classifier and loaded.preprocessing_assumed:
    st.subheader("Which preprocessing does it take?")
    with section("Weighing the preprocessings"):
        common.preprocessing_choice(selection)

st.subheader("Layers")
show_conv_only = links.toggle(st, "Convolutional layers only", param="conv_only", key="model_conv_only")
shown = table[table.is_conv] if show_conv_only else table
st.dataframe(
    common.displayable(shown), hide_index=True, width="stretch",
    column_config={
        "params": st.column_config.NumberColumn("params", format="localized", width="medium"),
        "is_conv": st.column_config.CheckboxColumn("conv"),
        "is_container": st.column_config.CheckboxColumn("nested model"),
        "is_operation": st.column_config.CheckboxColumn("keras.ops"),
    },
)
st.download_button("Download the layer table (CSV)", common.displayable(table).to_csv(index=False),
                   file_name=f"{loaded.file_stem}_layers.csv", mime="text/csv")

st.subheader("Parameters per layer")
with_params = leaves[leaves.params > 0]
figure = charts.layer_groups(with_params, "params", "type", layer="path", value_title="parameters",
                             log=links.toggle(st, "Log scale", param="log", key="model_log"), height=380)
st.plotly_chart(figure, width="stretch")
st.caption(f"{len(with_params):,} layers with weights, in network order (hover a bar for its name). Most parameters: "
           f"{markup.escape(charts.top_layers(with_params, 'params', layer='path'))}.")

st.subheader("On the current image")
left, right = st.columns([1, 2])
left.image(selection.image.pixels, caption=markup.escape(selection.image.name + (
    f" ({selection.image.label})" if selection.image.label else "")))
with user_errors("The prediction"):
    output = selection.predict()
head = selection.head
if head.is_classifier:
    names, origin = selection.class_names_and_origin()
    top = np.argsort(output)[::-1][:5]
    right.dataframe(pd.DataFrame({"class": [names[i] for i in top], "probability": output[top]}), hide_index=True,
                    column_config={"probability": st.column_config.ProgressColumn(
                        "probability", min_value=0.0, max_value=1.0, format="%.3f")})
    right.caption(markup.escape(head.description[0].upper() + head.description[1:]) + "."
                  + (f" Class names from {origin}." if origin and origin != "the model" else ""))
    if loaded.untrained:
        right.caption("Random weights: these probabilities mean nothing.")
else:
    right.write(f"Output shape {tuple(output.shape)}: the model has no class output "
                f"(mean {output.mean():.3g}, max {output.max():.3g}). "
                f"{markup.escape(head.description[0].upper() + head.description[1:])}.")
