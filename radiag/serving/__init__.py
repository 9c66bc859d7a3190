"""Online serving of a run's models: one Ray Serve application (`radiag serve`)."""
