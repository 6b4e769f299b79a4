"""Models page: registered versions with aliases, tags and metrics; promote one or roll back, after a confirmation."""

import cached_store as store
import streamlit as st

from cifake_core import dashboard_data as data
from cifake_core.errors import CifakeError

PENDING = "models.pending_version"
DONE = "models.done"

tracking_uri = store.connect()
st.title("Models")
if done := st.session_state.pop(DONE, None):
    st.success(done)
versions = store.versions(tracking_uri)
if not versions:
    st.info(
        f"No version of `{store.MODEL}` is registered in `{tracking_uri}` yet. Training registers one: run "
        "`make demo` or `cifake train`, with MLFLOW_TRACKING_URI pointing at this store."
    )
    st.stop()

production = data.production_version(versions)
if production:
    st.markdown(f"**Production:** `{store.MODEL}` v{production}")
else:
    st.warning("No version is production: promote one below, and Classify will use it.")
st.dataframe(
    data.versions_table(versions, store.runs(tracking_uri)),
    hide_index=True,
    column_config={
        "production": st.column_config.CheckboxColumn("production"),
        "created": st.column_config.DatetimeColumn("created (UTC)", format="YYYY-MM-DD HH:mm"),
        **{name: st.column_config.NumberColumn(format="%.4f") for name in ("val_auc", "test_auc", "test_f1")},
    },
)

st.subheader("Promote or roll back")
numbers = [version["version"] for version in versions]
choice = st.selectbox(
    "Version", numbers, format_func=lambda number: f"v{number}" + (" (production)" if number == production else "")
)
verb = data.promotion_verb(choice, production)
if verb == "keep":
    st.caption(f"v{choice} is production already.")
elif st.button(f"{verb.capitalize()} to v{choice}..."):
    st.session_state[PENDING] = choice

pending = st.session_state.get(PENDING)
if pending:
    st.warning(
        f"{data.promotion_verb(pending, production).capitalize()}: `{store.MODEL}@production` will point to "
        f"v{pending} instead of v{production or '-'}. Classify answers with it at once; a running `cifake serve` "
        "keeps its version until it is restarted."
    )
    confirm_column, cancel_column = st.columns(2)
    if confirm_column.button("Confirm", type="primary"):
        del st.session_state[PENDING]
        # pipeline imports torch, which nothing else in the dashboard needs: load it only for a promotion.
        from cifake_core import pipeline

        try:
            previous = pipeline.promote(store.MODEL, pending, store.EXPERIMENT)
        except CifakeError as error:
            st.error(f"Could not move production to v{pending}: {error}")
        else:
            store.forget_queries()
            st.session_state[DONE] = f"`{store.MODEL}@production`: v{previous or '-'} -> v{pending}"
            st.rerun()
    if cancel_column.button("Cancel"):
        del st.session_state[PENDING]
        st.rerun()
