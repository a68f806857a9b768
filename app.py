"""Chest X-ray toolkit: the Streamlit entry point (``streamlit run app.py``).

Pages live in ``pages/``; each shows the research-use banner and the sidebar model
selector from ``ui.py``.
"""

import streamlit as st

st.set_page_config(page_title="Chest X-ray toolkit", page_icon="🩻", layout="wide")
st.navigation(
    [
        st.Page("pages/classify.py", title="Classify", icon="🩻", default=True),
        st.Page("pages/batch.py", title="Batch review", icon="🗂️"),
        st.Page("pages/metrics.py", title="Model metrics", icon="📈"),
        st.Page("pages/instructor.py", title="Instructor", icon="🎓"),
    ]
).run()
