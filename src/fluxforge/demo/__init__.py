"""The built-in demo model: a tiny FLUX.2 (variant `fluxforge-demo`) trained in this repository on procedural
scenes (`fluxforge.demo.data`) by `tools/train_demo.py`, shipped in the diffusers layout under `weights/`."""

from pathlib import Path

DEMO_PATH = Path(__file__).with_name("weights")
DEMO_NOTICE = "using the built-in demo model; pass -m for a FLUX.2 checkpoint"
