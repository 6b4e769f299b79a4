"""The cifake dashboard: training runs, registered models and a classifier, on the same MLflow store as training.

The store is MLFLOW_TRACKING_URI, or `mlflow.db` at the project root (`tracking.configure_tracking`). The pages
in `pages/` only lay out what `cifake_core.dashboard_data` shapes from `cifake_core.tracking`'s answers.

Usage:
    streamlit run dashboard/app.py        # or: cifake dashboard --port 8501
"""

import cached_store as store
import streamlit as st

st.set_page_config(page_title="cifake dashboard", page_icon=":material/image_search:", layout="wide")
tracking_uri = store.connect()
page = st.navigation(
    [
        st.Page("pages/runs.py", title="Runs", icon=":material/table_chart:", default=True),
        st.Page("pages/models.py", title="Models", icon=":material/deployed_code:"),
        st.Page("pages/classify.py", title="Classify", icon=":material/image_search:"),
    ]
)
st.sidebar.caption(
    f"Tracking store `{tracking_uri}`  \nExperiment `{store.EXPERIMENT}`, registered model `{store.MODEL}`"
)
if problem := store.problem(tracking_uri):
    st.error(
        f"The tracking store `{tracking_uri}` cannot be read ({problem}). Point MLFLOW_TRACKING_URI at the store "
        "training writes to (for example `sqlite:///$PWD/mlflow.db`) and restart the dashboard."
    )
    st.stop()
page.run()
