"""edgeward.actors."""
