"""mae-transfer."""
