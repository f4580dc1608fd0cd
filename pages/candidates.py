"""The pruning choice that the Pruning and Report pages share: a criterion and a target (a share of channels to
cut, per layer or over the model, or a share of parameters or multiply-adds to keep), carried in the link and
kept for the session, so both pages propose the same filters (audit.pruning.selection_for)."""

import streamlit as st

from audit import pruning
from pages import links

_KEPT = "_pruning_choice"  # the last choice, kept when the user moves between the two pages
_WIDGETS = {"criterion": "prune_criterion", "target": "prune_target", "share": "prune_share", "keep": "prune_keep"}


def choose(where, scores=None) -> tuple[str, pruning.Target]:
    """The criterion and the target, drawn on `where`; a criterion without scores for this model (Taylor without
    classes, APoZ without a zero floor anywhere) is not offered."""
    offered = [code for code in pruning.CRITERIA if scores is None or code == "dead"
               or (code in scores and scores[code].notna().any())]
    kept = st.session_state.get(_KEPT, {})
    # another page offered other criteria (the Report page offers all): Streamlit takes the criterion box for a
    # new widget and resets it, and the boxes it disables with it, so the choice is put back before they are drawn
    moved = kept.get("offered") not in (None, offered)
    for name, key in _WIDGETS.items():
        if (key not in st.session_state or moved) and name in kept and (name != "criterion" or kept[name] in offered):
            st.session_state[key] = kept[name]
    left, middle, right = where.columns([2, 2, 2])
    criterion = links.selectbox(left, "Pruning criterion", offered, param="criterion", key="prune_criterion",
                                format_func=pruning.CRITERIA.get)
    kind = links.selectbox(middle, "Target", list(pruning.TARGET_KINDS), param="prune_target", key="prune_target",
                           format_func=lambda code: pruning.TARGET_KINDS[code].capitalize(),
                           disabled=criterion == "dead",
                           help="Whole dependency groups go, least important first, until the target is met: a "
                                "share cut is the share of channels really removed, coupled ones included.")
    if kind in ("layer", "global"):
        value = links.number(right, "Share to cut", 0.0, 0.9, 0.3, step=0.05, slider=True, param="share",
                             key="prune_share", disabled=criterion == "dead")
    else:
        value = links.number(right, "Share to keep", 0.1, 1.0, 0.5, step=0.05, slider=True, param="keep",
                             key="prune_keep", disabled=criterion == "dead")
    if criterion == "dead":
        right.caption("Every dead or near-dead filter is proposed, with its group: no target to set.")
    st.session_state[_KEPT] = {**kept, "offered": offered, "criterion": criterion, "target": kind,
                               "share" if kind in ("layer", "global") else "keep": float(value)}
    return criterion, pruning.Target(kind, float(value))
