"""eapcore: Edge Attribution Patching of base vs RL-tuned language models (no Streamlit here)."""
