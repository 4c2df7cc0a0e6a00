"""Publishing a run: repo folders with their cards (model, SFT data, DPO data) and the Hub upload.

`lineage` reads what the run's stages recorded, `dataset_card` and `model_card` lay out one repo folder
each, and `hub` resolves the token and pushes a folder idempotently. `mathwizard.stages.publish` chains them.
"""
