"""Names the in-context model's options choose from (a light leaf: the recipe schema checks them without
importing torch)."""

BLOCK_GROUPS = ("down", "mid", "up")  # U-Net block groups that can get reference attention
QUERY_MODES = ("shared", "self")  # how reference attention makes its query
