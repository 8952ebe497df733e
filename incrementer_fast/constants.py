"""Values the whole package shares, each defined once."""

IGNORE_INDEX = 255
"""The label no loss and no metric counts: VOC's void border, crop padding, uncertain pseudo-labels."""

NEW_TOKEN_INITS = ("trunc_normal", "background")
"""How ``Incrementer.add_classes`` initialises the class tokens of a new step (see ``incrementer_fast.model``)."""
