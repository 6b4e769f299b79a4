"""Classify page: upload images and classify them with the production model, at a threshold from thresholds.json."""

import cached_store as store
import streamlit as st

from cifake_core import dashboard_data as data
from cifake_core import tracking
from cifake_core.data import IMAGE_EXTENSIONS
from cifake_core.errors import CifakeError, RegistryError

GRID_COLUMNS = 4


def _heatmap(content: bytes):
    from cifake_core.explain import explain_image  # torch only when heatmaps are asked for

    model, lock = store.explainer(tracking_uri, pinned_uri)
    with lock:
        return data.preview(explain_image(model, content, scorer.image_size)[1])


tracking_uri = store.connect()
st.title("Classify")
try:
    pinned_uri = tracking.pin_model_uri(store.PRODUCTION_URI)
except RegistryError as error:
    st.info(
        f"There is no production model yet ({error}). `make demo` or `cifake train` trains one and makes it "
        "production when none is; an already registered version can be promoted on the Models page."
    )
    st.stop()
try:
    scorer = store.scorer(tracking_uri, pinned_uri)
except CifakeError as error:
    st.error(f"The production model cannot be used: {error}. Promote a working version on the Models page.")
    st.stop()

version = tracking.version_info(store.MODEL, pinned_uri.rsplit("/", 1)[1])
test_auc = data.number(version["tags"].get("test_auc"))
st.markdown(
    f"Answering: **`{store.MODEL}` v{version['version']}** (production), from run `{version['run_id']}`, "
    f"test AUC {test_auc:.4f}"
)
names = list(scorer.thresholds)
threshold_name = st.selectbox(
    "Threshold (chosen on validation; an image is `ai` when prob_ai >= threshold)",
    names,
    index=names.index(scorer.default_threshold),
    format_func=lambda name: (
        f"{name} = {scorer.thresholds[name]:.4f}"
        + (" (the model's default)" if name == scorer.default_threshold else "")
    ),
)
threshold = scorer.resolve_threshold(threshold_name)
uploads = st.file_uploader(
    "Images", type=sorted(extension.lstrip(".") for extension in IMAGE_EXTENSIONS), accept_multiple_files=True
)
if not uploads:
    st.caption("Upload one or many images: png, jpg, webp, bmp, gif or tiff, any size.")
    st.stop()

explain = st.toggle(
    "Show Grad-CAM heatmaps: where the evidence for `ai` is (loads PyTorch and the run's checkpoint once)"
)
contents = [upload.getvalue() for upload in uploads]
results = data.results_table([upload.name for upload in uploads], scorer.classify(contents, threshold))
grid = st.columns(GRID_COLUMNS)
for index, (content, row) in enumerate(zip(contents, results.itertuples(index=False), strict=True)):
    with grid[index % GRID_COLUMNS]:
        if row.error:
            st.error(f"**{row.file}**: {row.error}. Upload it again as a PNG, JPEG or WebP that an image viewer opens.")
            continue
        st.image(data.preview(content), width=160)
        if explain:
            st.image(_heatmap(content), width=160, caption="Grad-CAM: red = evidence for ai")
        st.markdown(
            f"**{row.file}**: `{row.label}`, prob_ai {row.prob_ai:.4f}, "
            f"threshold {threshold_name} = {row.threshold:.4f}"
        )

st.dataframe(results, hide_index=True, column_config={"prob_ai": st.column_config.NumberColumn(format="%.4f")})
st.download_button("Download CSV", results.to_csv(index=False), file_name="cifake-predictions.csv", mime="text/csv")
