"""The new-run wizard: model, dataset, preset, plan, launch. One module per step."""
