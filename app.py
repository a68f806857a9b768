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
PAGES = [  # (action the page needs, script, title, icon)
    ("classify", "pages/classify.py", "Classify", ":material/radiology:"),
    ("batch", "pages/batch.py", "Batch review", ":material/table_view:"),
    ("pacs_search", "pages/pacs.py", "PACS worklist", ":material/cloud_sync:"),
    ("metrics", "pages/metrics.py", "Model metrics", ":material/monitoring:"),
    ("instructor", "pages/instructor.py", "Instructor", ":material/school:"),
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
    # The navigation lists the pages the role allows; the others stay reachable by their address but hidden,
    # so that a direct URL runs the page, whose own auth.require refuses and audits the attempt (unregistered,
    # it would only be "Page not found", with no trace).
    allowed = {action: auth.allowed(action) for action, *_ in PAGES}
    pages = [st.Page(script, title=title, icon=icon, default=action == "classify" and allowed[action],
                     visibility="visible" if allowed[action] else "hidden")
             for action, script, title, icon in PAGES]
    if not any(allowed.values()):  # signed in with no role (every role has the default page, Classify)
        pages.insert(0, st.Page(no_role_page, title="No access", icon=":material/lock:", default=True))
    st.navigation(pages).run()
