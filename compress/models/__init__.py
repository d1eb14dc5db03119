"""Models as transformers sees them: loading and checking, compress's own BERT class, masks and measurements."""
