"""edgeward.simulator."""
