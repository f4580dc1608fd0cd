"""The pruning choice that the Pruning and Report pages share: a criterion and a share, carried in the link and
kept for the session, so both pages list the same candidates (audit.pruning.candidates)."""

import streamlit as st

from audit import pruning
from pages import links

_KEPT = "_pruning_choice"  # the last choice, kept when the user moves between the two pages


def choose(where, scores=None) -> tuple[str, float]:
    """The criterion and the share of each layer to cut, drawn on `where`; a criterion without scores for this
    model (Taylor without classes, APoZ without a zero floor anywhere) is not offered."""
    offered = [code for code in pruning.CRITERIA if scores is None or code == "dead"
               or (code in scores and scores[code].notna().any())]
    kept = st.session_state.get(_KEPT, {})
    if "prune_criterion" not in st.session_state and kept.get("criterion") in offered:
        st.session_state["prune_criterion"] = kept["criterion"]
    if "prune_share" not in st.session_state and "share" in kept:
        st.session_state["prune_share"] = kept["share"]
    left, right = where.columns([2, 1])
    criterion = links.selectbox(left, "Pruning criterion", offered, param="criterion", key="prune_criterion",
                                format_func=pruning.CRITERIA.get)
    share = links.number(right, "Share of each layer to cut", 0.0, 0.9, 0.3, step=0.05, slider=True, param="share",
                         key="prune_share", disabled=criterion == "dead",
                         help="The lowest-scored share of each layer's filters is proposed.")
    if criterion == "dead":
        right.caption("Every dead or near-dead filter is proposed: no share to set.")
    st.session_state[_KEPT] = {"criterion": criterion, "share": float(share)}
    return criterion, float(share)
