"""Chest X-ray toolkit: Streamlit entry point (landing page until the app pages land)."""

import streamlit as st

from cxr_core.card import RESEARCH_USE

st.set_page_config(page_title="Chest X-ray toolkit", page_icon="🩻", layout="wide")
st.title("Chest X-ray toolkit")
st.warning(RESEARCH_USE)
st.write("Upload chest radiographs to see class probabilities with Grad-CAM heatmaps.")
