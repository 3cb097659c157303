"""Which rank holds which slice: the one owner of the parallel layout (see :mod:`.layout`)."""
