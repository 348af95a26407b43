"""edgeward.transport."""
