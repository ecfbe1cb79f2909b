import os

# Evaluation tests never touch the network (tests/conftest.py sets the same; kept for standalone runs).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
