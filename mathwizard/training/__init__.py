"""What the SFT and DPO stages share: data conversion, trainer arguments, metrics, plots and checkpoint resume."""
