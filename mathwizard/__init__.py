"""Math Wizard: MM_Math → teacher rewrite → SFT → DPO → evaluation → Hub, as plain functions."""

__version__ = "0.1.0"
