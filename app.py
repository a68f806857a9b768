"""Chest X-ray toolkit: the Streamlit entry point (``streamlit run app.py``).

Pages live in ``pages/``; each shows the research-use banner and the sidebar model
selector from ``ui.py``. Icons are Material Symbols, which Streamlit bundles (no emoji font needed).
"""

import streamlit as st

st.set_page_config(page_title="Chest X-ray toolkit", page_icon="🩻", layout="wide")
st.navigation(
    [
        st.Page("pages/classify.py", title="Classify", icon=":material/radiology:", default=True),
        st.Page("pages/batch.py", title="Batch review", icon=":material/table_view:"),
        st.Page("pages/pacs.py", title="PACS worklist", icon=":material/cloud_sync:"),
        st.Page("pages/metrics.py", title="Model metrics", icon=":material/monitoring:"),
        st.Page("pages/instructor.py", title="Instructor", icon=":material/school:"),
    ]
).run()
