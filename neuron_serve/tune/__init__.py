"""Feed back: what served traffic and device profiles say, turned into better compile settings."""
