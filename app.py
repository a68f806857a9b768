"""Chest X-ray toolkit: the Streamlit entry point (``streamlit run app.py``).

Pages live in ``pages/``; each shows the research-use banner and the sidebar model selector from
``ui.py``. The navigation holds only the pages the user's role allows (``auth.py``); with sign-in
configured and nobody signed in, every URL shows the sign-in screen. Icons are Material Symbols,
which Streamlit bundles (no emoji font needed).
"""

import streamlit as st

import auth
import ui

st.set_page_config(page_title="Chest X-ray toolkit", page_icon="🩻", layout="wide")
PAGES = [  # (action the page needs, page)
    ("classify", st.Page("pages/classify.py", title="Classify", icon=":material/radiology:", default=True)),
    ("batch", st.Page("pages/batch.py", title="Batch review", icon=":material/table_view:")),
    ("pacs_search", st.Page("pages/pacs.py", title="PACS worklist", icon=":material/cloud_sync:")),
    ("metrics", st.Page("pages/metrics.py", title="Model metrics", icon=":material/monitoring:")),
    ("instructor", st.Page("pages/instructor.py", title="Instructor", icon=":material/school:")),
]


def sign_in_page() -> None:
    ui.research_banner()
    auth.sign_in_ui()


def no_role_page() -> None:
    ui.research_banner()
    st.title("No access")
    st.error(auth.refusal("classify"), icon="🔒")


if auth.user_or_stop() is None:  # (stops with the reason when the secrets file cannot be read)
    st.navigation([st.Page(sign_in_page, title="Sign in", icon=":material/login:", default=True)],
                  position="hidden").run()
else:
    auth.sidebar_ui()
    pages = [page for action, page in PAGES if auth.allowed(action)]
    if not pages:  # signed in with no role (every role has the default page, Classify)
        pages = [st.Page(no_role_page, title="No access", icon=":material/lock:", default=True)]
    st.navigation(pages).run()
