"""CNN Audit: the frame of the dashboard (sidebar choices, navigation). Run: streamlit run dashboard.py"""

import streamlit as st

st.set_page_config(page_title="CNN Audit", page_icon=":material/biotech:", layout="wide")

from pages import links, selection, sidebar  # noqa: E402  (after set_page_config, which must come first)

PAGES = [
    st.Page("pages/model.py", title="Model", icon=":material/account_tree:", default=True),
    st.Page("pages/activations.py", title="Activations", icon=":material/grid_view:"),
    st.Page("pages/filters.py", title="Filters", icon=":material/filter_vintage:"),
    st.Page("pages/attribution.py", title="Attribution", icon=":material/center_focus_strong:"),
    st.Page("pages/pruning.py", title="Pruning", icon=":material/content_cut:"),
    st.Page("pages/quantization.py", title="Quantisation", icon=":material/compress:"),
    st.Page("pages/report.py", title="Report", icon=":material/description:"),
]

navigation = st.navigation(PAGES)
st.sidebar.title("CNN Audit")
if sidebar.sidebar() is None:
    st.stop()
try:
    with selection.user_errors("This page", stop_page=False):  # what was drawn stays; the error is shown below it
        navigation.run()
    links.share_box()
finally:  # the selection is for this run only: a kept session must not keep a dropped model alive
    st.session_state.pop("_selection", None)
