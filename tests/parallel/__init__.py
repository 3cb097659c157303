"""mindlora.parallel: the layout facts (which rank holds which slice)."""
