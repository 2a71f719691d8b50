"""The near-duplicate thresholds, in a module light enough for the command line to import at start-up.

Chosen on the tuning set of scripts/make_duplicates_set.py and checked on its holdout set (docs/duplicates.md).
The cosine only proposes pairs, so it sits below every copy's (0.93 with the bundled shapes model); the pixel
threshold sits in the tuning set's gap between copies (>= 0.936) and pictures with a colour changed or the frame
panned (<= 0.855), near the copies' side to leave room for stronger copies.
"""

DEFAULT_THRESHOLD = 0.85  # cosine similarity at which a pair is compared pixel by pixel
DEFAULT_PIXEL_THRESHOLD = 0.91  # pixel similarity (retrieval.pixel_print) at which a compared pair is copies
