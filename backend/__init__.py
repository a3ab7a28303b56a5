"""Label Studio ML backend around the one-shot engine (``matcher_core``)."""
