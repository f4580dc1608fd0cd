"""Report page: the whole audit in one self-contained HTML file to attach to a ticket or send by mail."""

import streamlit as st

from audit import attribution, models, report
from pages import candidates, common, jobs, links, quantization_jobs
from pages.selection import current, set_key, user_errors, what_these_mean

selection = current()
loaded = selection.model
st.title("Report")
what_these_mean("Report")
st.caption("One HTML file that opens offline: the model and its layer table, dead filters over the image set, "
           "filter galleries, attribution overlays and pruning candidates. The same file as "
           "`cnn-audit report`.")

convs = models.conv_layers(loaded.model)
left, right = st.columns(2)
late = common.last_map_conv(loaded.fingerprint, loaded.source)
layers = links.multiselect(left, "Gallery layers", convs, default=list(dict.fromkeys([convs[0], late])),
                           param="report_layers", key=f"report_layers_{loaded.fingerprint}")
count = links.number(left, "Filters per gallery", 1, 32, 8, slider=True, param="report_filters",
                     key="report_filters")
steps = links.number(left, "Ascent steps (0: each layer's default)", 0, 200, 0, slider=True, param="report_steps",
                     key="report_steps", help="On a CPU a deep layer takes seconds per filter and step count.")
shown = links.number(right, "Images with attribution overlays", 1, 16, 4, slider=True, param="report_images",
                     key="report_images")
methods = links.multiselect(right, "Attribution methods", list(attribution.METHODS), default=["Grad-CAM", "Saliency"],
                            param="report_methods", key="report_methods")
st.markdown("**Pruning candidates** (the Pruning page's choice: the same link lists the same filters)")
criterion, target = candidates.choose(st)
options = report.ReportOptions(gallery_layers=tuple(layers), gallery_filters=int(count), gallery_steps=int(steps),
                               attribution_images=int(shown), methods=tuple(methods), prune_criterion=criterion,
                               prune_target=target.kind, prune_share=target.value, fit=selection.fit, preprocessing=selection.preprocessing,
                               precision=selection.precision)
key = set_key(selection, "report", options)
pressed = st.button("Build the report", type="primary", key="report_go")
report_passes = (3 * len(selection.image_set) + len(layers) * int(count) * 3 * (int(steps) or 40)
                 + int(shown) * len(methods) * 30
                 + jobs.traces_as_passes(selection, 2 * quantization_jobs.CONVERSION_TRACES * options.quantize))
if jobs.job_shown(selection, "report", pressed, key, jobs.has_result(key), report_passes):
    def build():
        with jobs.model_job(selection, "Building the report", "report") as progress:
            return report.build(loaded, selection.image_set, options, progress)

    with user_errors():
        page = jobs.shared_result(key, build)
    name = f"cnn_audit_{loaded.file_stem}.html"
    st.success(f"The report is ready: {len(page.encode()) / 2**20:.1f} MB, {len(selection.image_set)} images.")
    st.download_button("Download the report (HTML)", page, name, "text/html", type="primary", key="report_download")
    if st.toggle("Preview here", key="report_preview"):
        st.iframe(page, height=900)
else:
    st.info("Choose what goes in and press **Build the report**.")
