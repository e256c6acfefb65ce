"""Vision-language models: one module per family under `families/`, looked up by `registry`."""
