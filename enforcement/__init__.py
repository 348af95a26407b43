"""edgeward.enforcement."""
