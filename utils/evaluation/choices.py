"""The names ``test.py`` offers on its command line, free of PyTorch so that the script
parses and checks its arguments before the heavy libraries load. The modules that
implement them take their names from here (tests keep the two in step)."""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATASETS_CONFIG = os.path.join(REPO_ROOT, "configs", "datasets.yaml")
DEMO_OUTPUT = os.path.join(REPO_ROOT, "experiment", "demo")
DEMO_IMAGE_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle")
TILINGS = ("none", "naive", "pops")
CODEC_NAMES = ("jpeg", "webp", "jpeg2000", "avif", "x265", "jxl")
INTERPOLATIONS = ("pchip", "akima", "cubic")  # of the BD-rate fit
