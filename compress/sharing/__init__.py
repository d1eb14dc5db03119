"""Cross-layer sharing: layers merged (mean, first or RegMean), factorised embeddings, ALBERT or compress's class."""
