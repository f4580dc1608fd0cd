"""Quantisation page: what int8 does to the model, layer by layer, and the integer model itself, measured."""

import pandas as pd
import plotly.express as px
import streamlit as st

from audit import charts, quantization
from pages import common, jobs, links, markup, quantization_jobs, smaller_model
from pages.selection import current, stop, user_errors

CLIPPED_SHARE = 0.001  # a layer whose held-out values fall outside its calibrated range more often is named

selection = current()
loaded = selection.model
st.title("Quantisation")
st.caption("8-bit integers as TensorFlow Lite runs them: weights symmetric per output channel, activations "
           "asymmetric per tensor over ranges calibrated on your images. Pruning says which filters can go; this "
           "says whether what is left survives int8, and measures the integer model. Computed in float32.")
common.warn_if_at_chance(selection)

count = len(selection.image_set)
if count < 2:
    st.info("Quantising needs at least 2 images: some to calibrate the ranges, others to measure on.")
    stop()
settings = st.columns(4)
held_out = links.number(settings[0], "Held-out images", 1, max(count - 1, 1), min(max(count // 2, 1), 300),
                        param="quant_held_out", key="quant_held_out",
                        help="Measured on, never calibrated on: stratified by class.")
calibration = links.number(settings[1], "Calibration images", 1, max(count - held_out, 1),
                           min(max(count - held_out, 1), 200), param="quant_calibration", key="quant_calibration",
                           help="The images whose activations set each tensor's range (a few hundred is typical).")
keep_params = links.selectbox(settings[2], "Prune first", [1.0, 0.7, 0.5, 0.3], param="quant_prune",
                              key="quant_prune", show=lambda v: "no" if v == 1.0 else f"to {v:.0%} of the parameters",
                              help="Prune, then quantise: BN scale (else L1) to the share, BatchNorm recalibrated.")
others = links.toggle(settings[3], "All layers but one", param="quant_others", key="quant_others",
                      help="Sensitivity with every other layer int8 too: what keeping one layer in float buys.")
tested_indices = quantization_jobs.split(selection, calibration, held_out)[1]
st.caption(f"Measured on {common.sample_sentence(selection, held_out)}; calibrated on "
           f"{markup.count(calibration, 'other image')}.")
if held_out < 30:
    st.warning(f"{markup.count(held_out, 'held-out image')}: agreement and accuracy below carry wide intervals "
               "(shown in brackets); add images before trusting a difference of a few percent.",
               icon=":material/info:")

# --- dynamic ranges -------------------------------------------------------------------------------------------
st.subheader("Dynamic ranges")
key = quantization_jobs.ranges_key(selection, calibration, held_out, keep_params)
if not jobs.started(selection, f"Measure the ranges on {calibration:,} images", key, calibration, "quant_ranges",
                    images=calibration):
    stop()
with user_errors("Measuring the ranges"):
    frame, samples = quantization_jobs.ranges(selection, calibration, held_out, keep_params)
problems = quantization.problems(frame)
chart = problems.assign(weights=problems.weights_outlier_ratio.fillna(0),
                        activations=problems.activations_outlier_ratio.fillna(0),
                        tail=problems.activations_tail.fillna(0))
figure = charts.layer_bars(chart, ["weights", "activations", "tail"],
                           {"weights": "#1f77b4", "activations": "#ff7f0e", "tail": "#2ca02c"}, barmode="group",
                           names={"weights": "widest weight channel / median", "activations":
                                  "widest activation channel / median", "tail": "activation max / 99.9th percentile"},
                           value_title="ratio", log=True, height=340)
st.plotly_chart(figure, width="stretch")
flagged = problems[problems.flag != ""]
st.caption(f"Per layer, what breaks one scale per tensor: a channel {quantization.OUTLIER_RATIO:.0f}x its "
           f"layer's median or an activation maximum {quantization.TAIL_RATIO:.0f}x its 99.9th percentile "
           "is flagged. Activations are measured where the integer model materialises them (after a conv's "
           "BatchNorm and ReLU, which TensorFlow Lite fuses into the conv).")
if len(flagged):
    st.dataframe(flagged[["layer", "flag"]], hide_index=True, width="stretch")
else:
    st.caption("No layer flagged.")
layers = list(problems.layer)
shown_layer = links.selectbox(st, "Histograms of", layers, param="quant_layer", key="quant_layer")
left, right = st.columns(2)
layer_rows = frame[frame.layer == shown_layer]
point = layer_rows[layer_rows.kind == "activations"].measured_at.iloc[0]
left.plotly_chart(px.histogram(x=samples[point], nbins=80, log_y=True, height=300,
                               labels={"x": f"activations at {point} (a sample)"}).update_layout(margin=dict(t=10)),
                  width="stretch")
right.plotly_chart(px.bar(layer_rows[layer_rows.kind == "weights"], x="channel", y=["min", "max"], barmode="overlay",
                          height=300, labels={"value": "weight range per output channel"}
                          ).update_layout(margin=dict(t=10)), width="stretch")

# --- sensitivity ----------------------------------------------------------------------------------------------
st.subheader("Which layers int8 hurts")
# a pass per run (one traced graph with a switch per layer); one at a time, also the float pass that measures every
# layer's own rounding (its int8 twins beside it: about two passes); the traces of both graphs (both branches)
passes = ((len(layers) + 1 if others else len(layers) + 2) * held_out + held_out + calibration
          + jobs.traces_as_passes(selection, 2 if others else 4))
pressed = st.button(f"Simulate int8 layer by layer ({jobs.estimate(selection, passes)} here)", key="quant_sensitivity")
key = quantization_jobs.sensitivity_key(selection, calibration, held_out, keep_params, others)
if jobs.job_shown(selection, "quant_sensitivity", pressed, key, jobs.has_result(key), passes):
    with user_errors("Simulating int8"):
        table = quantization_jobs.sensitivity(selection, calibration, held_out, keep_params, others)
    measure = "feature_error" if "feature_error" in table else "kl"
    st.plotly_chart(charts.layer_bars(table[table.layer != "(all)"], [measure], {measure: "#d62728"},
                                      value_title=measure.replace("_", " "), height=320,
                                      hover=[c for c in ("agreement", "accuracy", "rounding_steps", "clipped")
                                             if c in table]), width="stretch")
    worst = table[table.layer != "(all)"].sort_values(measure, ascending=others).head(3)
    st.caption(("Every layer int8 but the one named: the lower its bar, the more keeping that layer in float "
                "buys. " if others else "One layer int8 at a time, the others float. ")
               + f"Simulated on the {held_out:,} held-out images. Candidates to keep in float: "
               + markup.escape(", ".join(worst.layer)) + ".")
    if "clipped" in table:
        clipping = table[table.clipped > CLIPPED_SHARE].sort_values("clipped", ascending=False)
        named = ", ".join(f"{row.layer} ({row.clipped:.1%})" for row in clipping.head(5).itertuples())
        more = f" and {markup.count(len(clipping) - 5, 'more layer')}" if len(clipping) > 5 else ""
        st.caption("Rounding error in steps of each layer's int8 scale: rounding alone gives at most 0.29 "
                   "(1/sqrt(12)). " + (
                       f"Held-out values fall outside the calibrated range in {markup.escape(named)}{more}: those "
                       "are clipped in int8; calibrate on more (or more varied) images."
                       if len(clipping) else f"No layer clips more than {CLIPPED_SHARE:.1%} of its held-out values."))
    with st.expander("The table"):
        st.dataframe(table, hide_index=True, width="stretch", column_config=common.number_columns(table, 4))

# --- the integer model ----------------------------------------------------------------------------------------
st.subheader("The integer model")
keep = tuple(links.multiselect(st, "Keep in float", layers, param="quant_keep", key="quant_keep", default=[],
                               help="Their weights and outputs stay float32 (TensorFlow Lite's selective "
                                    "quantisation); the others are int8."))
passes = (2 * calibration + 3 * held_out + 2 * quantization_jobs.THROUGHPUT_PASSES
          + jobs.traces_as_passes(selection, 2 * quantization_jobs.CONVERSION_TRACES))  # int8 and float32 files
pressed = st.button(f"Convert and measure ({jobs.estimate(selection, passes)} here)", key="quant_convert",
                    type="primary")
key = quantization_jobs.integer_key(selection, calibration, held_out, keep_params, keep)
if jobs.job_shown(selection, "quant_convert", pressed, key, jobs.has_result(key), passes):
    with user_errors("Converting to int8"):
        found = quantization_jobs.integer_model(selection, calibration, held_out, keep_params, keep)
    rows = []
    for name, result in (("float32 .tflite", found["floated"]), ("int8 .tflite", found["measured"])):
        row = {"model": name, "MB": result["bytes"] / 2**20, "ms per image (batch 1)": 1000 * result["seconds_per_image"],
               "images/s (batch 32)": result["images_per_second"]}
        for measure in ("agreement", "accuracy"):
            if measure in result:
                row[measure] = (f"{result[measure]:.1%} [{result[measure + '_low']:.1%}, "
                                f"{result[measure + '_high']:.1%}]")
        row["relative error"] = result["relative_error"]
        rows.append(row)
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config=common.number_columns(pd.DataFrame(rows), 3))
    floated, measured = found["floated"], found["measured"]
    st.caption(f"{floated['bytes'] / measured['bytes']:.1f}x smaller; here "
               f"{floated['seconds_per_image'] / measured['seconds_per_image']:.2f}x the speed at batch 1 and "
               f"{measured['images_per_second'] / floated['images_per_second']:.2f}x at batch 32, with the "
               "LiteRT interpreter on this server's CPU (a phone or a GPU delegate differs: measure there). "
               + ("Agreement: each file's top-1 against the Keras model's on the same held-out images; " if
                  "agreement" in measured else "")
               + "relative error: |file's outputs - Keras model's| / |Keras model's| over the held-out images.")
    if keep_params < 1:
        st.caption(f"Both files are of the model pruned to {keep_params:.0%} of its parameters ("
                   f"{found['parameters']:,} kept), its BatchNorms recalibrated but not fine-tuned: the Pruning page "
                   "fine-tunes a cut and compares it with a random one; upload the model you would ship to quantise it.")
    if found["forgets"] is not None:
        smaller_model.forgetting(selection, found["forgets"], tested_indices, "the int8 model")
    st.download_button("Download the int8 model (.tflite)", found["int8"], "model.int8.tflite",
                       "application/octet-stream", type="primary")
    st.download_button("Download the float32 .tflite", found["float32"], "model.float32.tflite",
                       "application/octet-stream")
